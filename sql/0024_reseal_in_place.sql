-- Re-sealing a value rewrites no index entry (a heap-only update).
--
-- `keys rotate` changes one column, the sealed value. Every index that named that
-- column (an expression on its key id, or "holds a value" as a partial predicate)
-- made each re-seal a new row version in every index of the table: at 1M clients
-- 3,900 bytes of WAL per re-sealed token (81% of it B-tree pages, mostly their
-- full-page images), and the commits of concurrent deliveries waited behind it.
-- Once no index names the sealed value, a re-seal with room on its page is a HOT
-- update: the heap page only (about 440 bytes per value, measured the same way).
--
-- 1. "Holds a value" is read from the column the drop sets, never from the value:
--    body_dropped_at IS NULL / value_dropped_at IS NULL. Every statement that drops a
--    value sets both (prune, erasure); the checks below hold them to it.
-- 2. How many values each key id seals is kept in receiver.sealed_tallies, insert-only
--    deltas written by statement triggers (as receiver.token_tallies): the rotation
--    gauge, `receiver status`, the start-up key check and `keys rotate`'s plan read
--    it, not an index on the key id. `keys rotate` walks the heap in page order.
-- 3. Pages keep a tenth free (fillfactor 90) for the new versions: a re-seal on a
--    full page moves its row (a non-HOT update); the walk re-seals one row per page
--    per batch so that each batch finds the room the one before it freed.

-- 1. A row holds a value exactly when it has no drop time. The baseline's checks
--    "value or drop time" are NOT VALID (rows from before them may have neither):
--    such a row gets its drop time, then both are validated and the converse added.
--    The drop time first: the NOT VALID check still holds every new row version, so
--    a row with neither must get its drop time before any other change to it.
UPDATE receiver.events SET body_dropped_at = received_at
 WHERE body_sealed IS NULL AND body_dropped_at IS NULL;
UPDATE receiver.events SET body_redacted = NULL
 WHERE body_sealed IS NULL AND body_redacted IS NOT NULL;
UPDATE receiver.events SET body_dropped_at = NULL
 WHERE body_sealed IS NOT NULL AND body_dropped_at IS NOT NULL;
UPDATE receiver.tokens SET value_dropped_at = updated_at
 WHERE token_sealed IS NULL AND value_dropped_at IS NULL AND status <> 'active';
UPDATE receiver.tokens SET value_dropped_at = NULL
 WHERE token_sealed IS NOT NULL AND value_dropped_at IS NOT NULL;
ALTER TABLE receiver.events VALIDATE CONSTRAINT events_body_or_dropped;
-- An active token with no value (which tokens_active_has_value, NOT VALID too, keeps
-- from getting a drop time) is left as it is: no statement that reads drop times
-- reads active tokens. Where there is none, the check is validated.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM receiver.tokens
                    WHERE token_sealed IS NULL AND value_dropped_at IS NULL) THEN
        ALTER TABLE receiver.tokens VALIDATE CONSTRAINT tokens_value_or_dropped;
    END IF;
END
$$;
ALTER TABLE receiver.events ADD CONSTRAINT events_body_xor_dropped
    CHECK (body_sealed IS NULL OR body_dropped_at IS NULL);
ALTER TABLE receiver.events ADD CONSTRAINT events_redacted_with_body
    CHECK (body_redacted IS NULL OR body_sealed IS NOT NULL);
ALTER TABLE receiver.tokens ADD CONSTRAINT tokens_value_xor_dropped
    CHECK (token_sealed IS NULL OR value_dropped_at IS NULL);

-- The same indexes, each naming the drop time instead of the value.
DROP INDEX receiver.events_body_due, receiver.events_body_kept, receiver.events_body_names,
    receiver.events_body_unnamed, receiver.events_client_body,
    receiver.events_sealed_key_id_row, receiver.tokens_revoked_value,
    receiver.tokens_superseded_value, receiver.tokens_sealed_key_id_row;
CREATE INDEX events_body_due ON receiver.events (received_at)
    WHERE body_dropped_at IS NULL AND status <> 'quarantined';
CREATE INDEX events_body_kept ON receiver.events (received_at)
    WHERE body_dropped_at IS NULL;
CREATE INDEX events_body_names ON receiver.events USING gin (body_names)
    WITH (fastupdate = off) WHERE body_dropped_at IS NULL;
CREATE INDEX events_body_unnamed ON receiver.events (key)
    WHERE body_dropped_at IS NULL AND body_names IS NULL;
CREATE INDEX events_client_body ON receiver.events (client_id)
    WHERE body_dropped_at IS NULL;
CREATE INDEX tokens_revoked_value ON receiver.tokens (revoked_at)
    WHERE value_dropped_at IS NULL AND status = 'revoked';
