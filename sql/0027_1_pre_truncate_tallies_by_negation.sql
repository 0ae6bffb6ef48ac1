-- A TRUNCATE of tokens or events zeroes their tallies with a negated sum, not a DELETE.
--
-- The v1 truncate triggers deleted the table's tally rows. Racing the /metrics
-- refresh's fold (sealed_tallies_fold_v2, token_tallies_fold_v2: delete some deltas,
-- insert their sum, in one statement), the trigger's DELETE waited on the fold's row
-- locks, skipped the rows the fold had deleted, and never saw the row it inserted:
-- the truncated table kept the fold's sum as its tally for good (keys rotate then
-- reported values left under an old key in an empty table, and exited 1 every time).
-- A negated sum holds whichever way they interleave: a fold keeps every sum, so the
-- trigger reads the same total before or after the fold commits, and a fold that
-- began before the trigger's row commits leaves it alone. The TRUNCATE's exclusive
-- lock keeps writers of the table out until it commits.
CREATE FUNCTION receiver.tally_sealed_truncate_v2() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.sealed_tallies (kind, key_id, n)
    SELECT kind, key_id, -sum(n) FROM receiver.sealed_tallies
     WHERE kind = TG_TABLE_NAME
     GROUP BY 1, 2 HAVING sum(n) <> 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.tally_token_truncate_v2() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT environment, kind, day, -sum(n) FROM receiver.token_tallies
     GROUP BY 1, 2, 3 HAVING sum(n) <> 0;
    RETURN NULL;
END
$$;

DROP TRIGGER tokens_sealed_truncate ON receiver.tokens;
CREATE TRIGGER tokens_sealed_truncate AFTER TRUNCATE ON receiver.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_truncate_v2();
DROP TRIGGER events_sealed_truncate ON receiver.events;
CREATE TRIGGER events_sealed_truncate AFTER TRUNCATE ON receiver.events
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_sealed_truncate_v2();
DROP TRIGGER tokens_tally_truncate ON receiver.tokens;
CREATE TRIGGER tokens_tally_truncate AFTER TRUNCATE ON receiver.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_token_truncate_v2();
