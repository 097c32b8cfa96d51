"""`learning_loop`: the continuous-learning loop end to end on a live platform, as a city runs it,
written to `bench/results/learning_loop.json` (the `learning_loop` result schema).

A new complaint type reaches the 311 hotline: dockless rental scooters left across sidewalks,
ramps and bus stops, phrased in words the events model never trained on (its generator has no
scooters). The hotline's tenant samples every request (`sample_rate` 1.0); a quarter of the reports
carry a phone number and an e-mail address. Then, on one running platform:

1. `payload_sampling`, `redaction`: every sampled report is in the sample log, masked; no report
   of a tenant that does not sample is.
2. `feedback`: the hotline sends the true class of every report (`illegal_parking`).
3. `drift`: `cityserve monitor`'s figures for production: the drift of what it sees against its
   reference, and its live accuracy against its validation accuracy.
4. `retrain_gate`: `cityserve retrain events` — the feedback joins the training data, a hold-out
   is kept apart, the candidate is judged against production on the hold-out and the test split.
5. `shadow`: where the gate passed, the candidate answers a shadow copy of all traffic under
   steady load: its answers are recorded, never returned.
6. `canary`: then it answers a share of requests, then it is promoted — under the same load, no
   request failing.

    .venv/bin/python -m bench.learning_loop     # quick-profile events model; ~15 min on 2 cores

`tests/integration/test_serve.py` runs `run_loop` with smoke-trained models behind its own platform.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import RESULTS, git_commit
from bench.reliability import Check, save_checks
from domains import get_domain
from domains.drift import SHIFT
from services import samples
from services.monitor import health
from services.retrain import Retrained, RetrainOptions, retrain
from training.workspace import Workspace

NAME = "learning_loop"
RESULT_FILE = RESULTS / f"{NAME}.json"
COMMAND = ".venv/bin/python -m bench.learning_loop"
DOMAIN, TRUTH = "events", "illegal_parking"
URL = f"/v1/{DOMAIN}/classify"
# The new phrasing: 5 x 5 x 5 reports, none of whose words about scooters the generator knows.
SUBJECTS = ("rental scooters", "a pile of e-scooters", "dockless bikes", "shared mopeds", "three lime scooters")
ACTIONS = ("dumped across", "left blocking", "tipped over on", "abandoned in", "chained to the railing of")
PLACES = ("the sidewalk", "the crosswalk ramp", "the bus stop", "the subway stairs", "the wheelchair ramp")
PHONE, EMAIL = re.compile(r"415-555-\d{4}"), re.compile(r"resident\d+@example\.org")


def shifted_reports() -> list[str]:
    """The scooter reports; every fourth with the caller's phone number and e-mail address."""
    texts = [f"{s} {a} {p}" for s, a, p in itertools.product(SUBJECTS, ACTIONS, PLACES)]
    return [f"{t}, call me on 415-555-{n:04d} or resident{n}@example.org" if n % 4 == 0 else t
            for n, t in enumerate(texts)]


@dataclass(frozen=True)
class Tenants:
    """The hotline's key (samples every request) and another tenant's (samples none)."""

    sampled: str
    unsampled: str


@dataclass
class Loop:
    """How large a run is, and what it leaves behind for the caller to look at."""

    options: RetrainOptions
    train: dict[str, Any]  # `make_trainer` options for the retrain (workers, CPUs)
    phase_s: float = 10.0  # each phase of steady load
    clients: int = 2  # closed-loop clients of that load
    retrained: Retrained | None = field(default=None, init=False)


