"""Multi-node checks: CityServe on a Ray cluster of a head and two worker nodes, with everything it
stores on an S3-compatible server.

Each check is a function `check_<name>(env, short=False) -> Check` (`Check` as the reliability suite
has it). `make cluster` runs the full versions (`python -m bench.cluster`) on one cluster started
for them all and writes `bench/results/cluster.json` (the `cluster` result schema);
`tests/integration/test_cluster.py` runs the short versions (`--short`) in a subprocess inside
`make test`. The same code decides `passed` in both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import RESULTS, git_commit
from bench.cluster.nodes import RayNodes
from bench.reliability import Check, command, save_checks
from core.settings import Settings

RESULT_FILE = RESULTS / "cluster.json"
RUNNER = "bench.cluster"
# In the order they run: a check that kills a node adds a fresh one afterwards, so each starts on a
# head and two worker nodes; the kills still go last, so a replacement node is the exception.
CHECKS = ("object_store", "ddp_across_nodes", "tune_across_nodes", "serving_node_loss", "training_node_loss")


@dataclass
class ClusterEnv:
    """What every check runs against: the nodes, and settings whose registry, Ray storage and
    reports are in the bucket (`bucket`: this run's prefix of it) and whose Ray address is the
    cluster's head."""

    nodes: RayNodes
    settings: Settings
    bucket: str


def verdict(name: str, figures: dict[str, Any], problems: list[str], short: bool,
            timing: Sequence[str] = ()) -> Check:
    """The check's outcome. Recovery-time criteria (`timing`) are judged at full size only: a short
    run's windows on a shared 2-core CI machine measure its neighbours (as the reliability suite
    does); a short run records them under `unjudged` and still fails on every other problem."""
    if short:
        figures["unjudged"] = list(timing)
        return Check(name, not problems, figures, command(name, RUNNER), problems)
    return Check(name, not problems and not timing, figures, command(name, RUNNER), [*problems, *timing])


def device() -> str:
    """The machine, in words: the three nodes are raylets on it, sharing its cores."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPU cores, {memory_gib:.0f} GiB, no GPU; the Ray head and 2 worker nodes are "
            "separate raylets on this one machine, the S3 server (moto) a process beside them")


def document(checks: Sequence[Check]) -> dict[str, Any]:
    """A cluster.json document of these checks alone (what `--json-out` writes)."""
    from dataclasses import asdict

    return {"commit": git_commit(), "device": device(), "checks": [asdict(c) for c in checks]}


def save(checks: list[Check], path: Path = RESULT_FILE) -> Path:
    """Replaces these checks' entries in cluster.json, stamped with this commit and machine."""
    return save_checks(checks, path, stamp={"commit": git_commit(), "device": device()})
