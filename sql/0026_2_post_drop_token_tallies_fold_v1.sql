-- The whole-table fold, replaced by 0026_1_pre's chunked one. Nothing has been
-- released, so the pre- and post-migration ship together.
DROP FUNCTION receiver.token_tallies_fold_v1();
