-- The (key id, row) indexes hold only rows that hold a sealed value.
--
-- A value dropped by retention or erasure (NULL) is under no key and never rotated,
-- yet its row stayed in these indexes under a NULL key: at 1M clients, 2.2M of
-- events_sealed_key_id_row's 3M entries. Every prune or erasure of a body then
-- inserted one more index entry (its new row version's NULL key), one of the five a
-- dropped body cost; now four. Every query reading them says `… IS NOT NULL`.
DROP INDEX receiver.events_sealed_key_id_row;
CREATE INDEX events_sealed_key_id_row ON receiver.events (receiver.sealed_key_id(body_sealed), key)
    WHERE body_sealed IS NOT NULL;
DROP INDEX receiver.tokens_sealed_key_id_row;
CREATE INDEX tokens_sealed_key_id_row ON receiver.tokens (receiver.sealed_key_id(token_sealed), id)
    WHERE token_sealed IS NOT NULL;
