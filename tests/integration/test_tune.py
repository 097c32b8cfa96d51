"""Ray Tune sweeps on the real cluster: each trial is the same Ray Train run as `cityserve train`."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityserve.config import Settings
from training.tune import FIGURE_FILE, TRIALS_FILE, SweepOptions, sweep

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_smoke_sweep_asha_registers_the_best_trial(settings: Settings) -> None:
    # 2 concurrent trials on 2 CPUs: each trial's driver takes 0.05 CPU, its Train worker 0.9.
    options = SweepOptions(num_samples=4, scheduler="asha", search="optuna", max_concurrent=2,
                           cpus_per_trial=0.9, profile="smoke")
    sweep_id, trials, version = sweep("energy", settings, options, overrides={"epochs": 3, "patience": 3})

    assert len(trials) == 4 and trials["error"].isna().all()
    assert trials["epochs"].between(1, 3).all()
    assert version is not None and version.stage == "candidate"
    assert version.record["lineage"]["sweep"] == sweep_id
    best = trials["val_mape"].min()
    assert version.metrics["val_mape"] == pytest.approx(best)
    out = Path(settings.storage_uri()) / sweep_id
    assert (out / TRIALS_FILE).is_file() and (out / FIGURE_FILE).stat().st_size > 1000
