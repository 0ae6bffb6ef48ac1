-- Token management through Debitura's API (DESIGN §9).

-- A rotation is recorded here, and committed, before rotate-token is sent: rotate-token
-- is not idempotent, so an answer lost on the way back (timeout, reset, 5xx) or a
-- process that dies before storing the new token leaves this row open, and
-- `tokens rotate --resume` (and `serve`) finish it with a fetch, never a second rotate.
-- At most one open rotation per client and environment.
CREATE TABLE receiver.rotation_intents (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id text NOT NULL,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    old_prefix text NOT NULL,
    reason text NOT NULL,
    revoke_immediately boolean NOT NULL DEFAULT false,
    actor text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    resume_attempts integer NOT NULL DEFAULT 0,
    last_error text,
    closed_at timestamptz,
    outcome text CHECK (outcome IN ('rotated', 'resumed', 'not_rotated', 'already_stored',
                                    'failed')),
    new_prefix text,
    CONSTRAINT rotation_intents_closed_has_outcome CHECK ((closed_at IS NULL) = (outcome IS NULL))
);
CREATE UNIQUE INDEX rotation_intents_one_open
    ON receiver.rotation_intents (client_id, environment) WHERE closed_at IS NULL;

-- What Debitura's validate-token last said about a token.
ALTER TABLE receiver.tokens
    ADD COLUMN validated_at timestamptz,
    ADD COLUMN valid boolean,
    ADD COLUMN scopes text[];
CREATE INDEX tokens_invalid ON receiver.tokens (environment) WHERE valid = false;

-- The inventory shows them (columns appended: CREATE OR REPLACE keeps the old ones).
CREATE OR REPLACE VIEW receiver.token_inventory AS
SELECT id, client_id, environment, prefix,
       CASE WHEN status = 'superseded' AND expires_at <= now() THEN 'expired'
            ELSE status END AS status,
       onboarding_completed_at, stored_at, superseded_at, expires_at, revoked_at,
       revoke_reason, created_by_event, changed_by_event, updated_at,
       receiver.sealed_key_id(token_sealed) AS key_id,
       validated_at, valid, scopes
  FROM receiver.tokens;

-- The audit trail's new actions (after 0012's events_dismiss).
ALTER TABLE receiver.audit DROP CONSTRAINT audit_action_check;
ALTER TABLE receiver.audit ADD CONSTRAINT audit_action_check CHECK (action IN (
    'token_reveal', 'token_import', 'client_erase', 'keys_rotate', 'events_reprocess',
    'event_resend', 'events_dismiss', 'token_fetch', 'token_rotate', 'client_revoke'))
    NOT VALID;
ALTER TABLE receiver.audit VALIDATE CONSTRAINT audit_action_check;