def post(url: str, body: Any, key: str) -> tuple[int, dict[str, str], Any]:
    """(status, headers with lower-case names, JSON body); a connection that fails is status 0."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, TimeoutError) as exc:
        return 0, {}, str(exc)


def run_loop(ws: Workspace, gateway: str, tenants: Tenants, loop: Loop,
             reload: Callable[[str, str | None], object]) -> list[Check]:
    """The whole loop (module docstring) against the platform at `gateway`, whose events
    production is what the loop starts from; `reload(production, canary)` returns once the
    platform serves that. Returns the checks in the order they ran."""
    texts = shifted_reports()
    sent = [(text, *post(gateway + URL, {"text": text}, tenants.sampled)) for text in texts]
    others = [post(gateway + URL, {"text": text}, tenants.unsampled)[1].get("x-request-id", "") for text in texts[:10]]
    answered = [(text, headers["x-request-id"], body) for text, status, headers, body in sent if status == 200]
    feedback = [post(gateway + f"/v1/{DOMAIN}/feedback",
                     {"request_id": rid, "item": 0, "truth": {"label": TRUTH}}, tenants.sampled)
                for _, rid, _ in answered]
    rows = _wait_for_samples(ws, {rid for _, rid, _ in answered})
    checks = [_sampling(len(sent), answered, rows, others), _redaction(answered, rows),
              _feedback(feedback, len(answered)), _drift(ws, answered)]
    production = ws.registry.get(DOMAIN).version
    started = time.monotonic()
    loop.retrained = done = retrain(get_domain(DOMAIN), ws, loop.options, **loop.train)
    checks.append(_gate(done, time.monotonic() - started))
    if not done.canary:
        why = "the gate kept the candidate from traffic: " + "; ".join(done.gate.reasons)
        return [*checks, Check("shadow", False, {}, COMMAND, [why]), Check("canary", False, {}, COMMAND, [why])]
    candidate = done.candidate
    with steady_load(gateway + URL, tenants.sampled, [{"text": text} for text in texts], loop.clients) as seen:
        # retrain started the shadow (`loop.options.shadow`)
        seen.move("shadow", lambda: reload(production, candidate), loop.phase_s)
        shadowed_at = time.time()
        seen.move("canary", lambda: (ws.registry.start_canary(DOMAIN, candidate, loop.options.weight),
                                     reload(production, candidate)), loop.phase_s)
        seen.move("promoted", lambda: (ws.registry.promote(DOMAIN, candidate), reload(candidate, None)),
                  loop.phase_s)
    shadow_rows = [r for r in _read(ws, "samples") if r["model_version"] == candidate and r["shadow"]
                   and r["at"].timestamp() <= shadowed_at + 5]
    return [*checks, _shadow(seen.of("shadow"), production, candidate, len(shadow_rows)),
            _canary(seen.of("canary"), seen.of("promoted"), production, candidate, loop.options.weight)]


def _read(ws: Workspace, kind: samples.Kind) -> list[dict[str, Any]]:
    return samples.read(ws.settings.registry_location(), kind, DOMAIN).to_pylist()


def _wait_for_samples(ws: Workspace, ids: set[str], timeout_s: float = 60) -> list[dict[str, Any]]:
    """The sample log's rows once it holds each of `ids` (the gateways write every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _read(ws, "samples")
        if ids <= {r["request_id"] for r in rows} or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _sampling(sent: int, answered: list[tuple[str, str, Any]], rows: list[dict[str, Any]],
              others: list[str]) -> Check:
    kept = Counter(r["request_id"] for r in rows)
    mine = [kept[rid] for _, rid, _ in answered]
    figures = {"requests": sent, "answered": len(answered), "sampled_rows": sum(mine),
               "requests_sampled_once": sum(n == 1 for n in mine), "unsampled_tenant_requests": len(others),
               "unsampled_tenant_rows": sum(kept[rid] for rid in others)}
    problems = [f"{name}: {figures[name]}" for name, ok in (
        ("answered", len(answered) == sent), ("requests_sampled_once", figures["requests_sampled_once"] == sent),
        ("unsampled_tenant_rows", figures["unsampled_tenant_rows"] == 0)) if not ok]
    return Check("payload_sampling", not problems, figures, COMMAND, problems)


def _redaction(answered: list[tuple[str, str, Any]], rows: list[dict[str, Any]]) -> Check:
    stored = {r["request_id"]: json.loads(r["request"])["text"] for r in rows}
    personal = [(text, stored.get(rid, "")) for text, rid, _ in answered if PHONE.search(text)]
    leaked = [kept for _, kept in personal if PHONE.search(kept) or EMAIL.search(kept)]
    masked = [kept for _, kept in personal if "<PHONE>" in kept and "<EMAIL>" in kept]
    figures = {"reports_with_phone_and_email": len(personal), "stored_masked": len(masked), "leaked": len(leaked),
               "example": masked[0] if masked else ""}
    problems = [] if personal and len(masked) == len(personal) and not leaked else [
        f"{len(leaked)} stored with a phone number or e-mail address; {len(masked)} of {len(personal)} masked"]
    return Check("redaction", not problems, figures, COMMAND, problems)


