-- Authentic deliveries are never refused (docs/contract.md): a delivery whose
-- signature verifies but that cannot be applied is stored as 'quarantined', with a
-- machine-readable reason. Live and test are separate worlds: one active token per
-- client per environment, revocations scoped to one environment, signals that say
-- which. Groups take every lock they need up front, in one order, so they never
-- deadlock. The v1 entry point (record_event) stays for replicas still on the old
-- code during a rolling deploy; a later migration drops it (sql/README.md).

-- Events: quarantine, content identity, and what reprocessing needs.
ALTER TABLE receiver.events DROP CONSTRAINT events_status_check;
ALTER TABLE receiver.events ADD CONSTRAINT events_status_check
    CHECK (status IN ('processed', 'ignored', 'quarantined'));
ALTER TABLE receiver.events ALTER COLUMN body_redacted DROP NOT NULL;  -- NULL: not JSON
ALTER TABLE receiver.events
    ADD COLUMN envelope_id text,          -- an id conflict's envelope id (its key is the
                                          -- body hash); NULL where key = the id
    ADD COLUMN body_hash bytea,           -- sha256 of the raw body; NULL for old rows
    ADD COLUMN quarantine_reason text,    -- why it was (or is) quarantined
    ADD COLUMN quarantine_detail text,    -- field path and error kind, never a value
    ADD COLUMN test_header boolean,       -- X-Debitura-Test as sent (quarantined rows)
    ADD COLUMN signature text,            -- the signature header (quarantined rows)
    ADD COLUMN reprocessed_at timestamptz;
ALTER TABLE receiver.events ADD CONSTRAINT events_quarantine_reason_check
    CHECK (quarantine_reason IN ('invalid_json', 'not_an_object', 'invalid_data',
                                 'unstorable_value', 'id_conflict',
                                 'test_delivery_targets_live', 'token_outside_bearer_token'));
ALTER TABLE receiver.events ADD CONSTRAINT events_quarantined_has_reason
    CHECK (status <> 'quarantined' OR quarantine_reason IS NOT NULL);
CREATE INDEX events_quarantined ON receiver.events (received_at) WHERE status = 'quarantined';
CREATE INDEX events_envelope_id ON receiver.events (envelope_id) WHERE envelope_id IS NOT NULL;

-- Tokens: the environment comes from the token itself. Earlier code let a test
-- onboarding supersede the client's live token (and the reverse): such a token is
-- active again when nothing newer of its own environment replaced it. A revocation
-- is never undone here: a token revoked by a test delivery stays revoked.
UPDATE receiver.tokens SET environment = substr(prefix, 5, 4)
 WHERE environment IS DISTINCT FROM substr(prefix, 5, 4);
CREATE UNIQUE INDEX tokens_one_active_per_client_environment
    ON receiver.tokens (client_id, environment) WHERE status = 'active';
DROP INDEX receiver.tokens_one_active_per_client;
UPDATE receiver.tokens t
   SET status = 'active', superseded_at = NULL, expires_at = NULL,
       changed_by_event = NULL, updated_at = now()
 WHERE t.status = 'superseded'
   AND EXISTS (SELECT 1 FROM receiver.tokens n
                WHERE n.created_by_event = t.changed_by_event
                  AND n.environment <> t.environment)
   AND NOT EXISTS (SELECT 1 FROM receiver.tokens o
                    WHERE o.client_id = t.client_id AND o.environment = t.environment
                      AND o.id <> t.id
                      AND (o.status = 'active'
                           OR o.onboarding_completed_at > t.onboarding_completed_at));

-- Revocations act inside one environment: their prefix's, else the delivery's.
ALTER TABLE receiver.revocations ADD COLUMN environment text;
UPDATE receiver.revocations r
   SET environment = COALESCE(substr(r.token_prefix, 5, 4),
                              CASE WHEN e.is_test THEN 'test' ELSE 'live' END)
  FROM receiver.events e
 WHERE e.key = r.event_key;
ALTER TABLE receiver.revocations ALTER COLUMN environment SET NOT NULL;
ALTER TABLE receiver.revocations ADD CONSTRAINT revocations_environment_check
    CHECK (environment IN ('live', 'test'));

-- Signals say which environment's token to drop; NULL on rows from before.
ALTER TABLE receiver.signals ADD COLUMN environment text
    CHECK (environment IN ('live', 'test'));
