-- Linking through the vault, reconciling it with Debitura, and rotations whose
-- outcome is uncertain staying open (docs/design.md §9).

-- Debitura's `issued_at` (fetch, validate, link): a token's age for the 90-day
-- rotation when Debitura gave one; else its onboarding time; else when stored.
ALTER TABLE receiver.tokens ADD COLUMN issued_at timestamptz;

CREATE OR REPLACE VIEW receiver.token_inventory AS
SELECT id, client_id, environment, prefix,
       CASE WHEN status = 'superseded' AND expires_at <= now() THEN 'expired'
            ELSE status END AS status,
       onboarding_completed_at, stored_at, superseded_at, expires_at, revoked_at,
       revoke_reason, created_by_event, changed_by_event, updated_at,
       receiver.sealed_key_id(token_sealed) AS key_id,
       validated_at, valid, scopes, issued_at
  FROM receiver.tokens;

-- A rotation whose answer was lost, or whose settling fetch still shows the old
-- token, stays open and is checked again at `next_check_at` (backoff: seconds at
-- first), for at least the 24 h grace. `revoked`/`superseded`: the new token was
-- stored, but not as the active one (the client was revoked meanwhile, say).
ALTER TABLE receiver.rotation_intents
    ADD COLUMN next_check_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE receiver.rotation_intents DROP CONSTRAINT rotation_intents_outcome_check;
ALTER TABLE receiver.rotation_intents ADD CONSTRAINT rotation_intents_outcome_check
    CHECK (outcome IN ('rotated', 'resumed', 'not_rotated', 'already_stored', 'failed',
                       'revoked', 'superseded')) NOT VALID;
ALTER TABLE receiver.rotation_intents VALIDATE CONSTRAINT rotation_intents_outcome_check;
CREATE INDEX rotation_intents_next_check ON receiver.rotation_intents (next_check_at)
    WHERE closed_at IS NULL;

-- A partner application's report that a client has no token at all (`NoToken`)
-- names no prefix. `serve` reconciles every reported client within a minute and
-- marks the report done.
ALTER TABLE receiver.link_reports ALTER COLUMN token_prefix DROP NOT NULL;
ALTER TABLE receiver.link_reports ADD COLUMN reconciled_at timestamptz;
CREATE INDEX link_reports_to_reconcile ON receiver.link_reports (reported_at)
    WHERE reconciled_at IS NULL;

-- Each reconcile run of one environment: when it ran, whether it saw everything
-- (every page of Debitura's list, every active token validated), what it changed.
CREATE TABLE receiver.reconcile_runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    trigger text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    complete boolean NOT NULL DEFAULT false,
    summary jsonb
);
CREATE INDEX reconcile_runs_last ON receiver.reconcile_runs (environment, finished_at)
    WHERE complete;

ALTER TABLE receiver.audit DROP CONSTRAINT audit_action_check;
ALTER TABLE receiver.audit ADD CONSTRAINT audit_action_check CHECK (action IN (
    'token_reveal', 'token_import', 'client_erase', 'keys_rotate', 'events_reprocess',
    'event_resend', 'events_dismiss', 'token_fetch', 'token_rotate', 'client_revoke',
    'client_link', 'token_reconcile'))
    NOT VALID;
ALTER TABLE receiver.audit VALIDATE CONSTRAINT audit_action_check;
