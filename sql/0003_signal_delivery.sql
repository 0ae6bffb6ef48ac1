-- Invalidation delivery: an outbox row is pending for the dispatcher only when HTTP
-- delivery is configured; otherwise the NOTIFY sent at commit is the delivery and
-- the row is kept as 'notified', the record of what was announced.

ALTER TABLE receiver.signals DROP CONSTRAINT signals_status_check;
ALTER TABLE receiver.signals ADD CONSTRAINT signals_status_check
    CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead', 'notified'));
CREATE INDEX signals_dead ON receiver.signals (created_at) WHERE status = 'dead';

DROP FUNCTION receiver.record_onboarding(
    text, text, boolean, timestamptz, bytea, jsonb, uuid, text, text, text, bytea, bytea,
    timestamptz, timestamptz, interval, text);
DROP FUNCTION receiver.record_revocation(
    text, text, boolean, timestamptz, bytea, jsonb, text, text, timestamptz, text, text);
DROP FUNCTION receiver.enqueue_signal(text, text, text, text, text);

-- Announce a token change: an outbox row, and a NOTIFY for caches that LISTEN.
-- Called only for changes, never per request: NOTIFY takes a cluster-wide lock at commit.
CREATE FUNCTION receiver.enqueue_signal(
    p_client_id text, p_token_prefix text, p_reason text, p_event_key text, p_channel text,
    p_http boolean
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO receiver.signals (client_id, token_prefix, reason, event_key, status)
    VALUES (p_client_id, p_token_prefix, p_reason, p_event_key,
            CASE WHEN p_http THEN 'pending' ELSE 'notified' END)
    RETURNING id INTO v_id;
    PERFORM pg_notify(p_channel, json_build_object(
        'signal_id', v_id, 'client_id', p_client_id, 'token_prefix', p_token_prefix,
        'reason', p_reason, 'event_id', p_event_key)::text);
END;
$$;

-- client.onboarding_completed, in one round trip and one transaction.
-- The token this one supersedes stays usable until p_old_expires_at when the event
-- says so, else for p_grace after this token's onboarding.
CREATE FUNCTION receiver.record_onboarding(
    p_key text, p_type text, p_is_test boolean, p_occurred_at timestamptz,
    p_body_sealed bytea, p_body_redacted jsonb,
    p_token_id uuid, p_client_id text, p_environment text, p_prefix text,
    p_token_index bytea, p_token_sealed bytea, p_completed_at timestamptz,
    p_old_expires_at timestamptz, p_grace interval, p_channel text, p_http boolean
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_revocation receiver.revocations%ROWTYPE;
    v_newer receiver.tokens%ROWTYPE;
    v_status text;
    v_expires_at timestamptz;
BEGIN
    IF NOT receiver.insert_event(p_key, p_type, 'processed', p_client_id, p_is_test,
                                 p_occurred_at, p_body_sealed, p_body_redacted) THEN
        RETURN 'duplicate';
    END IF;
    PERFORM receiver.lock_client(p_client_id);

    -- The same token delivered again by another event changes nothing.
    IF EXISTS (SELECT 1 FROM receiver.tokens WHERE token_index = p_token_index) THEN
        RETURN 'processed';
    END IF;

    -- A revocation that arrived first still wins (order does not matter).
    SELECT * INTO v_revocation FROM receiver.revocations r
     WHERE r.client_id = p_client_id
       AND (r.token_prefix = p_prefix
            OR (r.token_prefix IS NULL AND r.revoked_at >= p_completed_at))
     ORDER BY r.revoked_at
     LIMIT 1;

    IF FOUND THEN
        v_status := 'revoked';
    ELSE
        SELECT * INTO v_newer FROM receiver.tokens
         WHERE client_id = p_client_id AND status = 'active'
           AND onboarding_completed_at > p_completed_at;
        IF FOUND THEN
            -- An older onboarding arriving late never displaces the newer active
            -- token; it is stored as superseded by it, with the grace it would have had.
            v_status := 'superseded';
            v_expires_at := v_newer.onboarding_completed_at + p_grace;
        ELSE
            UPDATE receiver.tokens
               SET status = 'superseded', superseded_at = now(),
                   expires_at = COALESCE(p_old_expires_at, p_completed_at + p_grace),
                   changed_by_event = p_key, updated_at = now()
             WHERE client_id = p_client_id AND status = 'active';
            v_status := 'active';
        END IF;
    END IF;

    INSERT INTO receiver.tokens
        (id, client_id, environment, prefix, token_index, token_sealed, status,
         onboarding_completed_at, superseded_at, expires_at, revoked_at, revoke_reason,
         created_by_event)
    VALUES
        (p_token_id, p_client_id, p_environment, p_prefix, p_token_index, p_token_sealed,
         v_status, p_completed_at,
         CASE WHEN v_status = 'superseded' THEN now() END, v_expires_at,
         v_revocation.revoked_at, v_revocation.reason, p_key);

    IF v_status = 'active' THEN
        PERFORM receiver.enqueue_signal(p_client_id, p_prefix, 'token_issued', p_key, p_channel,
                                       p_http);
    END IF;
    RETURN 'processed';
END;
$$;

-- token.revoked, in one round trip and one transaction.
CREATE FUNCTION receiver.record_revocation(
    p_key text, p_type text, p_is_test boolean, p_occurred_at timestamptz,
    p_body_sealed bytea, p_body_redacted jsonb,
    p_client_id text, p_prefix text, p_revoked_at timestamptz, p_reason text, p_channel text,
    p_http boolean
) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF NOT receiver.insert_event(p_key, p_type, 'processed', p_client_id, p_is_test,
                                 p_occurred_at, p_body_sealed, p_body_redacted) THEN
        RETURN 'duplicate';
    END IF;
    PERFORM receiver.lock_client(p_client_id);

    INSERT INTO receiver.revocations (event_key, client_id, token_prefix, revoked_at, reason)
    VALUES (p_key, p_client_id, p_prefix, p_revoked_at, p_reason);

    -- With a prefix: that token only. Without: every token issued before revoked_at,
    -- so an old revocation never touches a newer token.
    UPDATE receiver.tokens
       SET status = 'revoked', revoked_at = p_revoked_at, revoke_reason = p_reason,
           changed_by_event = p_key, updated_at = now()
     WHERE client_id = p_client_id
       AND status <> 'revoked'
       AND CASE WHEN p_prefix IS NULL THEN onboarding_completed_at <= p_revoked_at
                ELSE prefix = p_prefix END;

    -- Signal even when nothing matched: the cache may hold a token we never saw.
    PERFORM receiver.enqueue_signal(p_client_id, p_prefix, 'token_revoked', p_key, p_channel,
                                   p_http);
    RETURN 'processed';
END;
$$;
