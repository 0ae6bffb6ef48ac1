-- The truncate triggers' v1 functions, replaced by 0027_1_pre's (triggers alone call
-- them, and nothing has been released: the pre- and post-migration ship together).
DROP FUNCTION receiver.tally_sealed_truncate_v1();
DROP FUNCTION receiver.tally_token_truncate_v1();
