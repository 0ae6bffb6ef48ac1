-- The receiver's current schema, as the migrations in this folder build it: read
-- this file, not the migrations, to know what is there. Written by `make schema`
-- (pg_dump, noise stripped); tests/integration/test_schema.py checks that a
-- database built from it and one built from the migrations are the same.
-- Never apply it to a database: `receiver migrate` is how schemas change.

SET check_function_bodies = false;

CREATE SCHEMA receiver;

CREATE TYPE receiver.event_row_v3 AS (
	kind text,
	key text,
	envelope_id text,
	type text,
	is_test boolean,
	test_header boolean,
	signature text,
	occurred_at timestamp with time zone,
	body_hash bytea,
	body_sealed bytea,
	body_redacted jsonb,
	client_id text,
	environment text,
	token_id uuid,
	prefix text,
	token_index bytea,
	token_sealed bytea,
	completed_at timestamp with time zone,
	old_expires_at timestamp with time zone,
	grace interval,
	revoked_at timestamp with time zone,
	reason text,
	quarantine_reason text,
	quarantine_detail text,
	replaces text,
	spared text[],
	body_names bigint[]
);

CREATE FUNCTION receiver.apply_group_v2(p_rows receiver.event_row_v3[], p_channel text, p_http boolean) RETURNS TABLE(outcome text, revoked integer)
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    SET plan_cache_mode TO 'force_generic_plan'
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
         signature, body_names)
    SELECT x.key, NULLIF(x.envelope_id, x.key), x.type, s.status, x.client_id, x.is_test,
           x.occurred_at, x.body_hash, x.body_sealed, x.body_redacted,
           CASE WHEN s.status = 'quarantined' THEN x.quarantine_reason END,
           CASE WHEN s.status = 'quarantined' THEN x.quarantine_detail END,
           CASE WHEN s.status = 'quarantined' THEN x.test_header END,
           CASE WHEN s.status = 'quarantined' THEN x.signature END, x.body_names
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
                 test_header, signature, body_names)
            SELECT receiver.body_key(x.body_hash), x.envelope_id, x.type, 'quarantined',
                   x.is_test, x.occurred_at, x.body_hash, x.body_sealed, x.body_redacted,
                   'id_conflict', 'id: already used by a delivery with other content',
                   x.test_header, x.signature, x.body_names
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

CREATE FUNCTION receiver.audit_is_append_only() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'receiver.audit is append-only: rows are never changed or removed'
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE FUNCTION receiver.body_key(p_hash bytea) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
    SELECT 'sha256:' || encode(p_hash, 'hex')
$$;

CREATE FUNCTION receiver.enqueue_signal_v2(p_client_id text, p_environment text, p_token_prefix text, p_reason text, p_event_key text, p_channel text, p_http boolean) RETURNS void
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION receiver.link_report_bounded_v1() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    IF length(NEW.client_id) > 200 OR length(NEW.token_prefix) > 64 THEN
        RETURN NULL;
    END IF;
    NEW.detail := left(NEW.detail, 200);
    NEW.reported_at := now();
    NEW.reconciled_at := NULL;
    IF (SELECT count(*) FROM (
            SELECT 1 FROM receiver.link_reports r
             WHERE r.client_id = NEW.client_id AND r.environment = NEW.environment
               AND r.reconciled_at IS NULL
             LIMIT 3) AS o) >= 3 THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;

CREATE FUNCTION receiver.lock_clients_v1(p_clients text[]) RETURNS void
    LANGUAGE sql
    AS $$
    INSERT INTO receiver.client_locks AS l (key)
    SELECT DISTINCT hashtextextended('receiver.client:' || c, 0)
      FROM unnest(p_clients) AS c
     WHERE c IS NOT NULL
     ORDER BY 1
    ON CONFLICT (key) DO UPDATE SET key = excluded.key WHERE false;
$$;

CREATE FUNCTION receiver.prefix_may_match(p text, stored text) RETURNS boolean
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
    SELECT starts_with(stored, left(p, length(stored)))
$$;

