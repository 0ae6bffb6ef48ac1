"""The operator console (docs/design.md §9, "Operator console"): pages on the admin
listener only, for the holders of an admin token (RECEIVER_ADMIN_TOKENS).

Everywhere else every console path answers 404, as the admin API's do. No page
needs JavaScript; no page has an inline script or style (the Content-Security-Policy
forbids both); no value reaches a page without passing `Redactor.text`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from receiver.service.webconsole import actions, pages, render

PREFIX = "/console"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "", pages.to_overview),
    ("GET", "/", pages.overview),
    ("GET", "/sign-in", actions.sign_in_page),
    ("POST", "/sign-in", actions.sign_in),
    ("POST", "/sign-out", actions.sign_out),
    ("GET", "/quarantine", pages.quarantine),
    ("GET", "/delivery", pages.delivery),
    ("POST", "/delivery/dismiss", actions.dismiss),
    ("POST", "/delivery/reprocess", actions.reprocess),
    ("GET", "/tokens", pages.token_inventory),
    ("GET", "/signals", pages.signals),
    ("POST", "/signals/retry", actions.retry_signal),
    ("GET", "/audit", pages.audit_trail),
    ("GET", "/console.css", pages.stylesheet),
)


def add_routes(
    app: web.Application, expect_handler: Callable[[web.Request], Awaitable[None]]
) -> None:
    """The console's routes, each with the app's expectation handler, and the headers
    every console answer carries."""
    for method, path, handler in ROUTES:
        app.router.add_route(method, PREFIX + path, handler, expect_handler=expect_handler)
    app.on_response_prepare.append(render.secure_headers)
