"""SIGHUP: reload what can change without a restart (docs/design.md §5).

The webhook secrets, the cache's signing secrets, the admin tokens, the Debitura API
keys and the log level are read again (from the environment and their `_FILE`s) and
put in force while the service keeps serving; one line names what changed, never a
value. A reload that would leave an invalid configuration is refused with one line,
and the old one stays in force. Token keys and the database URL need a (rolling)
restart: a change to them is named in the line, not applied.
"""

from __future__ import annotations

import os
import sys

import structlog
from aiohttp import web

from receiver import config, errors, log
from receiver.service import state

logger = structlog.get_logger(__name__)

RELOADABLE = (
    "webhook_secrets",
    "test_webhook_secrets",
    "cache_secret",
    "admin_tokens",
    "debitura_api_key",
    "debitura_test_api_key",
    "log_level",
)
RESTART_ONLY = ("token_keys", "index_key", "database_url")


def reload(application: web.Application, *, dev: bool) -> list[str]:
    """Read the settings again and put the reloadable ones in force; the names of the
    variables that changed (empty: nothing changed, or the reload was refused)."""
    live = application[state.LIVE]
    old = live.settings
    new = reread(old, dev=dev, needs=config.NEEDS_SERVICE)
    changed = [name for name in RELOADABLE if getattr(new, name) != getattr(old, name)]
    if changed:
        live.settings = new
        secret_sets = application[state.SECRET_SETS]  # read by every delivery
        secret_sets.clear()
        secret_sets.update(new.webhook_secret_sets())
        dispatcher = application.get(state.DISPATCHER)
        if dispatcher is not None:
            dispatcher.use_secrets(new)
    return changed


def reread(old: config.Settings, *, dev: bool, needs: frozenset[str]) -> config.Settings:
    """The settings in force after a reload: `old` with the reloadable ones read
    again (`old` itself when the reload is refused), the log configured for them, and
    one line naming what changed."""
    try:
        fresh = config.load_settings(dev=dev, needs=needs)
    except errors.ConfigError as exc:
        logger.warning("reload_refused", reason=str(exc))
        return old
    changed = [name for name in RELOADABLE if getattr(fresh, name) != getattr(old, name)]
    restart = [
        name
        for name in RESTART_ONLY
        if getattr(fresh, name) is not None and getattr(fresh, name) != getattr(old, name)
    ]
    new = old
    if changed:
        new = old.model_copy(update={name: getattr(fresh, name) for name in changed})
        # The redaction must know the new secrets before any line could hold one.
        log.configure(
            level=new.log_level,
            fmt=new.log_format,
            secrets=[*new.secret_values(), *old.secret_values()],
            stream=sys.stdout,
        )
    logger.info(
        "configuration_reloaded",
        changed=[f"RECEIVER_{name.upper()}" for name in changed],
        needs_restart=[f"RECEIVER_{name.upper()}" for name in restart],
        pid=os.getpid(),  # which process reloaded (serve --workers)
    )
    return new
