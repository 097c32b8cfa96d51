"""The platform over real HTTP: the serve config deployed through the dashboard's REST API onto
the session's Ray cluster, exactly as `cityserve serve up` does, with smoke-trained models.

Serves traffic, events and energy (sentiment runs the same text code as events) behind two
gateway replicas, so quotas are seen to hold across replicas.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from bench.learning_loop import Loop, Tenants, run_loop, shifted_reports, steady_load
from cluster.serve import Platform
from core.settings import Settings
from domains import get_domain
from domains.base import request_example
from services import samples
from services.batch import score_file
from services.config import VERBS
from services.platform import CONFIG_FILE, platform_up, reload_domain, serve_config
from services.retrain import RetrainOptions
from services.tenants import KeyEntry, Store, Tenant, new_key
from tests.integration.helpers import (
    GRID,
    GRID_KEY,
    SERVED,
    TEST_OVERLAY,
    ensure_versions,
    http,
    session_app,
    write_tenants,
)
from training.workspace import Workspace

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_batch_scoring_reports_a_bad_row_and_scores_the_rest(workspace: Workspace, tmp_path: Path) -> None:
    # First in the module: its scoring actor needs a whole CPU, which the app's replicas would hold.
    versions = ensure_versions(workspace, "events", 1)
    source = tmp_path / "reports.csv"
    pd.DataFrame({"case": [10, 11, 12, 13, 14],
                  "text": ["Water main break on Fulton St", "", "loud party next door", "pothole on 5th ave",
                           "小区门口的路灯坏了三天了"]},
                 ).to_csv(source, index=False)
    dest = tmp_path / "scored.parquet"
    report = score_file(get_domain("events"), workspace, source, dest, ref=versions[-1], batch_size=2)
    assert (report.rows, report.scored, report.failed_count) == (5, 3, 2)
    assert [row for row, _ in report.failed] == [1, 4]
    assert "text" in report.failed[0][1] and "language zh" in report.failed[1][1]
    out = pd.read_parquet(dest)
    assert list(out["case"]) == [10, 11, 12, 13, 14]
    assert out["result"].isna().tolist() == [False, True, False, False, True]
    get_domain("events").response_model.model_validate(json.loads(out["result"][0]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".scored")]  # no temporary left behind


@pytest.fixture(scope="module")
def platform(workspace: Workspace) -> Iterator[Platform]:
    """The app on the session cluster, deployed the way `cityserve serve up` deploys it."""
    for domain in SERVED:
        versions = ensure_versions(workspace, domain, 2 if domain == "energy" else 1)
        workspace.registry.promote(domain, versions[-1])
    tenants_file = workspace.settings.state_dir / "tenants.yaml"
    write_tenants(tenants_file, GRID)
    overlay = TEST_OVERLAY.model_copy(update={"args": {"tenants_file": str(tenants_file),
                                                       "samples": {"flush_s": 0.5, "monitor_s": 2}}})
    with session_app(workspace, overlay) as record:
        yield record


@pytest.fixture(scope="module")
def keys(settings: Settings) -> dict[str, str]:
    store = Store(settings.ledger_location())
    return {
        "hotline": store.create_tenant(Tenant("hotline", list(SERVED), 100_000, 1_000_000, 64), 1),
        "press": store.create_tenant(Tenant("press", ["sentiment"], 100, 1000, 4), 1),
    }


def test_every_domain_answers_its_documented_example(platform: Platform, keys: dict[str, str]) -> None:
    for domain in SERVED:
        example = request_example(get_domain(domain).request_model)
        status, headers, body = http("POST", f"{platform.gateway_url}/v1/{domain}/{VERBS[domain]}", example,
                                     keys["hotline"])
        assert status == 200, body
        get_domain(domain).response_model.model_validate(body)
        assert headers["x-model-version"].startswith("v") and headers["x-request-id"]
    status, _, body = http("POST", f"{platform.gateway_url}/v1/events/classify",
                           [{"text": "pothole"}, {"text": "no heat in apartment"}], keys["hotline"])
    assert status == 200 and len(body) == 2
    models = http("GET", f"{platform.gateway_url}/v1/models")[2]
    assert {m["domain"] for m in models["domains"] if m["ready"]} == set(SERVED)


def test_auth_matrix_and_errors_over_http(platform: Platform, keys: dict[str, str]) -> None:
    url = f"{platform.gateway_url}/v1/events/classify"
    event = {"text": "street light out"}
    cases = {
        "no key": http("POST", url, event),
        "unknown key": http("POST", url, event, "csk_000000000000_" + "A" * 43),
        "not granted": http("POST", url, event, keys["press"]),
        "invalid": http("POST", url, {"text": ""}, keys["hotline"]),
        "unknown route": http("POST", f"{platform.gateway_url}/v1/water/forecast", event, keys["hotline"]),
        "too many": http("POST", url, [event] * 65, keys["hotline"]),
        "chinese": http("POST", url, {"text": "小区门口的路灯坏了三天了"}, keys["hotline"]),
    }
    traffic = {**request_example(get_domain("traffic").request_model), "sensors": ["L00-10", "nope"]}
    cases["unknown sensor"] = http("POST", f"{platform.gateway_url}/v1/traffic/forecast", traffic, keys["hotline"])
    expected = {"no key": 401, "unknown key": 401, "not granted": 403, "invalid": 422, "unknown route": 404,
                "too many": 413, "unknown sensor": 422, "chinese": 422}
    assert {k: v[0] for k, v in cases.items()} == expected
    for name, (_, _, body) in cases.items():
        assert set(body) <= {"code", "message", "field"} and body["message"], name
    assert cases["unknown sensor"][2]["field"] == "sensors[1]"
    assert (cases["chinese"][2]["code"], cases["chinese"][2]["field"]) == ("unsupported_language", "text")


def test_an_answer_says_how_sure_it_is_and_explains_itself_when_asked(platform: Platform,
                                                                      keys: dict[str, str]) -> None:
    text = "Water main break on Fulton St, water gushing into the street"
    url = f"{platform.gateway_url}/v1/events/classify"
    status, _, plain = http("POST", url, {"text": text}, keys["hotline"])
    assert status == 200 and 0 < plain["confidence"] <= 1 and isinstance(plain["uncertain"], bool)
    assert "explanation" not in plain
    status, _, explained = http("POST", f"{url}?explain=true", {"text": text}, keys["hotline"])
    assert status == 200 and explained["label"] == plain["label"]
    words = explained["explanation"]["words"]
    assert words and all(w["word"] in text for w in words) and explained["explanation"]["forward_passes"] > len(words)
    forecast = f"{platform.gateway_url}/v1/energy/forecast?explain=true"
    status, _, why = http("POST", forecast, request_example(get_domain("energy").request_model), keys["hotline"])
    inputs = why["explanation"]["inputs"]
    assert status == 200 and len(why["steps"]) == 48 and why["explanation"]["forward_passes"] == len(inputs) + 1
    assert {"demand, last 24 hours", "temperature forecast"} <= {i["input"] for i in inputs}


def test_sampled_requests_and_their_feedback_are_kept_masked(platform: Platform, settings: Settings,
                                                            keys: dict[str, str]) -> None:
    key = Store(settings.ledger_location()).create_tenant(
        Tenant("sampled", ["events", "energy"], 1000, 10_000, 8, sample_rate=1.0), 1)
    text = "Water main break outside 221 Baker Street, call me on 415-555-0132"
    status, headers, answers = http("POST", f"{platform.gateway_url}/v1/events/classify",
                                    [{"text": text}, {"text": "loud party next door"}], key)
    assert status == 200
    unsampled = http("POST", f"{platform.gateway_url}/v1/events/classify", {"text": text}, keys["hotline"])[1]
    rid = headers["x-request-id"]
    truth = {"request_id": rid, "item": 0, "truth": {"label": "water_sewer", "priority": "high"}}
    assert http("POST", f"{platform.gateway_url}/v1/events/feedback", truth, key)[::2] == (200, {"stored": 1})
    registry = settings.registry_location()
    deadline = time.monotonic() + 30
    while (rows := samples.read(registry, "samples", "events").to_pylist()) == [] and time.monotonic() < deadline:
        time.sleep(0.5)
    mine = sorted((r for r in rows if r["request_id"] == rid), key=lambda r: r["item"])
    assert [(r["tenant"], r["model_version"]) for r in mine] == [("sampled", headers["x-model-version"])] * 2
    assert json.loads(mine[0]["request"])["text"] == "Water main break outside <ADDRESS>, call me on <PHONE>"
    assert json.loads(mine[0]["answer"])["label"] == answers[0]["label"]
    assert unsampled["x-request-id"] not in {r["request_id"] for r in rows}  # its tenant did not opt in
    (kept,) = [r for r in samples.read(registry, "feedback", "events").to_pylist() if r["request_id"] == rid]
    assert json.loads(kept["truth"]) == truth["truth"] and kept["tenant"] == "sampled"
    deadline = time.monotonic() + 10
    while not [u for u in Store(settings.ledger_location()).usage("sampled") if u.route == "feedback"]:
        assert time.monotonic() < deadline, "the feedback's usage row never reached the ledger"
        time.sleep(0.2)
    # The monitor actor reads the log back and its gauges reach the node's metrics endpoint, which
    # Prometheus scrapes, by the names the chart's alert rules use (Ray prefixes them `ray_`): the
    # sampled items, the live accuracy of the one judged answer, and the gateway's request count.
    series = {("ray_cityserve_sampled_items", 'domain="events"'): 2.0,
              ("ray_cityserve_live_quality", 'metric="accuracy"'): float(answers[0]["label"] == "water_sewer")}
    deadline = time.monotonic() + 90
    while True:  # each process's agent exports every few seconds: the gateway's counter may come later
        found = _scraped(series)
        counted = any(line.startswith("ray_cityserve_requests_total{") for line in _metric_lines())
        if found == series and counted:
            break
        assert time.monotonic() < deadline, f"never reached Prometheus's endpoint: {found}, requests counted {counted}"
        time.sleep(2)


def _metric_lines() -> list[str]:
    """This node's Prometheus endpoint, line by line."""
    import ray

    node = ray._private.worker.global_worker.node
    assert node is not None, "the session's Ray cluster is not running"
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10) as resp:
        return list(resp.read().decode().splitlines())


