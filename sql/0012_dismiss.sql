-- `receiver events dismiss`: a quarantined delivery that will never apply (a sender's
-- bug) is closed by an operator, audited. It leaves the open quarantine (the gauge
-- counts status 'quarantined' only) and retention treats it as settled (bodies are
-- kept only while status is 'quarantined'). Its quarantine reason stays, for history.
ALTER TABLE receiver.events DROP CONSTRAINT events_status_check;
ALTER TABLE receiver.events ADD CONSTRAINT events_status_check
    CHECK (status IN ('processed', 'ignored', 'quarantined', 'dismissed')) NOT VALID;
ALTER TABLE receiver.events VALIDATE CONSTRAINT events_status_check;

ALTER TABLE receiver.audit DROP CONSTRAINT audit_action_check;
ALTER TABLE receiver.audit ADD CONSTRAINT audit_action_check CHECK (action IN (
    'token_reveal', 'token_import', 'client_erase', 'keys_rotate',
    'events_reprocess', 'event_resend', 'events_dismiss')) NOT VALID;
ALTER TABLE receiver.audit VALIDATE CONSTRAINT audit_action_check;