def _feedback(answers: list[tuple[int, dict[str, str], Any]], expected: int) -> Check:
    statuses = Counter(status for status, _, _ in answers)
    stored = sum(body.get("stored", 0) for status, _, body in answers if status == 200)
    figures = {"sent": len(answers), "statuses": {str(k): v for k, v in sorted(statuses.items())}, "stored": stored}
    problems = [] if stored == expected == len(answers) else [f"{stored} stored of {expected} sent"]
    return Check("feedback", not problems, figures, COMMAND, problems)


def _drift(ws: Workspace, answered: list[tuple[str, str, Any]]) -> Check:
    """Production's figures as `cityserve monitor` shows them, over the sampled scooter reports."""
    version = ws.registry.get(DOMAIN).version
    report = next((h for h in health(ws.registry, ws.settings.registry_location(), DOMAIN) if h.version == version),
                  None)
    if report is None:
        return Check("drift", False, {}, COMMAND, [f"monitor shows nothing for {DOMAIN} {version}"])
    top = report.max_psi
    live, reference = report.quality.get("accuracy"), report.reference.get("accuracy")
    figures = {"version": version, "items": report.items, "feedback": report.feedback,
               "max_psi": round(top[1], 3) if top else None, "max_psi_feature": top[0] if top else None,
               "psi": {k: round(v, 3) for k, v in sorted(report.drift.items())}, "live_accuracy": live,
               "reference_accuracy": reference, "answered_as": dict(Counter(b["label"] for _, _, b in answered)),
               "shift_threshold": SHIFT}
    problems = []
    if not top or top[1] < SHIFT:
        problems.append(f"largest PSI {figures['max_psi']} below {SHIFT}")
    if live is None or reference is None or live >= reference:
        problems.append(f"live accuracy {live} not below the reference's {reference}")
    return Check("drift", not problems, figures, COMMAND, problems)


def _gate(done: Retrained, seconds: float) -> Check:
    gate = done.gate
    figures = {"production": done.production, "candidate": done.candidate, "metric": gate.metric,
               "holdout_items": gate.holdout_items, "test_items": gate.test_items,
               "production_holdout": gate.production["holdout"].get(gate.metric),
               "candidate_holdout": gate.candidate["holdout"].get(gate.metric),
               "production_test": gate.production["test"].get(gate.metric),
               "candidate_test": gate.candidate["test"].get(gate.metric),
               "min_gain": gate.min_gain, "max_test_loss": gate.max_test_loss,
               "feedback_rows_trained_on": done.data["added"], "retrain_seconds": round(seconds, 1)}
    return Check("retrain_gate", gate.passed, figures, COMMAND, list(gate.reasons))


def _shadow(seen: list[tuple[int, str]], production: str, candidate: str, shadow_rows: int) -> Check:
    statuses, versions = Counter(s for s, _ in seen), Counter(v for _, v in seen)
    figures = {"requests": len(seen), "failed": len(seen) - statuses[200], "answered_by": dict(versions),
               "candidate_shadow_rows": shadow_rows}
    problems = []
    if not seen or statuses[200] != len(seen):
        problems.append(f"statuses {dict(statuses)}")
    if set(versions) != {production}:
        problems.append(f"answered by {dict(versions)}: a shadow never answers")
    if not shadow_rows:
        problems.append("no shadow answer recorded")
    return Check("shadow", not problems, figures, COMMAND, problems)


def _canary(canary: list[tuple[int, str]], promoted: list[tuple[int, str]], production: str, candidate: str,
            weight: float) -> Check:
    both = canary + promoted
    failed = sum(s != 200 for s, _ in both)
    shares = Counter(v for _, v in canary)
    after = Counter(v for _, v in promoted)
    figures = {"requests": len(both), "failed": failed, "weight_percent": weight,
               "canary_answered_by": dict(shares), "candidate_share": round(shares[candidate] / max(1, len(canary)), 3),
               "promoted_answered_by": dict(after)}
    problems = []
    if not canary or not promoted or failed:
        problems.append(f"{failed} failed of {len(both)}")
    if set(shares) != {production, candidate}:
        problems.append(f"canary phase answered by {dict(shares)}")
    if set(after) != {candidate}:
        problems.append(f"after promotion answered by {dict(after)}")
    return Check("canary", not problems, figures, COMMAND, problems)


