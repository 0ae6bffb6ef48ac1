"""Every answer is one the contract documents, whatever is sent: random, mutated,
deep and unicode bodies, signed and not, get 200 (or 503) when authentic and a
documented 4xx otherwise, never a 500, always JSON, never an echoed token; and what
they leave stored is consistent and sealed.

Black box: plain HTTP from the standard library on loopback, against a real
`receiver serve` process. The fuzz run is deterministic (derandomised) and bounded
in count.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver import vault
from receiver.lifecycle import events
from tests import conftest, helpers
from tests.integration.processes import Served

FUZZ_EXAMPLES = 1000


# --- strategies -----------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
data_keys = st.sampled_from(
    ["client_id", "bearer_token", "onboarding_completed_at", "token_prefix", "revoked_at", "reason"]
)


@dataclass(frozen=True)
class Deep:
    """A nesting depth (a type no JSON strategy produces, unlike int)."""

    depth: int


@st.composite
def tokenish(draw: st.DrawFn) -> str:
    """Valid canary tokens, near misses, and junk in the token field."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return helpers.canary_token(draw(st.sampled_from(["live", "test"])))
    if choice == 1:
        return helpers.canary_token() + draw(st.sampled_from(["!", " ", "\u00e9", "\x00", "_x"]))
    if choice == 2:
        return "tok_live_" + draw(st.text(max_size=20))
    return draw(st.text(max_size=40))


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """Envelopes from valid to absurd."""
    kind = draw(st.integers(0, 4))
    if kind == 0:  # a valid event, sometimes with unicode and extra fields
        document = helpers.onboarding(
            draw(st.from_regex(r"\Acli_[A-Za-z0-9]{1,20}\Z")), helpers.canary_token()
        )
        document["extra"] = draw(json_values)
        return document
    if kind == 1:  # the right shape, wrong values
        data = draw(st.dictionaries(data_keys, json_values | tokenish(), max_size=6))
        if draw(st.booleans()):
            data["bearer_token"] = draw(tokenish())
        return {
            "id": draw(st.text(max_size=40) | json_values),
            "event": draw(
                st.sampled_from([events.ONBOARDING_COMPLETED, events.TOKEN_REVOKED])
                | st.text(max_size=20)
            ),
            "timestamp": draw(st.text(max_size=30) | json_values),
            "data": data,
        }
    if kind == 2:
        return draw(json_values)
    if kind == 3:  # deep nesting, up to far past what a recursive parser survives
        return Deep(draw(st.integers(1, 20_000)))
    return {"event": draw(st.text(max_size=30)), "data": draw(json_values)}


@st.composite
def deliveries(draw: st.DrawFn) -> bytes:
    """A body, from a valid event to mangled bytes around the size limit."""
    document = draw(documents())
    if isinstance(document, Deep):  # built as text: json.dumps would recurse too
        body = ("[" * document.depth + "]" * document.depth).encode()
    else:
        body = json.dumps(document, ensure_ascii=draw(st.booleans())).encode()
    mangle = draw(st.integers(0, 9))
    if mangle == 0:
        body = draw(st.binary(max_size=300))
    elif mangle == 1:
        body = body.decode().encode("utf-16")
    elif mangle == 2:
        body += b" " * draw(st.integers(60_000, 70_000))  # around the 64 KiB limit
    return body


# --- tests ------------------------------------------------------------------------

# Signed, JSON-typed and within the size limit: authentic, so never refused.
AUTHENTIC = {200, 503}
# Anything else: refused with a documented 4xx (401 signature, 408 slow body, 413
# size, 415 content type). 400 is for malformed HTTP, which the fuzz does not send.
REFUSED = {401, 408, 413, 415}
OUTCOMES = {"processed", "duplicate", "ignored", "quarantined"}
LIMIT = 65_536


