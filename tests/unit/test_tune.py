"""Sweep flags and search spaces are refused before anything starts, naming what is wrong; a
sweep's results land in its folder in Ray storage, on a disk or in S3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from core.errors import ConfigError
from core.storage import Location
from domains import DOMAINS, get_domain
from domains.base import SearchParam
from training.loop import build_config
from training.tune import (
    FIGURE_FILE,
    TRIALS_FILE,
    SweepOptions,
    _grid_values,
    load_space,
    trial_table,
    validate_space,
    write_results,
)

BASE = {"lr": 1e-3, "dropout": 0.1, "hidden": 64, "epochs": 3}


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (SweepOptions(num_samples=0), "num_samples"),
        (SweepOptions(scheduler="hyperband"), "scheduler"),
        (SweepOptions(search="bayes"), "search"),
        (SweepOptions(max_concurrent=0), "max_concurrent"),
        (SweepOptions(cpus_per_trial=0), "cpus_per_trial"),
        (SweepOptions(gpus_per_trial=-0.25), "gpus_per_trial"),
        (SweepOptions(time_budget_s=-1), "time_budget_s"),
        (SweepOptions(grid_points=1), "grid_points"),
    ],
)
def test_bad_flags_are_refused(options: SweepOptions, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        options.validate()
    assert info.value.field == field


def test_default_flags_pass() -> None:
    SweepOptions().validate()
    SweepOptions(gpus_per_trial=0.25, max_concurrent=4).validate()


@pytest.mark.parametrize(
    ("space", "words"),
    [
        ({}, "empty"),
        ({"learning_rate": SearchParam("loguniform", 1e-5, 1e-3)}, "not a hyperparameter"),
        ({"lr": SearchParam("loguniform", 0.0, 1e-3)}, "low > 0"),
        ({"dropout": SearchParam("uniform", 0.5, 0.1)}, "low < high"),
        ({"hidden": SearchParam("randint", 32, None)}, "low < high"),
        ({"hidden": SearchParam("choice")}, "at least one value"),
    ],
)
def test_bad_spaces_are_refused(space: dict[str, SearchParam], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        validate_space(space, BASE)


def test_grid_values_cover_the_range() -> None:
    assert _grid_values(SearchParam("loguniform", 1e-4, 1e-2), 3) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert _grid_values(SearchParam("uniform", 0.0, 0.4), 3) == pytest.approx([0.0, 0.2, 0.4])
    assert _grid_values(SearchParam("randint", 1, 3), 3) == [1, 2, 3]
    assert _grid_values(SearchParam("choice", values=(32, 64)), 3) == [32, 64]


def test_space_file(tmp_path: Path) -> None:
    good = tmp_path / "space.json"
    good.write_text(json.dumps({"lr": {"kind": "loguniform", "low": 1e-4, "high": 1e-2}}))
    assert load_space(good) == {"lr": SearchParam("loguniform", 1e-4, 1e-2)}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"lr": {"kind": "loguniform", "lowest": 1}}))
    with pytest.raises(ConfigError, match="not a search space"):
        load_space(bad)


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_every_domain_declares_a_valid_space(name: str, tmp_path: Path) -> None:
    domain = get_domain(name)
    base = build_config(domain, "quick", tmp_path, threads=1)
    space = domain.search_space()
    validate_space(space, base)
    assert len(space) >= 4


# ---- the sweep's results, written where Ray keeps the sweep -------------------------------------
def _grid() -> list[Any]:
    """Two finished trials as Tune hands them back (real `Result`s, no cluster)."""
    from ray.tune import Result

    results = []
    for i, (lr, mapes) in enumerate([(1e-3, [0.30, 0.21]), (1e-2, [0.28, 0.25])]):
        history = pd.DataFrame({"epoch": [1, 2], "val_mape": mapes, "resumed": [0.0, 0.0]})
        results.append(Result(metrics={"config": {"lr": lr, "dropout": 0.1 * i, "epochs": 2}}, checkpoint=None,
                              error=None, path=f"bucket/sweeps/sweep-1/run_trial_{i:05d}", metrics_dataframe=history))
    return results


@pytest.mark.parametrize("where", ["local", "s3"])
def test_trials_table_and_figure_land_in_the_sweeps_folder(where: str, request: pytest.FixtureRequest,
                                                          tmp_path: Path) -> None:
    # They were written through Path(storage_uri) / sweep_id, which turns s3://bucket/x into a local
    # folder "s3:/bucket/x" (and fails, that folder not existing).
    storage = request.getfixturevalue("s3_dir") if where == "s3" else str(tmp_path / "ray_results")
    energy = get_domain("energy")
    grid = _grid()
    trials = trial_table(grid, energy, ["lr", "dropout"])
    out = write_results(grid, trials, energy, ["lr", "dropout"], Location.of(storage).join("sweep-1"))

    assert str(out) == (f"{storage}/sweep-1" if where == "s3" else str(tmp_path / "ray_results" / "sweep-1"))
    with out.join(TRIALS_FILE).reading() as path:
        written = pd.read_parquet(path)
    assert list(written["trial_id"]) == ["run_trial_00000", "run_trial_00001"]
    assert written["val_mape"].tolist() == pytest.approx([0.21, 0.25])
    figure = out.join(FIGURE_FILE).read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n" and len(figure) > 10_000
    assert sorted(i.base_name for i in out.children()) == sorted([TRIALS_FILE, FIGURE_FILE])
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()