def _scraped(series: dict[tuple[str, str], float]) -> dict[tuple[str, str], float]:
    """The value of each (metric, label) on this node's Prometheus endpoint: its first line of that
    metric with that label."""
    lines = _metric_lines()
    found = {}
    for name, label in series:
        values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") and label in line]
        if values:
            found[name, label] = values[0]
    return found


def test_a_response_carries_its_request_id_once(platform: Platform, keys: dict[str, str]) -> None:
    """Serve's HTTP server adds its request id to every response; the gateway adds none beside it."""
    energy = json.dumps(request_example(get_domain("energy").request_model)).encode()

    def ids(key: str, sent: dict[str, str]) -> tuple[int, list[str]]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}", **sent}
        request = urllib.request.Request(f"{platform.gateway_url}/v1/energy/forecast", data=energy, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, resp.headers.get_all("x-request-id") or []
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get_all("x-request-id") or []

    assert ids(keys["hotline"], {"X-Request-Id": "trace-42"}) == (200, ["trace-42"])
    assert ids("csk_000000000000_" + "A" * 43, {"X-Request-Id": "trace-43"}) == (401, ["trace-43"])
    status, made = ids(keys["hotline"], {})
    assert status == 200 and len(made) == 1 and made[0]


def test_haproxy_fronts_the_gateway_on_loopback_only(platform: Platform) -> None:
    """Serve's HAProxy takes the gateway port; `cluster/haproxy-local` narrowed the config Ray
    wrote: nothing it serves listens beyond 127.0.0.1, and its own error page is our JSON 503."""
    import psutil
    import ray

    config = f"/tmp/haproxy-serve/{ray.get_runtime_context().get_node_id()}/haproxy.cfg"
    ours = [p for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "haproxy" and config in (p.info["cmdline"] or [])]
    assert ours, f"no HAProxy runs with {config}"
    listening = {c.laddr for p in ours for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert {a.ip for a in listening} == {"127.0.0.1"}
    assert int(platform.gateway_url.rsplit(":", 1)[1]) in {a.port for a in listening}
    pages = {line.split()[2] for line in Path(config).read_text().splitlines() if line.strip().startswith("errorfile")}
    assert len(pages) == 1
    head, _, body = Path(pages.pop()).read_bytes().decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503") and "Retry-After: 1" in head
    assert json.loads(body)["code"] == "unavailable"


def test_quota_holds_across_two_gateway_replicas(platform: Platform, settings: Settings) -> None:
    url = f"{platform.gateway_url}/v1/energy/forecast"
    example = request_example(get_domain("energy").request_model)
    store = Store(settings.ledger_location())
    # Serve routes each request to either gateway replica; now and then all ten admitted ones go
    # through one, which proves nothing about a count shared between replicas. A burst that did
    # not reach both is repeated with a fresh tenant (the quota is still checked on every burst).
    for _ in range(3):
        key = store.create_tenant(Tenant(f"tight-{uuid.uuid4().hex[:8]}", ["energy"], 10, 1000, 64), 1)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _, key=key: http("POST", url, example, key), range(30)))
        statuses = Counter(a[0] for a in answers)
        assert statuses == {200: 10, 429: 20}  # 10 a minute for the tenant, whichever replica answered
        refused = {a[1].get("retry-after") for a in answers if a[0] == 429}
        assert refused and all(r is not None and 1 <= int(r) <= 60 for r in refused)
        replicas = {a[1]["x-gateway-replica"] for a in answers if a[0] == 200}
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, "three bursts in a row reached only one gateway replica"


