-- The intake's functions of event_row_v2, replaced by 0022_1_pre's (one more field:
-- body_names). Nothing has been released, so the pre- and post-migration ship together.
DROP FUNCTION receiver.record_events_v6(receiver.event_row_v2[], text, boolean);
DROP FUNCTION receiver.reapply_v1(receiver.event_row_v2, text, boolean);
DROP FUNCTION receiver.apply_group_v1(receiver.event_row_v2[], text, boolean);
DROP TYPE receiver.event_row_v2;
