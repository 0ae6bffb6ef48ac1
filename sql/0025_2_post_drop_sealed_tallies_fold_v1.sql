-- The whole-table fold, replaced by 0025_1_pre's chunked one. Nothing has been
-- released, so the pre- and post-migration ship together.
DROP FUNCTION receiver.sealed_tallies_fold_v1();
