"""The admission actor's class (driven directly, without Ray) and the store under it when the
database goes away: refusals cached, failures isolated per request, usage rows spilled, none lost.

An outage is a real one: the store's URL is pointed at a PostgreSQL port nothing listens on, so
every connection attempt is refused by the operating system, as when the server is down."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from services import admission
from services.admission import Admission, Gatekeeper
from services.tenants import LedgerUnavailable, Store, Tenant, Usage, UsageSpill, split_key

DOWN = "postgresql://cityserve@127.0.0.1:9/ledger"  # the discard port: nothing answers PostgreSQL there


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def key_of(store: Store, name: str, rpm: int = 600) -> tuple[str, str]:
    parts = split_key(store.create_tenant(Tenant(name, ["events"], rpm, 10_000, 50), key_ttl_days=1))
    assert parts is not None
    return parts


class Outage:
    """Takes a store's database away (and gives it back) the way a server restart does."""

    def __init__(self, store: Store) -> None:
        self.store, self.url = store, store.url

    def begin(self) -> None:
        self.store.close()
        self.store.url = DOWN

    def end(self) -> None:
        self.store.url = self.url
        self.store._retry_at = 0.0  # as if the backoff had passed


def counting_lookups(store: Store) -> list[str]:
    """The key ids `store.api_key` is asked for, recorded on their way to the real lookup."""
    asked: list[str] = []
    real = store.api_key

    def api_key(key_id: str) -> Any:
        asked.append(key_id)
        return real(key_id)

    store.api_key = api_key  # type: ignore[method-assign]
    return asked


def test_unknown_ids_and_wrong_secrets_take_one_lookup_then_the_refusal_cache(url: str) -> None:
    store = Store(url)
    key_id, key_digest = key_of(store, "press")
    keeper = Gatekeeper(store, refresh_s=60.0)
    keeper.refresh(0.0)
    asked = counting_lookups(store)
    for now in (1.0, 1.5):  # the second try of each comes from the cache
        assert keeper.admit("aaaaaaaaaaaa", "0" * 64, "events", 1, 30, now, time.time()).status == 401
        assert keeper.admit(key_id, "0" * 64, "events", 1, 30, now, time.time()).status == 401
    assert asked == ["aaaaaaaaaaaa", key_id]  # the same path for both: one lookup each
    assert keeper.admit(key_id, "0" * 64, "events", 1, 30, 1.0 + admission.UNKNOWN_TTL_S + 0.1,
                        time.time()).status == 401
    assert asked[-1] == key_id  # the cache is short-lived
    assert keeper.admit(key_id, key_digest, "events", 1, 30, 2.0, time.time()).status == 200


def test_a_read_holding_a_new_key_but_not_its_tenant_looks_the_key_up(url: str) -> None:
    store = Store(url)
    tenants_before = store.tenants()  # the re-read's first half, before the tenant exists
    key_id, key_digest = key_of(store, "outage")
    keeper = Gatekeeper(store, refresh_s=60.0)
    keeper.load(tenants_before, store.api_keys(), 0.0)  # its second half sees the new key
    asked = counting_lookups(store)
    assert keeper.admit(key_id, key_digest, "events", 1, 30, 1.0, time.time()).status == 200
    assert asked == [key_id]  # looked up once, and cached with its tenant from then on
    assert keeper.admit(key_id, key_digest, "events", 1, 30, 1.5, time.time()).status == 200
    assert asked == [key_id]


def test_the_unknown_key_cache_is_bounded(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "MAX_UNKNOWN", 3)
    keeper = Gatekeeper(Store(url), refresh_s=60.0)
    for i in range(10):
        keeper.admit(f"{i:012x}", "0" * 64, "events", 1, 30, 1.0, time.time())
    assert list(keeper.unknown.entries) == [(f"{i:012x}", "0" * 64) for i in (7, 8, 9)]  # the newest kept


