"""The console's forms (POST): sign-in and sign-out, and the operator's acts on the
quarantine and the outbox, each through the CLI's own function and each audited with
the admin token's fingerprint as the actor and the reason the operator gave."""

from __future__ import annotations

import uuid
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiDict

from receiver import errors
from receiver.admin import dead_letters, inbox
from receiver.lifecycle import audit
from receiver.service import admin_api, state
from receiver.service.webconsole import pages, render, session

FORM_MAX_BYTES = 16 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"


async def _form(request: web.Request) -> MultiDict[str]:
    """The posted form's fields: urlencoded, as every console page posts it (a
    multipart body, with its files and transfer encodings, is no console form)."""
    if request.content_type != FORM_TYPE:
        raise errors.UnsupportedMediaType(f"a console form is {FORM_TYPE}")
    too_large = errors.BodyTooLarge(f"a console form is at most {FORM_MAX_BYTES} bytes")
    if request.content_length is not None and request.content_length > FORM_MAX_BYTES:
        raise too_large
    # A chunked body says no length: counted once read (read() stops at the app's
    # client_max_size; post() parses what it read).
    if len(await request.read()) > FORM_MAX_BYTES:
        raise too_large
    try:
        posted = await request.post()
    except (ValueError, LookupError):
        # Not UTF-8 (UnicodeDecodeError), a charset nobody knows: the sender's
        # fault, never an internal error.
        raise errors.InvalidRequest("the form could not be read") from None
    return MultiDict((k, v) for k, v in posted.items() if isinstance(v, str))


def _sign_in_form(request: web.Request, *, refused: bool) -> web.Response:
    settings = request.app[state.LIVE].settings
    csrf = session.new_sign_in_value()
    response = render.page(
        request, "sign_in.html", None, status=401 if refused else 200, csrf=csrf, refused=refused
    )
    session.remember_sign_in_value(response, settings, csrf)
    return response


async def sign_in_page(request: web.Request) -> web.Response:
    """The sign-in form (an admin token), with its CSRF value."""
    _, signed_in = pages.operator(request)
    if signed_in is not None:
        return pages.see_other("/console/")
    return _sign_in_form(request, refused=False)


async def sign_in(request: web.Request) -> web.Response:
    """An admin token in, a session cookie out; a wrong token is refused (401) and the
    form shown again, empty."""
    settings, _ = pages.operator(request)
    form = await _form(request)
    session.check_sign_in_form(request, form.get(session.CSRF_FIELD, ""))
    token = admin_api.matching_token(settings, form.get("token", ""))
    if token is None:
        return _sign_in_form(request, refused=True)
    response = pages.see_other("/console/")
    session.sign_in(response, settings, token)
    return response


async def _signed_in(request: web.Request) -> tuple[session.Session, MultiDict[str]]:
    """The operator and their form, or `errors.Forbidden` (no session, or the form's
    CSRF token missing or wrong): nothing is done for such a request."""
    _, signed_in = pages.operator(request)
    form = await _form(request)
    if signed_in is None:
        raise errors.Forbidden("sign in first")
    session.check_form(signed_in, form.get(session.CSRF_FIELD, ""))
    return signed_in, form


def _actor(request: web.Request, signed_in: session.Session, form: MultiDict[str]) -> audit.Actor:
    reason = form.get("reason", "").strip()
    if not reason:
        raise errors.InvalidRequest("a reason is required: it goes into the audit trail")
    settings = request.app[state.LIVE].settings
    return admin_api.actor(signed_in.fingerprint, reason, settings.secret_values())


async def sign_out(request: web.Request) -> web.Response:
    """End the session (the cookie is cleared)."""
    await _signed_in(request)
    response = pages.see_other("/console/sign-in")
    session.sign_out(response)
    return response


async def dismiss(request: web.Request) -> web.Response:
    """`events dismiss KEY --reason …` from the delivery's page."""
    signed_in, form = await _signed_in(request)
    key = form.get("key", "")
    actor = _actor(request, signed_in, form)
    (outcome,) = await inbox.dismiss(request.app[state.DATABASE], actor, [key])
    if outcome.outcome == "unknown":
        # Never back to a URL with what was typed (a pasted token, say) in it.
        raise errors.NotFound("no stored delivery with that key")
    done = {
        "dismissed": "dismissed",
        "already_dismissed": "already dismissed",
    }.get(outcome.outcome, "not an open quarantine: nothing done")
    return pages.see_other("/console/delivery?" + urlencode({"key": key, "done": done}))


async def reprocess(request: web.Request) -> web.Response:
    """`events reprocess KEY` from the delivery's page."""
    signed_in, form = await _signed_in(request)
    key = form.get("key", "")
    actor = _actor(request, signed_in, form)
    settings = request.app[state.LIVE].settings
    (result,) = await inbox.reprocess(request.app[state.DATABASE], settings, [key], actor)
    if result.outcome == "not_found":
        raise errors.NotFound("no stored delivery with that key")
    done = f"reprocessed: {result.outcome}" + (f" ({result.reason})" if result.reason else "")
    return pages.see_other("/console/delivery?" + urlencode({"key": result.key, "done": done}))


async def retry_signal(request: web.Request) -> web.Response:
    """`signals retry --id ID` from the signals page."""
    signed_in, form = await _signed_in(request)
    ids = form.getall("id", [])
    try:
        ids = [str(uuid.UUID(i)) for i in ids]
    except ValueError:
        raise errors.InvalidRequest("a signal id is a UUID") from None
    if not ids:
        raise errors.InvalidRequest("name the dead signal to retry")
    actor = _actor(request, signed_in, form)
    retried = await dead_letters.retry(request.app[state.DATABASE], actor, ids)
    return pages.see_other("/console/signals?" + urlencode({"retried": str(len(retried))}))
