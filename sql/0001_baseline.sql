-- The baseline: the schema as 0001_baseline … 0010_post_drop_replaced_lifecycle
-- left it, squashed into one file before the first release (sql/README.md, "The
-- baseline"). A database those ten files built is recognised and recorded as at this
-- baseline (receiver/db/migrations.py, SQUASHED), so its data stays. Only the
-- functions in use are here, each once; numbers 0002-0010 stay unused.
--
-- The receiver's schema: events received, tokens sealed, revocations remembered,
-- the outbox of invalidation signals, the audit of operator actions. Only sealed
-- bytes and the blind index of a token are ever stored; never the token itself.
--
-- Column order is the order the squashed files added the columns in, so a database
-- built here and one they built are the same to pg_dump (tests/integration/
-- test_schema.py compares both with schema.sql).

-- Events: every authentic delivery, applied or quarantined. An authentic delivery is
-- never refused: one whose signature verifies but that cannot be applied is stored
-- as 'quarantined', with a machine-readable reason.
CREATE TABLE receiver.events (
    key                text PRIMARY KEY,      -- envelope id, or sha256:<hex> of the raw body
    type               text NOT NULL,
    status             text NOT NULL CONSTRAINT events_status_check
                       CHECK (status IN ('processed', 'ignored', 'quarantined')),
    client_id          text,
    is_test            boolean NOT NULL,
    occurred_at        timestamptz,           -- the envelope's own timestamp
    received_at        timestamptz NOT NULL DEFAULT now(),
    body_sealed        bytea,                 -- exact raw body, AES-GCM, AD 'event|<key>'
    body_redacted      jsonb,                 -- tokens cut to their prefix; NULL: not JSON
    envelope_id        text,                  -- an id conflict's envelope id (its key is the
                                              -- body hash); NULL where key = the id
    body_hash          bytea,                 -- sha256 of the raw body
    quarantine_reason  text,                  -- why it was (or is) quarantined
    quarantine_detail  text,                  -- field path and error kind, never a value
    test_header        boolean,               -- X-Debitura-Test as sent (quarantined rows)
    signature          text,                  -- the signature header (quarantined rows)
    reprocessed_at     timestamptz,
    body_dropped_at    timestamptz,           -- pruned or erased
    CONSTRAINT events_quarantine_reason_check
        CHECK (quarantine_reason IN ('invalid_json', 'not_an_object', 'invalid_data',
                                     'unstorable_value', 'id_conflict',
                                     'test_delivery_targets_live',
                                     'token_outside_bearer_token')),
    CONSTRAINT events_quarantined_has_reason
        CHECK (status <> 'quarantined' OR quarantine_reason IS NOT NULL)
);
-- NOT VALID, as the squashed file added it to a table that had rows: a database it
-- built and one built here stay the same.
ALTER TABLE receiver.events ADD CONSTRAINT events_body_or_dropped
    CHECK (body_sealed IS NOT NULL OR body_dropped_at IS NOT NULL) NOT VALID;
CREATE INDEX events_received_at ON receiver.events (received_at);
CREATE INDEX events_quarantined ON receiver.events (received_at) WHERE status = 'quarantined';
CREATE INDEX events_envelope_id ON receiver.events (envelope_id) WHERE envelope_id IS NOT NULL;
-- Events whose body is still there, by age (received_at is indexed already; this one
-- skips the bodies already dropped): what retention walks.
CREATE INDEX events_body_kept ON receiver.events (received_at)
    WHERE body_sealed IS NOT NULL;

-- Live and test are separate worlds: one active token per client per environment,
-- the environment taken from the token itself.
CREATE TABLE receiver.tokens (
    id                       uuid PRIMARY KEY,   -- chosen by the writer: it is in the AD
    client_id                text NOT NULL,
    environment              text NOT NULL CHECK (environment IN ('live', 'test')),
    prefix                   text NOT NULL,      -- first 15 characters, public
    token_index              bytea UNIQUE,       -- HMAC-SHA256 under the index key; NULL once erased
    token_sealed             bytea,              -- AES-GCM, AD 'token|<id>'; NULL once dropped
    status                   text NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
    onboarding_completed_at  timestamptz NOT NULL,
    stored_at                timestamptz NOT NULL DEFAULT now(),
    superseded_at            timestamptz,
    revoked_at               timestamptz,
    revoke_reason            text,
    created_by_event         text NOT NULL REFERENCES receiver.events (key),
    changed_by_event         text REFERENCES receiver.events (key),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    -- A superseded token stays usable until expires_at (Debitura's rotation grace
    -- period); after it, the token counts as expired.
    expires_at               timestamptz,
    value_dropped_at         timestamptz
);
-- NOT VALID for the same reason as events_body_or_dropped.
ALTER TABLE receiver.tokens ADD CONSTRAINT tokens_active_has_value
    CHECK (status <> 'active' OR token_sealed IS NOT NULL) NOT VALID;
