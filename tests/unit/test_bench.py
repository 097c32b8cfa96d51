"""Benchmark results files: one row per domain, replaced when that domain is measured again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bench


def test_a_new_row_replaces_only_its_domains_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.save_row("x.json", {"domain": "traffic", "ratio": 1.0})
    bench.save_row("x.json", {"domain": "energy", "ratio": 0.5})
    path = bench.save_row("x.json", {"domain": "traffic", "ratio": 2.0})
    rows = json.loads(path.read_text())["rows"]
    assert [(r["domain"], r["ratio"]) for r in rows] == [("energy", 0.5), ("traffic", 2.0)]
    assert all(isinstance(r["load_average"], float) for r in rows)
    assert all(r["commit"] == bench.git_commit() for r in rows)


def test_train_throughput_refuses_sides_that_computed_different_losses() -> None:
    from bench.train_throughput import UnequalWork, require_equal_work

    require_equal_work("energy", [0.0363467136, 0.0198125564], [0.0363467136, 0.0198125564])
    with pytest.raises(UnequalWork, match="differ"):
        require_equal_work("energy", [0.0363, 0.0198], [0.0363, 0.0201])
    with pytest.raises(UnequalWork):
        require_equal_work("energy", [0.0363, 0.0198], [0.0363])  # a side that stopped early


def test_soak_trend_tells_a_rising_p99_from_noise() -> None:
    from bench.reliability.serving import p99_trend

    slope, low, high = p99_trend([100 + 10 * i for i in range(10)], 60)  # +10 ms every minute
    assert slope == pytest.approx(10) and low > 0
    slope, low, high = p99_trend([100, 140, 95, 130, 105, 120, 98, 135, 102, 110], 60)
    assert low <= 0 <= high
    slope, low, high = p99_trend([100 + 10 * i for i in range(3)], 20)  # minutes, whatever the window
    assert slope == pytest.approx(30)


def test_reliability_checks_replace_their_entries_and_fit_the_shared_schema(tmp_path: Path) -> None:
    from bench.reliability import Check, save_checks
    from tests.schemas import validate

    path = tmp_path / "reliability.json"
    save_checks([Check("soak", False, {"errors": 3}, "make reliability", ["3 requests failed"]),
                 Check("exposure", True, {"exposed": []}, "make reliability")], path)
    save_checks([Check("soak", True, {"errors": 0}, "make reliability")], path)
    doc = json.loads(path.read_text())
    validate("reliability", doc)
    assert [(c["name"], c["passed"]) for c in doc["checks"]] == [("exposure", True), ("soak", True)]
    assert doc["checks"][1]["figures"]["errors"] == 0 and "load_average" in doc["checks"][1]["figures"]


def test_a_kept_entry_keeps_the_commit_it_was_measured_at(tmp_path: Path) -> None:
    from bench.reliability import Check, save_checks

    path = tmp_path / "reliability.json"
    save_checks([Check("soak", True, {}, "make reliability")], path)  # a file from before commits were recorded
    save_checks([Check("fuzz", True, {}, "make reliability")], path, stamp={"commit": "a" * 40})
    save_checks([Check("exposure", True, {}, "make reliability")], path, stamp={"commit": "b" * 40})
    doc = json.loads(path.read_text())
    assert doc["commit"] == "b" * 40
    assert {c["name"]: c.get("commit") for c in doc["checks"]} == {"exposure": None, "fuzz": "a" * 40,
                                                                     "soak": "unknown"}


def test_the_paired_bootstrap_tells_a_real_gain_from_none() -> None:
    from bench.paired import paired_bootstrap

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    a = np.where(rng.random(300) < 0.7, y, (y + 1) % 3)  # right 70% of the time
    same = paired_bootstrap(y, a, a.copy(), range(3), resamples=200)
    assert same["difference"] == same["low"] == same["high"] == 0.0  # paired: no noise between equals
    better = np.where(rng.random(300) < 0.5, y, a)  # a's mistakes half fixed
    gain = paired_bootstrap(y, a, better, range(3), resamples=200)
    assert 0.0 < gain["low"] < gain["difference"] < gain["high"]
    assert gain["b"] - gain["a"] == pytest.approx(gain["difference"])
    # a coin-flip change of a few answers is not told apart from zero
    noisy = a.copy()
    flip = rng.choice(300, 6, replace=False)
    noisy[flip] = y[flip]
    noisy[rng.choice(300, 6, replace=False)] = (y[flip] + 2) % 3
    assert paired_bootstrap(y, a, noisy, range(3), resamples=200)["low"] < 0.0
