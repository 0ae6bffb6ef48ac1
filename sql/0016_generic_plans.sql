-- The lifecycle's statements are written for one plan at any size (0001_baseline,
-- "Plans": each probes an index per row of the group). plpgsql still planned some of
-- them anew on every call: its plan cache keeps a custom plan (made for the group's
-- actual array) whenever that plan's estimate beats the generic plan's, and it did
-- for these. Planning them on each call cost about 270 µs per group, 17 µs per event
-- in a group of 16 (bench/README.md, "Hot path, round 2"). The generic plans are the
-- ones the statements were written for.
--
-- A setting on the functions, not a change of them: what they do and their
-- signatures stay, so a replica of the previous release calls them unchanged (the
-- rule against changing a function in place is about what it does).
ALTER FUNCTION receiver.record_events_v5(receiver.event_row_v2[], text, boolean)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION receiver.apply_group_v1(receiver.event_row_v2[], text, boolean)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION receiver.reapply_v1(receiver.event_row_v2, text, boolean)
    SET plan_cache_mode = force_generic_plan;
