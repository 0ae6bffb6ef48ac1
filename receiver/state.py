"""The application's typed keys, defined in one place."""

from __future__ import annotations

import asyncio

from aiohttp import web

from receiver import committer, config, db, outbox, scrape, vault

SETTINGS = web.AppKey("settings", config.Settings)
DATABASE = web.AppKey("database", db.Database)
SEALER = web.AppKey("sealer", vault.Sealer)
DISPATCHER = web.AppKey("dispatcher", outbox.Dispatcher)
COMMITTER = web.AppKey("committer", committer.GroupCommit)
DRAINING = web.AppKey("draining", asyncio.Event)
GAUGES = web.AppKey("gauges", scrape.DatabaseGauges)