def _fuzz(served: Served, statuses: Counter[str]) -> None:
    """Run the deliveries; count statuses as "signed 200", "unsigned 401", …"""

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
        ],
    )
    @given(
        body=deliveries(),
        header_mode=st.integers(0, 7),
        content_type=st.sampled_from(
            [
                "application/json",
                "application/json; charset=utf-8",
                "text/plain",
                "",
                "application/cloudevents+json",
            ]
        ),
    )
    def one(body: bytes, header_mode: int, content_type: str) -> None:
        headers = {"X-Debitura-Event": "fuzz"}
        if content_type:
            headers["Content-Type"] = content_type
        if header_mode < 5:
            headers["X-Debitura-Signature"] = helpers.debitura_signature(served.secret, body)
        elif header_mode == 5:
            headers["X-Debitura-Signature"] = "t=" + "9" * 40 + ",v1=" + "z" * 64
        elif header_mode == 6:
            headers["X-Debitura-Signature"] = helpers.debitura_signature(helpers.new_secret(), body)
        status, answer, _ = served.post(body, headers)
        authentic = (
            header_mode < 5 and content_type.startswith("application/") and len(body) <= LIMIT
        )
        statuses[f"{'signed' if authentic else 'refused'} {status}"] += 1
        parsed = json.loads(answer)
        if authentic:
            assert status in AUTHENTIC, (status, answer[:200])
            if status == 200:
                assert parsed["status"] in OUTCOMES
                assert ("reason" in parsed) == (parsed["status"] == "quarantined")
        else:
            assert status in REFUSED, (status, answer[:200])
            assert set(parsed["error"]) == {"type", "code", "message"}
        assert not helpers.find_canaries(answer.decode())

    one()


def test_fuzzed_deliveries_get_the_contract_and_leave_the_database_consistent(
    served: Served,
) -> None:
    """Random, mutated, deep and unicode bodies with good and bad signatures: a signed
    one is always answered 200 (never refused, never 500), an unsigned one a documented
    4xx, every answer is JSON, no token is echoed. Afterwards every stored event opens
    and is well-formed, every token row belongs to an event, no client has two active
    tokens in one environment, nothing failed inside the receiver, and a pg_dump holds
    no token."""
    statuses: Counter[str] = Counter()
    _fuzz(served, statuses)
    keyring = vault.Keyring(
        [
            (k, base64.b64decode(v))
            for k, v in (p.split(":", 1) for p in served.keys["token_keys"].split(","))
        ]
    )

    async def check() -> dict[str, int]:
        conn = await asyncpg.connect(served.database_url)
        try:
            rows = await conn.fetch(
                "SELECT key, status, body_hash, body_sealed, body_redacted FROM receiver.events"
            )
            for row in rows:
                assert row["status"] in ("processed", "ignored", "quarantined")
                sealed_for = "sha256:" + row["body_hash"].hex()
                keyring.open(row["body_sealed"], vault.event_associated_data(sealed_for))
                if row["status"] != "quarantined":
                    assert isinstance(json.loads(row["body_redacted"]), dict)
            orphans = await conn.fetchval(
                "SELECT count(*) FROM receiver.tokens t LEFT JOIN receiver.events e "
                "ON e.key = t.created_by_event WHERE e.key IS NULL"
            )
            assert orphans == 0
            active = await conn.fetchval(
                "SELECT count(*) FROM (SELECT client_id FROM receiver.tokens "
                "WHERE status = 'active' GROUP BY client_id, environment HAVING count(*) > 1) x"
            )
            assert active == 0
            return {
                "events": len(rows),
                "quarantined": sum(r["status"] == "quarantined" for r in rows),
                "tokens": await conn.fetchval("SELECT count(*) FROM receiver.tokens"),
            }
        finally:
            await conn.close()

    counts = asyncio.run(check())
    from tests.integration.test_no_plaintext import pg_dump

    dump = pg_dump(served.database_url)
    assert not helpers.find_canaries(dump)
    assert "receiver_internal_errors_total 0.0" in served.get("/metrics")
    report = (
        f"fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, "
        f"{counts['events']} events ({counts['quarantined']} quarantined) and "
        f"{counts['tokens']} tokens stored, 0 leaks"
    )
    (conftest.LOG_DIR / "fuzz-report.txt").write_text(report)
    print("\n" + report)
    assert sum(statuses.values()) >= FUZZ_EXAMPLES
    # The run reached every kind of answer it is meant to exercise.
    for kind in ("signed 200", "refused 401", "refused 413", "refused 415"):
        assert statuses[kind] > 0, kind
    assert counts["quarantined"] > 0
    assert counts["tokens"] > 0


def test_stored_rows_hold_only_sealed_bytes(served: Served) -> None:
    """No column of any receiver table holds a plaintext canary, in any encoding."""

    async def scan() -> str:
        conn = await asyncpg.connect(served.database_url)
        try:
            parts = []
            for table in ("events", "tokens", "revocations", "signals"):
                for row in await conn.fetch(f"SELECT * FROM receiver.{table}"):  # noqa: S608
                    parts += [v.hex() if isinstance(v, bytes) else str(v) for v in row.values()]
                    parts += [v.decode("latin-1") for v in row.values() if isinstance(v, bytes)]
            return "\n".join(parts)
        finally:
            await conn.close()

    assert not helpers.find_canaries(asyncio.run(scan()))
