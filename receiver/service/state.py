"""The application's typed keys, defined in one place, and the small state they hold."""

from __future__ import annotations

import asyncio

from aiohttp import web

from receiver import config, db, vault
from receiver.debitura import api
from receiver.lifecycle import committer
from receiver.service import scrape
from receiver.signals import outbox


class Live:
    """The settings SIGHUP may change while serving (`reload`): read through this
    where a reloadable value is used, never copied at start."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings


class Load:
    """Deliveries being handled by this process right now (the admission cap)."""

    in_flight = 0


SETTINGS = web.AppKey("settings", config.Settings)
DATABASE = web.AppKey("database", db.Database)
SEALER = web.AppKey("sealer", vault.Sealer)
DISPATCHER = web.AppKey("dispatcher", outbox.Dispatcher)
COMMITTER = web.AppKey("committer", committer.GroupCommit)
DRAINING = web.AppKey("draining", asyncio.Event)
GAUGES = web.AppKey("gauges", scrape.DatabaseGauges)
# The webhook secrets by world (live, test), decoded once for every delivery.
SECRET_SETS = web.AppKey("secret_sets", dict[str, list[bytes]])
LOAD = web.AppKey("load", Load)
LIVE = web.AppKey("live", Live)
# Debitura's API, for the admin API's link call (only with RECEIVER_ADMIN_TOKENS).
DEBITURA = web.AppKey("debitura", api.Api)