def _ledger_counts(store: Store, tenant: str, expected: int) -> Counter[int]:
    deadline = time.monotonic() + 10  # the admission actor flushes every 0.2 s
    while len(store.usage(tenant)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)  # and nothing more arrives
    return Counter(u.status for u in store.usage(tenant))


def _metering_round(gateway: str, store: Store) -> None:
    tenant = f"meter-{uuid.uuid4().hex[:8]}"
    key = store.create_tenant(Tenant(tenant, ["events", "traffic"], 1000, 10_000, 64), 1)
    traffic = {**request_example(get_domain("traffic").request_model), "sensors": ["nope", "L10-00"]}
    sent = [http("POST", f"{gateway}/v1/events/classify", {"text": f"report {i}"}, key)[0] for i in range(12)]
    sent += [http("POST", f"{gateway}/v1/traffic/forecast", traffic, key)[0] for _ in range(3)]
    sent += [http("POST", f"{gateway}/v1/events/classify", {"text": ""}, key)[0] for _ in range(2)]
    assert Counter(sent) == {200: 12, 422: 5}
    # Admitted requests are metered with their outcome; a body refused before admission is not.
    assert _ledger_counts(store, tenant, 15) == {200: 12, 422: 3}


def test_metering_counts_equal_requests_sent_sqlite(platform: Platform, settings: Settings) -> None:
    _metering_round(platform.gateway_url, Store(settings.ledger_location()))