ALTER TABLE receiver.tokens ADD CONSTRAINT tokens_value_or_dropped
    CHECK (token_sealed IS NOT NULL OR value_dropped_at IS NOT NULL) NOT VALID;
-- At most one active token per client and environment, enforced here and not only in code.
CREATE UNIQUE INDEX tokens_one_active_per_client_environment
    ON receiver.tokens (client_id, environment) WHERE status = 'active';
CREATE INDEX tokens_client_prefix ON receiver.tokens (client_id, prefix);

-- Every revocation is remembered, so a token whose onboarding arrives after its
-- revocation is stored already revoked (DESIGN §3, guarantee 5). A revocation acts
-- inside one environment: its prefix's, else the delivery's.
CREATE TABLE receiver.revocations (
    event_key     text PRIMARY KEY REFERENCES receiver.events (key),
    client_id     text NOT NULL,
    token_prefix  text,                 -- NULL: every token issued before revoked_at
    revoked_at    timestamptz NOT NULL,
    reason        text,
    environment   text NOT NULL CONSTRAINT revocations_environment_check
                  CHECK (environment IN ('live', 'test'))
);
CREATE INDEX revocations_client ON receiver.revocations (client_id);
-- Revocations by a prefix longer than the stored 15 characters: rare, and each
-- onboarding asks whether its client has one (record_events_v5).
CREATE INDEX revocations_long_prefix ON receiver.revocations (client_id, environment)
    WHERE length(token_prefix) > 15;

-- The outbox: written in the same transaction as the token change it announces.
CREATE TABLE receiver.signals (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_id         text NOT NULL,
    token_prefix      text,
    reason            text NOT NULL CONSTRAINT signals_reason_check
                      CHECK (reason IN ('token_issued', 'token_revoked')),
    event_key         text NOT NULL REFERENCES receiver.events (key),
    created_at        timestamptz NOT NULL DEFAULT now(),
    status            text NOT NULL DEFAULT 'pending'
                      -- 'notified': HTTP delivery is off; the NOTIFY sent at commit was the
                      -- delivery, and the row is the record of what was announced.
                      CONSTRAINT signals_status_check
                      CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead', 'notified')),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_id          uuid,
    lease_expires_at  timestamptz,
    last_error        text,
    delivered_at      timestamptz,
    environment       text CHECK (environment IN ('live', 'test')),  -- which token to drop
    CONSTRAINT signals_lease_iff_in_flight CHECK ((status = 'in_flight') = (lease_id IS NOT NULL))
);
CREATE INDEX signals_due ON receiver.signals (next_attempt_at) WHERE status = 'pending';
CREATE INDEX signals_leased ON receiver.signals (lease_expires_at) WHERE status = 'in_flight';
CREATE INDEX signals_dead ON receiver.signals (created_at) WHERE status = 'dead';
-- The prune walks settled signals by age; the partial index keeps that a range scan.
CREATE INDEX signals_settled ON receiver.signals (created_at)
    WHERE status IN ('delivered', 'notified');

-- The key id a sealed value names (its header: version, length, key id), read
-- without opening it.
CREATE FUNCTION receiver.sealed_key_id(sealed bytea) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT encode(substring(sealed FROM 3 FOR get_byte(sealed, 1)), 'escape')
$$;

-- The key id each value is sealed under, indexed, so that "how many values still need
-- re-sealing" (the receiver_sealed_values_to_rotate gauge, read at scrape time) is an
-- index range scan over exactly those values: nothing to read once a rotation is
-- done, instead of a scan of every token and event. Expression indexes, not stored
-- columns: adding a generated column rewrites the table under an exclusive lock,
-- building an index lets reads on (sql/README.md, rule 1).
CREATE INDEX tokens_sealed_key_id ON receiver.tokens (receiver.sealed_key_id(token_sealed));
CREATE INDEX events_sealed_key_id ON receiver.events (receiver.sealed_key_id(body_sealed));

-- The token inventory as operators and caches see it at this moment: `expired` is
-- derived from expires_at, so it is exact without a sweeper.
CREATE VIEW receiver.token_inventory AS
SELECT id,
       client_id,
       environment,
       prefix,
       CASE WHEN status = 'superseded' AND expires_at <= now() THEN 'expired'
            ELSE status END AS status,
       onboarding_completed_at,
       stored_at,
       superseded_at,
       expires_at,
       revoked_at,
       revoke_reason,
       created_by_event,
       changed_by_event,
       updated_at,
       receiver.sealed_key_id(token_sealed) AS key_id
  FROM receiver.tokens;