ALTER TABLE receiver.signals ADD CONSTRAINT signals_reason_check
    CHECK (reason IN ('token_issued', 'token_revoked'));
ALTER TABLE receiver.signals ADD CONSTRAINT signals_lease_iff_in_flight
    CHECK ((status = 'in_flight') = (lease_id IS NOT NULL));

-- One delivery as the receiver hands it over: named fields, one array per group.
-- receiver/store.py builds these in this order; a test compares the two.
CREATE TYPE receiver.event_row AS (
    kind               text,         -- onboarding | revocation | ignored | quarantined
    key                text,         -- envelope id, or sha256:<hex> of the raw body
    envelope_id        text,
    type               text,
    is_test            boolean,
    test_header        boolean,
    signature          text,
    occurred_at        timestamptz,
    body_hash          bytea,
    body_sealed        bytea,
    body_redacted      jsonb,
    client_id          text,
    environment        text,         -- live | test: where the effect applies
    token_id           uuid,
    prefix             text,
    token_index        bytea,
    token_sealed       bytea,
    completed_at       timestamptz,
    old_expires_at     timestamptz,
    grace              interval,
    revoked_at         timestamptz,
    reason             text,
    quarantine_reason  text,
    quarantine_detail  text
);

-- Announce a token change: an outbox row, and a NOTIFY for caches that LISTEN.
-- Called only for changes, never per request: NOTIFY takes a cluster-wide lock at commit.
CREATE FUNCTION receiver.enqueue_signal_v2(
    p_client_id text, p_environment text, p_token_prefix text, p_reason text,
    p_event_key text, p_channel text, p_http boolean
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
BEGIN
    INSERT INTO receiver.signals (client_id, environment, token_prefix, reason, event_key, status)
    VALUES (p_client_id, p_environment, p_token_prefix, p_reason, p_event_key,
            CASE WHEN p_http THEN 'pending' ELSE 'notified' END)
    RETURNING id INTO v_id;
    PERFORM pg_notify(p_channel, json_build_object(
        'signal_id', v_id, 'client_id', p_client_id, 'environment', p_environment,
        'token_prefix', p_token_prefix, 'reason', p_reason, 'event_id', p_event_key)::text);
END;
$$;

-- Store one delivery's event row. Returns 'inserted', 'duplicate' (same key, same
-- content), or 'id_conflict' (same key, other content: this one is kept as well,
-- quarantined under its body hash, and the first one's effect stands).
CREATE FUNCTION receiver.insert_event_v2(r receiver.event_row, p_status text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_hash bytea;
BEGIN
    INSERT INTO receiver.events
        (key, envelope_id, type, status, client_id, is_test, occurred_at, body_hash,
         body_sealed, body_redacted, quarantine_reason, quarantine_detail, test_header,
         signature)
    VALUES
        (r.key, NULLIF(r.envelope_id, r.key), r.type, p_status, r.client_id, r.is_test,
         r.occurred_at,
         r.body_hash, r.body_sealed, r.body_redacted,
         CASE WHEN p_status = 'quarantined' THEN r.quarantine_reason END,
         CASE WHEN p_status = 'quarantined' THEN r.quarantine_detail END,
         CASE WHEN p_status = 'quarantined' THEN r.test_header END,
         CASE WHEN p_status = 'quarantined' THEN r.signature END)
    ON CONFLICT (key) DO NOTHING;
    IF FOUND THEN
        RETURN 'inserted';
    END IF;
    SELECT body_hash INTO v_hash FROM receiver.events WHERE key = r.key;
    -- Rows stored before body hashes existed cannot be compared: a duplicate, as then.
    IF v_hash IS NULL OR v_hash = r.body_hash THEN
        RETURN 'duplicate';
    END IF;
    INSERT INTO receiver.events
        (key, envelope_id, type, status, is_test, occurred_at, body_hash, body_sealed,
         body_redacted, quarantine_reason, quarantine_detail, test_header, signature)
    VALUES
        (receiver.body_key(r.body_hash), r.envelope_id, r.type, 'quarantined', r.is_test,
         r.occurred_at, r.body_hash, r.body_sealed, r.body_redacted, 'id_conflict',
         'id: already used by a delivery with other content', r.test_header, r.signature)
    ON CONFLICT (key) DO NOTHING;
    IF FOUND THEN
        RETURN 'id_conflict';
    END IF;
    RETURN 'duplicate';  -- this very conflicting delivery, again
END;
$$;

-- The idempotency key of a body without a usable id: sha256:<hex>.
CREATE FUNCTION receiver.body_key(p_hash bytea) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT 'sha256:' || encode(p_hash, 'hex')
$$;

-- The advisory locks one delivery needs: its key and its client. (The body key an
-- id conflict is stored under needs none: only the same body, hence the same key,
-- can write it.)
CREATE FUNCTION receiver.event_locks(r receiver.event_row) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_remove(ARRAY[
        hashtextextended('receiver.event:' || r.key, 0),
        hashtextextended('receiver.client:' || r.client_id, 0)], NULL)
$$;

-- client.onboarding_completed: store the token; it becomes the client's active token
-- in its environment unless a revocation or a newer token of that environment says
-- otherwise (order does not matter).
CREATE FUNCTION receiver.apply_onboarding_v2(r receiver.event_row, p_channel text, p_http boolean)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_revocation receiver.revocations%ROWTYPE;
    v_newer receiver.tokens%ROWTYPE;
    v_status text;
    v_expires_at timestamptz;
BEGIN
    -- The same token delivered again by another event changes nothing.
    IF EXISTS (SELECT 1 FROM receiver.tokens WHERE token_index = r.token_index) THEN
        RETURN;
    END IF;

    -- A revocation that arrived first still wins.
    SELECT * INTO v_revocation FROM receiver.revocations v
     WHERE v.client_id = r.client_id AND v.environment = r.environment
       AND (v.token_prefix = r.prefix
            OR (v.token_prefix IS NULL AND v.revoked_at >= r.completed_at))
     ORDER BY v.revoked_at
     LIMIT 1;

    IF FOUND THEN
        v_status := 'revoked';
    ELSE
        SELECT * INTO v_newer FROM receiver.tokens
         WHERE client_id = r.client_id AND environment = r.environment AND status = 'active'
           AND onboarding_completed_at > r.completed_at;
        IF FOUND THEN
            -- An older onboarding arriving late never displaces the newer active
            -- token; it is stored as superseded by it, with the grace it would have had.
            v_status := 'superseded';
            v_expires_at := v_newer.onboarding_completed_at + r.grace;
        ELSE
            UPDATE receiver.tokens
               SET status = 'superseded', superseded_at = now(),
                   expires_at = COALESCE(r.old_expires_at, r.completed_at + r.grace),
                   changed_by_event = r.key, updated_at = now()
             WHERE client_id = r.client_id AND environment = r.environment
               AND status = 'active';
            v_status := 'active';
        END IF;
    END IF;

    INSERT INTO receiver.tokens
        (id, client_id, environment, prefix, token_index, token_sealed, status,
         onboarding_completed_at, superseded_at, expires_at, revoked_at, revoke_reason,
         created_by_event)
    VALUES
        (r.token_id, r.client_id, r.environment, r.prefix, r.token_index, r.token_sealed,
         v_status, r.completed_at,
         CASE WHEN v_status = 'superseded' THEN now() END, v_expires_at,
         v_revocation.revoked_at, v_revocation.reason, r.key);

    IF v_status = 'active' THEN
        PERFORM receiver.enqueue_signal_v2(r.client_id, r.environment, r.prefix,
                                           'token_issued', r.key, p_channel, p_http);
    END IF;
END;
$$;

-- token.revoked: remembered (so a late onboarding is stored revoked), applied inside
-- its environment, and signalled even when nothing matched: the cache may hold a
-- token we never saw.
CREATE FUNCTION receiver.apply_revocation_v2(r receiver.event_row, p_channel text, p_http boolean)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO receiver.revocations
        (event_key, client_id, environment, token_prefix, revoked_at, reason)
    VALUES (r.key, r.client_id, r.environment, r.prefix, r.revoked_at, r.reason);

    -- With a prefix: that token only. Without: every token issued before revoked_at,
    -- so an old revocation never touches a newer token.
    UPDATE receiver.tokens
       SET status = 'revoked', revoked_at = r.revoked_at, revoke_reason = r.reason,
           changed_by_event = r.key, updated_at = now()
     WHERE client_id = r.client_id AND environment = r.environment
       AND status <> 'revoked'
       AND CASE WHEN r.prefix IS NULL THEN onboarding_completed_at <= r.revoked_at
                ELSE prefix = r.prefix END;

    PERFORM receiver.enqueue_signal_v2(r.client_id, r.environment, r.prefix,
                                       'token_revoked', r.key, p_channel, p_http);
END;
$$;

-- One delivery: its event row, then its effect. The caller holds its locks.
CREATE FUNCTION receiver.apply_event_v2(r receiver.event_row, p_channel text, p_http boolean)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_stored text;
BEGIN
    v_stored := receiver.insert_event_v2(r, CASE r.kind
        WHEN 'onboarding' THEN 'processed' WHEN 'revocation' THEN 'processed'
        ELSE r.kind END);
    IF v_stored = 'duplicate' THEN
        RETURN 'duplicate';
    ELSIF v_stored = 'id_conflict' THEN
        RETURN 'id_conflict';  -- stored quarantined, under its body key
    END IF;
    IF r.kind = 'onboarding' THEN
        PERFORM receiver.apply_onboarding_v2(r, p_channel, p_http);
        RETURN 'processed';
    ELSIF r.kind = 'revocation' THEN
        PERFORM receiver.apply_revocation_v2(r, p_channel, p_http);
        RETURN 'processed';
    END IF;
    RETURN r.kind;  -- ignored | quarantined: stored, no effect
END;
$$;

-- A group of deliveries in one transaction, outcomes in order: processed, duplicate,
-- ignored, quarantined, or id_conflict (stored quarantined). Every advisory lock
-- the group needs is taken first, in one global order, before any row is written:
-- two groups (or a group and a reprocess) can then never wait on each other in a
-- cycle, whatever keys and clients they share.
CREATE FUNCTION receiver.record_events_v2(
    p_rows receiver.event_row[], p_channel text, p_http boolean
) RETURNS TABLE (outcome text) LANGUAGE plpgsql AS $$
DECLARE
    r receiver.event_row;
BEGIN
    PERFORM pg_advisory_xact_lock(l)
       FROM (SELECT DISTINCT unnest(receiver.event_locks(x)) AS l
               FROM unnest(p_rows) AS x) AS locks
      ORDER BY l;
    FOREACH r IN ARRAY p_rows LOOP
        outcome := receiver.apply_event_v2(r, p_channel, p_http);
        RETURN NEXT;
    END LOOP;
END;
$$;

-- Re-apply a quarantined delivery, read again under the current code and config
-- (`receiver events reprocess`). `p_stored_key` is the row being reprocessed; `r` is
-- what it reads as now. The old row gives way to the new outcome, which keeps the
-- original arrival time and records the quarantine it came from.
CREATE FUNCTION receiver.reprocess_event_v2(
    p_stored_key text, r receiver.event_row, p_channel text, p_http boolean
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_old receiver.events%ROWTYPE;
    v_outcome text;
BEGIN
    PERFORM pg_advisory_xact_lock(l)
       FROM (SELECT DISTINCT unnest(receiver.event_locks(r)
                                    || hashtextextended('receiver.event:' || p_stored_key, 0)) AS l
            ) AS locks
      ORDER BY l;
    DELETE FROM receiver.events WHERE key = p_stored_key AND status = 'quarantined'
    RETURNING * INTO v_old;
    IF NOT FOUND THEN
        RETURN 'not_quarantined';
    END IF;
    v_outcome := receiver.apply_event_v2(r, p_channel, p_http);
    IF v_outcome = 'duplicate' AND v_old.key <> r.key THEN
        -- It reads as a repeat of a stored delivery: nothing to apply, nothing lost.
        RETURN 'duplicate';
    END IF;
    UPDATE receiver.events
       SET received_at = v_old.received_at, reprocessed_at = now(),
           quarantine_reason = CASE WHEN status = 'quarantined' THEN quarantine_reason
                                    ELSE v_old.quarantine_reason END,
           quarantine_detail = CASE WHEN status = 'quarantined' THEN quarantine_detail
                                    ELSE v_old.quarantine_detail END
     WHERE key = CASE WHEN v_outcome = 'id_conflict' THEN receiver.body_key(r.body_hash)
                      ELSE r.key END;
    RETURN v_outcome;
END;
$$;
