"""Temperature scaling, expected calibration error and the `uncertain` threshold
(`domains.calibration`), on answers whose true calibration is known by construction; and the
forecasters' split-conformal P10-P90 widths (`domains.forecast`), on smoke-trained models."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from cityserve import cli
from core.settings import get_settings
from domains import metrics
from domains.calibration import CALIBRATION_FILE, Calibration, ece, fit_temperature, flagged, scaled, uncertain_below
from domains.drift import REFERENCE_FILE
from domains.forecast import MISS, interval_offsets, widened
from tests.unit.conftest import SmokeRun
from training.registry import Registry

SmokeBuilder = Callable[[str], SmokeRun]


def overconfident(n: int = 4000, k: int = 5, temperature: float = 2.0, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) and a model that answers softmax(z · temperature): right as
    often as softmax(z) says, but `temperature` times too sure of itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, k))
    truth = scaled(np.exp(z), 1.0)
    y = np.array([rng.choice(k, p=p) for p in truth])
    return scaled(truth, 1 / temperature), y


def test_the_fitted_temperature_undoes_the_overconfidence() -> None:
    probs, y = overconfident(temperature=2.0)
    assert fit_temperature(probs, y) == pytest.approx(2.0, rel=0.1)
    calibration = Calibration.fit(probs, y)
    assert calibration.ece_before is not None and calibration.ece_after is not None
    assert calibration.ece_after < calibration.ece_before / 3


def test_scaling_keeps_every_answer_and_undoes_itself() -> None:
    probs, _ = overconfident(n=200)
    once = scaled(probs, 1.7)
    assert (once.argmax(1) == probs.argmax(1)).all() and np.allclose(once.sum(1), 1.0)
    assert np.allclose(scaled(once, 1 / 1.7), probs, atol=1e-6)
    assert Calibration().apply(probs) is probs  # an uncalibrated version's answers are left alone


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_otherwise() -> None:
    y = np.array([0, 0, 0, 1])  # three of four answers right at confidence 0.75
    probs = np.tile([0.75, 0.25], (4, 1))
    assert ece(probs, y) == pytest.approx(0.0)
    assert ece(np.tile([0.95, 0.05], (4, 1)), y) == pytest.approx(0.20)


def test_the_threshold_leaves_answers_right_nine_times_in_ten() -> None:
    confidence = np.linspace(0.31, 0.95, 20)
    correct = np.ones(20, bool)
    correct[[0, 1, 2, 3, 4, 5, 6, 12]] = False  # wrong: the seven least sure and one in the middle
    threshold = uncertain_below(confidence, correct)
    kept = confidence >= threshold
    assert correct[kept].mean() >= 0.9 and not correct[confidence >= threshold - 0.01].mean() >= 0.9
    assert threshold == 0.52  # the 13 answers from 0.546 up are right 12 times
    assert uncertain_below(confidence, np.ones(20, bool)) == 0.0  # nothing to flag
    assert uncertain_below(confidence, np.zeros(20, bool)) == 0.95  # nothing trustworthy: the highest cut-off
    confidence = np.array([0.35, 0.4, 0.45, 0.5, 0.8, 0.85, 0.9, 0.95])
    correct = np.array([False, False, False, True, True, True, True, True])
    probs = np.stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2], axis=1)  # class 0 most probable
    picked = flagged(probs, np.where(correct, 0, 1), 0.5)
    assert picked == {"share": 0.375, "accuracy_flagged": 0.0, "accuracy_rest": 1.0}
    # nothing flagged: no accuracy to give, and the report (JSON) must still be writable
    unflagged = flagged(probs, np.where(correct, 0, 1), 0.0)
    assert unflagged == {"share": 0.0, "accuracy_flagged": None, "accuracy_rest": 0.625}
    json.dumps(unflagged, allow_nan=False)


def test_conformal_widths_make_each_side_miss_one_in_ten() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(0.0, 1.0, size=5000)
    narrow = np.stack([np.full_like(y, -0.5), np.zeros_like(y), np.full_like(y, 0.5)], axis=-1)  # covers ~38%
    lower, upper = interval_offsets(narrow, y)
    fixed = widened(narrow, lower, upper)
    assert (y < fixed[:, 0]).mean() <= MISS and (y > fixed[:, 2]).mean() <= MISS
    assert metrics.coverage(y, fixed[:, 0], fixed[:, 2]) == pytest.approx(0.8, abs=0.01)
    wide = np.stack([np.full_like(y, -3.0), np.zeros_like(y), np.full_like(y, 3.0)], axis=-1)
    assert all(w < 0 for w in interval_offsets(wide, y))  # an interval too wide narrows
    crossing = widened(wide, -5.0, -5.0)  # never past the median
    assert (crossing[:, 0] <= crossing[:, 1]).all() and (crossing[:, 1] <= crossing[:, 2]).all()
    assert interval_offsets(narrow, np.full_like(y, np.nan)) == (0.0, 0.0)  # no values: no change


@pytest.mark.parametrize("name", ["traffic", "energy"])
def test_a_forecasters_intervals_cover_eight_in_ten_on_the_split_they_were_fitted_on(
        name: str, smoke: SmokeBuilder, tmp_path: Path) -> None:
    run = smoke(name)
    assert run.history  # trained
    model_dir = tmp_path / "model"
    shutil.copytree(run.model_dir, model_dir)
    fitted = run.domain.calibrate(model_dir, run.data_dir)
    assert fitted is not None and json.loads((model_dir / CALIBRATION_FILE).read_text()) == fitted
    predictor = run.domain.load_predictor(model_dir, "v1")
    assert predictor.intervals == fitted["intervals"]  # type: ignore[attr-defined]
    for actual, before, after in valid_forecasts(run, predictor):
        assert metrics.coverage(actual, after[..., 0], after[..., 2]) >= 0.79
        assert not np.allclose(before, after)  # the widths moved the intervals


def valid_forecasts(run: SmokeRun, predictor: Any) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(actual values, uncalibrated quantiles, calibrated quantiles) of each group of the validation split."""
    if run.domain.name == "energy":
        from domains.energy.features import split_frames, windows_for_split

        windows = windows_for_split(split_frames(run.data_dir), "valid", predictor.meta)
        return [(windows.target, predictor.quantiles(windows, calibrated=False), predictor.quantiles(windows))]
    from domains.tables import load_table
    from domains.traffic.contract import NETWORKS
    from domains.traffic.features import make_windows

    out = []
    for network, spec in NETWORKS.items():
        win = make_windows(load_table(run.data_dir, "traffic", f"{network}_valid"),
                           predictor.meta["networks"][network]["sensors"], spec)
        out.append((win.actual, predictor.forecast(network, win.counts, win.hist_times, calibrated=False),
                    predictor.forecast(network, win.counts, win.hist_times)))
    return out