def test_canary_shadow_abort_promote_and_rollback_under_load_fail_nothing(platform: Platform, keys: dict[str, str],
                                                                          workspace: Workspace) -> None:
    """Every stage move a city makes on a live domain — a canary, its abort, a shadow, a promotion
    (past a canary), a rollback — under four closed-loop clients: no request fails, and each phase
    is answered by the versions it should be."""
    registry = workspace.registry
    before = registry.get("energy").version
    other = next(v.version for v in reversed(registry.versions("energy")) if v.version != before)
    url = f"{platform.gateway_url}/v1/energy/forecast"
    example = request_example(get_domain("energy").request_model)

    def settled(change: Callable[[], object], production: str, canary: str | None) -> Callable[[], None]:
        def run() -> None:
            change()
            assert reload_domain(workspace, "energy", production, timeout_s=120, canary=canary)
        return run

    with steady_load(url, keys["hotline"], [example], 4) as load:
        load.phase = "production"
        time.sleep(2)
        load.move("canary", settled(lambda: registry.start_canary("energy", other, 50), before, other), 3)
        load.move("aborted", settled(lambda: registry.abort_canary("energy"), before, None), 3)
        load.move("shadow", settled(lambda: registry.start_canary("energy", other, 100, shadow=True), before, other),
                  3)
        load.move("promoted", settled(lambda: (registry.start_canary("energy", other, 50),
                                               registry.promote("energy", other)), other, None), 3)
        load.move("rolled back", settled(lambda: registry.rollback("energy"), before, None), 3)
    seen = load.rows
    assert Counter(s for _, s, _ in seen) == {200: len(seen)}, Counter(s for _, s, _ in seen)
    answered = {name: Counter(v for p, _, v in seen if p == name) for name in
                ("canary", "aborted", "shadow", "promoted", "rolled back")}
    assert set(answered["canary"]) == {before, other}, answered  # about half each
    assert set(answered["aborted"]) == set(answered["shadow"]) == {before}, answered  # a shadow never answers
    assert set(answered["promoted"]) == {other} and set(answered["rolled back"]) == {before}, answered


