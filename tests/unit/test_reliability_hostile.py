"""The hostile-input checks (`bench/reliability/hostile.py`), short, against the real gateway code
served over real HTTP by uvicorn in this process: the admission arithmetic on a SQLite ledger,
the model calls answered with documented example responses. The platform runs the same checks in
`tests/integration/test_reliability.py`."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from bench.reliability import Target
from bench.reliability.auth import check_auth_matrix, sign_test
from bench.reliability.hostile import check_fuzz, check_nasty_inputs
from core.settings import Settings
from domains import DOMAINS, get_domain
from domains.base import request_example
from services.config import PlatformArgs
from services.gateway import create_api
from services.tenants import Store
from tests.unit.test_gateway import LocalBackend

# One schema-valid answer per domain (the text domains document theirs; a forecast may be empty).
ANSWERS: dict[str, dict[str, Any]] = {
    "events": request_example(get_domain("events").response_model),
    "sentiment": request_example(get_domain("sentiment").response_model),
    "energy": {"series": "victoria", "unit": "GW", "version": "v7", "steps": []},
    "traffic": {"network": "grid", "version": "v7", "forecasts": []},
}


class ReadyBackend(LocalBackend):
    """Every domain has a model and answers every item with its canned response."""

    async def info(self, domain: str) -> dict[str, Any]:
        return {"domain": domain, "version": "v7"}


async def canned(domain: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"version": "v7", "items": [ANSWERS[domain]] * len(items)}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("hostile")
    settings = Settings(ledger_url=f"sqlite:///{root / 'ledger.db'}", state_dir=root / "state")
    args = PlatformArgs(registry_uri=str(root / "registry"), ledger_url="unused", domains={d: {} for d in DOMAINS})
    app = create_api(args, ReadyBackend(Store(settings.ledger_url), canned))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield Target(f"http://127.0.0.1:{port}", "", "", settings, os.getpid())
    server.should_exit = True
    thread.join(10)


def test_canned_answers_are_schema_valid() -> None:
    for domain, answer in ANSWERS.items():
        get_domain(domain).response_model.model_validate(answer)


def test_fuzz(target: Target) -> None:
    check = check_fuzz(target, short=True)
    assert check.passed, (check.problems, check.figures)
    posts = [r for r in check.figures["by_route"] if r["has_body"]]
    # Each domain has two POST routes (its verb, feedback), each sent with and without a key.
    assert len(posts) == 2 * 2 * len(DOMAINS) and all(r["cases"] == 25 for r in posts)
    assert all(set(r["statuses"]) == {401} for r in posts if not r["key"])  # no key: nothing else is said


def test_auth_matrix(target: Target) -> None:
    check = check_auth_matrix(target, short=True)
    assert check.passed, (check.problems, check.figures)
    assert check.figures["timing"]["constant_time_code"]
    # No Ray here: the logs and metrics could not be searched, and the figures say so.
    assert check.figures["searched"]["logs"].startswith("not searched")
    assert check.figures["searched"]["ledger_rows"] > 0


def test_nasty_inputs(target: Target) -> None:
    check = check_nasty_inputs(target, short=True)
    assert check.passed, (check.problems, check.figures)
    assert set(check.figures["tenant_names"].values()) == {"refused"}


def test_sign_test() -> None:
    assert sign_test(5, 10) == 1.0
    assert sign_test(0, 10) == pytest.approx(2 / 1024)
    assert sign_test(0, 0) == 1.0