def test_a_lost_database_is_reopened_after_a_backoff_without_waiting_on_each_call(url: str) -> None:
    store = Store(url)
    key_of(store, "press")
    outage = Outage(store)
    outage.begin()
    with pytest.raises(LedgerUnavailable, match="unreachable"):
        store.tenants()
    started = time.monotonic()
    with pytest.raises(LedgerUnavailable, match="retrying in"):  # within the backoff: no new attempt
        store.tenants()
    assert time.monotonic() - started < 0.05
    outage.end()
    assert [t.name for t in store.tenants()] == ["press"]


@pytest.fixture
def actor(url: str, tmp_path: Path) -> Admission:
    # flushes only when the test asks (flush_s: an hour), so their counts are the test's own
    return Admission(url, refresh_s=0.05, flush_s=3600, spill_dir=str(tmp_path / "spill"))


def test_during_an_outage_known_tenants_are_admitted_and_every_usage_row_reaches_the_ledger(
        actor: Admission, tmp_path: Path) -> None:
    store = actor.keeper.store
    known = key_of(store, "grid")
    seen = key_of(store, "press")
    revoked = key_of(store, "gone")
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    try:
        decisions = run(actor.admit_many([(*k, "events", 1, 30.0) for k in (known, seen, revoked)]))
        assert [d.status for d in decisions] == [200, 200, 200]
        store.revoke("gone")
        time.sleep(0.1)
        run(actor.admit_many([]))  # starts the re-read that sees the revocation
        run(asyncio.sleep(0.1))
        leases = [d.lease for d in decisions]
        outage = Outage(store)
        outage.begin()
        time.sleep(0.1)
        batch = [(*known, "events", 1, 30.0), ("bbbbbbbbbbbb", "1" * 64, "events", 1, 30.0),
                 (*revoked, "events", 1, 30.0)]
        statuses = [d.status for d in run(actor.admit_many(batch))]
        # the known tenant goes on; a key never seen cannot be checked (503, its request only);
        # a revocation seen before the outage still applies
        assert statuses == [200, 503, 401]
        for i, lease in enumerate(leases):
            run(actor.release_many([(lease, Usage(f"r{i}", time.time(), "grid", "events", 1, 200, 5.0, "v1",
                                                   lease))]))
        assert run(actor.flush()) == 0
        assert actor.keeper.pending == [] and UsageSpill(tmp_path / "spill").rows() == 3  # none only in memory
        outage.end()
        assert run(actor.flush()) == 3
        assert sorted(u.lease for u in store.usage()) == sorted(leases)
        assert UsageSpill(tmp_path / "spill").files() == []
        assert run(actor.flush()) == 0  # replayed once: one row per lease
        assert len(store.usage()) == 3
    finally:
        if actor.flusher is not None:
            actor.flusher.cancel()
            loop.run_until_complete(asyncio.gather(actor.flusher, return_exceptions=True))
        loop.close()


def test_admission_stops_after_the_stated_staleness(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(url)
    known = key_of(store, "grid")
    keeper = Gatekeeper(store, refresh_s=1.0, inline=False)
    keeper.load(store.tenants(), store.api_keys(), now=0.0)
    assert keeper.admit(*known, "events", 1, 30, now=1.0 + admission.STALE_LIMIT_S, wall=time.time()).status == 200
    late = keeper.admit(*known, "events", 1, 30, now=1.1 + admission.STALE_LIMIT_S, wall=time.time())
    assert late.status == 503 and late.retry_after > 0 and "unreachable" in late.message


def test_a_spilled_file_is_whole_and_replays_to_one_row_each(url: str, tmp_path: Path) -> None:
    store = Store(url)
    spill = UsageSpill(tmp_path / "spill")
    rows = [Usage(f"r{i}", 1.0 + i, "grid", "energy", 2, 200, 3.5, "v2", f"lease-{i}") for i in range(5)]
    spill.write(rows[:3])
    spill.write(rows[2:])  # an overlap, as a crash between a replay's write and its unlink leaves
    assert [p.suffix for p in (tmp_path / "spill").iterdir()] == [".jsonl", ".jsonl"]  # no temporary left
    assert spill.replay(store) == 6
    assert sorted(u.lease for u in store.usage()) == [f"lease-{i}" for i in range(5)]
    assert store.usage()[0] == rows[0]
