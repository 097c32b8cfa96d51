"""Sweep flags and search spaces are refused before anything starts, naming what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import ConfigError
from domains import DOMAINS, get_domain
from domains.base import SearchParam
from training.loop import build_config
from training.tune import SweepOptions, _grid_values, load_space, validate_space

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
