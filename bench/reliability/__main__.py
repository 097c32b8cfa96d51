"""`make reliability`: every reliability check, full size, on a platform this script starts.

    .venv/bin/python -m bench.reliability [--only NAME ...] [--short] [--port 8330]

Training and registry checks run first, on a Ray cluster of their own; then a platform (all four
domains, two gateway replicas, two energy replicas, state and ledger in a temporary folder)
serves the HTTP checks; the shutdown check starts a platform of its own last. Results go to
`bench/results/reliability.json`, replacing only the checks run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench import git_commit
from bench.reliability import RESULT_FILE, Check, Target, save_checks, timed_check
from cluster.local import LOOPBACK_ENV
from core.settings import Settings, get_settings
from domains import DOMAINS, get_domain
from services.config import ServeOverlay
from training.workspace import Workspace

# Two gateway replicas (quotas across replicas, a gateway killed) and two energy replicas (a model
# replica killed): fixed, so autoscaling does not blur what a kill does.
OVERLAY = ServeOverlay(deployments={
    name: {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}} for name in ("Gateway", "energy")})


def save(checks: list[Check]) -> Any:
    """Replaces these checks' entries in reliability.json, stamped with the commit that measured them."""
    return save_checks(checks, stamp={"commit": git_commit()})


def training_checks() -> dict[str, Callable[[Settings, bool], Check]]:
    """The checks that need settings but no platform: training and the registry, and the chart's policy."""
    from bench.reliability import chart_policy as c
    from bench.reliability import training_faults as t

    return {"registry_corruption": t.check_registry_corruption, "train_worker_kill": t.check_train_worker_kill,
            "tune_driver_kill": t.check_tune_driver_kill, c.NAME: c.check_chart_policy}


# In the order they run: the kills last, so a replica restarting does not disturb another check.
PLATFORM_CHECKS = ("exposure", "fuzz", "auth_matrix", "nasty_inputs", "refusals_metered", "unauthenticated_flood",
                   "quota_exactness", "soak", "lease_return", "kill_domain_replica", "kill_gateway_replica")


def platform_checks() -> dict[str, Callable[[Target, bool], Check]]:
    from bench.reliability import auth as a
    from bench.reliability import hostile as h
    from bench.reliability import serving as s
    from bench.reliability import trust as t

    checks = {"refusals_metered": t.check_refusals_metered, "unauthenticated_flood": t.check_unauthenticated_flood,
              "exposure": s.check_exposure, "fuzz": h.check_fuzz, "auth_matrix": a.check_auth_matrix,
              "nasty_inputs": h.check_nasty_inputs, "kill_domain_replica": s.check_kill_domain_replica,
              "kill_gateway_replica": s.check_kill_gateway_replica, "lease_return": s.check_lease_return,
              "quota_exactness": s.check_quota_exactness, "soak": s.check_soak}
    return {name: checks[name] for name in PLATFORM_CHECKS}


def ensure_production(settings: Settings, domains: list[str]) -> None:
    """A production version of each domain (a smoke-size training where there is none)."""
    from training.trainer import train

    workspace = Workspace.from_settings(settings)
    for domain in domains:
        if not workspace.registry.stages(domain).get("production"):
            version = train(get_domain(domain), workspace, profile="smoke", num_workers=1, cpus_per_worker=1)
            workspace.registry.promote(domain, version.version)


def run_platform_checks(names: list[str], short: bool, port: int) -> list[Check]:
    from services.platform import platform_down, platform_up, serve_config

    state = Path(tempfile.mkdtemp(prefix="cityserve-reliability-"))
    settings = get_settings().model_copy(update={"state_dir": state, "ledger_url": f"sqlite:///{state}/ledger.db"})
    checks = platform_checks()
    results = []
    try:  # a platform that failed to start is stopped too
        config = serve_config(Workspace.from_settings(settings), "local", sorted(DOMAINS), port, OVERLAY)
        platform = platform_up(settings, config, num_cpus=2)
        target = Target(platform.gateway_url, platform.dashboard_url, platform.gcs_address, settings, platform.pid)
        for name in names:
            results.append(timed_check(name, partial(checks[name], target, short), save=None if short else save))
    finally:
        platform_down(settings)
    return results


def main() -> None:
    # The platform runs with token auth; this process talks to it (Ray's state API) and starts
    # Ray itself for the training checks, so it must be in the same mode before importing ray.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # and it reaches the platform at 127.0.0.1, which Ray would swap for the machine's address
    os.environ.update(LOOPBACK_ENV)
    from bench.reliability.durability import NAME as SHUTDOWN
    from bench.reliability.durability import OUTAGE, check_ledger_outage, check_shutdown_durability

    own_platform_checks = {SHUTDOWN: check_shutdown_durability, OUTAGE: check_ledger_outage}
    every = [*training_checks(), *PLATFORM_CHECKS, *own_platform_checks]
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="+", choices=every, default=every, metavar="NAME",
                        help=f"checks to run, of {', '.join(every)}")
    parser.add_argument("--short", action="store_true",
                        help="the short versions `make test` runs (printed, not saved)")
    parser.add_argument("--port", type=int, default=8330)
    parser.add_argument("--table", action="store_true", help="print reliability.json as a table; run nothing")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULT_FILE.read_text())["checks"]))
        return
    settings = get_settings()
    wanted = [n for n in PLATFORM_CHECKS if n in args.only]
    if wanted or set(own_platform_checks) & set(args.only):
        ensure_production(settings, sorted(DOMAINS))
    results: list[Any] = []
    for name, check in training_checks().items():
        if name in args.only:
            results.append(timed_check(name, partial(check, settings, args.short),
                                       save=None if args.short else save))
    _shutdown_ray()
    if wanted:
        results += run_platform_checks(wanted, args.short, args.port)
    for name, check in own_platform_checks.items():
        if name in args.only:
            results.append(timed_check(name, partial(check, settings, args.short),
                                       save=None if args.short else save))
    print(f"{sum(c.passed for c in results)}/{len(results)} passed" + ("" if args.short else f"; {RESULT_FILE}"))


def table(checks: list[dict[str, Any]]) -> str:
    """Markdown: one row per check, its scalar figures (lists stay in the file)."""
    rows = ["| check | passed | figures |", "|---|---|---|"]
    for c in checks:
        figures = ", ".join(f"{k} {v}" for k, v in c["figures"].items() if not isinstance(v, list | dict))
        rows.append(f"| `{c['name']}` | {'yes' if c['passed'] else '**no**'} | {figures} |")
    return "\n".join(rows)


def _shutdown_ray() -> None:
    """The training checks' cluster goes before the platform's starts: two would share 2 cores."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    main()
