-- The baseline: the schema as 0001_initial … 0004_group_commit left it, squashed
-- into one file before the first release (see sql/README.md). A database migrated
-- by those four files is recognised and recorded as at this baseline
-- (receiver/migrations.py), so its data stays.
--
-- The receiver's schema: events received, tokens sealed, revocations remembered,
-- and the outbox of invalidation signals. Only sealed bytes and the blind index of
-- a token are ever stored; never the token itself.

CREATE TABLE receiver.events (
    key            text PRIMARY KEY,          -- envelope id, or sha256:<hex> of the raw body
    type           text NOT NULL,
    status         text NOT NULL CHECK (status IN ('processed', 'ignored')),
    client_id      text,
    is_test        boolean NOT NULL,
    occurred_at    timestamptz,               -- the envelope's own timestamp
    received_at    timestamptz NOT NULL DEFAULT now(),
    body_sealed    bytea NOT NULL,            -- exact raw body, AES-GCM, AD 'event|<key>'
    body_redacted  jsonb NOT NULL             -- tokens cut to their prefix, for operators
);
CREATE INDEX events_received_at ON receiver.events (received_at);

CREATE TABLE receiver.tokens (
    id                       uuid PRIMARY KEY,   -- chosen by the writer: it is in the AD
    client_id                text NOT NULL,
    environment              text NOT NULL CHECK (environment IN ('live', 'test')),
    prefix                   text NOT NULL,      -- first 15 characters, public
    token_index              bytea NOT NULL UNIQUE,  -- HMAC-SHA256 under the index key
    token_sealed             bytea NOT NULL,     -- AES-GCM, AD 'token|<id>'
    status                   text NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
    onboarding_completed_at  timestamptz NOT NULL,
    stored_at                timestamptz NOT NULL DEFAULT now(),
    superseded_at            timestamptz,
    revoked_at               timestamptz,
    revoke_reason            text,
    created_by_event         text NOT NULL REFERENCES receiver.events (key),
    changed_by_event         text REFERENCES receiver.events (key),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    -- A superseded token stays usable until expires_at (Debitura's rotation grace
    -- period); after it, the token counts as expired.
    expires_at               timestamptz
);
-- At most one active token per client, enforced here and not only in code.
CREATE UNIQUE INDEX tokens_one_active_per_client ON receiver.tokens (client_id)
    WHERE status = 'active';
CREATE INDEX tokens_client_prefix ON receiver.tokens (client_id, prefix);

-- Every revocation is remembered, so a token whose onboarding arrives after its
-- revocation is stored already revoked (DESIGN §3, guarantee 5).
CREATE TABLE receiver.revocations (
    event_key     text PRIMARY KEY REFERENCES receiver.events (key),
    client_id     text NOT NULL,
    token_prefix  text,                 -- NULL: every token issued before revoked_at
    revoked_at    timestamptz NOT NULL,
    reason        text
);
CREATE INDEX revocations_client ON receiver.revocations (client_id);

-- The outbox: written in the same transaction as the token change it announces.
CREATE TABLE receiver.signals (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_id         text NOT NULL,
    token_prefix      text,
    reason            text NOT NULL,
    event_key         text NOT NULL REFERENCES receiver.events (key),
    created_at        timestamptz NOT NULL DEFAULT now(),
    status            text NOT NULL DEFAULT 'pending'
                      -- 'notified': HTTP delivery is off; the NOTIFY sent at commit was the
                      -- delivery, and the row is the record of what was announced.
                      CONSTRAINT signals_status_check
                      CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead', 'notified')),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_id          uuid,
    lease_expires_at  timestamptz,
    last_error        text,
    delivered_at      timestamptz
);
CREATE INDEX signals_due ON receiver.signals (next_attempt_at) WHERE status = 'pending';
CREATE INDEX signals_leased ON receiver.signals (lease_expires_at) WHERE status = 'in_flight';
CREATE INDEX signals_dead ON receiver.signals (created_at) WHERE status = 'dead';

-- The key id a sealed value names (its header: version, length, key id), read
-- without opening it.
CREATE FUNCTION receiver.sealed_key_id(sealed bytea) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT encode(substring(sealed FROM 3 FOR get_byte(sealed, 1)), 'escape')
$$;

