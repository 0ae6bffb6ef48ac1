-- Named queries, loaded once by receiver.db. Placeholders are asyncpg's $1…$n.

-- name: record_events
-- The one way in (record_events_v7, sql/0022_1_pre_body_names.sql): a group of rows (one
-- receiver.event_row_v3[]: deliveries, imports, reprocessings) in one statement and
-- one transaction; outcomes (and tokens revoked, for revocations) come back in order. `recheck`: nothing was
-- written, the row's prefix is to be checked in memory first (lifecycle/store.py).
SELECT outcome, revoked FROM receiver.record_events_v7($1::receiver.event_row_v3[], $2, $3);

-- name: confirm_replicated
-- A write whose commit waits for the synchronous standby, as every write's does: once
-- it returns, everything committed before it is on the standby too (lifecycle/store.py,
-- before a duplicate's 200). It locks one of 16 client_locks rows whose keys no client
-- id can take ('/' is in none), created the first time: a row lock is logged, so the
-- commit waits (a transaction id alone is not); 16 rows, so the duplicates of many
-- senders do not all queue behind one lock.
SELECT receiver.lock_clients_v1(ARRAY['/replicated/' || floor(random() * 16)::int]);

-- name: revocations_to_check
-- Remembered revocations of client $1 in environment $2 whose prefix is longer than
-- the stored prefix $3 and starts with it: the onboarding's token is checked against
-- each in memory.
SELECT event_key, token_prefix FROM receiver.revocations
 WHERE client_id = $1 AND environment = $2
   AND length(token_prefix) > length($3) AND starts_with(token_prefix, $3);

-- name: tokens_to_check
-- Tokens of client $1 in environment $2, not revoked, whose stored prefix is the start
-- of revocation prefix $3 (longer than it): each is opened and checked in memory.
SELECT id::text AS id, token_sealed FROM receiver.tokens
 WHERE client_id = $1 AND environment = $2 AND status <> 'revoked'
   AND length($3) > length(prefix) AND receiver.prefix_may_match($3, prefix);

-- name: ping
-- Is the database answering (readiness probe)?
SELECT 1;

-- name: applied_migrations
-- Migration names already applied (readiness: is the schema current?).
SELECT name FROM receiver.schema_migrations;

-- name: migration_status
-- Applied migrations and when (`receiver migrate --status`).
SELECT name, applied_at FROM receiver.schema_migrations ORDER BY name;

-- name: migration_lock
-- Replicas bootstrapping a new database at once take turns (session advisory lock:
-- before the first migration there is no table to lock).
SELECT pg_advisory_lock(hashtextextended('receiver.migrate', 0));

-- name: migration_try_lock
-- migration_lock if free now (else say who holds it, then wait for it).
SELECT pg_try_advisory_lock(hashtextextended('receiver.migrate', 0));

-- name: migration_table_lock
-- A migration's transaction takes turns with other migrators' (a lock on the
-- migrations table: only roles with a privilege on it, never the cache reader).
LOCK TABLE receiver.schema_migrations IN SHARE ROW EXCLUSIVE MODE;

-- name: migration_table_try_lock
-- migration_table_lock if free now.
LOCK TABLE receiver.schema_migrations IN SHARE ROW EXCLUSIVE MODE NOWAIT;

-- name: migration_lock_holder
-- Who holds the migrations table's lock, or (before it exists) the bootstrap's
-- advisory lock.
WITH k AS (SELECT hashtextextended('receiver.migrate', 0) AS v)
SELECT a.pid AS holder_pid, a.usename::text AS holder_role,
       a.application_name AS holder_application, host(a.client_addr) AS holder_address,
       a.backend_start::text AS holder_since
  FROM pg_locks l
  CROSS JOIN k
  JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.granted AND l.pid <> pg_backend_pid()
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND ((l.locktype = 'relation' AND l.relation = to_regclass('receiver.schema_migrations')
         AND l.mode NOT IN ('AccessShareLock', 'RowShareLock'))
        OR (l.locktype = 'advisory' AND l.objsubid = 1
            AND l.classid = ((k.v >> 32) & 4294967295)::oid
            AND l.objid = (k.v & 4294967295)::oid))
 LIMIT 1;

-- name: lock_timeout
-- This session's lock_timeout ('0': none), e.g. while waiting for migration_lock.
SELECT set_config('lock_timeout', $1, false);

-- name: migration_unlock
-- Releases migration_lock.
SELECT pg_advisory_unlock(hashtextextended('receiver.migrate', 0));

-- name: session_settings
-- The settings a session got (behind a pooler: the role's and the database's).
SELECT name, setting FROM pg_settings
 WHERE name IN ('synchronous_commit', 'statement_timeout', 'lock_timeout');

-- name: migration_table_exists
-- Whether the migrations table is there yet.
SELECT to_regclass('receiver.schema_migrations') IS NOT NULL;

-- name: migration_bootstrap
-- The schema and the migrations table, before the first migration.
CREATE SCHEMA IF NOT EXISTS receiver;
CREATE TABLE IF NOT EXISTS receiver.schema_migrations (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: migration_record
-- Records one applied migration and its checksum.
INSERT INTO receiver.schema_migrations (name, checksum) VALUES ($1, $2);

-- name: migration_forget
-- Squashed migrations give way to the baseline that replaces them.
DELETE FROM receiver.schema_migrations WHERE name = ANY($1::text[]);

-- name: migration_checksum
-- The checksum migration $1 was applied with (none: not applied).
SELECT checksum FROM receiver.schema_migrations WHERE name = $1;

-- name: roles_missing
-- Of the group roles $1, those missing from the cluster; whether the current role may
-- create them (CREATEROLE or superuser); its name.
SELECT array(SELECT r FROM unnest($1::text[]) AS r
              WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)) AS missing,
       (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user)
           AS may_create,
       current_user AS role;

-- name: migration_checksums
-- Applied migrations and their checksums (an edited file is refused).
SELECT name, checksum FROM receiver.schema_migrations;

-- name: token_inventory
-- The inventory operators list: metadata only, never a token; filters optional.
-- link_invalid_at: when a partner application last reported that this token, though
-- active, got a second 401 (the client needs re-linking).
SELECT client_id, prefix AS token_prefix, environment, status,
       onboarding_completed_at, stored_at,
       superseded_at, expires_at, revoked_at, revoke_reason, created_by_event,
       changed_by_event, key_id, validated_at, valid, scopes, issued_at,
       (SELECT max(r.reported_at) FROM receiver.link_reports r
         WHERE r.client_id = i.client_id AND r.environment = i.environment
           AND r.token_prefix = i.prefix) AS link_invalid_at
  FROM receiver.token_inventory i
 WHERE ($1::text IS NULL OR client_id = $1)
   AND ($2::text IS NULL OR status = $2)
   AND ($3::text IS NULL OR environment = $3)
   AND ($4::interval IS NULL OR onboarding_completed_at < now() - $4::interval)
 ORDER BY client_id, onboarding_completed_at DESC, prefix
 LIMIT $5;

-- name: token_inventory_of_client
-- token_inventory for one client ($1, required): written without the optional
-- client filter so that a reused (generic) plan still reads tokens_client_prefix.
SELECT client_id, prefix, prefix AS token_prefix, environment, status,
       onboarding_completed_at, stored_at,
       superseded_at, expires_at, revoked_at, revoke_reason, created_by_event,
       changed_by_event, key_id, validated_at, valid, scopes, issued_at,
       (SELECT max(r.reported_at) FROM receiver.link_reports r
         WHERE r.client_id = i.client_id AND r.environment = i.environment
           AND r.token_prefix = i.prefix) AS link_invalid_at
  FROM receiver.token_inventory i
 WHERE client_id = $1
   AND ($2::text IS NULL OR status = $2)
   AND ($3::text IS NULL OR environment = $3)
   AND ($4::interval IS NULL OR onboarding_completed_at < now() - $4::interval)
 ORDER BY client_id, onboarding_completed_at DESC, prefix
 LIMIT $5;

-- name: token_to_open
-- The client's active token in environment $3, or the one with prefix $2.
SELECT t.id::text AS id, t.client_id, t.environment, t.prefix, i.status, t.token_sealed
  FROM receiver.tokens t
  JOIN receiver.token_inventory i USING (id)
 WHERE t.client_id = $1
   AND (($2::text IS NULL AND t.status = 'active' AND t.environment = $3) OR t.prefix = $2)
 ORDER BY t.onboarding_completed_at DESC
 LIMIT 1;

-- name: rotation_tokens_sweep
-- keys rotate's claim: in each page of $2 (heap pages of receiver.tokens), the first
-- token sealed under one of the key ids $1 (the configured keys but the primary),
-- not one of the tokens $3 (ids of values this run found broken: by id, never by
-- place, since a row updated meanwhile moves and its place is free for another
-- version, maybe a healthy value under an old key), locked for re-sealing.
-- One row per page: its new version takes the room on the page (a HOT update, no
-- index entry), and the next batch, after this one commits, finds the room it left.
-- Each page is a TID range scan of its own.
SELECT t.at, t.id::text AS sealed_for, t.id::text AS name, t.sealed, p.page
  FROM unnest($2::bigint[]) AS p (page),
       LATERAL (SELECT ctid AS at, id, token_sealed AS sealed FROM receiver.tokens
                 WHERE ctid >= format('(%s,0)', p.page)::tid
                   AND ctid < format('(%s,0)', p.page + 1)::tid
                   AND receiver.sealed_key_id(token_sealed) = ANY ($1::text[])
                   AND id::text <> ALL ($3::text[])
                 ORDER BY ctid
                 LIMIT 1
                   FOR UPDATE SKIP LOCKED) AS t;

-- name: rotation_events_sweep
-- As rotation_tokens_sweep, for stored bodies ($3: event keys).
SELECT e.at, COALESCE(receiver.body_key(e.body_hash), e.key) AS sealed_for, e.key AS name,
       e.sealed, p.page
  FROM unnest($2::bigint[]) AS p (page),
       LATERAL (SELECT ctid AS at, key, body_hash, body_sealed AS sealed FROM receiver.events
                 WHERE ctid >= format('(%s,0)', p.page)::tid
                   AND ctid < format('(%s,0)', p.page + 1)::tid
                   AND receiver.sealed_key_id(body_sealed) = ANY ($1::text[])
                   AND key <> ALL ($3::text[])
                 ORDER BY ctid
                 LIMIT 1
                   FOR UPDATE SKIP LOCKED) AS e;

-- name: relation_pages
-- The pages table $1 holds now (keys rotate walks them).
SELECT pg_relation_size($1::regclass) / current_setting('block_size')::bigint;

-- name: rotation_store_tokens
-- A batch in one statement ($1 row locations, $2 old bytes, $3 new bytes): each row
-- found where the claim locked it (a TID scan, no index), fenced on its old bytes.
UPDATE receiver.tokens t SET token_sealed = v.resealed
  FROM unnest($1::tid[], $2::bytea[], $3::bytea[]) AS v (at, sealed, resealed)
 WHERE t.ctid = v.at AND t.token_sealed = v.sealed;

-- name: rotation_store_events
-- As rotation_store_tokens, for stored bodies.
UPDATE receiver.events e SET body_sealed = v.resealed
  FROM unnest($1::tid[], $2::bytea[], $3::bytea[]) AS v (at, sealed, resealed)
 WHERE e.ctid = v.at AND e.body_sealed = v.sealed;

-- name: sealed_tallies_fold
-- Toward one row per kind and key id again (run by the /metrics refresh, as
-- token_tallies_fold): at most $1 deltas a call (db.TALLY_FOLD_CHUNK), so a refresh
-- fits its bound and makes progress however many piled up while nobody scraped.
SELECT receiver.sealed_tallies_fold_v2($1);

-- name: sealed_key_counts
-- How many values each key id seals, per kind: receiver.sealed_tallies (kept by
-- triggers on both tables), never a count of the tables.
SELECT kind, key_id, sum(n)::bigint AS n
  FROM receiver.sealed_tallies
 GROUP BY 1, 2 HAVING sum(n) <> 0
 ORDER BY 1, 2;

-- name: sealed_to_rotate_counts
-- Values sealed under a key other than $1 (the primary), per kind and key id: what a
-- rotation has still to move (the /metrics gauge, `receiver status`, the start-up
-- key check).
SELECT kind, key_id, sum(n)::bigint AS n
  FROM receiver.sealed_tallies
 WHERE key_id <> $1
 GROUP BY 1, 2 HAVING sum(n) <> 0
 ORDER BY 1, 2;

-- name: claim_due_signals
-- Claimed in one statement (its own transaction); delivery happens after it commits.
-- Revocations first, then the rest, each oldest first: a revoked token must leave
-- the cache fast, and behind a burst of issued tokens it would wait for all of them
-- (signals are "drop and re-read", so their order is free). Both halves walk the
-- due range of the signals_due index; rows locked beyond the batch are let go when
-- this statement's transaction ends.
WITH revoked AS (
    SELECT id, next_attempt_at FROM receiver.signals
     WHERE status = 'pending' AND next_attempt_at <= now() AND reason = 'token_revoked'
     ORDER BY next_attempt_at
     LIMIT $3
       FOR UPDATE SKIP LOCKED
), others AS (
    SELECT id, next_attempt_at FROM receiver.signals
     WHERE status = 'pending' AND next_attempt_at <= now() AND reason <> 'token_revoked'
     ORDER BY next_attempt_at
     LIMIT $3
       FOR UPDATE SKIP LOCKED
), batch AS (
    SELECT id FROM (SELECT id, 0 AS rank, next_attempt_at FROM revoked
                    UNION ALL
                    SELECT id, 1 AS rank, next_attempt_at FROM others) AS due
     ORDER BY rank, next_attempt_at
     LIMIT $3
)
UPDATE receiver.signals s
   SET status = 'in_flight', lease_id = $1, attempts = s.attempts + 1,
       lease_expires_at = now() + make_interval(secs => $2)
 WHERE s.id IN (SELECT id FROM batch)
RETURNING s.id::text AS id, s.client_id, s.environment, s.token_prefix, s.reason,
          s.event_key, s.created_at, s.attempts;

-- name: claim_due_revocations
-- The revocation lane's claim (receiver/outbox.py): due revocations only, oldest first.
UPDATE receiver.signals s
   SET status = 'in_flight', lease_id = $1, attempts = s.attempts + 1,
       lease_expires_at = now() + make_interval(secs => $2)
 WHERE s.id IN (SELECT id FROM receiver.signals
                 WHERE status = 'pending' AND next_attempt_at <= now()
                   AND reason = 'token_revoked'
                 ORDER BY next_attempt_at
                 LIMIT $3
                   FOR UPDATE SKIP LOCKED)
RETURNING s.id::text AS id, s.client_id, s.environment, s.token_prefix, s.reason,
          s.event_key, s.created_at, s.attempts;

-- name: mark_signals_delivered
-- One statement per batch. Fenced on the lease: a worker whose lease expired cannot
-- overwrite a newer result.
UPDATE receiver.signals
   SET status = 'delivered', delivered_at = now(), lease_id = NULL, lease_expires_at = NULL,
       last_error = NULL
 WHERE id = ANY($1::uuid[]) AND lease_id = $2 AND status = 'in_flight'
RETURNING id::text AS id, now() - created_at AS age;

-- name: mark_signal_failed
-- $3: retry delay in seconds; $4: a permanent refusal (dead now); $5: the age in
-- seconds past which a signal no longer matters; $6: error text. The last retry
-- is at that age, not after it.
UPDATE receiver.signals
   SET status = CASE WHEN $4 OR created_at + make_interval(secs => $5) <= now()
                     THEN 'dead' ELSE 'pending' END,
       next_attempt_at = least(now() + make_interval(secs => $3),
                               created_at + make_interval(secs => $5)),
       lease_id = NULL, lease_expires_at = NULL, last_error = $6
 WHERE id = $1::uuid AND lease_id = $2 AND status = 'in_flight'
RETURNING status;

-- name: release_signal_leases
-- A dispatcher stopping on purpose hands back what it had not finished.
UPDATE receiver.signals
   SET status = 'pending', lease_id = NULL, lease_expires_at = NULL,
       attempts = greatest(attempts - 1, 0)
 WHERE lease_id = ANY($1::uuid[]) AND status = 'in_flight';

-- name: reap_expired_leases
-- Leases whose dispatcher died or stalled go back to pending; a signal older than
-- the max age ($1 seconds) is dead instead, so one that kills every dispatcher
-- taking it does not cycle forever.
UPDATE receiver.signals
   SET status = CASE WHEN created_at + make_interval(secs => $1) <= now()
                     THEN 'dead' ELSE 'pending' END,
       lease_id = NULL, lease_expires_at = NULL,
       last_error = 'lease expired: the dispatcher holding it stopped or stalled'
 WHERE status = 'in_flight' AND lease_expires_at < now()
RETURNING id::text AS id, status;

-- name: pull_forward_signals
-- The cache answers again: every pending signal waiting for a later backoff step is
-- due now (partial index signals_due).
UPDATE receiver.signals SET next_attempt_at = now()
 WHERE status = 'pending' AND next_attempt_at > now()
RETURNING id::text AS id;

-- name: signal_counts
-- Every signal status and its count (signals list).
SELECT status, count(*) AS n FROM receiver.signals GROUP BY status ORDER BY status;

-- name: list_signals
-- The outbox, newest first, optionally one status.
SELECT id::text AS id, client_id, environment, token_prefix, reason, event_key, status, attempts,
       created_at, next_attempt_at, delivered_at, last_error
  FROM receiver.signals
 WHERE ($1::text IS NULL OR status = $1)
 ORDER BY created_at DESC
 LIMIT $2;

-- name: retry_dead_signals
-- Dead letters (all, or the given ids) back to pending with a fresh count; what the
-- audit row names (client, environment, prefix).
UPDATE receiver.signals
   SET status = 'pending', attempts = 0, next_attempt_at = now(), last_error = NULL
 WHERE status = 'dead' AND ($1::uuid[] IS NULL OR id = ANY($1::uuid[]))
RETURNING id::text AS id, client_id, environment, token_prefix, reason;

-- name: active_token
-- The client's newest token in one environment (the cache's read, through the view
-- the cache reader role may read): active, or what became of it. Two tokens with the
-- same onboarding time: the revoked one is the newer (a token superseded by the other
-- is older than it), so a revocation is what `TokenRevoked` names.
SELECT id::text AS id, prefix, status, token_sealed
  FROM receiver.cache_tokens
 WHERE client_id = $1 AND environment = $2
 ORDER BY status = 'active' DESC, onboarding_completed_at DESC, status = 'revoked' DESC
 LIMIT 1;

