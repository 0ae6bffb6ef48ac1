-- Token lifecycle: grace periods after rotation, the derived `expired` state, and
-- what key rotation needs to find values sealed under an old key.

-- A superseded token stays usable until expires_at (Debitura's rotation grace
-- period); after it, the token counts as expired.
ALTER TABLE receiver.tokens ADD COLUMN expires_at timestamptz;

-- The key id a sealed value names (its header: version, length, key id), read
-- without opening it.
CREATE FUNCTION receiver.sealed_key_id(sealed bytea) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT encode(substring(sealed FROM 3 FOR get_byte(sealed, 1)), 'escape')
$$;

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

DROP FUNCTION receiver.record_onboarding(
    text, text, boolean, timestamptz, bytea, jsonb, uuid, text, text, text, bytea, bytea,
    timestamptz, text);

-- client.onboarding_completed, in one round trip and one transaction.
-- The token this one supersedes stays usable until p_old_expires_at when the event
-- says so, else for p_grace after this token's onboarding.
CREATE FUNCTION receiver.record_onboarding(
    p_key text, p_type text, p_is_test boolean, p_occurred_at timestamptz,
    p_body_sealed bytea, p_body_redacted jsonb,
    p_token_id uuid, p_client_id text, p_environment text, p_prefix text,
    p_token_index bytea, p_token_sealed bytea, p_completed_at timestamptz,
    p_old_expires_at timestamptz, p_grace interval, p_channel text
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
        PERFORM receiver.enqueue_signal(p_client_id, p_prefix, 'token_issued', p_key, p_channel);
    END IF;
    RETURN 'processed';
END;
$$;
