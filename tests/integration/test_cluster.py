"""CityServe on several nodes: the short version of every multi-node check (`bench.cluster`).

The checks need a cluster of a head and two worker nodes, and this session already runs a
single-node cluster in this process (`ray_cluster`); one process drives one cluster. So they run
as a user runs them, `python -m bench.cluster --short`, in a process of their own that starts its
own S3 server and its own three nodes (every port free-picked, its workers pinned to its own
address), and this test reads the checks it wrote. That process starts as soon as the session has
collected these tests (`ClusterChecks.start`, from conftest), at a lower CPU priority: it runs
beside the unit tests, which keep one of the two cores busy, and is mostly done when read here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.cluster import CHECKS
from tests.schemas import validate

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 1800  # from its start; alone it takes ~5 minutes here


@dataclass
class ClusterChecks:
    """The `bench.cluster --short` run of a session: its process and folder (its data, its output)."""

    proc: subprocess.Popen[bytes]
    folder: Path
    started: float

    @classmethod
    def start(cls) -> ClusterChecks:
        folder = Path(tempfile.mkdtemp(prefix="cityserve-cluster-test-"))
        # Nothing of this session's cluster, bucket or settings: it makes its own, and its own smoke data.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "CITYSERVE_"))}
        env["CITYSERVE_DATA_DIR"] = str(folder / "data")
        with open(folder / "output.log", "wb") as log:
            proc = subprocess.Popen(["nice", "-n", "10", sys.executable, "-m", "bench.cluster", "--short",
                                     "--json-out", str(folder / "cluster.json")], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, folder, time.monotonic())

    def result(self) -> dict[str, Any]:
        """The checks it wrote, once it has ended (stopped when it runs past LIMIT_S)."""
        try:
            self.proc.wait(max(0.0, self.started + LIMIT_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
        out = self.folder / "cluster.json"
        output = (self.folder / "output.log").read_text(errors="replace")
        assert out.is_file(), f"exit {self.proc.returncode}: {output[-3000:]}"
        return json.loads(out.read_text())

    def stop(self) -> None:
        """Ends the run as Ctrl-C would (it stops its nodes and S3 server), killed if it will not; its
        folder goes unless the run failed (then Ray's logs are in it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.returncode == 0:
            shutil.rmtree(self.folder, ignore_errors=True)


CLUSTER_CHECKS = pytest.StashKey[ClusterChecks]()


@pytest.fixture(scope="module")
def checks(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    document = request.config.stash[CLUSTER_CHECKS].result()  # started by conftest once collected
    validate("cluster", document)
    return {c["name"]: c for c in document["checks"]}


def test_every_check_ran_and_passed(checks: dict[str, dict[str, Any]]) -> None:
    assert sorted(checks) == sorted(CHECKS)
    assert {name: c["problems"] for name, c in checks.items() if not c["passed"]} == {}


def test_everything_stored_is_in_the_bucket(checks: dict[str, dict[str, Any]]) -> None:
    figures = checks["object_store"]["figures"]
    assert figures["checkpoint"].startswith(figures["storage_path"]) and figures["storage_path"].startswith("s3://")
    assert figures["trained_on"] != figures["loaded_on"] and {figures["trained_on"], figures["loaded_on"]} <= {
        "worker-1", "worker-2"}
    assert all(count > 0 for count in figures["objects"].values())
    assert figures["report_version"] == figures["registered"] == figures["loaded_version"]


def test_ddp_workers_ran_on_two_worker_nodes_and_track_one_worker(checks: dict[str, dict[str, Any]]) -> None:
    figures = checks["ddp_across_nodes"]["figures"]
    assert sorted(w["node"] for w in figures["ddp_workers"]) == ["worker-1", "worker-2"]
    assert all(d <= figures["tolerance_rel"] for d in figures["max_rel_diff"].values())
    assert len(figures["curves"]["ddp"]["val_loss"]) == len(figures["curves"]["one_worker"]["val_loss"]) == \
        figures["epochs"]


def test_a_sweep_spreads_over_both_worker_nodes(checks: dict[str, dict[str, Any]]) -> None:
    figures = checks["tune_across_nodes"]["figures"]
    assert figures["nodes_used"] == ["worker-1", "worker-2"] and figures["overlapping_on_two_nodes"]
    assert figures["registered_checkpoint"].startswith(figures["results"])


def test_serving_survives_a_worker_node_lost_under_load(checks: dict[str, dict[str, Any]]) -> None:
    figures = checks["serving_node_loss"]["figures"]
    assert figures["replicas_before"]["energy"] == ["worker-1", "worker-2"]
    assert figures["replicas_before"]["Gateway"] == figures["admission_actor"] == ["head"]
    assert figures["failed_pct"] <= 1 and figures["hung"] == 0
    assert figures["slowest_s"] <= figures["timeout_s"] + 1
    assert figures["replica_back_s_after_node_joined"] is not None


def test_training_resumes_on_the_nodes_left_after_a_node_is_lost(checks: dict[str, dict[str, Any]]) -> None:
    figures = checks["training_node_loss"]["figures"]
    killed = figures["killed"]["node"]
    assert figures["resumed"] and figures["resumed_after_epoch"] >= figures["checkpoint_epoch_at_kill"]
    assert figures["final_epoch"] == figures["epochs"]
    assert killed in {w["node"] for w in figures["attempts"][0]}
    assert killed not in {w["node"] for w in figures["attempts"][-1]}
