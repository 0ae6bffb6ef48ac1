-- Which identifiers each stored body names, so that erasing a client finds the bodies
-- naming it through an index instead of opening every stored body (issue 33).
--
-- body_names: keyed 64-bit hashes (BLAKE2b under a key derived from the blind-index
-- key: vault.name_hashes) of every identifier a body holds between quotes in any of
-- its readings (lifecycle/naming.py: the rule erasure applies), but for the words
-- every delivery holds, timestamps and tokens. NULL while not known: a
-- body stored before this migration or by a release before it, or one naming more
-- identifiers than are kept; erasure opens those (events_body_unnamed) and fills
-- them in. A body whose value is dropped drops its names with it.
--
-- The intake functions take one more field (event_row_v3): new versions beside the
-- old ones, which 0022_2_post drops.
ALTER TABLE receiver.events ADD COLUMN body_names bigint[];
-- fastupdate off: with a pending list, whichever insert found it full merged it (a
-- delivery's commit stalling for the whole list); each insert pays its own few entries.
CREATE INDEX events_body_names ON receiver.events USING gin (body_names)
    WITH (fastupdate = off) WHERE body_sealed IS NOT NULL;
CREATE INDEX events_body_unnamed ON receiver.events (key)
    WHERE body_sealed IS NOT NULL AND body_names IS NULL;

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
