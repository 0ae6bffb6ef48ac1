-- Least privilege (README "Roles"). The migration owner is the login role that runs
-- `receiver migrate` (it owns what the migrations create: ownership cannot be shared
-- by a group role without SET ROLE, which would strip a superuser's rights midway).
-- Two group roles, NOLOGIN, that an operator grants to login roles of their own:
--   receiver_runtime       `receiver serve`, `dispatch` and the CLI: DML, no DDL,
--                          and the audit table append-only
--   receiver_cache_reader  a partner application's token cache: SELECT on
--                          receiver.cache_tokens, INSERT into receiver.link_reports,
--                          and LISTEN (which needs no grant); nothing else
-- Roles belong to the cluster, not the database: created only when missing.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['receiver_runtime', 'receiver_cache_reader'] LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created by another database's migration, or concurrently
        END;
    END LOOP;
END;
$$;

-- What a cache may read: tokens as ciphertext with their state, nothing of events.
CREATE VIEW receiver.cache_tokens AS
SELECT id, client_id, environment, prefix,
       CASE WHEN status = 'superseded' AND expires_at <= now() THEN 'expired'
            ELSE status END AS status,
       onboarding_completed_at, token_sealed
  FROM receiver.tokens;

-- A partner application that got a second 401 with a client's current token reports
-- it here: the link itself is invalid. The token is not revoked (only Debitura says
-- that); `tokens list` shows the report and a gauge counts such clients.
CREATE TABLE receiver.link_reports (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    client_id text NOT NULL,
    environment text NOT NULL CHECK (environment IN ('live', 'test')),
    token_prefix text NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now(),
    detail text
);
CREATE INDEX link_reports_client ON receiver.link_reports (client_id, environment, token_prefix);

GRANT USAGE ON SCHEMA receiver TO receiver_runtime, receiver_cache_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA receiver TO receiver_runtime;
REVOKE UPDATE, DELETE ON receiver.audit FROM receiver_runtime;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA receiver TO receiver_runtime;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA receiver TO receiver_runtime;
GRANT SELECT ON receiver.cache_tokens TO receiver_cache_reader;
GRANT INSERT ON receiver.link_reports TO receiver_cache_reader;
-- Tables later migrations create are the runtime's too.
ALTER DEFAULT PRIVILEGES IN SCHEMA receiver
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO receiver_runtime;
ALTER DEFAULT PRIVILEGES IN SCHEMA receiver GRANT USAGE ON SEQUENCES TO receiver_runtime;
-- Functions are executable by PUBLIC by default; the reader gets no table behind them.
