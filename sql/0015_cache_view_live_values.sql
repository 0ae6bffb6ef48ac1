-- The cache reader sees ciphertext only of tokens it may still use: the active one,
-- and a superseded one inside its grace. Revoked and expired tokens keep their row
-- (the cache tells "revoked" from "never linked" by it) but show no value. Same
-- columns, so a replica of the previous release reads it unchanged.
CREATE OR REPLACE VIEW receiver.cache_tokens AS
SELECT id, client_id, environment, prefix,
       CASE WHEN status = 'superseded' AND expires_at <= now() THEN 'expired'
            ELSE status END AS status,
       onboarding_completed_at,
       CASE WHEN status = 'active' OR (status = 'superseded' AND expires_at > now())
            THEN token_sealed END AS token_sealed
  FROM receiver.tokens;