-- name: report_link_invalid
-- A partner application's report: this active token got a second 401.
INSERT INTO receiver.link_reports (client_id, environment, token_prefix, detail)
VALUES ($1, $2, $3, $4);

-- name: stored_events
-- Stored deliveries to re-send (replay resend): sealed bodies, filters optional.
SELECT key, COALESCE(receiver.body_key(body_hash), key) AS sealed_for, type, status,
       received_at, body_sealed
  FROM receiver.events
 WHERE ($1::text[] IS NULL OR key = ANY($1)
        OR key = ANY(ARRAY(SELECT 'test/' || k FROM unnest($1::text[]) AS k)))
   AND ($2::timestamptz IS NULL OR received_at >= $2)
   AND ($3::timestamptz IS NULL OR received_at < $3)
   AND ($4::text IS NULL OR type = $4)
   AND ($5::text IS NULL OR status = $5)
 ORDER BY received_at, key
 LIMIT $6;

-- name: oldest_pending_signal_age
-- Seconds since the oldest pending signal was queued (0: none), over the partial
-- index signals_due: the backlog's age, which an alert watches.
SELECT COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8
  FROM receiver.signals WHERE status = 'pending';

-- name: open_signal_counts
-- The open statuses, one count each, so each can use its partial index
-- (signals_due, signals_leased, signals_dead): cheap at any outbox size. (One
-- `status IN (…)` cannot use partial indexes and scans the table.)
SELECT 'pending' AS status, count(*) AS n FROM receiver.signals WHERE status = 'pending'
UNION ALL
SELECT 'in_flight', count(*) FROM receiver.signals WHERE status = 'in_flight'
UNION ALL
SELECT 'dead', count(*) FROM receiver.signals WHERE status = 'dead';

