-- Data governance (docs/decisions.md): what is kept, for how long, and who opened what.
--
-- Retention drops values, not rows: an event's body after RECEIVER_RETAIN_EVENT_BODIES
-- (its key stays, so a late retry is still a duplicate), a revoked or expired token's
-- ciphertext after RECEIVER_RETAIN_TOKEN_VALUES (its inventory row stays), and
-- settled signals after RECEIVER_RETAIN_SIGNALS (those rows go). Erasure drops every
-- token value and stored body of one client at once. Every operator action that
-- opens or changes a secret is written to receiver.audit, which nobody can rewrite.

ALTER TABLE receiver.events ALTER COLUMN body_sealed DROP NOT NULL;
ALTER TABLE receiver.events ADD COLUMN body_dropped_at timestamptz;  -- pruned or erased
ALTER TABLE receiver.events ADD CONSTRAINT events_body_or_dropped
    CHECK (body_sealed IS NOT NULL OR body_dropped_at IS NOT NULL) NOT VALID;

ALTER TABLE receiver.tokens ALTER COLUMN token_sealed DROP NOT NULL;
ALTER TABLE receiver.tokens ALTER COLUMN token_index DROP NOT NULL;  -- NULL once erased
ALTER TABLE receiver.tokens ADD COLUMN value_dropped_at timestamptz;
ALTER TABLE receiver.tokens ADD CONSTRAINT tokens_active_has_value
    CHECK (status <> 'active' OR token_sealed IS NOT NULL) NOT VALID;
ALTER TABLE receiver.tokens ADD CONSTRAINT tokens_value_or_dropped
    CHECK (token_sealed IS NOT NULL OR value_dropped_at IS NOT NULL) NOT VALID;

-- The prune walks settled signals by age; the partial index keeps that a range scan.
CREATE INDEX signals_settled ON receiver.signals (created_at)
    WHERE status IN ('delivered', 'notified');
-- And events whose body is still there, by age (received_at is indexed already; this
-- one skips the bodies already dropped).
CREATE INDEX events_body_kept ON receiver.events (received_at)
    WHERE body_sealed IS NOT NULL;

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
