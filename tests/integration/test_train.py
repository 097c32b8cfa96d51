"""Ray Train end to end on a real local cluster: smoke runs with 2 DDP workers, registration and
evaluation reports that match the shared schema. (A killed worker's recovery is the reliability
check `train_worker_kill`, run by tests/integration/test_training_faults.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from domains import DOMAINS, get_domain
from tests.schemas import validate_report
from training.evaluate import evaluate
from training.loop import TRAIN_STATE
from training.trainer import train
from training.workspace import Workspace

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_smoke_run_with_two_workers_registers_and_evaluates(workspace: Workspace, domain: str,
                                                            tmp_path: Path) -> None:
    dom = get_domain(domain)
    version = train(dom, workspace, profile="smoke", num_workers=2)  # CPUs per worker: the default
    assert version.stage == "candidate"
    assert version.record["config"]["num_workers"] == 2
    assert version.record["config"]["threads"] == 1  # two workers on the session's one 2-CPU node
    assert dom.metric in version.metrics and version.metrics["epoch"] >= 1
    assert len(version.record["data"]["manifest_sha256"]) == 64
    # The registry gets the model without its resume state; the run's checkpoint keeps it.
    assert TRAIN_STATE not in version.record["files"]
    assert (Path(version.record["lineage"]["checkpoint"]) / TRAIN_STATE).is_file()

    report, evaluation = evaluate(dom, workspace, version.version, tmp_path)
    validate_report(report)
    assert report["version"] == version.version and report["profile"] == "quick"
    assert evaluation.figure is not None and evaluation.figure.stat().st_size > 1000
