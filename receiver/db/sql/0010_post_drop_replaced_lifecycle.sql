-- Post-migration (sql/README.md): drops what 0009 replaced. In a released project
-- this would ship a release after 0009, once no replica calls record_events_v4 or
-- reprocess_event_v2 any more; before the first release the two ship together.

DROP FUNCTION receiver.record_events_v4;
DROP FUNCTION receiver.reprocess_event_v2;
DROP FUNCTION receiver.apply_event_v2;
DROP FUNCTION receiver.apply_event_v3;
DROP FUNCTION receiver.apply_onboarding_v2;
DROP FUNCTION receiver.apply_revocation_v2;
DROP FUNCTION receiver.apply_revocation_v3;
DROP FUNCTION receiver.insert_event_v2;
DROP FUNCTION receiver.event_locks;
DROP TYPE receiver.event_row;
