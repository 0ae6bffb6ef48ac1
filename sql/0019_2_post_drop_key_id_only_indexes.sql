-- The key-id-only indexes, superseded by the (key id, row) ones 0019_1_pre added:
-- each re-seal wrote both, and no statement needs the narrower one.
DROP INDEX receiver.tokens_sealed_key_id;
DROP INDEX receiver.events_sealed_key_id;