-- name: open_quarantine_count
-- Quarantined deliveries waiting for an operator (partial index events_quarantined).
SELECT count(*) FROM receiver.events WHERE status = 'quarantined';

-- name: list_events
-- Stored deliveries, newest first, by status / quarantine reason / type; no bodies.
SELECT key, envelope_id, type, status, quarantine_reason AS reason, is_test AS test,
       client_id, received_at, reprocessed_at, quarantine_detail AS detail
  FROM receiver.events
 WHERE ($1::text IS NULL OR status = $1)
   AND ($2::text IS NULL OR quarantine_reason = $2)
   AND ($3::text IS NULL OR type = $3)
 ORDER BY received_at DESC, key
 LIMIT $4;

-- name: list_events_of_type
-- list_events for one type ($3, required), through events_type_received in its
-- order: a rare type costs its own rows, whatever plan is reused.
SELECT key, envelope_id, type, status, quarantine_reason AS reason, is_test AS test,
       client_id, received_at, reprocessed_at, quarantine_detail AS detail
  FROM receiver.events
 WHERE type = $3
   AND ($1::text IS NULL OR status = $1)
   AND ($2::text IS NULL OR quarantine_reason = $2)
 ORDER BY received_at DESC, key
 LIMIT $4;

-- name: show_event
-- One delivery by key (a test delivery's also by its key without `test/`), or every
-- delivery of an envelope id (an id conflict keeps both; live and test both show).
SELECT key, envelope_id, type, status, quarantine_reason AS reason,
       quarantine_detail AS detail, is_test AS test, client_id, received_at,
       reprocessed_at, body_redacted, body_sealed,
       COALESCE(receiver.body_key(body_hash), key) AS sealed_for
  FROM receiver.events
 WHERE key = $1 OR key = 'test/' || $1 OR envelope_id = $1
 ORDER BY received_at, key;

-- name: event_to_reprocess
-- What reprocessing a stored delivery needs: its sealed bytes and how it arrived.
-- $1: the key as typed; the key itself first, else the test world's (`test/` + $1).
SELECT key, status, is_test, test_header, signature, body_sealed,
       COALESCE(receiver.body_key(body_hash), key) AS sealed_for
  FROM receiver.events
 WHERE key = $1 OR key = 'test/' || $1
 ORDER BY key = $1 DESC
 LIMIT 1;

-- name: dismiss_event
-- Close one quarantined delivery ($1: its stored key) for good (`events dismiss`).
-- The key as typed, else the test world's of that name (`test/` + $1).
UPDATE receiver.events SET status = 'dismissed'
 WHERE key = (SELECT key FROM receiver.events
               WHERE (key = $1 OR key = 'test/' || $1) AND status = 'quarantined'
               ORDER BY key = $1 DESC
               LIMIT 1)
RETURNING key, client_id, quarantine_reason;

-- name: event_status_by_key
-- The status of stored delivery $1 (the key as typed, else the test world's of that
-- name): why `events dismiss` left it alone.
SELECT key, status FROM receiver.events
 WHERE key = $1 OR key = 'test/' || $1
 ORDER BY key = $1 DESC
 LIMIT 1;

-- name: quarantined_keys
-- Deliveries still quarantined, oldest first (`events reprocess --quarantined`).
SELECT key FROM receiver.events
 WHERE status = 'quarantined' AND ($1::text IS NULL OR quarantine_reason = $1)
 ORDER BY received_at, key
 LIMIT $2;

-- ---- data governance (receiver/lifecycle/) -------------------

-- name: audit_record
-- One audit row (the table refuses updates and deletes: a trigger).
INSERT INTO receiver.audit
    (actor, action, client_id, client_hash, environment, token_prefix, event_key, reason, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb);

-- name: audit_list
-- Newest first; $1 a client id, $2 its hash (finds its erasure's tombstone too), $3 an
-- action, $5 an actor, $6 ≤ at < $7 (the console's filters).
SELECT id, at, actor, action, COALESCE(client_id, 'erased:' || left(client_hash, 16)) AS client_id,
       environment, token_prefix, event_key, reason, detail
  FROM receiver.audit
 WHERE ($1::text IS NULL OR client_id = $1 OR client_hash = $2)
   AND ($3::text IS NULL OR action = $3)
   AND ($5::text IS NULL OR actor = $5)
   AND ($6::timestamptz IS NULL OR at >= $6)
   AND ($7::timestamptz IS NULL OR at < $7)
 ORDER BY id DESC
 LIMIT $4;

-- name: prune_counts
-- What a prune would drop now ($1, $2, $3: the retention ages in seconds).
SELECT (SELECT count(*) FROM receiver.events
         WHERE body_dropped_at IS NULL AND status <> 'quarantined'
           AND received_at < now() - make_interval(secs => $1)) AS event_bodies,
       (SELECT count(*) FROM receiver.tokens
         WHERE value_dropped_at IS NULL AND status = 'revoked'
           AND revoked_at < now() - make_interval(secs => $2))
       + (SELECT count(*) FROM receiver.tokens
           WHERE value_dropped_at IS NULL AND status = 'superseded'
             AND expires_at < now() - make_interval(secs => $2)) AS token_values,
       (SELECT count(*) FROM receiver.signals
         WHERE status IN ('delivered', 'notified')
           AND created_at < now() - make_interval(secs => $3)) AS signals;

-- name: prune_event_bodies
-- One batch: bodies older than $1 seconds, never an open quarantine's (an operator
-- still needs it). The key, hash and metadata stay: a retry is still a duplicate.
WITH batch AS (
    SELECT key FROM receiver.events
     WHERE body_dropped_at IS NULL AND status <> 'quarantined'
       AND received_at < now() - make_interval(secs => $1)
     ORDER BY received_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), done AS (
    -- By key (the primary key), never a hash join over the table.
    UPDATE receiver.events e
       SET body_sealed = NULL, body_redacted = NULL, body_names = NULL, body_dropped_at = now()
     WHERE e.key = ANY (ARRAY(SELECT key FROM batch))
    RETURNING 1
)
SELECT count(*) FROM done;

-- name: prune_token_values
-- One batch: ciphertext of tokens revoked, or expired, more than $1 seconds ago (each
-- through its partial index: tokens_revoked_value, tokens_superseded_value).
WITH revoked AS (
    SELECT id FROM receiver.tokens
     WHERE value_dropped_at IS NULL AND status = 'revoked'
       AND revoked_at < now() - make_interval(secs => $1)
     ORDER BY revoked_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), expired AS (
    SELECT id FROM receiver.tokens
     WHERE value_dropped_at IS NULL AND status = 'superseded'
       AND expires_at < now() - make_interval(secs => $1)
     ORDER BY expires_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), batch AS (
    SELECT id FROM revoked UNION ALL SELECT id FROM expired LIMIT $2
), done AS (
    UPDATE receiver.tokens t
       SET token_sealed = NULL, value_dropped_at = now(), updated_at = now()
     WHERE t.id = ANY (ARRAY(SELECT id FROM batch))
    RETURNING 1
)
SELECT count(*) FROM done;

-- name: prune_signals
-- One batch: signals settled (delivered, or NOTIFY-only) more than $1 seconds ago.
WITH batch AS (
    SELECT id FROM receiver.signals
     WHERE status IN ('delivered', 'notified')
       AND created_at < now() - make_interval(secs => $1)
     ORDER BY created_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
), done AS (
    DELETE FROM receiver.signals s USING batch WHERE s.id = batch.id RETURNING 1
)
SELECT count(*) FROM done;

-- name: lock_client
-- The same lock a delivery for this client takes (receiver.lock_clients_v1: a row
-- of receiver.client_locks, which the cache reader cannot lock).
SELECT receiver.lock_clients_v1(ARRAY[$1::text]);

-- name: erase_named_bodies
-- Stored bodies not attributed to client $2 whose names include $1 (the client id's
-- name hash: events_body_names). A hash is only a pointer: each is opened and read.
SELECT key, COALESCE(receiver.body_key(body_hash), key) AS sealed_for, body_sealed
  FROM receiver.events
 WHERE body_names @> ARRAY[$1::bigint] AND body_dropped_at IS NULL
   AND client_id IS DISTINCT FROM $2;

-- name: erase_unnamed_bodies
-- One batch (key order, after $1) of stored bodies whose names are not known yet
-- (events_body_unnamed: stored before body_names, or naming too many): opened in
-- Python, read for the client ($2's own need no opening), and their names filled in.
SELECT key, COALESCE(receiver.body_key(body_hash), key) AS sealed_for, body_sealed,
       client_id IS NOT DISTINCT FROM $2 AS attributed
  FROM receiver.events
 WHERE body_dropped_at IS NULL AND body_names IS NULL AND key > $1
 ORDER BY key
 LIMIT $3;

-- name: fill_body_names
-- The names of bodies opened by an erasure ($1 keys, $2 each one's names as an array
-- literal); only while still stored and not yet named.
UPDATE receiver.events e
   SET body_names = n.names::bigint[]
  FROM unnest($1::text[], $2::text[]) AS n(key, names)
 WHERE e.key = n.key AND e.body_dropped_at IS NULL AND e.body_names IS NULL;

-- name: erase_every_body
-- One batch (key order, after $1) of every stored body: for a client id that is not an
-- identifier, which no name hash holds (naming.indexable).
SELECT key, COALESCE(receiver.body_key(body_hash), key) AS sealed_for, body_sealed,
       client_id IS NOT DISTINCT FROM $2 AS attributed
  FROM receiver.events
 WHERE body_dropped_at IS NULL AND key > $1
 ORDER BY key
 LIMIT $3;

-- name: erase_client_bodies
-- One batch of client $1's own stored bodies (events_client_body), keys kept.
WITH batch AS (
    SELECT key FROM receiver.events
     WHERE client_id = $1 AND body_dropped_at IS NULL
     LIMIT $2
), done AS (
    UPDATE receiver.events e
       SET body_sealed = NULL, body_redacted = NULL, body_names = NULL,
           body_dropped_at = COALESCE(body_dropped_at, now())
     WHERE e.key = ANY (ARRAY(SELECT key FROM batch))
    RETURNING 1
)
SELECT count(*) FROM done;

-- name: erase_pending
-- What erasing client $1 would still remove ($2: the keys of other bodies naming it).
SELECT (SELECT count(*) FROM receiver.tokens
         WHERE client_id = $1 AND (token_sealed IS NOT NULL OR token_index IS NOT NULL))
           AS tokens,
       (SELECT count(*) FROM receiver.events
         WHERE (client_id = $1 OR key = ANY($2))
           AND body_dropped_at IS NULL) AS bodies,
       (SELECT array_agg(DISTINCT environment ORDER BY environment) FROM receiver.tokens
         WHERE client_id = $1) AS environments;

-- name: insert_operator_event
-- An operator action that changes tokens, as an event: signals name it. No body.
INSERT INTO receiver.events (key, type, status, is_test, body_dropped_at)
VALUES ($1, $2, 'processed', false, now());

-- name: erase_tokens
-- Every token of client $1: no value, no blind index, revoked (if it was not yet).
UPDATE receiver.tokens
   SET token_sealed = NULL, token_index = NULL,
       value_dropped_at = COALESCE(value_dropped_at, now()),
       revoke_reason = CASE WHEN status = 'revoked' THEN revoke_reason ELSE 'erased' END,
       revoked_at = CASE WHEN status = 'revoked' THEN revoked_at ELSE now() END,
       changed_by_event = CASE WHEN status = 'revoked' THEN changed_by_event ELSE $2 END,
       status = 'revoked', updated_at = now()
 WHERE client_id = $1 AND (token_sealed IS NOT NULL OR token_index IS NOT NULL)
RETURNING id;

-- name: erase_bodies
-- Every stored body of client $1 ($2: the keys of other bodies naming it), keys kept.
WITH done AS (
    UPDATE receiver.events
       SET body_sealed = NULL, body_redacted = NULL, body_names = NULL,
           body_dropped_at = COALESCE(body_dropped_at, now())
     WHERE (client_id = $1 OR key = ANY($2))
       AND body_dropped_at IS NULL
    RETURNING 1
)
SELECT count(*) FROM done;

-- name: enqueue_signal
-- "Drop whatever you hold for client $1 in environment $2" (no prefix: every token).
SELECT receiver.enqueue_signal_v2($1, $2, NULL, 'token_revoked', $3, $4, $5);

-- name: active_prefix
-- The prefix of client $1's active token in environment $2, if any.
SELECT prefix FROM receiver.tokens
 WHERE client_id = $1 AND environment = $2 AND status = 'active';

-- name: token_created_by
-- The status of the token event $1 stored (NULL: it was a token already stored).
SELECT status FROM receiver.tokens WHERE created_by_event = $1;

-- name: token_tallies_fold
-- The tallies' deltas folded toward one row per key (a few hundred rows: one per
-- environment and day of onboarding), before the gauges read them: at most $1
-- deltas a call, as sealed_tallies_fold.
SELECT receiver.token_tallies_fold_v2($1);

-- name: token_health
-- Active tokens by age of issue, clients whose tokens reported a second 401, active
-- tokens found invalid, and clients with tokens but none active, per environment.
-- Counts come from receiver.token_tallies (per UTC day of onboarding) and the two
-- days an age boundary falls in are counted exactly from tokens_active_onboarded:
-- a few hundred tally rows and two days of index entries, at any size.
WITH bounds AS (
    SELECT b.name, b.at, (b.at AT TIME ZONE 'UTC')::date AS day
      FROM (VALUES ('30d', now() - interval '30 days'),
                   ('90d', now() - interval '90 days')) AS b (name, at)
), tally AS (
    SELECT environment, kind, day, sum(n) AS n
      FROM receiver.token_tallies GROUP BY 1, 2, 3
), newer AS (
    -- Active tokens onboarded after each boundary, per environment.
    SELECT e.environment, b.name,
           (SELECT COALESCE(sum(t.n), 0) FROM tally t
             WHERE t.kind = 'active' AND t.environment = e.environment AND t.day > b.day)
           + (SELECT count(*) FROM receiver.tokens k
               WHERE k.status = 'active' AND k.environment = e.environment
                 AND k.onboarding_completed_at > b.at
                 AND k.onboarding_completed_at < ((b.day + 1)::timestamp AT TIME ZONE 'UTC'))
             AS n
      FROM (VALUES ('live'), ('test')) AS e (environment) CROSS JOIN bounds b
), totals AS (
    SELECT e.environment,
           (SELECT COALESCE(sum(t.n), 0) FROM tally t
             WHERE t.kind = 'active' AND t.environment = e.environment) AS active,
           (SELECT COALESCE(sum(t.n), 0) FROM tally t
             WHERE t.kind = 'clients' AND t.environment = e.environment) AS clients
      FROM (VALUES ('live'), ('test')) AS e (environment)
)
SELECT t.environment, 'active' AS kind, a.age,
       (CASE a.age WHEN 'under_30d' THEN n30.n
                   WHEN '30d_to_90d' THEN n90.n - n30.n
                   ELSE t.active - n90.n END)::bigint AS n
  FROM totals t
  JOIN newer n30 ON n30.environment = t.environment AND n30.name = '30d'
  JOIN newer n90 ON n90.environment = t.environment AND n90.name = '90d'
 CROSS JOIN (VALUES ('under_30d'), ('30d_to_90d'), ('over_90d')) AS a (age)
UNION ALL
SELECT r.environment, 'link_invalid', '', count(DISTINCT r.client_id)
  FROM receiver.link_reports r
 -- A scalar subquery, not a join: one probe of the active-token index per report,
 -- never a hash of every active token.
 WHERE r.token_prefix = (SELECT t.prefix FROM receiver.tokens t
                          WHERE t.client_id = r.client_id AND t.environment = r.environment
                            AND t.status = 'active')
 GROUP BY 1
UNION ALL
SELECT environment, 'invalid', '', count(*)
  FROM receiver.tokens WHERE valid IS FALSE AND status = 'active'
 GROUP BY 1
UNION ALL
SELECT environment, 'no_active', '', (clients - active)::bigint FROM totals;

-- name: rotation_intent_open
-- Claim a rotation before rotate-token is sent (committed on its own): only while
-- $3 is still the client's active token in $2 and, with $7, still older than $7
-- (re-checked as it is taken: two runners listing the same due token make one
-- rotation); NULL when it is not, or when the client has an unfinished one. Its first
-- check by another runner (`serve`'s backoff) waits a minute: the rotation's own
-- call is still in flight, and settling it from the side would store its answer twice.
INSERT INTO receiver.rotation_intents
    (client_id, environment, old_prefix, reason, revoke_immediately, actor, next_check_at)
SELECT t.client_id, t.environment, t.prefix, $4, $5, $6, now() + interval '1 minute'
  FROM receiver.tokens t
 WHERE t.client_id = $1 AND t.environment = $2 AND t.status = 'active' AND t.prefix = $3
   AND ($7::interval IS NULL
        OR coalesce(t.issued_at, t.onboarding_completed_at, t.stored_at) < now() - $7::interval)
ON CONFLICT (client_id, environment) WHERE closed_at IS NULL DO NOTHING
RETURNING id;

-- name: rotation_intent_is_open
-- Whether client $1 has an unfinished rotation in environment $2.
SELECT EXISTS (SELECT 1 FROM receiver.rotation_intents
                WHERE client_id = $1 AND environment = $2 AND closed_at IS NULL);

-- name: rotation_intent_close
-- Close an open rotation: $2 outcome, $3 the new token's prefix, $4 the error.
UPDATE receiver.rotation_intents
   SET closed_at = now(), outcome = $2, new_prefix = $3, last_error = $4
 WHERE id = $1 AND closed_at IS NULL
RETURNING id;

-- name: rotation_intent_retry_later
-- A resume that could not finish: counted, the fault kept, the intent left open and
-- checked again after a backoff (5 s, doubling, at most an hour).
UPDATE receiver.rotation_intents
   SET resume_attempts = resume_attempts + 1, last_error = $2,
       next_check_at = now() + least(interval '5 seconds' * power(2, least(resume_attempts, 20)),
                                     interval '1 hour')
 WHERE id = $1 AND closed_at IS NULL;

-- name: rotation_intents_due
-- Unfinished rotations whose next check is due, oldest first.
SELECT id, client_id, environment, old_prefix, reason, revoke_immediately, actor,
       started_at, resume_attempts
  FROM receiver.rotation_intents
 WHERE closed_at IS NULL AND next_check_at <= now()
 ORDER BY next_check_at
 LIMIT $1;

-- name: rotation_next_check
-- When the earliest unfinished rotation is next due a check (NULL: none open).
SELECT min(next_check_at) FROM receiver.rotation_intents WHERE closed_at IS NULL;

-- name: rotations_unsettled
-- Unfinished rotations per environment, and the age of the oldest.
SELECT environment, count(*) AS n,
       extract(epoch FROM now() - min(started_at))::float8 AS oldest_seconds
  FROM receiver.rotation_intents
 WHERE closed_at IS NULL
 GROUP BY environment;

-- name: rotation_intents_open
-- Unfinished rotations, oldest first.
SELECT id, client_id, environment, old_prefix, reason, revoke_immediately, actor,
       started_at, resume_attempts
  FROM receiver.rotation_intents
 WHERE closed_at IS NULL
 ORDER BY started_at
 LIMIT $1;

-- name: rotation_intent
-- One open rotation.
SELECT id, client_id, environment, old_prefix, reason, revoke_immediately, actor,
       started_at, resume_attempts
  FROM receiver.rotation_intents
 WHERE id = $1 AND closed_at IS NULL;

-- name: token_by_index
-- Whether a token is stored (by its blind index), and as what.
SELECT client_id, environment, prefix, status FROM receiver.tokens WHERE token_index = $1;

-- name: tokens_due_rotation
-- One page of active tokens in environments $2 older than $1 (from onboarding, else
-- from when stored) with no rotation unfinished, oldest first, after the page that
-- ended at ($4, $5, $6) (the first page: '-infinity', '', ''): a range of the
-- tokens_due index, never the whole table, never all rows at once.
SELECT t.client_id, t.environment, t.prefix, t.onboarding_completed_at, t.issued_at,
       coalesce(t.issued_at, t.onboarding_completed_at, t.stored_at) AS due_since
  FROM receiver.tokens t
 WHERE t.status = 'active'
   AND (coalesce(t.issued_at, t.onboarding_completed_at, t.stored_at), t.client_id,
        t.environment) > ($4::timestamptz, $5::text, $6::text)
   AND coalesce(t.issued_at, t.onboarding_completed_at, t.stored_at) < now() - $1::interval
   AND t.environment = ANY ($2::text[])
   AND NOT EXISTS (SELECT 1 FROM receiver.rotation_intents i
                    WHERE i.client_id = t.client_id AND i.environment = t.environment
                      AND i.closed_at IS NULL)
 ORDER BY coalesce(t.issued_at, t.onboarding_completed_at, t.stored_at), t.client_id,
          t.environment
 LIMIT $3;

-- name: tokens_to_validate
-- Active tokens to validate: of clients $1 (NULL: all), in environment $2 (NULL: both).
SELECT id::text AS id, client_id, environment, prefix, token_sealed
  FROM receiver.tokens
 WHERE status = 'active'
   AND ($1::text[] IS NULL OR client_id = ANY ($1::text[]))
   AND ($2::text IS NULL OR environment = $2)
 ORDER BY client_id, environment;

-- name: token_validated
-- What validate-token said about token $1 ($4: Debitura's issued_at, when it gave one).
UPDATE receiver.tokens
   SET validated_at = now(), valid = $2, scopes = $3, issued_at = coalesce($4, issued_at)
 WHERE id = $1::uuid;

-- name: token_status
-- The status of client $1's token with prefix $3 in environment $2 (the active one
-- first, should two share a prefix).
SELECT status FROM receiver.token_inventory
 WHERE client_id = $1 AND environment = $2 AND prefix = $3
 ORDER BY status = 'active' DESC
 LIMIT 1;

-- name: token_issued
-- Debitura's issued_at for the token with blind index $1.
UPDATE receiver.tokens SET issued_at = $2 WHERE token_index = $1;

-- name: link_reports_to_reconcile
-- Clients a partner application reported (a second 401, no token) and no reconcile
-- has looked at since, oldest first.
SELECT client_id, environment, min(reported_at) AS reported_at, array_agg(id) AS ids
  FROM receiver.link_reports
 WHERE reconciled_at IS NULL
 GROUP BY client_id, environment
 ORDER BY min(reported_at)
 LIMIT $1;

-- name: link_reports_reconciled
-- The reports $1 were reconciled.
UPDATE receiver.link_reports SET reconciled_at = now() WHERE id = ANY ($1::bigint[]);

-- name: reconcile_started
-- A reconcile run of environment $1 begins ($2: what started it).
INSERT INTO receiver.reconcile_runs (environment, trigger) VALUES ($1, $2) RETURNING id;

-- name: reconcile_finished
-- A reconcile run ends: $2 whether it saw everything, $3 its counts.
UPDATE receiver.reconcile_runs SET finished_at = now(), complete = $2, summary = $3::jsonb
 WHERE id = $1;

-- name: reconcile_last_runs
-- When each environment was last reconciled completely (unix seconds).
SELECT environment, extract(epoch FROM max(finished_at))::float8 AS at
  FROM receiver.reconcile_runs
 WHERE complete
 GROUP BY environment;

-- name: active_token_sealed
-- Client $1's active token in environment $2: id, prefix, sealed value.
SELECT id::text AS id, prefix, token_sealed FROM receiver.tokens
 WHERE client_id = $1 AND environment = $2 AND status = 'active';

-- name: lease_take
-- Lease $1 for $3 seconds to holder $2, if it is free, expired, or $2's already
-- (a renewal): when it now ends, else no row. A row of receiver.leases, which the
-- cache reader cannot read or lock (an advisory lock any role could take).
UPDATE receiver.leases SET holder = $2, until = now() + make_interval(secs => $3)
 WHERE name = $1 AND (until < now() OR holder = $2)
RETURNING until;

-- name: lease_release
-- Holder $2 lets lease $1 go.
UPDATE receiver.leases SET holder = NULL, until = '-infinity'
 WHERE name = $1 AND holder = $2;

-- name: active_tokens_page
-- Active tokens of environment $1 with client ids after $2, in client id order, at
-- most $3 (a reconcile run pages through them; the partial index on active tokens).
SELECT id::text AS id, client_id, prefix, token_sealed
  FROM receiver.tokens
 WHERE environment = $1 AND status = 'active' AND client_id > $2
 ORDER BY client_id
 LIMIT $3;

-- name: deliveries_per_minute
-- Deliveries of the last hour per minute and status (the console's overview): a range
-- of the received_at index, one hour wide.
SELECT date_trunc('minute', received_at) AS minute, status, count(*) AS n
  FROM receiver.events
 WHERE received_at > now() - interval '1 hour'
 GROUP BY 1, 2
 ORDER BY 1, 2;

-- name: token_status_counts
-- Stored tokens per environment and status (the console's overview).
SELECT environment, status, count(*) AS n
  FROM receiver.token_inventory
 GROUP BY 1, 2
 ORDER BY 1, 2;

-- name: last_delivery
-- When the newest delivery of environment $1 arrived, within the last 7 days (the
-- received_at index scanned backwards, bounded: `receiver status`).
SELECT received_at FROM receiver.events
 WHERE is_test = ($1 = 'test') AND received_at > now() - interval '7 days'
 ORDER BY received_at DESC
 LIMIT 1;
