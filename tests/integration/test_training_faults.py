"""The short version of each training and registry fault check (`bench/reliability/training_faults.py`)
on the session's cluster; `make reliability` runs the full versions. Each asserts the check passed and
that it measured what it claims (a check whose figures are empty could pass without looking)."""

from __future__ import annotations

import pytest

from bench.reliability.training_faults import (
    check_registry_corruption,
    check_train_worker_kill,
    check_tune_driver_kill,
)
from core.settings import Settings

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_a_damaged_candidate_is_refused_and_production_kept(settings: Settings) -> None:
    check = check_registry_corruption(settings, short=True)
    assert check.passed, (check.problems, check.figures)
    figures = check.figures
    assert figures["refused"] == len(figures["cases"]) >= 8 and figures["through_cli"] >= 2
    assert all(case["production_loads"] for case in figures["cases"].values())
    assert figures["generation"] == 1 and figures["intact_candidate"]["generation_after"] == 2


def test_a_killed_worker_resumes_and_ends_like_undisturbed_runs(settings: Settings) -> None:
    check = check_train_worker_kill(settings, short=True)
    assert check.passed, (check.problems, check.figures)
    figures = check.figures
    assert figures["resumed"] and figures["resumed_after_epoch"] >= figures["checkpoint_epoch_at_kill"] >= 2
    assert len(figures["undisturbed_metrics"]) == 3 and figures["std"] > 0 and abs(figures["z"]) <= 2
    assert figures["killed_epochs"] == figures["epochs"]


def test_a_sweep_whose_driver_was_killed_resumes_without_rerunning_finished_trials(settings: Settings) -> None:
    check = check_tune_driver_kill(settings, short=True)
    assert check.passed, (check.problems, check.figures)
    figures = check.figures
    assert figures["driver_exit"] == -9 and figures["finished_before_kill"]
    assert set(figures["epochs_retrained"].values()) == {0}
    assert len(figures["trials"]) == len(figures["trial_epochs"]) and figures["registered"]