class Seen:
    """(phase, status, version that answered) of each request of a steady load."""

    def __init__(self) -> None:
        self.phase = ""
        self.rows: list[tuple[str, int, str]] = []

    def of(self, phase: str) -> list[tuple[int, str]]:
        return [(s, v) for p, s, v in self.rows if p == phase]

    def move(self, name: str, change: Callable[[], object], hold_s: float) -> None:
        """Starts phase `name`: until `change` returns (it changes the stages and returns once the
        platform shows them), answers belong to no phase; then `hold_s` seconds of it."""
        self.phase = ""
        change()
        self.phase = name
        time.sleep(hold_s)


@contextlib.contextmanager
def steady_load(url: str, key: str, bodies: list[Any], clients: int) -> Iterator[Seen]:
    """`clients` closed-loop clients posting `bodies` in turn (each from its own place in the list)
    until the block ends."""
    seen, stop = Seen(), threading.Event()

    def client(offset: int) -> None:
        for body in itertools.cycle(bodies[offset:] + bodies[:offset]):
            if stop.is_set():
                return
            phase = seen.phase
            status, headers, _ = post(url, body, key)
            # A request that straddles a change of phase counts for its status alone.
            seen.rows.append((phase if phase == seen.phase else "", status, headers.get("x-model-version", "")))

    threads = [threading.Thread(target=client, args=(n * 7 % len(bodies),)) for n in range(clients)]
    for t in threads:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join()


# One gateway and one events replica with fractions of a CPU, so a Train worker finds a whole one
# beside them; samples written and monitored every few seconds, so a run need not wait minutes.
OVERLAY_ARGS = {"samples": {"flush_s": 1.0, "monitor_s": 5.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", choices=["quick", "full"], default="quick",
                        help="The events model's training profile, production's and the retrain's.")
    parser.add_argument("--port", type=int, default=8340)
    args = parser.parse_args()
    # The platform runs with token auth, and this process talks to it (and trains on it): the same
    # mode before importing ray, and the loopback address it is reached at.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from cluster.local import LOOPBACK_ENV

    os.environ.update(LOOPBACK_ENV)
    import ray

    from bench.reliability import Target
    from core.settings import get_settings
    from services.config import ServeOverlay
    from services.platform import platform_down, platform_up, reload_domain, serve_config
    from training.trainer import train

    commit = git_commit()  # of the code that runs, read before a long run in which a commit may land
    root = Path(tempfile.mkdtemp(prefix="cityserve-loop-"))
    (root / "state").mkdir()
    settings = get_settings().model_copy(update={
        "registry_uri": str(root / "registry"), "storage_path": str(root / "ray_results"),
        "reports_dir": root / "reports", "state_dir": root / "state",
        "ledger_url": f"sqlite:///{root / 'state' / 'ledger.db'}"})
    ws = Workspace.from_settings(settings)
    domain = get_domain(DOMAIN)
    ws.registry.promote(DOMAIN, train(domain, ws, profile=args.profile, num_workers=1).version)
    ray.shutdown()  # the platform starts a cluster of its own, which the retrain joins
    overlay = ServeOverlay(args=OVERLAY_ARGS, deployments={
        name: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.25}}
        for name in ("Gateway", DOMAIN)})
    try:
        platform = platform_up(settings, serve_config(ws, "local", [DOMAIN], args.port, overlay), num_cpus=2)
        live = Workspace.from_settings(settings.model_copy(update={"ray_address": platform.gcs_address}))
        target = Target(platform.gateway_url, platform.dashboard_url, platform.gcs_address, settings, platform.pid)
        tenants = Tenants(target.tenant("hotline", [DOMAIN], sample_rate=1.0)[1], target.tenant("press", [DOMAIN])[1])
        loop = Loop(RetrainOptions(min_holdout=10, weight=25, shadow=True), {"num_workers": 1, "cpus_per_worker": 1.0})
        checks = run_loop(live, platform.gateway_url, tenants, loop,
                          lambda production, canary: reload_domain(live, DOMAIN, production, 300, canary))
    finally:
        platform_down(settings)
    for check in checks:
        print(json.dumps({"name": check.name, "passed": check.passed, "problems": check.problems}), flush=True)
    path = save_checks(checks, RESULT_FILE, stamp={"commit": commit, "device": f"{os.cpu_count()} CPU cores, "
                                                   f"no GPU; events {args.profile} profile"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