def test_the_learning_loop_runs_from_sampled_reports_to_a_promoted_retrain(platform: Platform, settings: Settings,
                                                                          workspace: Workspace) -> None:
    """`bench.learning_loop` at smoke size: reports phrased as training never saw, sampled and
    masked, their feedback, drift in the monitor, a retrain on a Ray cluster with the feedback, a
    shadow, a canary and a promotion under load with no request failing. The smoke model learns
    too little for its gate to mean much, so the gate is opened wide here (any candidate passes):
    what is checked is that every step happens as it should; the bench judges a real candidate."""
    store = Store(settings.ledger_location())
    tenants = Tenants(store.create_tenant(Tenant("loop-hotline", ["events"], 100_000, 1_000_000, 8, sample_rate=1.0),
                                          1),
                      store.create_tenant(Tenant("loop-press", ["events"], 100_000, 1_000_000, 8), 1))
    before = workspace.registry.get("events").version
    options = RetrainOptions(min_holdout=5, min_gain=-1.0, max_test_loss=1.0, weight=50, shadow=True)
    loop = Loop(options, {"num_workers": 1, "cpus_per_worker": 0.5}, phase_s=3)
    try:
        checks = {c.name: c for c in run_loop(
            workspace, platform.gateway_url, tenants, loop,
            lambda production, canary: reload_domain(workspace, "events", production, 120, canary))}
        assert loop.retrained is not None
        assert {name: c.problems for name, c in checks.items() if not c.passed and name != "drift"} == {}
        assert checks["drift"].figures["items"] >= len(shifted_reports()) and checks["drift"].figures["psi"]
        # The candidate trained on the masked reports of the training part, never on the hold-out's.
        done = loop.retrained
        data = done.data
        assert data["added"] + data["holdout"] == data["feedback"] - data["unsampled"] - data["duplicates"]
        trained = set(pd.read_parquet(Path(data["data_dir"]) / "events" / "train.parquet")["text"])
        assert any("<PHONE>" in text for text in trained) and not any("415-555" in text for text in trained)
        record = workspace.registry.get("events", done.candidate).record
        assert record["retrain"]["gate"]["passed"] and record["config"]["data_dir"] == data["data_dir"]
    finally:
        if workspace.registry.canary("events"):
            workspace.registry.abort_canary("events")
        if workspace.registry.get("events").version != before:
            workspace.registry.rollback("events")
        assert reload_domain(workspace, "events", before, 120)