-- The token inventory as operators and caches see it at this moment: `expired` is
-- derived from expires_at, so it is exact without a sweeper.
CREATE VIEW receiver.token_inventory AS
SELECT id,
       client_id,
       environment,
       prefix,
       CASE WHEN status = 'superseded' AND expires_at <= now() THEN 'expired'
            ELSE status END AS status,
       onboarding_completed_at,
       stored_at,
       superseded_at,
       expires_at,
       revoked_at,
       revoke_reason,
       created_by_event,
       changed_by_event,
       updated_at,
       receiver.sealed_key_id(token_sealed) AS key_id
  FROM receiver.tokens;

-- Announce a token change: an outbox row, and a NOTIFY for caches that LISTEN.
-- Called only for changes, never per request: NOTIFY takes a cluster-wide lock at commit.
CREATE FUNCTION receiver.enqueue_signal(
    p_client_id text, p_token_prefix text, p_reason text, p_event_key text, p_channel text,
    p_http boolean
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO receiver.signals (client_id, token_prefix, reason, event_key, status)
    VALUES (p_client_id, p_token_prefix, p_reason, p_event_key,
            CASE WHEN p_http THEN 'pending' ELSE 'notified' END)
    RETURNING id INTO v_id;
    PERFORM pg_notify(p_channel, json_build_object(
        'signal_id', v_id, 'client_id', p_client_id, 'token_prefix', p_token_prefix,
        'reason', p_reason, 'event_id', p_event_key)::text);
END;
$$;

-- Store the event row, or report a duplicate. Shared by every event type.
CREATE FUNCTION receiver.insert_event(
    p_key text, p_type text, p_status text, p_client_id text, p_is_test boolean,
    p_occurred_at timestamptz, p_body_sealed bytea, p_body_redacted jsonb
) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO receiver.events
        (key, type, status, client_id, is_test, occurred_at, body_sealed, body_redacted)
    VALUES
        (p_key, p_type, p_status, p_client_id, p_is_test, p_occurred_at, p_body_sealed,
         p_body_redacted)
    ON CONFLICT (key) DO NOTHING;
    RETURN FOUND;
END;
$$;

-- Serialise all token changes of one client for the rest of the transaction: the
-- ordering rules below read, then write, and must not interleave.
CREATE FUNCTION receiver.lock_client(p_client_id text) RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('receiver.client:' || p_client_id, 0));
$$;

