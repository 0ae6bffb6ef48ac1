"""Schemathesis against the OpenAPI description: generated requests for every
operation, every answer checked against what the description promises."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from receiver.service import openapi
from tests.conftest import cloned_database
from tests.integration import processes

schema = schemathesis.openapi.from_dict(openapi.document())


@pytest.fixture(scope="module")
def base_url(server_dsn: str, template_name: str) -> Iterator[str]:
    """A `receiver serve` process on its own database, for the module."""
    with cloned_database(server_dsn, template_name, "receiver_schema") as url:
        env, _ = processes.receiver_env(url)
        port = processes.free_port()
        with processes.serving(["--port", str(port)], env) as (process, _):
            asyncio.run(processes.wait_healthy(port, process))
            yield f"http://127.0.0.1:{port}"


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_description(case: schemathesis.Case[Any], base_url: str) -> None:
    """No server error, only documented statuses, bodies that match their schemas."""
    case.call_and_validate(base_url=base_url)
