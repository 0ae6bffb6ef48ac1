-- The console (and `receiver signals retry`) put dead signals back to pending on an
-- operator's word: that act is audited like every other (who, why, which signal).
ALTER TABLE receiver.audit DROP CONSTRAINT audit_action_check;
ALTER TABLE receiver.audit ADD CONSTRAINT audit_action_check CHECK (action IN (
    'token_reveal', 'token_import', 'client_erase', 'keys_rotate', 'events_reprocess',
    'event_resend', 'events_dismiss', 'token_fetch', 'token_rotate', 'client_revoke',
    'client_link', 'token_reconcile', 'signals_retry'))
    NOT VALID;
ALTER TABLE receiver.audit VALIDATE CONSTRAINT audit_action_check;
