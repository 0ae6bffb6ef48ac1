-- History the runtime role cannot forge (issue 24).
--
-- receiver.audit: its id is GENERATED ALWAYS, but `INSERT … OVERRIDING SYSTEM VALUE`
-- lets any role with INSERT choose the id, and `at` has only a default: the runtime
-- could write a row that looks a year old and sorts among old ones. Column-level
-- privileges close both: the runtime may insert only the columns an audit row is
-- written with, so naming `id` or `at` in an INSERT is refused (and with it any
-- OVERRIDING SYSTEM VALUE, which needs `id` named). The owner keeps every right, as an
-- owner always does; the append-only trigger of 0004 still binds everyone.
REVOKE INSERT ON receiver.audit FROM receiver_runtime;
GRANT INSERT (actor, action, client_id, client_hash, environment, token_prefix, event_key,
              reason, detail)
   ON receiver.audit TO receiver_runtime;

-- receiver.schema_migrations: only `receiver migrate` (the owner) writes it. A runtime
-- that could delete a row would make the next migrate re-run that file; one that could
-- insert would make it skip one. The runtime reads it (readiness: is the schema current?).
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON receiver.schema_migrations FROM receiver_runtime;