-- Announce a token change: an outbox row, and a NOTIFY for caches that LISTEN.
-- Called only for changes, never per request: NOTIFY takes a cluster-wide lock at commit.
CREATE FUNCTION receiver.enqueue_signal_v2(
    p_client_id text, p_environment text, p_token_prefix text, p_reason text,
    p_event_key text, p_channel text, p_http boolean
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO receiver.signals (client_id, environment, token_prefix, reason, event_key, status)
    VALUES (p_client_id, p_environment, p_token_prefix, p_reason, p_event_key,
            CASE WHEN p_http THEN 'pending' ELSE 'notified' END)
    RETURNING id INTO v_id;
    PERFORM pg_notify(p_channel, json_build_object(
        'signal_id', v_id, 'client_id', p_client_id, 'environment', p_environment,
        'token_prefix', p_token_prefix, 'reason', p_reason, 'event_id', p_event_key)::text);
END;
$$;

-- The idempotency key of a body without a usable id: sha256:<hex>.
CREATE FUNCTION receiver.body_key(p_hash bytea) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT 'sha256:' || encode(p_hash, 'hex')
$$;

-- Data governance (docs/decisions.md): what is kept, for how long, and who opened what.
--
-- Retention drops values, not rows: an event's body after RECEIVER_RETAIN_EVENT_BODIES
-- (its key stays, so a late retry is still a duplicate), a revoked or expired token's
-- ciphertext after RECEIVER_RETAIN_TOKEN_VALUES (its inventory row stays), and
-- settled signals after RECEIVER_RETAIN_SIGNALS (those rows go). Erasure drops every
-- token value and stored body of one client at once. Every operator action that
-- opens or changes a secret is written to receiver.audit, which nobody can rewrite.
CREATE TABLE receiver.audit (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    action text NOT NULL CHECK (action IN (
        'token_reveal', 'token_import', 'client_erase', 'keys_rotate',
        'events_reprocess', 'event_resend')),
    client_id text,         -- NULL for an erasure: client_hash names it
    client_hash text,       -- HMAC of the client id under the index key (erasures)
    environment text CHECK (environment IN ('live', 'test')),
    token_prefix text,      -- the 15-character prefix: not secret
    event_key text,
    reason text,
    detail jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_client ON receiver.audit (client_id, at);
CREATE INDEX audit_client_hash ON receiver.audit (client_hash) WHERE client_hash IS NOT NULL;

CREATE FUNCTION receiver.audit_is_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'receiver.audit is append-only: rows are never changed or removed'
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON receiver.audit
    FOR EACH ROW EXECUTE FUNCTION receiver.audit_is_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON receiver.audit
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.audit_is_append_only();

-- Least privilege (README "Roles"). The migration owner is the login role that runs
-- `receiver migrate` (it owns what the migrations create: ownership cannot be shared
-- by a group role without SET ROLE, which would strip a superuser's rights midway).
-- Two group roles, NOLOGIN, that an operator grants to login roles of their own:
--   receiver_runtime       `receiver serve`, `dispatch` and the CLI: DML, no DDL,
--                          and the audit table append-only
--   receiver_cache_reader  a partner application's token cache: SELECT on
--                          receiver.cache_tokens, INSERT into receiver.link_reports,
--                          and LISTEN (which needs no grant); nothing else
-- Roles belong to the cluster, not the database: created only when missing (so a
-- migration owner without CREATEROLE migrates once they exist: `receiver migrate
-- --print-roles` prints the SQL a superuser runs once).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['receiver_runtime', 'receiver_cache_reader'] LOOP
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r);
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created by another database's migration, or concurrently
        END;
    END LOOP;
END;
$$;

-- What a cache may read: tokens as ciphertext with their state, nothing of events.
CREATE VIEW receiver.cache_tokens AS
SELECT id, client_id, environment, prefix,
       CASE WHEN status = 'superseded' AND expires_at <= now() THEN 'expired'
            ELSE status END AS status,
       onboarding_completed_at, token_sealed
  FROM receiver.tokens;

-- A partner application that got a second 401 with a client's current token reports
-- it here: the link itself is invalid. The token is not revoked (only Debitura says
-- that); `tokens list` shows the report and a gauge counts such clients.
CREATE TABLE receiver.link_reports (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id text NOT NULL,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    token_prefix text NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now(),
    detail text
);
CREATE INDEX link_reports_client ON receiver.link_reports (client_id, environment, token_prefix);

GRANT USAGE ON SCHEMA receiver TO receiver_runtime, receiver_cache_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA receiver TO receiver_runtime;
REVOKE UPDATE, DELETE ON receiver.audit FROM receiver_runtime;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA receiver TO receiver_runtime;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA receiver TO receiver_runtime;
GRANT SELECT ON receiver.cache_tokens TO receiver_cache_reader;
GRANT INSERT ON receiver.link_reports TO receiver_cache_reader;
-- Tables later migrations create are the runtime's too.
ALTER DEFAULT PRIVILEGES IN SCHEMA receiver
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO receiver_runtime;
ALTER DEFAULT PRIVILEGES IN SCHEMA receiver GRANT USAGE ON SEQUENCES TO receiver_runtime;
-- Functions are executable by PUBLIC by default; the reader gets no table behind them.

-- The lifecycle: one way in, each effect once, revocations of any prefix length.
-- Created after the grants above, as the squashed files did: they are executable by
-- PUBLIC, like every function, and hold no grant of their own.
--
-- * One way in: webhook deliveries, `tokens import` and `events reprocess` all call
--   record_events_v5. A reprocessed delivery is a row that names the quarantined row
--   it replaces (`replaces`), so it is applied by the very statements a delivery is.
-- * One copy of each effect: apply_group_v1 is the set-based group, and the row-by-row
--   fallback is apply_group_v1 on a group of one row at a time (each sees
--   the one before it), so the revocation UPDATE and every other statement of the
--   lifecycle exist once. A session setting `receiver.row_by_row = on` forces the
--   fallback: tests/integration/test_group_equivalence.py compares the two paths.
-- * A revocation fails safe (DESIGN §2): a `token_prefix` shorter than the stored
--   15-character prefix revokes every token of that client and environment whose
--   prefix starts with it; a longer one cannot be compared in SQL (the stored prefix
--   is all SQL knows of a token), so it is checked in memory. A row whose check is
--   still to do (`spared` NULL) comes back `recheck` before anything is written;
--   the caller opens the candidates (receiver/lifecycle/store.py), sends the ids or
--   keys that do NOT match as `spared`, and a candidate not in that list (one that
--   arrived meanwhile) is taken as matching: unsure means revoke.

CREATE TYPE receiver.event_row_v2 AS (
    kind text,                  -- onboarding | revocation | ignored | quarantined
    key text,
    envelope_id text,
    type text,
    is_test boolean,
    test_header boolean,
    signature text,
    occurred_at timestamptz,
    body_hash bytea,
    body_sealed bytea,
    body_redacted jsonb,
    client_id text,
    environment text,
    token_id uuid,
    prefix text,
    token_index bytea,
    token_sealed bytea,
    completed_at timestamptz,
    old_expires_at timestamptz,
    grace interval,
    revoked_at timestamptz,
    reason text,
    quarantine_reason text,
    quarantine_detail text,
    replaces text,              -- reprocessing: the quarantined row this one re-applies
    spared text[]               -- checked in memory, not matching (NULL: not checked)
);

-- Every advisory lock a row needs: its key, its client, the row it replaces.
CREATE FUNCTION receiver.event_locks_v2(r receiver.event_row_v2) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_remove(ARRAY[
        hashtextextended('receiver.event:' || r.key, 0),
        hashtextextended('receiver.client:' || r.client_id, 0),
        hashtextextended('receiver.event:' || r.replaces, 0)], NULL)
$$;

-- Whether revocation prefix `p` names a token whose stored prefix is `stored`, as far
-- as the stored prefix tells: a shorter `p` exactly, a longer one only by its start
-- (the rest is checked in memory: `spared`).
CREATE FUNCTION receiver.prefix_may_match(p text, stored text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT starts_with(stored, left(p, length(stored)))
$$;

-- The effects of a group of rows whose keys, clients and tokens are distinct, in a
-- handful of set-based statements, called under the group's locks. Returns no row
-- at all, having written nothing, when the group is not independent; a group of one
-- row always is.
--
-- The set-based form is only correct when no row of the group depends on another's
-- effect. Under the group's advisory locks (nobody else can write these keys or
-- these clients) that is checked first:
--   * every key in the group is distinct (a duplicate storm can put one key twice);
--   * no key is already stored with other content (an id conflict);
--   * the rows with an effect (new onboardings and revocations) touch distinct
--     (client, environment) pairs, and carry distinct tokens.
-- Everything an effect reads (the client's tokens and revocations in that
-- environment, the token's blind index) then belongs to that row alone, so applying
-- the rows together or one after another ends in the same state.
--
-- Plans. plpgsql keeps one generic plan per statement, made once while the tables
-- may still be small; a plan that scans a table (or joins it the other way round)
-- because it was tiny then gets slower with every row stored, until autovacuum's
-- next ANALYZE. Replanning
-- every call cost more than it saved. So each statement is written so that its only
-- sensible plan is "for each row of the group, probe an index": the group drives
-- every lookup through LATERAL subqueries with LIMIT or OFFSET (never flattened,
-- never reordered), updates name their target rows by primary key (`id = ANY`), and
-- the function runs with enable_seqscan off so a probe is an index scan at any size.
CREATE FUNCTION receiver.apply_group_v1(
    p_rows receiver.event_row_v2[], p_channel text, p_http boolean
) RETURNS TABLE (outcome text, revoked integer) LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_stored text[];        -- keys already stored: no effect
    v_conflicts text[];     -- of those, stored with other content: an id conflict
    v_kept text[];          -- the conflicting deliveries stored now, under their body key
    v_independent boolean;
    v_onboardings integer;
    v_revocations integer;
    v_revoked_keys text[];
    v_revoked_counts integer[];
    v_signals bigint;
    v_ids uuid[];           -- tokens an UPDATE changes, and what each gets
    v_keys text[];
    v_expires timestamptz[];
    v_at timestamptz[];
    v_reasons text[];
    v_new_rows bigint[];    -- the onboardings that store a token: their place in p_rows,
    v_new_statuses text[];  -- the status each token is stored with,
    v_new_expires timestamptz[];  -- and until when a superseded one stays usable
BEGIN
    -- Rows stored before body hashes existed cannot be compared: duplicates, as then.
    SELECT coalesce(array_agg(x.key) FILTER (WHERE e.key IS NOT NULL), '{}'),
           coalesce(array_agg(x.key) FILTER (WHERE e.body_hash <> x.body_hash), '{}'),
           count(*) = 1
           OR (count(DISTINCT x.key) = count(*)
               AND NOT coalesce(bool_or(e.body_hash <> x.body_hash), false)
               AND count(DISTINCT (x.client_id, x.environment))
                     FILTER (WHERE e.key IS NULL AND x.kind IN ('onboarding', 'revocation'))
                   = count(*) FILTER (WHERE e.key IS NULL
                                        AND x.kind IN ('onboarding', 'revocation'))
               AND count(DISTINCT x.token_index)
                     FILTER (WHERE e.key IS NULL AND x.kind = 'onboarding')
                   = count(*) FILTER (WHERE e.key IS NULL AND x.kind = 'onboarding')),
           count(*) FILTER (WHERE e.key IS NULL AND x.kind = 'onboarding'),
           count(*) FILTER (WHERE e.key IS NULL AND x.kind = 'revocation')
      INTO v_stored, v_conflicts, v_independent, v_onboardings, v_revocations
      FROM unnest(p_rows) AS x
      LEFT JOIN LATERAL (SELECT e.key, e.body_hash FROM receiver.events e
                          WHERE e.key = x.key LIMIT 1) AS e ON true;
    IF NOT v_independent THEN
        RETURN;
    END IF;

    -- Every new delivery's row (no ON CONFLICT: under the locks a clash is a fault,
    -- and the caller then retries the rows one by one).
    INSERT INTO receiver.events
        (key, envelope_id, type, status, client_id, is_test, occurred_at, body_hash,
         body_sealed, body_redacted, quarantine_reason, quarantine_detail, test_header,
         signature)
    SELECT x.key, NULLIF(x.envelope_id, x.key), x.type, s.status, x.client_id, x.is_test,
           x.occurred_at, x.body_hash, x.body_sealed, x.body_redacted,
           CASE WHEN s.status = 'quarantined' THEN x.quarantine_reason END,
           CASE WHEN s.status = 'quarantined' THEN x.quarantine_detail END,
           CASE WHEN s.status = 'quarantined' THEN x.test_header END,
           CASE WHEN s.status = 'quarantined' THEN x.signature END
      FROM unnest(p_rows) WITH ORDINALITY AS x,
           LATERAL (SELECT CASE WHEN x.kind IN ('onboarding', 'revocation') THEN 'processed'
                                ELSE x.kind END AS status) AS s
     WHERE x.key <> ALL (v_stored)
     ORDER BY x.ordinality;

    IF cardinality(v_conflicts) > 0 THEN
        -- An id reused with other content: kept, quarantined, under its body key (once:
        -- the same conflicting delivery again is a duplicate).
        WITH kept AS (
            INSERT INTO receiver.events
                (key, envelope_id, type, status, is_test, occurred_at, body_hash,
                 body_sealed, body_redacted, quarantine_reason, quarantine_detail,
                 test_header, signature)
            SELECT receiver.body_key(x.body_hash), x.envelope_id, x.type, 'quarantined',
                   x.is_test, x.occurred_at, x.body_hash, x.body_sealed, x.body_redacted,
                   'id_conflict', 'id: already used by a delivery with other content',
                   x.test_header, x.signature
              FROM unnest(p_rows) AS x
             WHERE x.key = ANY (v_conflicts)
            ON CONFLICT (key) DO NOTHING
            RETURNING key)
        SELECT array_agg(kept.key) INTO v_kept FROM kept;
    END IF;

    IF v_onboardings > 0 THEN
        -- Decided once per row from one probe each: a token already stored changes
        -- nothing; a revocation that came first wins (by a prefix its token starts
        -- with, a longer one unless checked and spared, or without a prefix one dated
        -- after it); the client's active token in that environment (one at most),
        -- when newer, makes this one superseded, and otherwise gives way to it.
        SELECT array_agg(x.ordinality), array_agg(d.status), array_agg(v.revoked_at),
               array_agg(v.reason),
               array_agg(CASE WHEN d.status = 'superseded'
                              THEN a.onboarding_completed_at + x.grace END),
               array_agg(a.id) FILTER (WHERE d.status = 'active' AND a.id IS NOT NULL),
               array_agg(x.key) FILTER (WHERE d.status = 'active' AND a.id IS NOT NULL),
               array_agg(COALESCE(x.old_expires_at, x.completed_at + x.grace))
                   FILTER (WHERE d.status = 'active' AND a.id IS NOT NULL)
          INTO v_new_rows, v_new_statuses, v_at, v_reasons, v_new_expires,
               v_ids, v_keys, v_expires
          FROM unnest(p_rows) WITH ORDINALITY AS x
          LEFT JOIN LATERAL (
                SELECT v.revoked_at, v.reason FROM receiver.revocations v
                 WHERE v.client_id = x.client_id AND v.environment = x.environment
                   AND CASE WHEN v.token_prefix IS NULL THEN v.revoked_at >= x.completed_at
                            ELSE receiver.prefix_may_match(v.token_prefix, x.prefix)
                                 AND (length(v.token_prefix) <= length(x.prefix)
                                      OR v.event_key <> ALL (coalesce(x.spared, '{}')))
                       END
                 ORDER BY v.revoked_at
                 LIMIT 1) AS v ON true
          LEFT JOIN LATERAL (
                SELECT t.id, t.onboarding_completed_at FROM receiver.tokens t
                 WHERE t.client_id = x.client_id AND t.environment = x.environment
                   AND t.status = 'active'
                 LIMIT 1) AS a ON true,
               LATERAL (SELECT CASE WHEN v.revoked_at IS NOT NULL THEN 'revoked'
                                    WHEN a.onboarding_completed_at > x.completed_at
                                    THEN 'superseded'
                                    ELSE 'active' END AS status) AS d
         WHERE x.kind = 'onboarding' AND x.key <> ALL (v_stored)
           AND NOT EXISTS (SELECT 1 FROM receiver.tokens o WHERE o.token_index = x.token_index);

        -- The active tokens that give way, before the new ones arrive (one active
        -- token per client and environment).
        IF v_ids IS NOT NULL THEN
            UPDATE receiver.tokens t
               SET status = 'superseded', superseded_at = now(),
                   expires_at = v_expires[array_position(v_ids, t.id)],
                   changed_by_event = v_keys[array_position(v_ids, t.id)], updated_at = now()
             WHERE t.id = ANY (v_ids);
        END IF;

        INSERT INTO receiver.tokens
            (id, client_id, environment, prefix, token_index, token_sealed, status,
             onboarding_completed_at, superseded_at, expires_at, revoked_at, revoke_reason,
             created_by_event)
        SELECT x.token_id, x.client_id, x.environment, x.prefix, x.token_index,
               x.token_sealed, n.status, x.completed_at,
               CASE WHEN n.status = 'superseded' THEN now() END, n.expires_at,
               n.revoked_at, n.reason, x.key
          FROM unnest(v_new_rows, v_new_statuses, v_at, v_reasons, v_new_expires)
                   AS n(ordinality, status, revoked_at, reason, expires_at)
          JOIN unnest(p_rows) WITH ORDINALITY AS x ON x.ordinality = n.ordinality
         ORDER BY n.ordinality;
    END IF;

    IF v_revocations > 0 THEN
        -- Remembered (a later onboarding it names ends revoked), applied inside its
        -- environment.
        INSERT INTO receiver.revocations
            (event_key, client_id, environment, token_prefix, revoked_at, reason)
        SELECT x.key, x.client_id, x.environment, x.prefix, x.revoked_at, x.reason
          FROM unnest(p_rows) AS x
         WHERE x.kind = 'revocation' AND x.key <> ALL (v_stored);

        -- One revocation can match several tokens (no prefix: all issued before it; a
        -- short prefix: all that start with it); a token matches one revocation at
        -- most (distinct clients).
        SELECT array_agg(a.id), array_agg(x.key), array_agg(x.revoked_at), array_agg(x.reason)
          INTO v_ids, v_keys, v_at, v_reasons
          FROM unnest(p_rows) AS x
          CROSS JOIN LATERAL (
                SELECT t.id FROM receiver.tokens t
                 WHERE t.client_id = x.client_id AND t.environment = x.environment
                   AND t.status <> 'revoked'
                   AND CASE WHEN x.prefix IS NULL THEN t.onboarding_completed_at <= x.revoked_at
                            ELSE receiver.prefix_may_match(x.prefix, t.prefix)
                                 AND (length(x.prefix) <= length(t.prefix)
                                      OR t.id::text <> ALL (coalesce(x.spared, '{}')))
                       END
                OFFSET 0) AS a
         WHERE x.kind = 'revocation' AND x.key <> ALL (v_stored);
        IF v_ids IS NOT NULL THEN
            UPDATE receiver.tokens t
               SET status = 'revoked', revoked_at = v_at[array_position(v_ids, t.id)],
                   revoke_reason = v_reasons[array_position(v_ids, t.id)],
                   changed_by_event = v_keys[array_position(v_ids, t.id)], updated_at = now()
             WHERE t.id = ANY (v_ids);
            SELECT array_agg(k), array_agg(n) INTO v_revoked_keys, v_revoked_counts
              FROM (SELECT k, count(*)::integer AS n FROM unnest(v_keys) AS k GROUP BY k) AS c;
        END IF;
    END IF;

    IF v_onboardings + v_revocations > 0 THEN
        -- For each token issued active and each revocation (even one that matched
        -- nothing: the cache may hold a token we never saw), in the group's order: an
        -- outbox row and its NOTIFY.
        WITH queued AS (
            INSERT INTO receiver.signals
                (client_id, environment, token_prefix, reason, event_key, status)
            SELECT x.client_id, x.environment, x.prefix,
                   CASE x.kind WHEN 'onboarding' THEN 'token_issued' ELSE 'token_revoked' END,
                   x.key, CASE WHEN p_http THEN 'pending' ELSE 'notified' END
              FROM unnest(p_rows) WITH ORDINALITY AS x
             WHERE x.key <> ALL (v_stored)
               AND (x.kind = 'revocation'
                    OR (x.kind = 'onboarding'
                        AND (SELECT t.status FROM receiver.tokens t
                              WHERE t.id = x.token_id AND t.created_by_event = x.key
                              LIMIT 1) = 'active'))
             ORDER BY x.ordinality
            RETURNING id, client_id, environment, token_prefix, reason, event_key)
        SELECT count(pg_notify(p_channel, json_build_object(
                   'signal_id', q.id, 'client_id', q.client_id, 'environment', q.environment,
                   'token_prefix', q.token_prefix, 'reason', q.reason,
                   'event_id', q.event_key)::text))
          INTO v_signals
          FROM queued AS q;
    END IF;

    RETURN QUERY
        SELECT CASE WHEN x.key = ANY (v_conflicts) THEN
                        CASE WHEN receiver.body_key(x.body_hash) = ANY (v_kept)
                             THEN 'id_conflict' ELSE 'duplicate' END
                    WHEN x.key = ANY (v_stored) THEN 'duplicate'
                    WHEN x.kind IN ('onboarding', 'revocation') THEN 'processed'
                    ELSE x.kind END,
               CASE WHEN x.kind = 'revocation' AND x.key <> ALL (v_stored)
                    THEN coalesce(v_revoked_counts[array_position(v_revoked_keys, x.key)], 0)
               END
          FROM unnest(p_rows) WITH ORDINALITY AS x
         ORDER BY x.ordinality;
END;
$$;

-- A quarantined delivery applied again as it reads now (`r.replaces`: its stored
-- key): the quarantined row gives way to what the delivery is now, through the same
-- statements as any delivery, keeping when it was received.
CREATE FUNCTION receiver.reapply_v1(
    r receiver.event_row_v2, p_channel text, p_http boolean,
    OUT outcome text, OUT revoked integer
) LANGUAGE plpgsql AS $$
DECLARE
    v_old receiver.events%ROWTYPE;
BEGIN
    DELETE FROM receiver.events WHERE key = r.replaces AND status = 'quarantined'
    RETURNING * INTO v_old;
    IF NOT FOUND THEN
        outcome := 'not_quarantined';
        RETURN;
    END IF;
    SELECT a.outcome, a.revoked INTO outcome, revoked
      FROM receiver.apply_group_v1(ARRAY[r], p_channel, p_http) AS a;
    IF outcome = 'duplicate' AND v_old.key <> r.key THEN
        RETURN;  -- it reads as a repeat of a stored delivery: nothing to apply, nothing lost
    END IF;
    UPDATE receiver.events
       SET received_at = v_old.received_at, reprocessed_at = now(),
           quarantine_reason = CASE WHEN status = 'quarantined' THEN quarantine_reason
                                    ELSE v_old.quarantine_reason END,
           quarantine_detail = CASE WHEN status = 'quarantined' THEN quarantine_detail
                                    ELSE v_old.quarantine_detail END
     WHERE key = CASE WHEN outcome = 'id_conflict' THEN receiver.body_key(r.body_hash)
                      ELSE r.key END;
END;
$$;

-- The one way in: a group of rows (deliveries, imports, reprocessings) in one
-- statement and one transaction; outcomes (and tokens revoked, for revocations) in
-- order. Every lock first, in one order (two groups never deadlock); then the rows
-- whose prefix check is still to do, if any, come back `recheck` (the rest
-- `deferred`) with nothing written; then the group set-based when it is
-- independent, else row by row.
CREATE FUNCTION receiver.record_events_v5(
    p_rows receiver.event_row_v2[], p_channel text, p_http boolean
) RETURNS TABLE (outcome text, revoked integer) LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    r receiver.event_row_v2;
    v_recheck boolean[];
BEGIN
    PERFORM pg_advisory_xact_lock(l)
       FROM (SELECT DISTINCT unnest(receiver.event_locks_v2(x)) AS l
               FROM unnest(p_rows) AS x) AS locks
      ORDER BY l;

    SELECT array_agg(c.needed ORDER BY x.ordinality) INTO v_recheck
      FROM unnest(p_rows) WITH ORDINALITY AS x,
           LATERAL (SELECT x.spared IS NULL AND CASE
               WHEN x.kind = 'onboarding' THEN EXISTS (
                   -- `> 15` as well: the partial index revocations_long_prefix, empty
                   -- unless such a revocation was ever received, answers this probe.
                   SELECT 1 FROM receiver.revocations v
                    WHERE v.client_id = x.client_id AND v.environment = x.environment
                      AND length(v.token_prefix) > 15
                      AND length(v.token_prefix) > length(x.prefix)
                      AND receiver.prefix_may_match(v.token_prefix, x.prefix))
               WHEN x.kind = 'revocation' THEN EXISTS (
                   SELECT 1 FROM receiver.tokens t
                    WHERE t.client_id = x.client_id AND t.environment = x.environment
                      AND t.status <> 'revoked' AND length(x.prefix) > length(t.prefix)
                      AND receiver.prefix_may_match(x.prefix, t.prefix))
               ELSE false END AS needed) AS c;
    IF true = ANY (v_recheck) THEN
        RETURN QUERY
            SELECT CASE WHEN c.needed THEN 'recheck' ELSE 'deferred' END, NULL::integer
              FROM unnest(v_recheck) WITH ORDINALITY AS c(needed, ordinality)
             ORDER BY c.ordinality;
        RETURN;
    END IF;

    IF current_setting('receiver.row_by_row', true) IS DISTINCT FROM 'on'
       AND NOT EXISTS (SELECT 1 FROM unnest(p_rows) AS x WHERE x.replaces IS NOT NULL) THEN
        RETURN QUERY SELECT * FROM receiver.apply_group_v1(p_rows, p_channel, p_http);
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    FOREACH r IN ARRAY p_rows LOOP
        IF r.replaces IS NULL THEN
            RETURN QUERY SELECT * FROM receiver.apply_group_v1(ARRAY[r], p_channel, p_http);
        ELSE
            RETURN QUERY SELECT * FROM receiver.reapply_v1(r, p_channel, p_http);
        END IF;
    END LOOP;
END;
$$;
