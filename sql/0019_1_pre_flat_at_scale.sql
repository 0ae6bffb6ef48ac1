-- Flat at a million clients (issue 33, design §12's last point): each operator path
-- and the /metrics gauges cost what their own rows cost, not the whole table.

-- Token tallies: the gauges' counts of active tokens (per environment and UTC day of
-- onboarding) and of clients holding any token (per environment), kept by triggers
-- on receiver.tokens as insert-only deltas (no row every delivery would update, so
-- no contention at intake), summed by the gauge refresh and folded back into one
-- row per key by receiver.token_tallies_fold_v1. Without them the gauges counted a
-- million tokens (and anti-joined them) on every refresh: 992 ms at 1M clients.
CREATE TABLE receiver.token_tallies (
    environment text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('active', 'clients')),
    day date,  -- 'active': the UTC day of onboarding_completed_at; 'clients': NULL
    n bigint NOT NULL
);
CREATE INDEX token_tallies_key ON receiver.token_tallies (environment, kind, day);

-- A statement that inserts tokens: its active ones, and the (client, environment)
-- pairs that had no token before it.
CREATE FUNCTION receiver.tally_token_inserts_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT environment, 'active', (onboarding_completed_at AT TIME ZONE 'UTC')::date, count(*)
      FROM added WHERE status = 'active'
     GROUP BY 1, 3
    UNION ALL
    -- A pair whose every token is one this statement added is a new client there.
    SELECT a.environment, 'clients', NULL, count(*)
      FROM (SELECT client_id, environment, count(*) AS n FROM added GROUP BY 1, 2) a
     WHERE (SELECT count(*) FROM receiver.tokens t
             WHERE t.client_id = a.client_id AND t.environment = a.environment) = a.n
     GROUP BY 1;
    RETURN NULL;
END
$$;

-- One token's status or onboarding time changed (a supersession, revocation,
-- erasure): move it between the active tallies. Client and environment never change.
CREATE FUNCTION receiver.tally_token_update_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT OLD.environment, 'active', (OLD.onboarding_completed_at AT TIME ZONE 'UTC')::date, -1
     WHERE OLD.status = 'active'
    UNION ALL
    SELECT NEW.environment, 'active', (NEW.onboarding_completed_at AT TIME ZONE 'UTC')::date, 1
     WHERE NEW.status = 'active';
    RETURN NULL;
END
$$;

-- Tokens are never deleted by the service; a hand-made DELETE or TRUNCATE keeps the
-- tallies true all the same.
CREATE FUNCTION receiver.tally_token_deletes_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT environment, 'active', (onboarding_completed_at AT TIME ZONE 'UTC')::date, -count(*)
      FROM removed WHERE status = 'active'
     GROUP BY 1, 3
    UNION ALL
    SELECT r.environment, 'clients', NULL, -count(DISTINCT r.client_id)
      FROM removed r
     WHERE NOT EXISTS (SELECT 1 FROM receiver.tokens t
                        WHERE t.client_id = r.client_id AND t.environment = r.environment)
     GROUP BY 1;
    RETURN NULL;
END
$$;

CREATE FUNCTION receiver.tally_token_truncate_v1() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    DELETE FROM receiver.token_tallies;
    RETURN NULL;
END
$$;

CREATE TRIGGER tokens_tally_inserts AFTER INSERT ON receiver.tokens
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_token_inserts_v1();
CREATE TRIGGER tokens_tally_update AFTER UPDATE OF status, onboarding_completed_at
    ON receiver.tokens FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.onboarding_completed_at IS DISTINCT FROM NEW.onboarding_completed_at)
    EXECUTE FUNCTION receiver.tally_token_update_v1();
CREATE TRIGGER tokens_tally_deletes AFTER DELETE ON receiver.tokens
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_token_deletes_v1();
CREATE TRIGGER tokens_tally_truncate AFTER TRUNCATE ON receiver.tokens
    FOR EACH STATEMENT EXECUTE FUNCTION receiver.tally_token_truncate_v1();

-- The tallies of the tokens already stored (CREATE TRIGGER above holds a lock that
-- keeps writers out until this migration commits).
INSERT INTO receiver.token_tallies (environment, kind, day, n)
SELECT environment, 'active', (onboarding_completed_at AT TIME ZONE 'UTC')::date, count(*)
  FROM receiver.tokens WHERE status = 'active'
 GROUP BY 1, 3
UNION ALL
SELECT environment, 'clients', NULL, count(DISTINCT client_id)
  FROM receiver.tokens
 GROUP BY 1;

-- Fold the deltas into one row per key: one statement, so a concurrent fold (another
-- replica's refresh) deletes only rows this one did not, and no sum is lost.
CREATE FUNCTION receiver.token_tallies_fold_v1() RETURNS void
    LANGUAGE sql
    AS $$
    WITH gone AS (
        DELETE FROM receiver.token_tallies RETURNING environment, kind, day, n
    )
    INSERT INTO receiver.token_tallies (environment, kind, day, n)
    SELECT environment, kind, day, sum(n) FROM gone GROUP BY 1, 2, 3 HAVING sum(n) <> 0
$$;

-- The active tokens of one onboarding day, for the exact age boundary (index only).
CREATE INDEX tokens_active_onboarded ON receiver.tokens (environment, onboarding_completed_at)
    WHERE status = 'active';

-- Active tokens found invalid, per environment. (tokens_invalid's `valid = false`
-- is not proven by a query's `valid IS FALSE`, the form whose estimate counts the
-- NULLs of never-validated tokens: with `valid = false` the planner expects every
-- row and scans the table. Dropped by 0019_2_post.)
CREATE INDEX tokens_active_invalid ON receiver.tokens (environment)
    WHERE status = 'active' AND valid IS FALSE;

-- Due rotation in pages, oldest first (keyset on the same expression and order).
CREATE INDEX tokens_due ON receiver.tokens
    (coalesce(issued_at, onboarding_completed_at, stored_at), client_id, environment)
    WHERE status = 'active';

-- Retention: the values each prune batch looks for, and nothing else (index only
-- for the dry run's counts: the planner takes "holds a body" and "old" as
-- independent, expects most of the table and scans it otherwise).
CREATE INDEX events_body_due ON receiver.events (received_at)
    WHERE body_sealed IS NOT NULL AND status <> 'quarantined';
CREATE INDEX tokens_revoked_value ON receiver.tokens (revoked_at)
    WHERE token_sealed IS NOT NULL AND status = 'revoked';
CREATE INDEX tokens_superseded_value ON receiver.tokens (expires_at)
    WHERE token_sealed IS NOT NULL AND status = 'superseded';

-- Key rotation claims in (key id, row) order: a keyset over these, no sort, and the
-- primary key's own range never walked. They replace the key-id-only indexes
-- (dropped by 0019_2_post).
CREATE INDEX tokens_sealed_key_id_row ON receiver.tokens (receiver.sealed_key_id(token_sealed), id);
CREATE INDEX events_sealed_key_id_row ON receiver.events (receiver.sealed_key_id(body_sealed), key);

-- Erasure: the bodies a client's own deliveries stored.
CREATE INDEX events_client_body ON receiver.events (client_id)
    WHERE body_sealed IS NOT NULL OR body_redacted IS NOT NULL;

-- `events list --type`: newest first, in the listing's order.
CREATE INDEX events_type_received ON receiver.events (type, received_at DESC, key);
