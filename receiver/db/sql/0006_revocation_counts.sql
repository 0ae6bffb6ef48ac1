-- A revocation reports how many tokens it revoked, so that senders (the replay tool,
-- an operator with curl) can tell "revoked" from "matched no token" (the signal is
-- queued either way: the cache may hold a token we never saw). v2 stays for replicas
-- still on the previous release (sql/README.md).

CREATE FUNCTION receiver.apply_revocation_v3(r receiver.event_row, p_channel text, p_http boolean)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_revoked integer;
BEGIN
    INSERT INTO receiver.revocations
        (event_key, client_id, environment, token_prefix, revoked_at, reason)
    VALUES (r.key, r.client_id, r.environment, r.prefix, r.revoked_at, r.reason);

    UPDATE receiver.tokens
       SET status = 'revoked', revoked_at = r.revoked_at, revoke_reason = r.reason,
           changed_by_event = r.key, updated_at = now()
     WHERE client_id = r.client_id AND environment = r.environment
       AND status <> 'revoked'
       AND CASE WHEN r.prefix IS NULL THEN onboarding_completed_at <= r.revoked_at
                ELSE prefix = r.prefix END;
    GET DIAGNOSTICS v_revoked = ROW_COUNT;

    PERFORM receiver.enqueue_signal_v2(r.client_id, r.environment, r.prefix,
                                       'token_revoked', r.key, p_channel, p_http);
    RETURN v_revoked;
END;
$$;

-- One delivery: its outcome, and for a processed revocation the tokens it revoked.
CREATE FUNCTION receiver.apply_event_v3(
    r receiver.event_row, p_channel text, p_http boolean,
    OUT outcome text, OUT revoked integer
) LANGUAGE plpgsql AS $$
DECLARE
    v_stored text;
BEGIN
    v_stored := receiver.insert_event_v2(r, CASE r.kind
        WHEN 'onboarding' THEN 'processed' WHEN 'revocation' THEN 'processed'
        ELSE r.kind END);
    IF v_stored = 'duplicate' OR v_stored = 'id_conflict' THEN
        outcome := v_stored;
    ELSIF r.kind = 'onboarding' THEN
        PERFORM receiver.apply_onboarding_v2(r, p_channel, p_http);
        outcome := 'processed';
    ELSIF r.kind = 'revocation' THEN
        revoked := receiver.apply_revocation_v3(r, p_channel, p_http);
        outcome := 'processed';
    ELSE
        outcome := r.kind;  -- ignored | quarantined: stored, no effect
    END IF;
END;
$$;

-- As record_events_v2 (every lock first, in one order), with the revocation counts.
CREATE FUNCTION receiver.record_events_v3(
    p_rows receiver.event_row[], p_channel text, p_http boolean
) RETURNS TABLE (outcome text, revoked integer) LANGUAGE plpgsql AS $$
DECLARE
    r receiver.event_row;
BEGIN
    PERFORM pg_advisory_xact_lock(l)
       FROM (SELECT DISTINCT unnest(receiver.event_locks(x)) AS l
               FROM unnest(p_rows) AS x) AS locks
      ORDER BY l;
    FOREACH r IN ARRAY p_rows LOOP
        SELECT a.outcome, a.revoked INTO outcome, revoked
          FROM receiver.apply_event_v3(r, p_channel, p_http) AS a;
        RETURN NEXT;
    END LOOP;
END;
$$;
