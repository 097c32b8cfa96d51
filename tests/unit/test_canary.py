"""Canary and shadow versions: the registry's one canary per domain and how it ends, the replica's
split of a batch between production and the candidate, and the shadow's answers reaching the
sample log beside production's and `cityserve monitor` side by side."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.errors import RegistryError
from domains import DOMAINS
from services import samples
from services.config import PlatformArgs
from services.gateway import create_api
from services.model import canary_groups
from services.monitor import health
from services.samples import SampleArgs
from services.tenants import Store, Tenant
from tests.unit.conftest import events_registry
from tests.unit.test_gateway import Doubler, LocalBackend, post
from training.registry import CANARY, PRODUCTION, Registry


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return events_registry(tmp_path, 3)


def test_one_canary_at_a_time_ending_in_promotion_or_abort(registry: Registry) -> None:
    generation = registry.generation("events")
    assert registry.start_canary("events", "v2", 10).stage == CANARY
    assert registry.canary("events") == {"version": "v2", "weight": 10, "shadow": False}
    assert registry.generation("events") == generation + 1  # replicas reload and pick it up
    registry.start_canary("events", "v2", 50, shadow=True)  # the same version: a new share, a new mode
    assert registry.canary("events") == {"version": "v2", "weight": 50, "shadow": True}
    with pytest.raises(RegistryError, match="a canary of events v2 runs"):
        registry.start_canary("events", "v3", 10)
    with pytest.raises(RegistryError, match="a canary of events v2 runs"):
        registry.promote("events", "v3")  # promotion past a running canary is refused too
    with pytest.raises(RegistryError, match="weight 0"):
        registry.start_canary("events", "v2", 0)
    assert registry.abort_canary("events") == "v2" and registry.canary("events") is None
    with pytest.raises(RegistryError, match="no canary"):
        registry.abort_canary("events")
    with pytest.raises(RegistryError, match="production already"):
        registry.start_canary("events", "v1", 5)
    registry.start_canary("events", "v3", 20)
    assert registry.promote("events", "v3").stage == PRODUCTION and registry.canary("events") is None
    registry.start_canary("events", "v2", 20)
    assert registry.rollback("events").version == "v1" and registry.canary("events") is None  # a way back, whole


class Tripler(Doubler):
    version = "v2"

    def predict(self, items: list[Any]) -> list[Any]:
        return [type(answer)(y=answer.y // 2 * 3) for answer in super().predict(items)]


def test_a_canary_answers_the_picked_requests_and_a_shadow_answers_beside_production() -> None:
    groups: list[list[Any]] = [[1], [2, 3], [-1], [4]]
    picked = [True, False, True, True]
    canary = canary_groups(Doubler(), Tripler(), groups, picked, shadow=False)  # type: ignore[arg-type]
    # -1 is refused by either; the refusal names the version that refused it (usage rows, metrics)
    assert [a.get("version") for a in canary] == ["v2", "v1", "v2", "v2"]
    assert canary[0]["items"] == [{"y": 3}] and canary[1]["items"] == [{"y": 4}, {"y": 6}]
    assert canary[2]["status"] == 422 and "items" not in canary[2]
    shadow = canary_groups(Doubler(), Tripler(), groups, picked, shadow=True)  # type: ignore[arg-type]
    assert [a.get("version") for a in shadow] == ["v1", "v1", "v1", "v1"] and shadow[2]["status"] == 422
    assert shadow[0]["shadow"] == {"version": "v2", "items": [{"y": 3}]} and "shadow" not in shadow[1]
    assert "shadow" not in shadow[2] and shadow[3]["shadow"]["items"] == [{"y": 12}]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient, str, Path]]:
    async def with_shadow(domain: str, items: list[dict[str, Any]]) -> dict[str, Any]:
        answer = {"label": "noise", "priority": "normal", "confidence": 0.9, "uncertain": False}
        return {"version": "v1", "items": [answer] * len(items),
                "shadow": {"version": "v2", "items": [{**answer, "label": "sanitation"}] * len(items)}}

    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    key = store.create_tenant(Tenant("hotline", ["events"], 1000, 10_000, 8, sample_rate=1.0), 1)
    registry = tmp_path / "registry"
    args = PlatformArgs(registry_uri=str(registry), ledger_url="unused", samples=SampleArgs(flush_s=0.05),
                        domains={d: {} for d in DOMAINS})
    with TestClient(create_api(args, LocalBackend(store, with_shadow))) as client:
        yield client, key, registry


def test_shadow_answers_are_recorded_never_returned_and_monitored_beside_production(
        gateway: tuple[TestClient, str, Path]) -> None:
    client, key, registry = gateway
    answered = post(client, "/v1/events/classify", {"text": "loud music at 3am"}, key)
    assert answered.status_code == 200 and answered.json()["label"] == "noise" and "shadow" not in answered.json()
    assert answered.headers["x-model-version"] == "v1"
    rid = answered.headers["x-request-id"]
    assert post(client, "/v1/events/feedback", {"request_id": rid, "truth": {"label": "sanitation"}},
                key).status_code == 200
    deadline = time.monotonic() + 10
    while samples.read(registry, "samples", "events").num_rows < 2:
        assert time.monotonic() < deadline, "the samples never reached the log"
        time.sleep(0.05)
    rows = {r["model_version"]: r for r in samples.read(registry, "samples", "events").to_pylist()}
    assert (rows["v1"]["shadow"], rows["v2"]["shadow"]) == (False, True)
    assert rows["v1"]["request"] == rows["v2"]["request"] and json.loads(rows["v2"]["answer"])["label"] == "sanitation"
    # Both versions judged by the same feedback, side by side (no registry versions here: no drift).
    by_version = {h.version: h for h in health(Registry(str(registry)), registry, "events")}
    assert (by_version["v2"].shadowed, by_version["v1"].shadowed) == (1, 0)
    assert (by_version["v2"].quality["accuracy"], by_version["v1"].quality["accuracy"]) == (1.0, 0.0)
