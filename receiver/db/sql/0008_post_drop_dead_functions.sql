-- Post-migration (sql/README.md, "Functions have an end date"): drops the functions
-- no release calls any more. `record_event` and its helpers were replaced by the
-- _v2 functions of 0002, `record_events_v2` by v3 (0006), `record_events_v3` by the
-- set-based v4 (0007); nothing live calls any of them (no named query, no trigger,
-- no other function: tests/integration/test_schema.py checks that for every
-- function left).

DROP FUNCTION receiver.record_event;
DROP FUNCTION receiver.record_onboarding;
DROP FUNCTION receiver.record_revocation;
DROP FUNCTION receiver.insert_event;
DROP FUNCTION receiver.lock_client;
DROP FUNCTION receiver.enqueue_signal;
DROP FUNCTION receiver.record_events_v2;
DROP FUNCTION receiver.record_events_v3;
