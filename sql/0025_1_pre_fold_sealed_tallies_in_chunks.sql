-- The /metrics refresh folds receiver.sealed_tallies' deltas a chunk at a time.
--
-- Every statement writing tokens or events adds a delta row, and only the refresh
-- folds them, inside its 1 s bound. sealed_tallies_fold_v1 folded the whole table in
-- one statement: after a while without scrapes (3M deltas, under two hours of a
-- 500/s intake) that no longer fits the bound, the refresh cancels it, it rolls back,
-- and every later refresh tries the same whole fold again: the backlog never shrinks.
-- v2 folds at most p_limit rows (any p_limit rows: a fold keeps every sum), so each
-- refresh makes progress whatever the backlog. As v1, one statement: a concurrent
-- fold deletes only rows this one did not (a row deleted under it is skipped).
-- Returns how many delta rows it took.
CREATE FUNCTION receiver.sealed_tallies_fold_v2(p_limit integer) RETURNS bigint
    LANGUAGE sql
    AS $$
    WITH gone AS (
        DELETE FROM receiver.sealed_tallies
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM receiver.sealed_tallies LIMIT p_limit))
        RETURNING kind, key_id, n
    ), folded AS (
        INSERT INTO receiver.sealed_tallies (kind, key_id, n)
        SELECT kind, key_id, sum(n) FROM gone GROUP BY 1, 2 HAVING sum(n) <> 0
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
