-- A group of deliveries in a handful of set-based statements instead of a plpgsql
-- call chain per row (issue 14: the row-by-row form cost ~300 µs of Postgres time
-- per event). Same locks, same outcomes, same effects as record_events_v3, which
-- stays: for replicas still on the previous release, and as the fallback below.
--
-- The set-based form is only correct when no row of the group depends on another's
-- effect. Under the group's advisory locks (nobody else can write these keys or
-- these clients) that is checked first; a group that fails the check goes row by
-- row through apply_event_v3, exactly as before:
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
-- next ANALYZE (measured: 14 ms a group after 2,400 tokens, from 2 ms). Replanning
-- every call cost more than it saved. So each statement is written so that its only
-- sensible plan is "for each row of the group, probe an index": the group drives
-- every lookup through LATERAL subqueries with LIMIT or OFFSET (never flattened,
-- never reordered), updates name their target rows by primary key (`id = ANY`), and
-- the function runs with enable_seqscan off so a probe is an index scan at any size.

CREATE FUNCTION receiver.record_events_v4(
    p_rows receiver.event_row[], p_channel text, p_http boolean
) RETURNS TABLE (outcome text, revoked integer) LANGUAGE plpgsql
-- Index probes at any table size (see Plans, above).
SET enable_seqscan = off
AS $$
DECLARE
    r receiver.event_row;
    v_stored text[];        -- keys already stored with the same content: duplicates
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
    PERFORM pg_advisory_xact_lock(l)
       FROM (SELECT DISTINCT unnest(receiver.event_locks(x)) AS l
               FROM unnest(p_rows) AS x) AS locks
      ORDER BY l;

    SELECT coalesce(array_agg(x.key) FILTER (WHERE e.key IS NOT NULL), '{}'),
           count(DISTINCT x.key) = count(*)
           AND NOT coalesce(bool_or(e.body_hash <> x.body_hash), false)
           AND count(DISTINCT (x.client_id, x.environment))
                 FILTER (WHERE e.key IS NULL AND x.kind IN ('onboarding', 'revocation'))
               = count(*) FILTER (WHERE e.key IS NULL AND x.kind IN ('onboarding', 'revocation'))
           AND count(DISTINCT x.token_index) FILTER (WHERE e.key IS NULL AND x.kind = 'onboarding')
               = count(*) FILTER (WHERE e.key IS NULL AND x.kind = 'onboarding'),
           count(*) FILTER (WHERE e.key IS NULL AND x.kind = 'onboarding'),
           count(*) FILTER (WHERE e.key IS NULL AND x.kind = 'revocation')
      INTO v_stored, v_independent, v_onboardings, v_revocations
      FROM unnest(p_rows) AS x
      -- One index probe per row, whatever the table's size: as a plain join the
      -- planner chose a hash join over a scan of the whole table while it was small.
      LEFT JOIN LATERAL (SELECT e.key, e.body_hash FROM receiver.events e
                          WHERE e.key = x.key LIMIT 1) AS e ON true;

    IF NOT v_independent THEN
        FOREACH r IN ARRAY p_rows LOOP
            SELECT a.outcome, a.revoked INTO outcome, revoked
              FROM receiver.apply_event_v3(r, p_channel, p_http) AS a;
            RETURN NEXT;
        END LOOP;
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

    IF v_onboardings > 0 THEN
        -- As apply_onboarding_v2, decided once per row from one probe each: a token
        -- already stored changes nothing; a revocation that came first wins; the
        -- client's active token in that environment (one at most), when newer, makes
        -- this one superseded, and otherwise gives way to it.
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
                   AND (v.token_prefix = x.prefix
                        OR (v.token_prefix IS NULL AND v.revoked_at >= x.completed_at))
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
        -- As apply_revocation_v3: remembered, applied inside its environment.
        INSERT INTO receiver.revocations
            (event_key, client_id, environment, token_prefix, revoked_at, reason)
        SELECT x.key, x.client_id, x.environment, x.prefix, x.revoked_at, x.reason
          FROM unnest(p_rows) AS x
         WHERE x.kind = 'revocation' AND x.key <> ALL (v_stored);

        -- One revocation can match several tokens (no prefix: all issued before it);
        -- a token matches one revocation at most (distinct clients).
        SELECT array_agg(a.id), array_agg(x.key), array_agg(x.revoked_at), array_agg(x.reason)
          INTO v_ids, v_keys, v_at, v_reasons
          FROM unnest(p_rows) AS x
          CROSS JOIN LATERAL (
                SELECT t.id FROM receiver.tokens t
                 WHERE t.client_id = x.client_id AND t.environment = x.environment
                   AND t.status <> 'revoked'
                   AND CASE WHEN x.prefix IS NULL THEN t.onboarding_completed_at <= x.revoked_at
                            ELSE t.prefix = x.prefix END
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
        -- As enqueue_signal_v2, for each token issued active and each revocation, in
        -- the group's order: an outbox row and its NOTIFY.
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
        SELECT CASE WHEN x.key = ANY (v_stored) THEN 'duplicate'
                    WHEN x.kind IN ('onboarding', 'revocation') THEN 'processed'
                    ELSE x.kind END,
               CASE WHEN x.kind = 'revocation' AND x.key <> ALL (v_stored)
                    THEN coalesce(v_revoked_counts[array_position(v_revoked_keys, x.key)], 0)
               END
          FROM unnest(p_rows) WITH ORDINALITY AS x
         ORDER BY x.ordinality;
END;
$$;
