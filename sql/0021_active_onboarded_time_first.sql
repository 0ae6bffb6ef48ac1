-- tokens_active_onboarded with the time first.
--
-- As (environment, onboarding_completed_at), the planner took it for intake's lookup
-- of a client's active token (equality on environment, the partial index's status):
-- a walk over every active token of the environment for each delivery, so intake
-- slowed as tokens grew (bench.versus: 2,529 deliveries/s on an empty database, 526
-- once it held 15,000 tokens; 2,259 with the index dropped). token_health reads it
-- as a range of onboarding times (two days at an age boundary) per environment,
-- which the time-first order serves as well.
DROP INDEX receiver.tokens_active_onboarded;
CREATE INDEX tokens_active_onboarded ON receiver.tokens (onboarding_completed_at, environment)
    WHERE status = 'active';
