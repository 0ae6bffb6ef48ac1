-- Indexes 0019_1_pre superseded: the key-id-only ones (each re-seal wrote both them
-- and the (key id, row) ones, and no statement needs the narrower one), and
-- tokens_invalid (replaced by tokens_active_invalid).
DROP INDEX receiver.tokens_sealed_key_id;
DROP INDEX receiver.events_sealed_key_id;
DROP INDEX receiver.tokens_invalid;