def _serving(platform: Platform, domain: str) -> str:
    models = http("GET", f"{platform.gateway_url}/v1/models")[2]
    return str(next(m["version"] for m in models["domains"] if m["domain"] == domain))


def _wait_serving(platform: Platform, domain: str, version: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while _serving(platform, domain) != version:
        assert time.monotonic() < deadline, f"{domain} still serves {_serving(platform, domain)}, not {version}"
        time.sleep(0.5)


def test_a_stage_moved_from_anywhere_reaches_the_replicas(platform: Platform, workspace: Workspace) -> None:
    """On Kubernetes nothing re-applies the serve config after a promotion: replicas poll the stage."""
    registry = workspace.registry
    before = registry.get("energy").version
    other = next(v.version for v in reversed(registry.versions("energy")) if v.version != before)
    registry.promote("energy", other)  # the registry alone, as `cityserve cluster upgrade --model` does
    _wait_serving(platform, "energy", other)
    registry.rollback("energy")
    _wait_serving(platform, "energy", before)


def test_the_tenants_file_is_applied_at_start_and_on_change(platform: Platform, workspace: Workspace) -> None:
    url = f"{platform.gateway_url}/v1/energy/forecast"
    example = request_example(get_domain("energy").request_model)
    assert http("POST", url, example, GRID_KEY)[0] == 200
    path = workspace.settings.state_dir / "tenants.yaml"
    rotated = new_key()[0]
    write_tenants(path, {**GRID, "keys": [KeyEntry.of(rotated).model_dump(exclude_none=True)], "grants": ["events"]})
    deadline = time.monotonic() + 15
    while http("POST", url, example, GRID_KEY)[0] != 401:  # the old key goes
        assert time.monotonic() < deadline, "the changed tenants file was not applied"
        time.sleep(0.5)
    assert http("POST", url, example, rotated)[0] == 403  # energy no longer granted
    assert http("POST", f"{platform.gateway_url}/v1/events/classify", {"text": "pothole"}, rotated)[0] == 200
    write_tenants(path)  # dropped from the file: revoked
    deadline = time.monotonic() + 15
    while http("POST", f"{platform.gateway_url}/v1/events/classify", {"text": "pothole"}, rotated)[0] != 401:
        assert time.monotonic() < deadline, "a tenant dropped from the file kept its access"
        time.sleep(0.5)


def test_metering_counts_equal_requests_sent_postgresql(platform: Platform, workspace: Workspace,
                                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Moves the ledger to a real PostgreSQL server (pgserver runs the postgres binaries), then back."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="stop")
    settings = workspace.settings
    port = int(platform.gateway_url.rsplit(":", 1)[1])
    config = json.loads((settings.state_dir / CONFIG_FILE).read_text())  # what the module's app runs
    try:
        moved = Workspace(settings.model_copy(update={"ledger_url": server.get_uri()}), workspace.registry)
        platform_up(moved.settings, serve_config(moved, "local", SERVED, port, TEST_OVERLAY), num_cpus=2,
                    timeout_s=600)
        _metering_round(platform.gateway_url, Store(moved.settings.ledger_location()))
    finally:
        platform_up(settings, config, num_cpus=2, timeout_s=600)  # the tests after this one meter in SQLite
        server.cleanup()
