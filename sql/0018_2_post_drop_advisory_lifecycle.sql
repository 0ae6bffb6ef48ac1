-- The lifecycle's advisory locks go (0018_1: record_events_v6 locks client rows).
-- Shipped with 0018_1 before the first release: no replica still calls them.
DROP FUNCTION receiver.record_events_v5(receiver.event_row_v2[], text, boolean);
DROP FUNCTION receiver.event_locks_v2(receiver.event_row_v2);
