-- One entry point for every event type, so concurrent deliveries can be committed
-- together: the receiver calls it once per row of an unnest() over column arrays,
-- in one statement, one transaction, one WAL flush and one NOTIFY-queue lock for
-- the whole group (see receiver/committer.py).
CREATE FUNCTION receiver.record_event(
    p_kind text,                -- 'onboarding' | 'revocation' | 'ignored'
    p_key text, p_type text, p_is_test boolean, p_occurred_at timestamptz,
    p_body_sealed bytea, p_body_redacted jsonb, p_client_id text,
    p_token_id uuid, p_environment text, p_prefix text, p_token_index bytea,
    p_token_sealed bytea, p_completed_at timestamptz, p_old_expires_at timestamptz,
    p_grace interval, p_revoked_at timestamptz, p_reason text,
    p_channel text, p_http boolean
) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF p_kind = 'onboarding' THEN
        RETURN receiver.record_onboarding(
            p_key, p_type, p_is_test, p_occurred_at, p_body_sealed, p_body_redacted,
            p_token_id, p_client_id, p_environment, p_prefix, p_token_index, p_token_sealed,
            p_completed_at, p_old_expires_at, p_grace, p_channel, p_http);
    ELSIF p_kind = 'revocation' THEN
        RETURN receiver.record_revocation(
            p_key, p_type, p_is_test, p_occurred_at, p_body_sealed, p_body_redacted,
            p_client_id, p_prefix, p_revoked_at, p_reason, p_channel, p_http);
    ELSIF p_kind = 'ignored' THEN
        IF receiver.insert_event(p_key, p_type, 'ignored', NULL, p_is_test, p_occurred_at,
                                 p_body_sealed, p_body_redacted) THEN
            RETURN 'ignored';
        END IF;
        RETURN 'duplicate';
    END IF;
    RAISE EXCEPTION 'unknown event kind %', p_kind;
END;
$$;
