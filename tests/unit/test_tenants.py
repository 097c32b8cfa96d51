"""Keys, sliding windows, leases, the tenant store and the admission decisions, without Ray."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError, InvalidInput
from services.admission import Decision, Gatekeeper
from services.tenants import (
    KeyEntry,
    Leases,
    SlidingWindow,
    Store,
    Tenant,
    Usage,
    digest,
    new_key,
    read_tenants_file,
    split_key,
)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'ledger.db'}")


def test_keys_are_stored_only_as_digests_and_parse_back() -> None:
    key, key_id, key_digest = new_key()
    assert key.startswith(f"csk_{key_id}_")
    secret = key.split("_", 2)[2]
    assert secret not in key_digest and key_digest == digest(secret)
    assert split_key(key) == (key_id, key_digest)
    for bad in ["", "csk_", "csk_abc", "Bearer x", "sk_abc_def", f"csk__{secret}"]:
        assert split_key(bad) is None


def test_sliding_window_never_admits_more_than_the_quota_in_any_window() -> None:
    window, limit, admitted = SlidingWindow(60.0), 10, []
    now = 0.0
    while now < 300:
        if window.wait(now, 1, limit) == 0:
            window.add(now, 1)
            admitted.append(now)
        now += 0.7
    for start in admitted:  # every window that starts at an admission holds at most `limit`
        assert sum(1 for t in admitted if start <= t < start + 60) <= limit
    assert len(admitted) >= 4 * limit  # and the quota is usable: ~10 per minute over 5 minutes


def test_sliding_window_says_when_enough_frees_up() -> None:
    window = SlidingWindow(60.0)
    window.add(0.0, 4)
    window.add(10.0, 4)
    assert window.wait(20.0, 2, 10) == 0
    assert window.wait(20.0, 4, 10) == pytest.approx(40.0)  # the first 4 leave the window at t=60
    assert window.wait(20.0, 8, 10) == pytest.approx(50.0)  # both batches must leave: the second at t=70
    assert window.wait(61.0, 4, 10) == 0


def test_leases_cap_concurrency_and_expire_when_never_released() -> None:
    leases = Leases()
    a = leases.acquire("t", 2, now=0.0, ttl=10.0)
    b = leases.acquire("t", 2, now=1.0, ttl=10.0)
    assert a and b and leases.acquire("t", 2, now=2.0, ttl=10.0) is None
    leases.release(a)
    assert leases.acquire("t", 2, now=3.0, ttl=10.0) is not None
    assert leases.acquire("t", 2, now=5.0, ttl=10.0) is None
    # b's holder died without releasing: at t=11 its lease has expired
    assert leases.acquire("t", 2, now=11.5, ttl=10.0) is not None
    assert leases.acquire("other", 1, now=0.0, ttl=10.0) is not None


def test_store_creates_rotates_revokes_and_audits(store: Store) -> None:
    key = store.create_tenant(Tenant("hotline", ["events"], 60, 600, 2), key_ttl_days=1)
    with pytest.raises(InvalidInput, match="exists"):
        store.create_tenant(Tenant("hotline", ["events"], 60, 600, 2), key_ttl_days=1)
    with pytest.raises(InvalidInput, match="unknown domains"):
        store.create_tenant(Tenant("x", ["water"], 60, 600, 2), key_ttl_days=1)
    with pytest.raises(InvalidInput, match="at least 1"):
        store.create_tenant(Tenant("y", ["events"], 0, 600, 2), key_ttl_days=1)
    new = store.rotate("hotline", key_ttl_days=1, grace_hours=1)
    keys = store.api_keys("hotline")
    assert len(keys) == 2 and all(k.problem(time.time()) is None for k in keys)  # both work while rotating
    assert keys[0].expires_at <= time.time() + 3601
    assert key not in str(store.query("SELECT * FROM api_keys")) and new not in str(store.query("SELECT * FROM audit"))
    store.set_quota("hotline", grants=["events", "sentiment"], requests_per_minute=120)
    assert store.tenant("hotline").grants == ["events", "sentiment"]
    store.revoke("hotline", keys[0].key_id)
    store.revoke("hotline")
    assert store.tenant("hotline").revoked_at is not None
    assert [a[2] for a in store.audit_log("hotline")] == ["create", "rotate", "set-quota", "revoke", "revoke"]


def test_usage_rows_are_kept_once_and_filtered(store: Store) -> None:
    rows = [Usage(f"r{i}", 100.0 + i, "a" if i % 2 else "b", "events", 1, 200, 5.0, "v1") for i in range(6)]
    store.record(rows)
    store.record(rows[:2])  # a retried flush writes nothing twice
    assert len(store.usage()) == 6
    assert [u.request_id for u in store.usage("a", since=102.0)] == ["r3", "r5"]
    # A client may repeat its X-Request-Id: each admission still has a row of its own.
    store.record([Usage("r0", 200.0, "a", "events", 1, 200, 5.0, "v1")])
    assert [u.request_id for u in store.usage("a", since=200.0)] == ["r0"]


def test_a_ledger_keyed_by_request_id_is_migrated_with_its_rows(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the usage table as ledgers made before leases had it
        conn.execute("CREATE TABLE usage (request_id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, tenant TEXT "
                     "NOT NULL, domain TEXT NOT NULL, items INTEGER NOT NULL, status INTEGER NOT NULL, latency_ms "
                     "DOUBLE PRECISION NOT NULL, model_version TEXT NOT NULL)")
        conn.execute("CREATE INDEX usage_tenant_at ON usage (tenant, at)")
        conn.execute("INSERT INTO usage VALUES ('r1', 1.0, 'a', 'events', 2, 200, 5.0, 'v1')")
    store = Store(f"sqlite:///{path}")
    store.record([Usage("r1", 2.0, "a", "events", 1, 200, 5.0, "v1")])
    assert [(u.request_id, u.lease, u.items) for u in store.usage("a")][:1] == [("r1", "r1", 2)]
    assert len(store.usage("a")) == 2


def _keeper(store: Store, **limits: int) -> tuple[Gatekeeper, tuple[str, str]]:
    tenant = Tenant("press", ["sentiment"], limits.get("rpm", 3), limits.get("ipm", 10), limits.get("conc", 2))
    key = store.create_tenant(tenant, key_ttl_days=1)
    parts = split_key(key)
    assert parts is not None
    return Gatekeeper(store, refresh_s=0.0), parts


def test_admission_decisions_cover_auth_grants_quotas_and_leases(store: Store) -> None:
    keeper, (key_id, key_digest) = _keeper(store, rpm=5)

    def admit(domain: str = "sentiment", items: int = 1, now: float = 0.0, digest_: str = key_digest) -> Decision:
        return keeper.admit(key_id, digest_, domain, items, lease_ttl=30, now=now, wall=time.time())

    assert admit(digest_="0" * 64).status == 401
    assert keeper.admit("nokey", key_digest, "sentiment", 1, 30, 0.0, time.time()).status == 401
    assert admit("energy").status == 403  # refused after authentication: one request of the quota
    assert admit(items=11).status == 413  # and another
    first = admit(items=4)
    assert first.status == 200 and first.lease
    second = admit(items=4, now=1.0)
    assert second.status == 200
    crowded = admit(items=1, now=2.0)
    assert crowded.status == 429 and crowded.code == "too_many_concurrent"
    keeper.release(first.lease, Usage("r1", 1.0, "press", "sentiment", 4, 200, 3.0, "v1"))
    over_items = admit(items=3, now=3.0)  # 8 + 3 > 10 items in the window
    assert over_items.status == 429 and over_items.retry_after == pytest.approx(57.0)
    assert admit(items=0, now=3.0).status == 200  # a body the gateway refuses: the fifth request
    over_requests = admit(items=1, now=4.0)
    assert over_requests.status == 429 and over_requests.retry_after == pytest.approx(56.0)
    # refused requests are throttled like any other once the quota is spent
    assert admit(items=0, now=4.0).status == 429 and admit("energy", now=4.0).status == 429
    keeper.release(second.lease, None)
    assert admit(items=1, now=61.0).status == 200
    assert [u.request_id for u in keeper.pending] == ["r1"]


def test_a_tenants_minute_is_spread_over_it(store: Store) -> None:
    keeper, (key_id, key_digest) = _keeper(store, rpm=1200, ipm=100_000, conc=1000)

    def admit(now: float) -> Decision:
        return keeper.admit(key_id, key_digest, "sentiment", 1, lease_ttl=30, now=now, wall=time.time())

    # After a quiet spell 10 go at once; the next wait their turn, one per 50 ms (1,200 a minute),
    # up to a second ahead; later than that is refused.
    burst = [admit(10.0) for _ in range(30)]
    assert [d.status for d in burst] == [200] * 30
    assert [d.delay for d in burst] == pytest.approx([0.0] * 10 + [0.05 * i for i in range(1, 21)])
    over = admit(10.0)
    assert over.status == 429 and over.code == "quota_exceeded" and over.retry_after == pytest.approx(0.05)
    assert "paced at 20 a second" in over.message
    # A flood asking every 5 ms reaches the model evenly, 20 a second, each at most a second late.
    flood = [(t, admit(float(t))) for t in np.arange(10.005, 20.0, 0.005)]
    turns = [t + d.delay for t, d in flood if d.status == 200]
    assert len(turns) == 199 and np.diff(turns) == pytest.approx(0.05)  # turns 11.05, 11.10 … 20.95
    assert max(d.delay for _, d in flood) <= 1.0
    # The sliding window still holds the minute to 1,200 admissions (by admission time).
    later = [float(t) for t in np.arange(20.0, 75.0, 0.005) if admit(float(t)).status == 200]
    times = [10.0] * 30 + [t for t, d in flood if d.status == 200] + later
    assert max(sum(t0 <= t < t0 + 60 for t in times) for t0 in np.arange(10.0, 15.0, 0.25)) == 1200


def test_revoked_and_expired_keys_are_refused(store: Store) -> None:
    keeper, (key_id, key_digest) = _keeper(store)
    now = time.time()
    assert keeper.admit(key_id, key_digest, "sentiment", 1, 30, 0.0, now + 2 * 86400).message.startswith(
        "API key expired")
    store.revoke("press")
    refused = keeper.admit(key_id, key_digest, "sentiment", 1, 30, 10.0, now)
    assert refused.status == 401 and refused.message == "API key revoked"


def test_a_new_key_works_at_once_and_bogus_keys_do_not_reread_the_store(store: Store) -> None:
    keeper = Gatekeeper(store, refresh_s=60.0)
    keeper.refresh(0.0)
    key = store.create_tenant(Tenant("late", ["events"], 10, 100, 2), key_ttl_days=1)
    parts = split_key(key)
    assert parts is not None
    assert keeper.admit(*parts, "events", 1, 30, now=0.01, wall=time.time()).status == 200  # read a moment ago
    loaded = keeper.loaded_at
    assert keeper.admit("bogus", "0" * 64, "events", 1, 30, now=0.02, wall=time.time()).status == 401
    assert keeper.admit(parts[0], "0" * 64, "events", 1, 30, now=0.03, wall=time.time()).status == 401
    assert keeper.loaded_at == loaded  # one-row lookups, not a re-read of every tenant


def _write(path: Path, *tenants: dict[str, object]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"tenants": list(tenants)}))
    return path


def _listed(*keys: str) -> list[dict[str, object]]:
    """Keys as a tenants file lists them: ids and digests."""
    return [KeyEntry.of(k).model_dump(exclude_none=True) for k in keys]


def _key_id(key: str) -> str:
    return KeyEntry.of(key).id


def test_a_tenants_file_is_the_truth_for_the_tenants_it_lists(store: Store, tmp_path: Path) -> None:
    keeper = Gatekeeper(store, refresh_s=0)
    cli_key = store.create_tenant(Tenant("press", ["sentiment"], 10, 100, 2), 1)
    first, second = new_key()[0], new_key()[0]
    grid = {"name": "grid", "grants": ["energy"], "requests_per_minute": 5, "items_per_minute": 50,
            "max_concurrent": 2, "keys": _listed(first)}
    path = _write(tmp_path / "tenants.yaml", grid)

    def status(key: str, domain: str = "energy") -> int:
        key_id, key_digest = split_key(key) or ("", "")
        decision = keeper.admit(key_id, key_digest, domain, 1, 10.0, now=time.monotonic(), wall=time.time())
        keeper.release(decision.lease, None)
        return decision.status

    assert store.sync_tenants(read_tenants_file(path)) == ["grid"]
    assert status(first) == 200 and status(first, "events") == 403
    assert store.sync_tenants(read_tenants_file(path)) == []  # nothing changed: nothing audited
    # rotation in the file: both keys work, then the old one goes
    assert store.sync_tenants(read_tenants_file(_write(path, {**grid, "keys": _listed(first, second)}))) == ["grid"]
    assert status(first) == 200 and status(second) == 200
    store.sync_tenants(read_tenants_file(_write(path, {**grid, "keys": _listed(second),
                                                       "grants": ["energy", "events"]})))
    assert status(first) == 401 and status(second, "events") == 200
    # dropped from the file: revoked; tenants made with the CLI are never touched
    assert store.sync_tenants(read_tenants_file(_write(path))) == ["grid"]
    assert status(second) == 401 and status(cli_key, "sentiment") == 200
    actions = [row[2] for row in store.audit_log("grid")]
    assert actions.count("sync") == 3 and actions[-1] == "sync-revoke"
    secret = first.split("_", 2)[2]
    assert secret not in path.read_text() and all(secret not in str(row) for row in store.audit_log())


def _status(keeper: Gatekeeper, key: str, domain: str = "energy") -> int:
    key_id, key_digest = split_key(key) or ("", "")
    decision = keeper.admit(key_id, key_digest, domain, 1, 10.0, now=time.monotonic(), wall=time.time())
    keeper.release(decision.lease, None)
    return decision.status


def test_a_key_works_until_the_expiry_the_file_gives_it_and_no_sync_extends_it(store: Store, tmp_path: Path) -> None:
    keeper = Gatekeeper(store, refresh_s=0)
    lasting, dated = new_key()[0], new_key()[0]
    grid = {"name": "grid", "grants": ["energy"], "requests_per_minute": 50, "items_per_minute": 50,
            "max_concurrent": 2, "keys": [*_listed(lasting), {**_listed(dated)[0], "expires": "2030-01-01T00:00:00Z"}]}
    path = _write(tmp_path / "tenants.yaml", grid)
    expected = {_key_id(lasting): math.inf, _key_id(dated): datetime(2030, 1, 1, tzinfo=UTC).timestamp()}
    for _ in range(3):  # however often the same file is applied
        store.sync_tenants(read_tenants_file(path))
        assert {k.key_id: k.expires_at for k in store.api_keys("grid")} == expected
    # an expiry the file changes is applied (and audited); one in the past refuses the key
    grid["keys"] = [*_listed(lasting), {**_listed(dated)[0], "expires": "2020-01-01T00:00:00+02:00"}]
    assert store.sync_tenants(read_tenants_file(_write(path, grid))) == ["grid"]
    assert _status(keeper, lasting) == 200
    refused = keeper.admit(*(split_key(dated) or ("", "")), "energy", 1, 10.0, now=time.monotonic(), wall=time.time())
    assert refused.status == 401 and refused.message == "API key expired at 2019-12-31T22:00:00Z"


def test_a_tenant_is_managed_by_the_file_or_by_the_cli_never_both(store: Store, tmp_path: Path) -> None:
    keeper = Gatekeeper(store, refresh_s=0)
    cli_key = store.create_tenant(Tenant("press", ["energy"], 10, 100, 2), 1)
    key = new_key()[0]
    grid = {"name": "grid", "grants": ["energy"], "requests_per_minute": 50, "items_per_minute": 50,
            "max_concurrent": 2, "keys": _listed(key)}
    path = _write(tmp_path / "tenants.yaml", grid)
    store.sync_tenants(read_tenants_file(path))
    assert store.file_managed() == {"grid"}
    # the CLI refuses to change a tenant the file manages (its next sync would undo the change), saying what to do
    for change, instead in [(lambda: store.revoke("grid", _key_id(key)), "remove the key from its keys there"),
                            (lambda: store.revoke("grid"), "remove the tenant from the file there"),
                            (lambda: store.rotate("grid", 1, 1), "cityserve tenants new-key"),
                            (lambda: store.set_quota("grid", max_concurrent=9), "change its grants and limits")]:
        with pytest.raises(InvalidInput, match="managed by the tenants file") as refused:
            change()
        assert instead in refused.value.message
    store.sync_tenants(read_tenants_file(path))
    assert _status(keeper, key) == 200 and store.tenant("grid").max_concurrent == 2
    # and a file listing a tenant the CLI made is refused whole: that tenant is the CLI's
    press = {**grid, "name": "press", "keys": _listed(new_key()[0]), "max_concurrent": 7}
    with pytest.raises(ConfigError, match="'press' was created with `cityserve tenants create`"):
        store.sync_tenants(read_tenants_file(_write(path, grid, press)))
    assert store.tenant("press").max_concurrent == 2 and _status(keeper, cli_key) == 200
    store.revoke("press")
    store.sync_tenants(read_tenants_file(_write(path, grid)))
    assert _status(keeper, cli_key) == 401  # the CLI's revoke sticks: no sync touches its tenants


def test_a_key_the_file_drops_stays_revoked_until_the_file_lists_it_again(store: Store, tmp_path: Path) -> None:
    keeper = Gatekeeper(store, refresh_s=0)
    old, new = new_key()[0], new_key()[0]
    grid = {"name": "grid", "grants": ["energy"], "requests_per_minute": 50, "items_per_minute": 50,
            "max_concurrent": 2, "keys": _listed(old, new)}
    path = tmp_path / "tenants.yaml"
    store.sync_tenants(read_tenants_file(_write(path, grid)))
    store.sync_tenants(read_tenants_file(_write(path, {**grid, "keys": _listed(new)})))
    for _ in range(2):
        assert store.sync_tenants(read_tenants_file(path)) == []
        assert _status(keeper, old) == 401 and _status(keeper, new) == 200
    # a tenant dropped from the file is revoked, stays so, and is restored by listing it again
    assert store.sync_tenants(read_tenants_file(_write(path))) == ["grid"]
    assert store.sync_tenants(read_tenants_file(path)) == [] and _status(keeper, new) == 401
    assert store.sync_tenants(read_tenants_file(_write(path, {**grid, "keys": _listed(old)}))) == ["grid"]
    assert _status(keeper, old) == 200 and _status(keeper, new) == 401


def test_a_bad_tenants_file_is_refused_whole_without_quoting_keys(store: Store, tmp_path: Path) -> None:
    key = new_key()[0]
    secret, entry = key.split("_", 2)[2], _listed(key)[0]
    good = {"name": "grid", "grants": ["energy"], "requests_per_minute": 5, "items_per_minute": 50,
            "max_concurrent": 2, "keys": [entry]}
    whole = rf"tenants\[0\]\.keys\.1: .*a whole API key \(id {entry['id']}\).*`cityserve tenants key-entry`"
    for bad, expected in [({**good, "keys": [entry, key]}, whole),
                          ({**good, "keys": ["not-a-key"]}, r"tenants\[0\]\.keys\.0: .*a string"),
                          ({**good, "keys": [entry, entry]}, r"tenants\[0\]\.keys: .*listed twice"),
                          ({**good, "keys": [{**entry, "expires": "2030-01-01T00:00"}]}, r"\.expires: .*timezone"),
                          ({**good, "keys": [{**entry, "sha256": secret}]}, r"keys\.0\.sha256: .*pattern"),
                          ({**good, "requests_per_minute": 0}, r"tenants\[0\]\.requests_per_minute"),
                          ({**good, "colour": "red"}, r"tenants\[0\]\.colour"),
                          ({**good, "keys": []}, r"tenants\[0\]\.keys")]:
        with pytest.raises(ConfigError, match=expected) as caught:
            read_tenants_file(_write(tmp_path / "t.yaml", bad))
        assert secret not in str(caught.value)
    (tmp_path / "t.yaml").write_text(f"tenants: [{{name: a, grants: [energy], requests_per_minute: 1, "
                                     f"items_per_minute: 1, max_concurrent: 1, keys: [{{id: 000000001234, "
                                     f"sha256: {entry['sha256']}}}]}}]")
    with pytest.raises(ConfigError, match=r"keys\.0\.id: .*in quotes"):  # YAML read the id as a number
        read_tenants_file(tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match="listed twice"):
        read_tenants_file(_write(tmp_path / "t.yaml", good, good))
    (tmp_path / "t.yaml").write_text("tenants: [oops")
    with pytest.raises(ConfigError, match="tenants file"):
        read_tenants_file(tmp_path / "t.yaml")
    with pytest.raises(InvalidInput, match="unknown domains"):
        store.sync_tenants(read_tenants_file(_write(tmp_path / "t.yaml", {**good, "grants": ["water"]})))
    assert store.tenants() == []  # nothing half-applied
    other = store.create_tenant(Tenant("press", ["sentiment"], 10, 100, 2), 1)
    with pytest.raises(ConfigError, match="key id"):
        store.sync_tenants(read_tenants_file(_write(tmp_path / "t.yaml", {**good, "keys": _listed(other)})))


def test_a_ledger_url_may_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    monkeypatch.setenv("CITYSERVE_LEDGER_URL", url)
    assert Store("env:CITYSERVE_LEDGER_URL").url == url
    monkeypatch.delenv("CITYSERVE_LEDGER_URL")
    with pytest.raises(ConfigError, match="CITYSERVE_LEDGER_URL"):
        Store("env:CITYSERVE_LEDGER_URL")
    assert "l.db" not in repr(Store(url))  # a URL may carry a password


@pytest.mark.parametrize("name", ["x'; DROP TABLE tenants; --", "a b", "", "-rf", "a" * 64, "\u0430dmin", "caf\u00e9",
                                  "name\n", "nul\x00name"])
def test_hostile_tenant_names_are_refused_by_the_cli_path_and_the_tenants_file(
        store: Store, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInput, match="ASCII letters") as refused:
        store.create_tenant(Tenant(name, ["events"], 10, 100, 2), key_ttl_days=1)
    assert refused.value.field == "name" and store.tenants() == []
    entry = {"name": name, "grants": ["events"], "requests_per_minute": 5, "items_per_minute": 50,
             "max_concurrent": 2, "keys": _listed(new_key()[0])}
    with pytest.raises(ConfigError, match=r"tenants\[0\]\.name: .*ASCII letters"):
        read_tenants_file(_write(tmp_path / "t.yaml", entry))
    store.create_tenant(Tenant("a" * 63, ["events"], 10, 100, 2), key_ttl_days=1)  # the longest name


def test_usage_summary_bills_answered_items_per_tenant_and_domain() -> None:
    from services.tenants import USAGE_SUMMARY_COLUMNS, Usage, summarise_usage

    rows = [Usage("a", 1.0, "press", "sentiment", 3, 200, 10.0, "v2"),
            Usage("b", 2.0, "press", "sentiment", 5, 429, 1.0),
            Usage("c", 3.0, "grid", "energy", 1, 200, 30.0, "v1"),
            Usage("d", 4.0, "press", "sentiment", 2, 200, 20.0, "v3")]
    summary = [dict(zip(USAGE_SUMMARY_COLUMNS, row, strict=True)) for row in summarise_usage(rows)]
    assert [(s["tenant"], s["domain"]) for s in summary] == [("grid", "energy"), ("press", "sentiment")]
    press = summary[1]
    assert (press["requests"], press["answered"], press["items"], press["errors"]) == (3, 2, 5, 1)
    assert press["versions"] == "v2,v3" and press["p50_ms"] == 10.0