CREATE FUNCTION receiver.reapply_v2(r receiver.event_row_v3, p_channel text, p_http boolean, OUT outcome text, OUT revoked integer) RETURNS record
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    AS $$
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
      FROM receiver.apply_group_v2(ARRAY[r], p_channel, p_http) AS a;
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

CREATE FUNCTION receiver.record_events_v7(p_rows receiver.event_row_v3[], p_channel text, p_http boolean) RETURNS TABLE(outcome text, revoked integer)
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    SET plan_cache_mode TO 'force_generic_plan'
    AS $$
DECLARE
    r receiver.event_row_v3;
    v_recheck boolean[];
BEGIN
    PERFORM receiver.lock_clients_v1(ARRAY(SELECT x.client_id FROM unnest(p_rows) AS x));

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
        RETURN QUERY SELECT * FROM receiver.apply_group_v2(p_rows, p_channel, p_http);
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    FOREACH r IN ARRAY p_rows LOOP
        IF r.replaces IS NULL THEN
            RETURN QUERY SELECT * FROM receiver.apply_group_v2(ARRAY[r], p_channel, p_http);
        ELSE
            RETURN QUERY SELECT * FROM receiver.reapply_v2(r, p_channel, p_http);
        END IF;
    END LOOP;
END;
$$;

CREATE FUNCTION receiver.sealed_key_id(sealed bytea) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$
    SELECT encode(substring(sealed FROM 3 FOR get_byte(sealed, 1)), 'escape')
$$;