def test_models_calibrate_fits_a_version_registered_without_calibration(
        smoke: SmokeBuilder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = smoke("energy")
    assert run.history  # trained
    registry = Registry(str(tmp_path / "registry"))
    plain = registry.register("energy", run.model_dir, {"config": {"data_dir": str(run.data_dir)}})
    assert "calibration" not in plain.record and CALIBRATION_FILE not in plain.record["files"]
    monkeypatch.setenv("CITYSERVE_REGISTRY_URI", str(tmp_path / "registry"))
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(cli.main, ["models", "calibrate", "energy", plain.version, "--json"])
    finally:
        get_settings.cache_clear()
    assert out.exit_code == 0, out.output
    rows = {row["what"]: row["value"] for row in json.loads(out.output)}
    calibrated = registry.get("energy", plain.version)
    series = calibrated.record["calibration"]["intervals"]
    quality = calibrated.record["reference"]["quality"]
    assert set(rows) == {f"calibration intervals {name}" for name in series} | {"calibration unit"} | {
        f"reference quality {metric}" for metric in quality}
    assert {CALIBRATION_FILE, REFERENCE_FILE} <= set(calibrated.record["files"]) and "mape" in quality
    assert registry.load_predictor(run.domain, plain.version).intervals == series  # type: ignore[attr-defined]