CREATE INDEX tokens_superseded_value ON receiver.tokens (expires_at)
    WHERE value_dropped_at IS NULL AND status = 'superseded';

-- 2. Values per key id and kind ('tokens', 'events'), as deltas.
CREATE TABLE receiver.sealed_tallies (
    kind text NOT NULL CHECK (kind IN ('tokens', 'events')),
    key_id text NOT NULL,
    n bigint NOT NULL
);
CREATE INDEX sealed_tallies_key ON receiver.sealed_tallies (kind, key_id);

-- One function for every statement on either table: the values the statement
-- removed (old rows) count -1 under their key id, the values it wrote +1; a row whose
-- value did not change nets to nothing, and nothing is written for it.
CREATE FUNCTION receiver.tally_sealed_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF TG_TABLE_NAME = 'tokens' THEN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'tokens', receiver.sealed_key_id(token_sealed), count(*)
              FROM added WHERE token_sealed IS NOT NULL GROUP BY 2;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'tokens', receiver.sealed_key_id(token_sealed), -count(*)
              FROM removed WHERE token_sealed IS NOT NULL GROUP BY 2;
        ELSE
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'tokens', k, sum(d) FROM (
                SELECT receiver.sealed_key_id(token_sealed) AS k, 1 AS d
                  FROM added WHERE token_sealed IS NOT NULL
                UNION ALL
                SELECT receiver.sealed_key_id(token_sealed), -1
                  FROM removed WHERE token_sealed IS NOT NULL
            ) AS v GROUP BY k HAVING sum(d) <> 0;
        END IF;
    ELSE
        IF TG_OP = 'INSERT' THEN
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'events', receiver.sealed_key_id(body_sealed), count(*)
              FROM added WHERE body_sealed IS NOT NULL GROUP BY 2;
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'events', receiver.sealed_key_id(body_sealed), -count(*)
              FROM removed WHERE body_sealed IS NOT NULL GROUP BY 2;
        ELSE
            INSERT INTO receiver.sealed_tallies (kind, key_id, n)
            SELECT 'events', k, sum(d) FROM (
                SELECT receiver.sealed_key_id(body_sealed) AS k, 1 AS d
                  FROM added WHERE body_sealed IS NOT NULL
                UNION ALL
                SELECT receiver.sealed_key_id(body_sealed), -1
                  FROM removed WHERE body_sealed IS NOT NULL
            ) AS v GROUP BY k HAVING sum(d) <> 0;
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.tally_sealed_truncate_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    DELETE FROM receiver.sealed_tallies WHERE kind = TG_TABLE_NAME;
    RETURN NULL;
END
$$;

CREATE TRIGGER tokens_sealed_inserts AFTER INSERT ON receiver.tokens
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();
CREATE TRIGGER tokens_sealed_updates AFTER UPDATE ON receiver.tokens
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();
CREATE TRIGGER tokens_sealed_deletes AFTER DELETE ON receiver.tokens
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();
CREATE TRIGGER tokens_sealed_truncate AFTER TRUNCATE ON receiver.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_truncate_v1();
CREATE TRIGGER events_sealed_inserts AFTER INSERT ON receiver.events
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();
CREATE TRIGGER events_sealed_updates AFTER UPDATE ON receiver.events
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();
CREATE TRIGGER events_sealed_deletes AFTER DELETE ON receiver.events
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_v1();
CREATE TRIGGER events_sealed_truncate AFTER TRUNCATE ON receiver.events
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_truncate_v1();

-- The values stored already (the triggers' locks keep writers out until this commits).
INSERT INTO receiver.sealed_tallies (kind, key_id, n)
SELECT 'tokens', receiver.sealed_key_id(token_sealed), count(*)
  FROM receiver.tokens WHERE token_sealed IS NOT NULL GROUP BY 2
UNION ALL
SELECT 'events', receiver.sealed_key_id(body_sealed), count(*)
  FROM receiver.events WHERE body_sealed IS NOT NULL GROUP BY 2;

-- Fold the deltas into one row per key (as token_tallies_fold_v1: one statement, so a
-- concurrent fold deletes only rows this one did not).
CREATE FUNCTION receiver.sealed_tallies_fold_v1() RETURNS void
    LANGUAGE sql
    AS $$
    WITH gone AS (
        DELETE FROM receiver.sealed_tallies RETURNING kind, key_id, n
    )
    INSERT INTO receiver.sealed_tallies (kind, key_id, n)
    SELECT kind, key_id, sum(n) FROM gone GROUP BY 1, 2 HAVING sum(n) <> 0
$$;

-- 3. Room on each page for a re-sealed row's new version (new pages; old ones gain it
--    as their rows move or are pruned).
ALTER TABLE receiver.tokens SET (fillfactor = 90);
ALTER TABLE receiver.events SET (fillfactor = 90);
