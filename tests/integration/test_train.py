"""Ray Train end to end on a real local cluster: smoke runs with 2 DDP workers, registration,
evaluation reports that match the shared schema, and recovery of a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cityserve.config import Settings
from domains import DOMAINS, get_domain
from tests.schemas import validate_report
from training.evaluate import evaluate
from training.trainer import make_trainer, train

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_smoke_run_with_two_workers_registers_and_evaluates(settings: Settings, domain: str,
                                                            tmp_path: Path) -> None:
    version = train(domain, settings, profile="smoke", num_workers=2, cpus_per_worker=1)
    dom = get_domain(domain)
    assert version.stage == "candidate"
    assert version.record["config"]["num_workers"] == 2
    assert dom.metric in version.metrics and version.metrics["epoch"] >= 1
    assert len(version.record["data"]["manifest_sha256"]) == 64

    report, evaluation = evaluate(domain, settings, version.version, tmp_path)
    validate_report(report)
    assert report["version"] == version.version and report["profile"] == "quick"
    assert evaluation.figure is not None and evaluation.figure.stat().st_size > 1000


def _train_workers() -> list[Any]:
    import ray
    from ray.util.state import list_actors

    # Name our cluster: other Ray clusters on the machine would make auto-detection refuse.
    return list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def test_killed_worker_resumes_from_last_checkpoint(settings: Settings) -> None:
    epochs = 20  # smoke epochs last ~1-2 s: enough of them that the kill lands mid-run
    trainer, _ = make_trainer("sentiment", settings, profile="smoke", num_workers=2, cpus_per_worker=1,
                              epochs=epochs, overrides={"patience": epochs})
    run_dir = Path(settings.storage_uri()) / trainer.run_config.name
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(result=trainer.fit()), daemon=True)
    thread.start()

    # A checkpoint folder appears before its report is registered: Ray Train V2's controller
    # collects reports when it polls the workers (every 2 s). Give it two polls after the first
    # folder, then kill a worker process (SIGKILL: no chance to clean up).
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("checkpoint_*")) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert list(run_dir.glob("checkpoint_*")), "no checkpoint was written within 240 s"
    time.sleep(5)
    workers = _train_workers()
    assert workers, "no live Ray Train worker to kill"
    os.kill(workers[0]["pid"], signal.SIGKILL)

    thread.join(timeout=480)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    result = outcome["result"]
    assert result.error is None
    assert result.metrics["epoch"] == epochs
    assert result.metrics["resumed"] == 1.0  # the final epochs ran after restoring a checkpoint