CREATE FUNCTION receiver.sealed_tallies_fold_v2(p_limit integer) RETURNS bigint
    LANGUAGE sql
    AS $$
    WITH gone AS (
        DELETE FROM receiver.sealed_tallies
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM receiver.sealed_tallies LIMIT p_limit))
        RETURNING kind, key_id, n
    ), folded AS (
        INSERT INTO receiver.sealed_tallies (kind, key_id, n)
        SELECT kind, key_id, sum(n) FROM gone GROUP BY 1, 2 HAVING sum(n) <> 0
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

CREATE FUNCTION receiver.tally_sealed_truncate_v2() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.sealed_tallies (kind, key_id, n)
    SELECT kind, key_id, -sum(n) FROM receiver.sealed_tallies
     WHERE kind = TG_TABLE_NAME
     GROUP BY 1, 2 HAVING sum(n) <> 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.tally_sealed_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF TG_TABLE_NAME = 'tokens' THEN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'tokens', receiver.sealed_key_id(token_sealed), count(*)
              FROM added WHERE token_sealed IS NOT NULL GROUP BY 2;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'tokens', receiver.sealed_key_id(token_sealed), -count(*)
              FROM removed WHERE token_sealed IS NOT NULL GROUP BY 2;
        ELSE
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'tokens', k, sum(d) FROM (
                SELECT receiver.sealed_key_id(token_sealed) AS k, 1 AS d
                  FROM added WHERE token_sealed IS NOT NULL
                UNION ALL
                SELECT receiver.sealed_key_id(token_sealed), -1
                  FROM removed WHERE token_sealed IS NOT NULL
            ) AS v GROUP BY k HAVING sum(d) <> 0;
        END IF;
    ELSE
        IF TG_OP = 'INSERT' THEN
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'events', receiver.sealed_key_id(body_sealed), count(*)
              FROM added WHERE body_sealed IS NOT NULL GROUP BY 2;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'events', receiver.sealed_key_id(body_sealed), -count(*)
              FROM removed WHERE body_sealed IS NOT NULL GROUP BY 2;
        ELSE
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'events', k, sum(d) FROM (
                SELECT receiver.sealed_key_id(body_sealed) AS k, 1 AS d
                  FROM added WHERE body_sealed IS NOT NULL
                UNION ALL
                SELECT receiver.sealed_key_id(body_sealed), -1
                  FROM removed WHERE body_sealed IS NOT NULL
            ) AS v GROUP BY k HAVING sum(d) <> 0;
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.tally_token_deletes_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT environment, 'active', (onboarding_completed_at AT TIME ZONE 'UTC')::date, -count(*)
      FROM removed WHERE status = 'active'
     GROUP BY 1, 3
    UNION ALL
    SELECT r.environment, 'clients', NULL, -count(DISTINCT r.client_id)
      FROM removed r
     WHERE NOT EXISTS (SELECT 1 FROM receiver.tokens t
                        WHERE t.client_id = r.client_id AND t.environment = r.environment)
     GROUP BY 1;
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.tally_token_inserts_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT environment, 'active', (onboarding_completed_at AT TIME ZONE 'UTC')::date, count(*)
      FROM added WHERE status = 'active'
     GROUP BY 1, 3
    UNION ALL
    -- A pair whose every token is one this statement added is a new client there.
    SELECT a.environment, 'clients', NULL, count(*)
      FROM (SELECT client_id, environment, count(*) AS n FROM added GROUP BY 1, 2) a
     WHERE (SELECT count(*) FROM receiver.tokens t
             WHERE t.client_id = a.client_id AND t.environment = a.environment) = a.n
     GROUP BY 1;
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.tally_token_truncate_v2() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT environment, kind, day, -sum(n) FROM receiver.token_tallies
     GROUP BY 1, 2, 3 HAVING sum(n) <> 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.tally_token_update_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT OLD.environment, 'active', (OLD.onboarding_completed_at AT TIME ZONE 'UTC')::date, -1
     WHERE OLD.status = 'active'
    UNION ALL
    SELECT NEW.environment, 'active', (NEW.onboarding_completed_at AT TIME ZONE 'UTC')::date, 1
     WHERE NEW.status = 'active';
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.token_tallies_fold_v2(p_limit integer) RETURNS bigint
    LANGUAGE sql
    AS $$
    WITH gone AS (
        DELETE FROM receiver.token_tallies
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM receiver.token_tallies LIMIT p_limit))
        RETURNING environment, kind, day, n
    ), folded AS (
        INSERT INTO receiver.token_tallies (environment, kind, day, n)
        SELECT environment, kind, day, sum(n) FROM gone GROUP BY 1, 2, 3 HAVING sum(n) <> 0
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

CREATE TABLE receiver.audit (
    id bigint NOT NULL,
    at timestamp with time zone DEFAULT now() NOT NULL,
    actor text NOT NULL,
    action text NOT NULL,
    client_id text,
    client_hash text,
    environment text,
    token_prefix text,
    event_key text,
    reason text,
    detail jsonb DEFAULT '{}'::jsonb NOT NULL,
    CONSTRAINT audit_action_check CHECK ((action = ANY (ARRAY['token_reveal'::text, 'token_import'::text, 'client_erase'::text, 'keys_rotate'::text, 'events_reprocess'::text, 'event_resend'::text, 'events_dismiss'::text, 'token_fetch'::text, 'token_rotate'::text, 'client_revoke'::text, 'client_link'::text, 'token_reconcile'::text, 'signals_retry'::text]))),
    CONSTRAINT audit_environment_check CHECK ((environment = ANY (ARRAY['live'::text, 'test'::text])))
);

ALTER TABLE receiver.audit ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME receiver.audit_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE receiver.tokens (
    id uuid NOT NULL,
    client_id text NOT NULL,
    environment text NOT NULL,
    prefix text NOT NULL,
    token_index bytea,
    token_sealed bytea,
    status text NOT NULL,
    onboarding_completed_at timestamp with time zone NOT NULL,
    stored_at timestamp with time zone DEFAULT now() NOT NULL,
    superseded_at timestamp with time zone,
    revoked_at timestamp with time zone,
    revoke_reason text,
    created_by_event text NOT NULL,
    changed_by_event text,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone,
    value_dropped_at timestamp with time zone,
    validated_at timestamp with time zone,
    valid boolean,
    scopes text[],
    issued_at timestamp with time zone,
    CONSTRAINT tokens_environment_check CHECK ((environment = ANY (ARRAY['live'::text, 'test'::text]))),
    CONSTRAINT tokens_status_check CHECK ((status = ANY (ARRAY['active'::text, 'superseded'::text, 'revoked'::text]))),
    CONSTRAINT tokens_value_or_dropped CHECK (((token_sealed IS NOT NULL) OR (value_dropped_at IS NOT NULL))),
    CONSTRAINT tokens_value_xor_dropped CHECK (((token_sealed IS NULL) OR (value_dropped_at IS NULL)))
)
WITH (fillfactor='90');

CREATE VIEW receiver.cache_tokens AS
 SELECT id,
    client_id,
    environment,
    prefix,
        CASE
            WHEN ((status = 'superseded'::text) AND (expires_at <= now())) THEN 'expired'::text
            ELSE status
        END AS status,
    onboarding_completed_at,
        CASE
            WHEN ((status = 'active'::text) OR ((status = 'superseded'::text) AND (expires_at > now()))) THEN token_sealed
            ELSE NULL::bytea
        END AS token_sealed
   FROM receiver.tokens;

CREATE TABLE receiver.client_locks (
    key bigint NOT NULL
);

CREATE TABLE receiver.events (
    key text NOT NULL,
    type text NOT NULL,
    status text NOT NULL,
    client_id text,
    is_test boolean NOT NULL,
    occurred_at timestamp with time zone,
    received_at timestamp with time zone DEFAULT now() NOT NULL,
    body_sealed bytea,
    body_redacted jsonb,
    envelope_id text,
    body_hash bytea,
    quarantine_reason text,
    quarantine_detail text,
    test_header boolean,
    signature text,
    reprocessed_at timestamp with time zone,
    body_dropped_at timestamp with time zone,
    body_names bigint[],
    CONSTRAINT events_body_or_dropped CHECK (((body_sealed IS NOT NULL) OR (body_dropped_at IS NOT NULL))),
    CONSTRAINT events_body_xor_dropped CHECK (((body_sealed IS NULL) OR (body_dropped_at IS NULL))),
    CONSTRAINT events_quarantine_reason_check CHECK ((quarantine_reason = ANY (ARRAY['invalid_json'::text, 'not_an_object'::text, 'invalid_data'::text, 'unstorable_value'::text, 'id_conflict'::text, 'test_delivery_targets_live'::text, 'token_outside_bearer_token'::text]))),
    CONSTRAINT events_quarantined_has_reason CHECK (((status <> 'quarantined'::text) OR (quarantine_reason IS NOT NULL))),
    CONSTRAINT events_redacted_with_body CHECK (((body_redacted IS NULL) OR (body_sealed IS NOT NULL))),
    CONSTRAINT events_status_check CHECK ((status = ANY (ARRAY['processed'::text, 'ignored'::text, 'quarantined'::text, 'dismissed'::text])))
)
WITH (fillfactor='90');

CREATE TABLE receiver.leases (
    name text NOT NULL,
    holder text,
    until timestamp with time zone DEFAULT '-infinity'::timestamp with time zone NOT NULL
);

CREATE TABLE receiver.link_reports (
    id bigint NOT NULL,
    client_id text NOT NULL,
    environment text NOT NULL,
    token_prefix text,
    reported_at timestamp with time zone DEFAULT now() NOT NULL,
    detail text,
    reconciled_at timestamp with time zone,
    CONSTRAINT link_reports_environment_check CHECK ((environment = ANY (ARRAY['live'::text, 'test'::text])))
);

ALTER TABLE receiver.link_reports ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME receiver.link_reports_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE receiver.reconcile_runs (
    id bigint NOT NULL,
    environment text NOT NULL,
    trigger text NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone,
    complete boolean DEFAULT false NOT NULL,
    summary jsonb,
    CONSTRAINT reconcile_runs_environment_check CHECK ((environment = ANY (ARRAY['live'::text, 'test'::text])))
);

ALTER TABLE receiver.reconcile_runs ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME receiver.reconcile_runs_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE receiver.revocations (
    event_key text NOT NULL,
    client_id text NOT NULL,
    token_prefix text,
    revoked_at timestamp with time zone NOT NULL,
    reason text,
    environment text NOT NULL,
    CONSTRAINT revocations_environment_check CHECK ((environment = ANY (ARRAY['live'::text, 'test'::text])))
);

CREATE TABLE receiver.rotation_intents (
    id bigint NOT NULL,
    client_id text NOT NULL,
    environment text NOT NULL,
    old_prefix text NOT NULL,
    reason text NOT NULL,
    revoke_immediately boolean DEFAULT false NOT NULL,
    actor text NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    resume_attempts integer DEFAULT 0 NOT NULL,
    last_error text,
    closed_at timestamp with time zone,
    outcome text,
    new_prefix text,
    next_check_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT rotation_intents_closed_has_outcome CHECK (((closed_at IS NULL) = (outcome IS NULL))),
    CONSTRAINT rotation_intents_environment_check CHECK ((environment = ANY (ARRAY['live'::text, 'test'::text]))),
    CONSTRAINT rotation_intents_outcome_check CHECK ((outcome = ANY (ARRAY['rotated'::text, 'resumed'::text, 'not_rotated'::text, 'already_stored'::text, 'failed'::text, 'revoked'::text, 'superseded'::text])))
);

ALTER TABLE receiver.rotation_intents ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME receiver.rotation_intents_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE receiver.sealed_tallies (
    kind text NOT NULL,
    key_id text NOT NULL,
    n bigint NOT NULL,
    CONSTRAINT sealed_tallies_kind_check CHECK ((kind = ANY (ARRAY['tokens'::text, 'events'::text])))
);

CREATE TABLE receiver.signals (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    client_id text NOT NULL,
    token_prefix text,
    reason text NOT NULL,
    event_key text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    status text DEFAULT 'pending'::text NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    lease_id uuid,
    lease_expires_at timestamp with time zone,
    last_error text,
    delivered_at timestamp with time zone,
    environment text,
    CONSTRAINT signals_environment_check CHECK ((environment = ANY (ARRAY['live'::text, 'test'::text]))),
    CONSTRAINT signals_lease_iff_in_flight CHECK (((status = 'in_flight'::text) = (lease_id IS NOT NULL))),
    CONSTRAINT signals_reason_check CHECK ((reason = ANY (ARRAY['token_issued'::text, 'token_revoked'::text]))),
    CONSTRAINT signals_status_check CHECK ((status = ANY (ARRAY['pending'::text, 'in_flight'::text, 'delivered'::text, 'dead'::text, 'notified'::text])))
);

CREATE VIEW receiver.token_inventory AS
 SELECT id,
    client_id,
    environment,
    prefix,
        CASE
            WHEN ((status = 'superseded'::text) AND (expires_at <= now())) THEN 'expired'::text
            ELSE status
        END AS status,
    onboarding_completed_at,
    stored_at,
    superseded_at,
    expires_at,
    revoked_at,
    revoke_reason,
    created_by_event,
    changed_by_event,
    updated_at,
    receiver.sealed_key_id(token_sealed) AS key_id,
    validated_at,
    valid,
    scopes,
    issued_at
   FROM receiver.tokens;

CREATE TABLE receiver.token_tallies (
    environment text NOT NULL,
    kind text NOT NULL,
    day date,
    n bigint NOT NULL,
    CONSTRAINT token_tallies_kind_check CHECK ((kind = ANY (ARRAY['active'::text, 'clients'::text])))
);

ALTER TABLE ONLY receiver.audit
    ADD CONSTRAINT audit_pkey PRIMARY KEY (id);

ALTER TABLE ONLY receiver.client_locks
    ADD CONSTRAINT client_locks_pkey PRIMARY KEY (key);

ALTER TABLE ONLY receiver.events
    ADD CONSTRAINT events_pkey PRIMARY KEY (key);

ALTER TABLE ONLY receiver.leases
    ADD CONSTRAINT leases_pkey PRIMARY KEY (name);

ALTER TABLE ONLY receiver.link_reports
    ADD CONSTRAINT link_reports_pkey PRIMARY KEY (id);

ALTER TABLE ONLY receiver.reconcile_runs
    ADD CONSTRAINT reconcile_runs_pkey PRIMARY KEY (id);

ALTER TABLE ONLY receiver.revocations
    ADD CONSTRAINT revocations_pkey PRIMARY KEY (event_key);

ALTER TABLE ONLY receiver.rotation_intents
    ADD CONSTRAINT rotation_intents_pkey PRIMARY KEY (id);

ALTER TABLE ONLY receiver.signals
    ADD CONSTRAINT signals_pkey PRIMARY KEY (id);

ALTER TABLE receiver.tokens
    ADD CONSTRAINT tokens_active_has_value CHECK (((status <> 'active'::text) OR (token_sealed IS NOT NULL))) NOT VALID;

ALTER TABLE ONLY receiver.tokens
    ADD CONSTRAINT tokens_pkey PRIMARY KEY (id);

ALTER TABLE ONLY receiver.tokens
    ADD CONSTRAINT tokens_token_index_key UNIQUE (token_index);

CREATE INDEX audit_client ON receiver.audit USING btree (client_id, at);

CREATE INDEX audit_client_hash ON receiver.audit USING btree (client_hash) WHERE (client_hash IS NOT NULL);

CREATE INDEX events_body_due ON receiver.events USING btree (received_at) WHERE ((body_dropped_at IS NULL) AND (status <> 'quarantined'::text));

CREATE INDEX events_body_kept ON receiver.events USING btree (received_at) WHERE (body_dropped_at IS NULL);

CREATE INDEX events_body_names ON receiver.events USING gin (body_names) WITH (fastupdate=off) WHERE (body_dropped_at IS NULL);

CREATE INDEX events_body_unnamed ON receiver.events USING btree (key) WHERE ((body_dropped_at IS NULL) AND (body_names IS NULL));

CREATE INDEX events_client_body ON receiver.events USING btree (client_id) WHERE (body_dropped_at IS NULL);

CREATE INDEX events_envelope_id ON receiver.events USING btree (envelope_id) WHERE (envelope_id IS NOT NULL);

CREATE INDEX events_quarantined ON receiver.events USING btree (received_at) WHERE (status = 'quarantined'::text);

CREATE INDEX events_received_at ON receiver.events USING btree (received_at);

CREATE INDEX events_type_received ON receiver.events USING btree (type, received_at DESC, key);

CREATE INDEX link_reports_client ON receiver.link_reports USING btree (client_id, environment, token_prefix);

CREATE INDEX link_reports_open ON receiver.link_reports USING btree (client_id, environment) WHERE (reconciled_at IS NULL);

CREATE INDEX link_reports_to_reconcile ON receiver.link_reports USING btree (reported_at) WHERE (reconciled_at IS NULL);

CREATE INDEX reconcile_runs_last ON receiver.reconcile_runs USING btree (environment, finished_at) WHERE complete;

CREATE INDEX revocations_client ON receiver.revocations USING btree (client_id);

CREATE INDEX revocations_long_prefix ON receiver.revocations USING btree (client_id, environment) WHERE (length(token_prefix) > 15);

CREATE INDEX rotation_intents_next_check ON receiver.rotation_intents USING btree (next_check_at) WHERE (closed_at IS NULL);

CREATE UNIQUE INDEX rotation_intents_one_open ON receiver.rotation_intents USING btree (client_id, environment) WHERE (closed_at IS NULL);

CREATE INDEX sealed_tallies_key ON receiver.sealed_tallies USING btree (kind, key_id);

CREATE INDEX signals_dead ON receiver.signals USING btree (created_at) WHERE (status = 'dead'::text);

CREATE INDEX signals_due ON receiver.signals USING btree (next_attempt_at) WHERE (status = 'pending'::text);

CREATE INDEX signals_leased ON receiver.signals USING btree (lease_expires_at) WHERE (status = 'in_flight'::text);

CREATE INDEX signals_settled ON receiver.signals USING btree (created_at) WHERE (status = ANY (ARRAY['delivered'::text, 'notified'::text]));

CREATE INDEX token_tallies_key ON receiver.token_tallies USING btree (environment, kind, day);

CREATE INDEX tokens_active_invalid ON receiver.tokens USING btree (environment) WHERE ((status = 'active'::text) AND (valid IS FALSE));

CREATE INDEX tokens_active_onboarded ON receiver.tokens USING btree (onboarding_completed_at, environment) WHERE (status = 'active'::text);

CREATE INDEX tokens_client_prefix ON receiver.tokens USING btree (client_id, prefix);

CREATE INDEX tokens_due ON receiver.tokens USING btree (COALESCE(issued_at, onboarding_completed_at, stored_at), client_id, environment) WHERE (status = 'active'::text);

CREATE UNIQUE INDEX tokens_one_active_per_client_environment ON receiver.tokens USING btree (client_id, environment) WHERE (status = 'active'::text);

CREATE INDEX tokens_revoked_value ON receiver.tokens USING btree (revoked_at) WHERE ((value_dropped_at IS NULL) AND (status = 'revoked'::text));

CREATE INDEX tokens_superseded_value ON receiver.tokens USING btree (expires_at) WHERE ((value_dropped_at IS NULL) AND (status = 'superseded'::text));

CREATE TRIGGER audit_append_only BEFORE DELETE OR UPDATE ON receiver.audit FOR EACH ROW EXECUTE FUNCTION receiver.audit_is_append_only();

CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON receiver.audit FOR EACH STATEMENT EXECUTE FUNCTION receiver.audit_is_append_only();

CREATE TRIGGER events_sealed_deletes AFTER DELETE ON receiver.events REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();

CREATE TRIGGER events_sealed_inserts AFTER INSERT ON receiver.events REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();

CREATE TRIGGER events_sealed_truncate AFTER TRUNCATE ON receiver.events FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_truncate_v2();

CREATE TRIGGER events_sealed_updates AFTER UPDATE ON receiver.events REFERENCING OLD TABLE AS removed NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();

CREATE TRIGGER link_report_bounded BEFORE INSERT ON receiver.link_reports FOR EACH ROW EXECUTE FUNCTION receiver.link_report_bounded_v1();

CREATE TRIGGER tokens_sealed_deletes AFTER DELETE ON receiver.tokens REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();

CREATE TRIGGER tokens_sealed_inserts AFTER INSERT ON receiver.tokens REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();

CREATE TRIGGER tokens_sealed_truncate AFTER TRUNCATE ON receiver.tokens FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_truncate_v2();

CREATE TRIGGER tokens_sealed_updates AFTER UPDATE ON receiver.tokens REFERENCING OLD TABLE AS removed NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();

CREATE TRIGGER tokens_tally_deletes AFTER DELETE ON receiver.tokens REFERENCING OLD TABLE AS removed FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_token_deletes_v1();

CREATE TRIGGER tokens_tally_inserts AFTER INSERT ON receiver.tokens REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_token_inserts_v1();

CREATE TRIGGER tokens_tally_truncate AFTER TRUNCATE ON receiver.tokens FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_token_truncate_v2();

CREATE TRIGGER tokens_tally_update AFTER UPDATE OF status, onboarding_completed_at ON receiver.tokens FOR EACH ROW WHEN (((old.status IS DISTINCT FROM new.status) OR (old.onboarding_completed_at IS DISTINCT FROM new.onboarding_completed_at))) EXECUTE FUNCTION receiver.tally_token_update_v1();

ALTER TABLE ONLY receiver.revocations
    ADD CONSTRAINT revocations_event_key_fkey FOREIGN KEY (event_key) REFERENCES receiver.events(key);

ALTER TABLE ONLY receiver.signals
    ADD CONSTRAINT signals_event_key_fkey FOREIGN KEY (event_key) REFERENCES receiver.events(key);

ALTER TABLE ONLY receiver.tokens
    ADD CONSTRAINT tokens_changed_by_event_fkey FOREIGN KEY (changed_by_event) REFERENCES receiver.events(key);

ALTER TABLE ONLY receiver.tokens
    ADD CONSTRAINT tokens_created_by_event_fkey FOREIGN KEY (created_by_event) REFERENCES receiver.events(key);
