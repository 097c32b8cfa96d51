"""The sample log and feedback: what is kept, masked, dropped, swept, and refused — through the
gateway's HTTP layer (FastAPI's TestClient over the real admission arithmetic) and the log itself."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.errors import InvalidInput
from domains import DOMAINS
from services import samples
from services.config import PlatformArgs
from services.gateway import create_api
from services.samples import Sample, SampleArgs, SampleLog
from services.tenants import Store, Tenant, TenantEntry, new_key
from services.tenants.tenants_file import KeyEntry
from tests.unit.test_gateway import LocalBackend, echo, post

PHONE_TEXT = "Water main break outside 221 Baker Street, call me on 415-555-0132"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[TestClient, LocalBackend, dict[str, str], Path]]:
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    keys = {
        "sampled": store.create_tenant(Tenant("sampled", ["events", "energy"], 100, 1000, 4, sample_rate=1.0), 1),
        "private": store.create_tenant(Tenant("private", ["events"], 100, 1000, 4), 1),
    }
    registry = tmp_path / "registry"
    args = PlatformArgs(registry_uri=str(registry), ledger_url="unused", samples=SampleArgs(flush_s=0.05),
                        domains={d: {"max_items": 8, "timeout_s": 2} for d in DOMAINS})
    backend = LocalBackend(store, echo)
    # One event loop for every request (a client used without `with` makes one per request), as
    # in a replica: the log's writer task lives in it.
    with TestClient(create_api(args, backend)) as client:
        yield client, backend, keys, registry


def wait_rows(registry: Path, kind: samples.Kind, domain: str, rows: int, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        table = samples.read(registry, kind, domain)
        if table.num_rows >= rows or time.monotonic() > deadline:
            return table.to_pylist()
        time.sleep(0.05)


def test_a_sampled_tenants_requests_are_kept_masked_and_others_are_not(
        gateway: tuple[TestClient, LocalBackend, dict[str, str], Path]) -> None:
    client, _, keys, registry = gateway
    answered = post(client, "/v1/events/classify", [{"text": PHONE_TEXT}, {"text": "loud party"}], keys["sampled"])
    private = post(client, "/v1/events/classify", {"text": "call 415-555-0199"}, keys["private"])
    assert answered.status_code == private.status_code == 200
    rows = wait_rows(registry, "samples", "events", 2)
    rid = answered.headers["x-request-id"]
    assert sorted((r["request_id"], r["item"], r["tenant"]) for r in rows) == [(rid, 0, "sampled"), (rid, 1, "sampled")]
    first = next(r for r in rows if r["item"] == 0)
    assert json.loads(first["request"]) == {"text": "Water main break outside <ADDRESS>, call me on <PHONE>"}
    assert json.loads(first["answer"]) == {"n": 0} and first["model_version"] == "v7" and first["latency_ms"] > 0
    time.sleep(0.3)  # the private tenant's request would be written by now: it never is
    assert samples.read(registry, "samples", "events").num_rows == 2
    assert "415-555" not in "".join(p.read_bytes().decode("latin-1") for p in registry.rglob("*.parquet"))


def test_feedback_is_checked_metered_and_stored(gateway: tuple[TestClient, LocalBackend, dict[str, str], Path]) -> None:
    client, backend, keys, registry = gateway
    url = "/v1/events/feedback"
    good = {"request_id": "req-1", "item": 1, "truth": {"label": "water_sewer", "priority": "high"}}
    stored = post(client, url, [good, {**good, "item": 0, "truth": {"label": "noise"}}], keys["sampled"])
    assert stored.status_code == 200 and stored.json() == {"stored": 2}
    rows = wait_rows(registry, "feedback", "events", 2, timeout_s=0)  # written before the answer
    assert sorted((r["item"], json.loads(r["truth"])) for r in rows) == [
        (0, {"label": "noise"}), (1, {"label": "water_sewer", "priority": "high"})]
    refused = {
        "unknown label": post(client, url, {**good, "truth": {"label": "aliens"}}, keys["sampled"]),
        "free text": post(client, url, {**good, "comment": "it was my neighbour Bob"}, keys["sampled"]),
        "bad request id": post(client, url, {**good, "request_id": "a b"}, keys["sampled"]),
        "not granted": post(client, "/v1/traffic/feedback", {**good, "truth": {"counts": {"d1": {"15min": 3}}}},
                            keys["sampled"]),
        "no key": post(client, url, good),
    }
    assert {k: v.status_code for k, v in refused.items()} == {
        "unknown label": 422, "free text": 422, "bad request id": 422, "not granted": 403, "no key": 401}
    assert refused["unknown label"].json()["field"] == "truth.label"
    assert samples.read(registry, "feedback", "events").num_rows == 2  # nothing refused was kept
    routes = [(u.route, u.items, u.status) for u in backend.released if u is not None and u.tenant == "sampled"]
    assert routes == [("feedback", 2, 200)]  # refused bodies count against the quota, as predictions do


def test_energy_feedback_takes_demand_with_gaps(gateway: tuple[TestClient, LocalBackend, dict[str, str], Path]) -> None:
    client, _, keys, registry = gateway
    body = {"request_id": "day-ahead-1", "truth": {"demand": [4.6, None, 4.4]}}
    assert post(client, "/v1/energy/feedback", body, keys["sampled"]).json() == {"stored": 1}
    too_long = {**body, "truth": {"demand": [4.0] * 49}}
    assert post(client, "/v1/energy/feedback", too_long, keys["sampled"]).status_code == 422
    (row,) = samples.read(registry, "feedback", "energy").to_pylist()
    assert json.loads(row["truth"]) == {"demand": [4.6, None, 4.4]}


def sample(n: int, at: float | None = None) -> Sample:
    return Sample("sentiment", f"r{n}", time.time() if at is None else at, "press", "v1", 3.0,
                  [{"text": f"mail me at person{n}@example.org"}], [{"label": "neutral", "explanation": {"w": 1}}])


def test_a_full_queue_drops_and_counts_and_never_waits(tmp_path: Path) -> None:
    async def run() -> SampleLog:
        log = SampleLog(str(tmp_path), SampleArgs(queue_size=2, flush_s=60))
        started = time.monotonic()
        offered = [log.offer(sample(n)) for n in range(5)]
        assert time.monotonic() - started < 0.5 and offered == [True, True, False, False, False]
        await asyncio.sleep(0)  # the writer takes the first and waits out flush_s: the queue has room for 1 more
        assert log.offer(sample(5)) and not log.offer(sample(6))
        await log.close()
        return log

    log = asyncio.run(run())
    assert log.counts == {"written": 3, "dropped": 4, "lost": 0}
    rows = samples.read(tmp_path, "samples", "sentiment").to_pylist()
    assert sorted(r["request_id"] for r in rows) == ["r0", "r1", "r5"]
    assert all(json.loads(r["request"]) == {"text": "mail me at <EMAIL>"} for r in rows)
    assert all(json.loads(r["answer"]) == {"label": "neutral"} for r in rows)  # explanations quote the text


def test_a_failed_write_loses_the_samples_not_the_log(tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("the registry root is a file: every write fails")

    async def run() -> SampleLog:
        log = SampleLog(str(blocked), SampleArgs(flush_s=0.01))
        log.offer(sample(1))
        await asyncio.sleep(0.3)
        log.offer(sample(2))
        await log.close()
        return log

    assert asyncio.run(run()).counts == {"written": 0, "dropped": 0, "lost": 2}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_sweep_deletes_whole_days_past_retention(where: str, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_dir")  # an S3 server: moto's
    now = time.time()
    old, recent = now - 40 * 86400, now - 2 * 86400
    samples.write(root, "samples", samples.sample_rows([sample(1, old), sample(2, recent), sample(3, now)]))
    samples.write(root, "feedback", [{"domain": "sentiment", "request_id": "r1", "item": 0, "at": old,
                                         "tenant": "press", "truth": '{"label": "neutral"}'}])
    assert {(p.kind, p.day, p.rows) for p in samples.partitions(root)} == {
        ("samples", samples.day_of(old), 1), ("samples", samples.day_of(recent), 1),
        ("samples", samples.day_of(now), 1), ("feedback", samples.day_of(old), 1)}
    gone = samples.sweep(root, retention_days=30, now=now)
    assert {(p.kind, p.day) for p in gone} == {("samples", samples.day_of(old)), ("feedback", samples.day_of(old))}
    assert sorted(r["request_id"] for r in samples.read(root, "samples", "sentiment").to_pylist()) == ["r2", "r3"]
    assert samples.read(root, "feedback", "sentiment").num_rows == 0
    assert samples.sweep(root, retention_days=30, now=now) == []


def test_a_tenants_sample_rate_is_kept_checked_and_synced(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    store.create_tenant(Tenant("desk", ["events"], 10, 100, 2), 1)
    assert store.tenant("desk").sample_rate == 0.0
    assert store.set_quota("desk", sample_rate=0.25).sample_rate == store.tenant("desk").sample_rate == 0.25
    with pytest.raises(InvalidInput, match="sample_rate"):
        store.set_quota("desk", sample_rate=1.5)
    entry = TenantEntry(name="grid", grants=["energy"], requests_per_minute=10, items_per_minute=100,
                        max_concurrent=2, sample_rate=0.1, keys=[KeyEntry.of(new_key()[0])])
    assert store.sync_tenants([entry]) == ["grid"] and store.tenant("grid").sample_rate == 0.1
    assert store.sync_tenants([entry.model_copy(update={"sample_rate": 0.2})]) == ["grid"]
    assert store.sync_tenants([entry.model_copy(update={"sample_rate": 0.2})]) == []


def test_a_ledger_from_before_sampling_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the tables as they were made before sampling and feedback
        conn.execute("CREATE TABLE tenants (name TEXT PRIMARY KEY, grants TEXT NOT NULL, requests_per_minute INTEGER "
                     "NOT NULL, items_per_minute INTEGER NOT NULL, max_concurrent INTEGER NOT NULL, created_at "
                     "DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)")
        conn.execute("INSERT INTO tenants VALUES ('desk', '[\"events\"]', 10, 100, 2, 0, NULL)")
        conn.execute("CREATE TABLE usage (request_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, tenant TEXT NOT "
                     "NULL, domain TEXT NOT NULL, items INTEGER NOT NULL, status INTEGER NOT NULL, latency_ms DOUBLE "
                     "PRECISION NOT NULL, model_version TEXT NOT NULL, lease TEXT PRIMARY KEY)")
        conn.execute("INSERT INTO usage VALUES ('r1', 1.0, 'desk', 'events', 3, 200, 5.0, 'v1', 'lease-1')")
    store = Store(f"sqlite:///{path}")
    assert store.tenant("desk").sample_rate == 0.0
    (row,) = store.usage("desk")
    assert (row.lease, row.route, row.items) == ("lease-1", "predict", 3)
