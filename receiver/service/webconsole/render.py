"""The console's pages as HTML: Jinja2 templates (package data), autoescaped, every
value masked by the one masking function on its way out, and the headers every
console answer carries."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web
from markupsafe import Markup

from receiver import config, redaction
from receiver.service import state
from receiver.service.webconsole import session

# No script, no inline style, no frame, forms only back to the console.
POLICY = "default-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


@functools.lru_cache(maxsize=4)
def _redactor(secrets: tuple[str, ...]) -> redaction.Redactor:
    return redaction.Redactor(secrets)


_SHAPES = redaction.Redactor()


@jinja2.pass_context
def _masked(context: jinja2.runtime.Context, value: Any) -> Any:
    """Every `{{ value }}` of every template, masked by `Redactor.text` (tokens cut to
    their prefix, configured secrets gone) before it is escaped: no page can show a
    token, whichever field it came from."""
    # Macros imported without the page's context still mask every shape of secret.
    redactor: redaction.Redactor = context.get("redactor") or _SHAPES
    if value is None:
        return ""
    if isinstance(value, Markup):
        # Markup the templates made (a macro's output: each of its values was masked on
        # its way in) stays markup only while masking leaves it as it is. Masking reads
        # escapes (`\u003c` is `<`, `%3C` too): what it changes is text, escaped, or a
        # value that reads as a tag would become one.
        shown = redactor.text(str(value))
        return value if shown == str(value) else shown
    return redactor.text(str(value))


def _when(value: str | None) -> str:
    """An ISO time as `2026-12-07 01:02:03 UTC`."""
    if not value:
        return ""
    at = datetime.fromisoformat(value).astimezone(UTC)
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


def _age(value: str | None) -> str:
    """How long ago an ISO time was, roughly (`3 min`, `5 h`, `2 d`)."""
    if not value:
        return ""
    seconds = (datetime.now(UTC) - datetime.fromisoformat(value)).total_seconds()
    if seconds < 120:
        return f"{max(int(seconds), 0)} s"
    if seconds < 7200:
        return f"{int(seconds // 60)} min"
    if seconds < 172_800:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86_400)} d"


_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("receiver.service.webconsole", "templates"),
    autoescape=True,
    finalize=_masked,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_TEMPLATES.filters["when"] = _when
_TEMPLATES.filters["age"] = _age


def page(
    request: web.Request,
    template: str,
    signed_in: session.Session | None,
    *,
    status: int = 200,
    **values: Any,
) -> web.Response:
    """A page rendered for the signed-in operator (or the sign-in page)."""
    settings: config.Settings = request.app[state.LIVE].settings
    html = _TEMPLATES.get_template(template).render(
        redactor=_redactor(tuple(settings.secret_values())),
        signed_in=signed_in,
        csrf_field=session.CSRF_FIELD,
        path=request.path,
        **values,
    )
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=status)


async def secure_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every console answer (pages, the stylesheet, errors, redirects) carries the
    strict policy and is never cached: a page may hold what an operator should not
    leave behind in a shared browser cache."""
    if request.path == "/console" or request.path.startswith("/console/"):
        response.headers.update(HEADERS)