-- client.onboarding_completed, in one round trip and one transaction.
-- The token this one supersedes stays usable until p_old_expires_at when the event
-- says so, else for p_grace after this token's onboarding.
CREATE FUNCTION receiver.record_onboarding(
    p_key text, p_type text, p_is_test boolean, p_occurred_at timestamptz,
    p_body_sealed bytea, p_body_redacted jsonb,
    p_token_id uuid, p_client_id text, p_environment text, p_prefix text,
    p_token_index bytea, p_token_sealed bytea, p_completed_at timestamptz,
    p_old_expires_at timestamptz, p_grace interval, p_channel text, p_http boolean
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_revocation receiver.revocations%ROWTYPE;
    v_newer receiver.tokens%ROWTYPE;
    v_status text;
    v_expires_at timestamptz;
BEGIN
    IF NOT receiver.insert_event(p_key, p_type, 'processed', p_client_id, p_is_test,
                                 p_occurred_at, p_body_sealed, p_body_redacted) THEN
        RETURN 'duplicate';
    END IF;
    PERFORM receiver.lock_client(p_client_id);

    -- The same token delivered again by another event changes nothing.
    IF EXISTS (SELECT 1 FROM receiver.tokens WHERE token_index = p_token_index) THEN
        RETURN 'processed';
    END IF;

    -- A revocation that arrived first still wins (order does not matter).
    SELECT * INTO v_revocation FROM receiver.revocations r
     WHERE r.client_id = p_client_id
       AND (r.token_prefix = p_prefix
            OR (r.token_prefix IS NULL AND r.revoked_at >= p_completed_at))
     ORDER BY r.revoked_at
     LIMIT 1;

    IF FOUND THEN
        v_status := 'revoked';
    ELSE
        SELECT * INTO v_newer FROM receiver.tokens
         WHERE client_id = p_client_id AND status = 'active'
           AND onboarding_completed_at > p_completed_at;
        IF FOUND THEN
            -- An older onboarding arriving late never displaces the newer active
            -- token; it is stored as superseded by it, with the grace it would have had.
            v_status := 'superseded';
            v_expires_at := v_newer.onboarding_completed_at + p_grace;
        ELSE
            UPDATE receiver.tokens
               SET status = 'superseded', superseded_at = now(),
                   expires_at = COALESCE(p_old_expires_at, p_completed_at + p_grace),
                   changed_by_event = p_key, updated_at = now()
             WHERE client_id = p_client_id AND status = 'active';
            v_status := 'active';
        END IF;
    END IF;

    INSERT INTO receiver.tokens
        (id, client_id, environment, prefix, token_index, token_sealed, status,
         onboarding_completed_at, superseded_at, expires_at, revoked_at, revoke_reason,
         created_by_event)
    VALUES
        (p_token_id, p_client_id, p_environment, p_prefix, p_token_index, p_token_sealed,
         v_status, p_completed_at,
         CASE WHEN v_status = 'superseded' THEN now() END, v_expires_at,
         v_revocation.revoked_at, v_revocation.reason, p_key);

    IF v_status = 'active' THEN
        PERFORM receiver.enqueue_signal(p_client_id, p_prefix, 'token_issued', p_key, p_channel,
                                       p_http);
    END IF;
    RETURN 'processed';
END;
$$;

-- token.revoked, in one round trip and one transaction.
CREATE FUNCTION receiver.record_revocation(
    p_key text, p_type text, p_is_test boolean, p_occurred_at timestamptz,
    p_body_sealed bytea, p_body_redacted jsonb,
    p_client_id text, p_prefix text, p_revoked_at timestamptz, p_reason text, p_channel text,
    p_http boolean
) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF NOT receiver.insert_event(p_key, p_type, 'processed', p_client_id, p_is_test,
                                 p_occurred_at, p_body_sealed, p_body_redacted) THEN
        RETURN 'duplicate';
    END IF;
    PERFORM receiver.lock_client(p_client_id);

    INSERT INTO receiver.revocations (event_key, client_id, token_prefix, revoked_at, reason)
    VALUES (p_key, p_client_id, p_prefix, p_revoked_at, p_reason);

    -- With a prefix: that token only. Without: every token issued before revoked_at,
    -- so an old revocation never touches a newer token.
    UPDATE receiver.tokens
       SET status = 'revoked', revoked_at = p_revoked_at, revoke_reason = p_reason,
           changed_by_event = p_key, updated_at = now()
     WHERE client_id = p_client_id
       AND status <> 'revoked'
       AND CASE WHEN p_prefix IS NULL THEN onboarding_completed_at <= p_revoked_at
                ELSE prefix = p_prefix END;

    -- Signal even when nothing matched: the cache may hold a token we never saw.
    PERFORM receiver.enqueue_signal(p_client_id, p_prefix, 'token_revoked', p_key, p_channel,
                                   p_http);
    RETURN 'processed';
END;
$$;

-- One entry point for every event type, so concurrent deliveries can be committed
-- together: the receiver calls it once per row of an unnest() over column arrays,
-- in one statement, one transaction, one WAL flush and one NOTIFY-queue lock for
-- the whole group (see receiver/committer.py).
CREATE FUNCTION receiver.record_event(
    p_kind text,                -- 'onboarding' | 'revocation' | 'ignored'
    p_key text, p_type text, p_is_test boolean, p_occurred_at timestamptz,
    p_body_sealed bytea, p_body_redacted jsonb, p_client_id text,
    p_token_id uuid, p_environment text, p_prefix text, p_token_index bytea,
    p_token_sealed bytea, p_completed_at timestamptz, p_old_expires_at timestamptz,
    p_grace interval, p_revoked_at timestamptz, p_reason text,
    p_channel text, p_http boolean
) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    IF p_kind = 'onboarding' THEN
        RETURN receiver.record_onboarding(
            p_key, p_type, p_is_test, p_occurred_at, p_body_sealed, p_body_redacted,
            p_token_id, p_client_id, p_environment, p_prefix, p_token_index, p_token_sealed,
            p_completed_at, p_old_expires_at, p_grace, p_channel, p_http);
    ELSIF p_kind = 'revocation' THEN
        RETURN receiver.record_revocation(
            p_key, p_type, p_is_test, p_occurred_at, p_body_sealed, p_body_redacted,
            p_client_id, p_prefix, p_revoked_at, p_reason, p_channel, p_http);
    ELSIF p_kind = 'ignored' THEN
        IF receiver.insert_event(p_key, p_type, 'ignored', NULL, p_is_test, p_occurred_at,
                                 p_body_sealed, p_body_redacted) THEN
            RETURN 'ignored';
        END IF;
        RETURN 'duplicate';
    END IF;
    RAISE EXCEPTION 'unknown event kind %', p_kind;
END;
$$;
