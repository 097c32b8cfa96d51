"""Ray Tune sweeps on the real cluster: each trial is the same Ray Train run as `cityserve train`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.settings import Settings
from domains import get_domain
from tests.schemas import validate_report
from training.evaluate import evaluate
from training.tune import FIGURE_FILE, TRIALS_FILE, SweepOptions, sweep
from training.workspace import Workspace

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_asha_sweep_registers_the_best_trial_as_a_candidate(workspace: Workspace, tmp_path: Path) -> None:
    # 2 concurrent trials on 2 CPUs: each trial's driver takes 0.05 CPU, its Train worker 0.9.
    # ASHA stops trials after their first epoch; each stop must free its worker's CPUs again.
    options = SweepOptions(num_samples=4, scheduler="asha", search="optuna", max_concurrent=2,
                           cpus_per_trial=0.9, profile="smoke")
    energy = get_domain("energy")
    sweep_id, trials, version = sweep(energy, workspace, options, overrides={"epochs": 3, "patience": 3})

    assert len(trials) == 4 and trials["error"].isna().all()
    assert trials["epochs"].between(1, 3).all()
    assert version is not None and version.stage == "candidate"
    assert version.record["lineage"]["sweep"] == sweep_id
    assert version.metrics["val_mape"] == pytest.approx(trials["val_mape"].min())
    assert 1 <= version.metrics["epoch"] <= 3 and not any(k.startswith(("config/", "time_")) for k in version.metrics)
    out = Path(workspace.settings.storage_uri()) / sweep_id
    assert (out / TRIALS_FILE).is_file() and (out / FIGURE_FILE).stat().st_size > 1000

    # The swept version is scored like any other and reported under `sweep` beside the model.
    report, _ = evaluate(energy, workspace, version.version, tmp_path, sweep_ref=version.version)
    validate_report(report)
    assert report["sweep"]["sweep_id"] == sweep_id and report["sweep"]["metrics"] == report["metrics"]


def test_interrupted_sweep_resumes_its_trials_from_their_checkpoints(settings: Settings, tmp_path: Path) -> None:
    import ray

    epochs = 30  # smoke epochs take 1-2 s: the trials are mid-run when Ctrl-C lands
    storage = tmp_path / "sweeps"
    # The CLI joins this session's cluster (as it would join a KubeRay head) and is stopped with
    # Ctrl-C once both trials have a checkpoint.
    env = {**os.environ, "CITYSERVE_DATA_DIR": str(settings.data_dir), "CITYSERVE_REGISTRY_URI": settings.registry_uri,
           "CITYSERVE_STORAGE_PATH": str(storage), "CITYSERVE_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cli = Path(sys.executable).parent / "cityserve"
    proc = subprocess.Popen([str(cli), "tune", "energy", "--smoke-test", "--num-samples", "2", "--scheduler", "fifo",
                             "--search", "random", "--max-concurrent", "2", "--cpus-per-trial", "0.9",
                             "--epochs", str(epochs)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while len({p.parent for p in storage.glob("sweep-energy-*-*/checkpoint_*")}) < 2:
            assert time.monotonic() < deadline, "the two trials wrote no checkpoints within 300 s"
            assert proc.poll() is None, f"the sweep ended early (exit {proc.returncode})"
            time.sleep(0.5)
        time.sleep(5)  # two Train controller polls: the checkpoints are reported, not only written
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 130  # Interrupted: nothing registered, told how to resume
    finally:
        if proc.poll() is None:
            proc.kill()
    [sweep_dir] = [p for p in storage.glob("sweep-energy-*") if (p / "tuner.pkl").is_file()]

    resumed = settings.model_copy(update={"storage_path": str(storage)})
    sweep_id, trials, version = sweep(get_domain("energy"), Workspace.from_settings(resumed),
                                      SweepOptions(profile="smoke"), resume=sweep_dir.name)

    assert sweep_id == sweep_dir.name and len(trials) == 2
    assert trials["error"].isna().all()
    # Each trial's epochs after the restore came from its checkpoint: had it restarted from
    # scratch, none of its reports would say `resumed`. (Early stopping may end it before 30.)
    assert trials["resumed"].all()
    assert version is not None and version.record["lineage"]["sweep"] == sweep_id
