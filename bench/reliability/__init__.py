"""Reliability checks: hostile input, faults, load and durability against a running platform.

Each check is a function `check_<name>(target, short=False) -> Check`. `make reliability` runs the
full versions (`python -m bench.reliability`) and writes `bench/results/reliability.json`
(the `reliability` result schema); `tests/integration/test_reliability.py` runs the short
version of each inside `make test`, so none of them rots. The same code decides `passed` in both.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import RESULTS
from bench.load import tree_rss_gb
from core.io import write_json_atomic
from core.settings import Settings

RESULT_FILE = RESULTS / "reliability.json"


@dataclass
class Check:
    """One check's outcome, as reliability.json records it."""

    name: str
    passed: bool
    figures: dict[str, Any]
    command: str
    # Why it failed, in words (empty when it passed); kept in the file beside the figures.
    problems: list[str] = field(default_factory=list)


@dataclass
class Target:
    """The running platform a check drives: its gateway, Ray dashboard and settings (registry,
    ledger). Checks make their own tenants (`tenant`) so they never share quotas."""

    gateway_url: str
    dashboard_url: str
    gcs_address: str
    settings: Settings
    # The process whose descendants are the platform's Ray processes (`ray start`'s, or the test
    # session's own: `ray.init` starts the cluster as its children).
    root_pid: int

    def processes(self) -> list[Any]:
        import psutil

        return list(psutil.Process(self.root_pid).children(recursive=True))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) the platform's processes have used, summed by name: a Ray
        actor's (`ray::ServeReplica:cityserve:events`) or the executable's (`raylet`, `haproxy`)."""
        import psutil

        used: dict[str, float] = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):  # a worker that exited meanwhile
                name = proc.name()
                name = name if name.startswith("ray::") else Path(proc.cmdline()[0]).name
                times = proc.cpu_times()
                used[name] = used.get(name, 0.0) + times.user + times.system
        return used

    def rss_gb(self) -> float:
        """Resident memory of the platform's processes."""
        return tree_rss_gb(self.root_pid, with_root=False)

    def store(self) -> Any:
        from services.tenants import Store

        return Store(self.settings.ledger_location())

    def tenant(self, prefix: str, grants: list[str], *, requests_per_minute: int = 100_000,
               items_per_minute: int = 1_000_000, max_concurrent: int = 1000,
               sample_rate: float = 0.0) -> tuple[str, str]:
        """A new tenant (`prefix-<random>`, sampling `sample_rate` of its requests into the sample
        log) and its key, returned once every gateway replica accepts
        the key: a check's load must not count as the fault's the 401s of a replica that refused a
        probe a moment before and repeats its refusal for `UNAUTHORIZED_CACHE_S`."""
        from services.config import VERBS
        from services.gateway import UNAUTHORIZED_CACHE_S
        from services.tenants import Tenant

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        store = self.store()
        try:
            key = store.create_tenant(Tenant(name, grants, requests_per_minute, items_per_minute, max_concurrent,
                                             sample_rate=sample_rate), key_ttl_days=1)
        finally:
            store.close()
        # An empty body: authenticated (422 once the key is known, 401 before), no quota taken.
        probe = urllib.request.Request(f"{self.gateway_url}/v1/{grants[0]}/{VERBS[grants[0]]}", data=b"{}",
                                       headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        deadline = time.monotonic() + 60
        refused = False
        while True:
            try:
                urllib.request.urlopen(probe, timeout=10).close()
                break
            except urllib.error.HTTPError as exc:
                refused |= exc.code == 401
                if exc.code != 401 or time.monotonic() > deadline:
                    break
            except (TimeoutError, urllib.error.URLError):  # a platform just started, on a busy machine
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        if refused:  # the replica that refused a probe may still hold that refusal
            time.sleep(UNAUTHORIZED_CACHE_S + 0.1)
        return name, str(key)


def command(name: str, runner: str = "bench.reliability") -> str:
    """How to run one check of the suite `runner` again (the result file's `command`)."""
    return f".venv/bin/python -m {runner} --only {name}"


def save_checks(checks: list[Check], path: Path = RESULT_FILE, *, stamp: dict[str, str] | None = None) -> Path:
    """Replaces the entries of these checks' names in the result file (others kept: checks may be
    run one at a time), stamping the load average each was measured under.

    `stamp`: values for the file's top level (cluster.json's `commit`). An entry kept from the file
    as it was carries that file's value of a stamped key as its own where the new one differs: it
    was measured there, not at this run's commit."""
    load = round(os.getloadavg()[0], 2)
    before = json.loads(path.read_text()) if path.is_file() else {}
    stamp = stamp or {}
    fresh = {c.name: {**asdict(c), "figures": {**c.figures, "load_average": load}} for c in checks}
    # an entry from a file that never recorded the key was measured somewhere unknown, not here
    earlier = {k: before.get(k, "unknown") for k in stamp if before.get(k, "unknown") != stamp[k]}
    kept = [{**earlier, **r} for r in before.get("checks", []) if r["name"] not in fresh]
    write_json_atomic(path, {**stamp, "checks": sorted(kept + list(fresh.values()), key=lambda r: str(r["name"]))})
    return path


def timed_check(name: str, run: Callable[[], Check], *, runner: str = "bench.reliability",
                save: Callable[[list[Check]], object] | None = None) -> Check:
    """Runs one check of the suite `runner`, timed, with the load average it ran under, and saves it
    at once with `save` (None for short versions: they are not the file's figures), so a later
    check failing to run loses nothing. A check that raises is a failed check, its error the problem.
    Prints one JSON line as it ends."""
    started = time.monotonic()
    try:
        check = run()
    except Exception as exc:
        check = Check(name, False, {}, command(name, runner), [f"did not run to the end: {type(exc).__name__}: {exc}"])
    check.figures["seconds"] = round(time.monotonic() - started, 1)
    check.figures["load_average"] = round(os.getloadavg()[0], 2)
    if save is not None:
        save([check])
    print(json.dumps({"name": check.name, "passed": check.passed, "problems": check.problems}), flush=True)
    return check
