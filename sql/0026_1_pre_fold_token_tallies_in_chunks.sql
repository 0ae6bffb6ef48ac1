-- The /metrics refresh folds receiver.token_tallies' deltas a chunk at a time, as
-- 0025 does for receiver.sealed_tallies: every statement that inserts or changes
-- tokens adds delta rows, only the refresh folds them, and its 1 s bound covers every
-- query of the refresh together. A whole-table fold of a backlog left while nobody
-- scraped (1M deltas: about half an hour of onboardings at 500/s) outgrew the bound,
-- rolled back every time, and left every Postgres gauge stale for good.
-- Returns how many delta rows it took.
CREATE FUNCTION receiver.token_tallies_fold_v2(p_limit integer) RETURNS bigint
    LANGUAGE sql
    AS $$
    WITH gone AS (
        DELETE FROM receiver.token_tallies
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM receiver.token_tallies LIMIT p_limit))
        RETURNING environment, kind, day, n
    ), folded AS (
        INSERT INTO receiver.token_tallies (environment, kind, day, n)
        SELECT environment, kind, day, sum(n) FROM gone GROUP BY 1, 2, 3 HAVING sum(n) <> 0
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
