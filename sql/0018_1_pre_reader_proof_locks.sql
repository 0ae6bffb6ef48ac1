-- Locks a partner application's cache reader cannot take (README "Security", docs/decisions.md).
--
-- Advisory locks belong to no table and need no privilege: any role that can connect
-- (receiver_cache_reader too) can take any key, and held `receiver.client:<id>` made
-- every delivery for that client wait out its lock timeout, or a schedule's name
-- stopped every scheduled run. The locks the service relies on are now rows of
-- tables the reader has no privilege on (locking a row needs UPDATE on its table):
--
-- * receiver.client_locks: one row per client (the 64-bit hash of its id, never the
--   id: erasure leaves no name here), made on first sight and locked (FOR UPDATE
--   strength) by every write that must not interleave with another on the same
--   client: a group of deliveries, an erasure.
-- * receiver.leases: a named lease per schedule (rotation, reconcile, reported
--   clients, prune), taken by UPDATE for a bounded time and renewed while the run
--   lasts: no transaction stays open for the run.

CREATE TABLE receiver.client_locks (
    key bigint PRIMARY KEY
);

CREATE TABLE receiver.leases (
    name text PRIMARY KEY,
    holder text,
    until timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO receiver.leases (name)
VALUES ('receiver.token_rotation'), ('receiver.reconcile'), ('receiver.reconcile_reports'),
       ('receiver.prune');

-- The runtime's only (the default privileges say the same; said here so that no
-- reading of 0001 is needed to see it). The cache reader gets nothing.
GRANT SELECT, INSERT, UPDATE, DELETE ON receiver.client_locks, receiver.leases
    TO receiver_runtime;

-- Every client lock a write needs, in one order (key order: two writers never
-- deadlock), in one statement: a client seen for the first time gets its row (a
-- second writer of the same new client waits on that insert), one already there is
-- locked by the conflict (`DO UPDATE ... WHERE false` locks the row, changes nothing,
-- and writes no new row version). NULLs are skipped.
CREATE FUNCTION receiver.lock_clients_v1(p_clients text[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO receiver.client_locks AS l (key)
    SELECT DISTINCT hashtextextended('receiver.client:' || c, 0)
      FROM unnest(p_clients) AS c
     WHERE c IS NOT NULL
     ORDER BY 1
    ON CONFLICT (key) DO UPDATE SET key = excluded.key WHERE false;
$$;

-- record_events_v5 with its locks on client_locks rows. It no longer locks event
-- keys: two groups writing one key for different clients (an id conflict, a
-- delivery with no client) are kept apart by the events primary key, the second
-- waiting on the first's insert and then retried whole (a unique violation is
-- retried; the retry sees the key stored). A reprocessing's replaced row is
-- kept apart by its own row lock (reapply_v1 deletes it first).
CREATE FUNCTION receiver.record_events_v6(
    p_rows receiver.event_row_v2[], p_channel text, p_http boolean
) RETURNS TABLE (outcome text, revoked integer) LANGUAGE plpgsql
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    r receiver.event_row_v2;
    v_recheck boolean[];
BEGIN
    PERFORM receiver.lock_clients_v1(ARRAY(SELECT x.client_id FROM unnest(p_rows) AS x));

    SELECT array_agg(c.needed ORDER BY x.ordinality) INTO v_recheck
      FROM unnest(p_rows) WITH ORDINALITY AS x,
           LATERAL (SELECT x.spared IS NULL AND CASE
               WHEN x.kind = 'onboarding' THEN EXISTS (
                   -- `> 15` as well: the partial index revocations_long_prefix, empty
                   -- unless such a revocation was ever received, answers this probe.
                   SELECT 1 FROM receiver.revocations v
                    WHERE v.client_id = x.client_id AND v.environment = x.environment
                      AND length(v.token_prefix) > 15
                      AND length(v.token_prefix) > length(x.prefix)
                      AND receiver.prefix_may_match(v.token_prefix, x.prefix))
               WHEN x.kind = 'revocation' THEN EXISTS (
                   SELECT 1 FROM receiver.tokens t
                    WHERE t.client_id = x.client_id AND t.environment = x.environment
                      AND t.status <> 'revoked' AND length(x.prefix) > length(t.prefix)
                      AND receiver.prefix_may_match(x.prefix, t.prefix))
               ELSE false END AS needed) AS c;
    IF true = ANY (v_recheck) THEN
        RETURN QUERY
            SELECT CASE WHEN c.needed THEN 'recheck' ELSE 'deferred' END, NULL::integer
              FROM unnest(v_recheck) WITH ORDINALITY AS c(needed, ordinality)
             ORDER BY c.ordinality;
        RETURN;
    END IF;

    IF current_setting('receiver.row_by_row', true) IS DISTINCT FROM 'on'
       AND NOT EXISTS (SELECT 1 FROM unnest(p_rows) AS x WHERE x.replaces IS NOT NULL) THEN
        RETURN QUERY SELECT * FROM receiver.apply_group_v1(p_rows, p_channel, p_http);
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    FOREACH r IN ARRAY p_rows LOOP
        IF r.replaces IS NULL THEN
            RETURN QUERY SELECT * FROM receiver.apply_group_v1(ARRAY[r], p_channel, p_http);
        ELSE
            RETURN QUERY SELECT * FROM receiver.reapply_v1(r, p_channel, p_http);
        END IF;
    END LOOP;
END;
$$;

-- A partner application's reports (receiver.link_reports, all the cache reader may
-- write) are bounded: the reader may report, not fill the table or the reconcile
-- queue. The trigger runs as its owner (it counts rows the reader cannot read);
-- nothing in it raises, so a report the partner library sends never fails:
-- * `detail` is cut to 200 characters; a client id or prefix longer than any real
--   one (200, 64) is not a report: dropped;
-- * the row says when it was reported, not the reporter (`reported_at` now,
--   `reconciled_at` unset);
-- * at most 3 reports of a client and environment wait for reconcile at a time: more
--   are dropped (the ones waiting already bring the client to reconcile). No bound in
--   all: one would let a reader's fake reports crowd out a real one. Concurrent
--   inserts may pass the bound by a few rows.
CREATE INDEX link_reports_open ON receiver.link_reports (client_id, environment)
    WHERE reconciled_at IS NULL;

CREATE FUNCTION receiver.link_report_bounded_v1() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF length(NEW.client_id) > 200 OR length(NEW.token_prefix) > 64 THEN
        RETURN NULL;
    END IF;
    NEW.detail := left(NEW.detail, 200);
    NEW.reported_at := now();
    NEW.reconciled_at := NULL;
    IF (SELECT count(*) FROM (
            SELECT 1 FROM receiver.link_reports r
             WHERE r.client_id = NEW.client_id AND r.environment = NEW.environment
               AND r.reconciled_at IS NULL
             LIMIT 3) AS o) >= 3 THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;
REVOKE ALL ON FUNCTION receiver.link_report_bounded_v1() FROM PUBLIC;

CREATE TRIGGER link_report_bounded BEFORE INSERT ON receiver.link_reports
    FOR EACH ROW EXECUTE FUNCTION receiver.link_report_bounded_v1();
