"""The training loop's resume: from which epoch a run continues, and a run restored after it ended."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from domains import get_domain
from domains.base import WEIGHTS_FILE, Batch
from training.loop import build_config, run_loop


class Recorder:
    """A plain-process LoopContext that keeps every report and a copy of every checkpoint, and
    resumes from `resume_from` (as Ray Train hands a restarted worker its latest checkpoint)."""

    world_rank = 0
    device = torch.device("cpu")

    def __init__(self, keep: Path, resume_from: Path | None = None) -> None:
        self.keep, self.resume_from = keep, resume_from
        self.reports: list[dict[str, float]] = []
        self.checkpoints: list[Path] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def prepare_loader(self, loader: DataLoader[Batch], *, distributed: bool) -> DataLoader[Batch]:
        return loader

    def latest_checkpoint(self) -> Path | None:
        return self.resume_from

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir is not None:
            self.checkpoints.append(Path(shutil.copytree(checkpoint_dir, self.keep / f"ckpt{len(self.reports)}")))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, object], Recorder]:
    """A two-epoch energy run from scratch, and what it reported."""
    data_dir = tmp_path_factory.mktemp("energy-data")
    domain = get_domain("energy")
    domain.prepare(data_dir, smoke=True)
    config = build_config(domain, "smoke", data_dir, threads=1, overrides={"epochs": 2, "patience": 5})
    ctx = Recorder(tmp_path_factory.mktemp("fresh"))
    run_loop(get_domain("energy"), config, ctx)
    return config, ctx


def test_a_fresh_run_says_it_started_afresh(fresh: tuple[dict[str, object], Recorder]) -> None:
    _, ctx = fresh
    assert [(r["epoch"], r["resumed"], r["resumed_after_epoch"]) for r in ctx.reports] == [(1, 0.0, 0.0),
                                                                                           (2, 0.0, 0.0)]


def test_a_resumed_run_says_after_which_epoch(fresh: tuple[dict[str, object], Recorder], tmp_path: Path) -> None:
    config, done = fresh
    ctx = Recorder(tmp_path, resume_from=done.checkpoints[0])
    run_loop(get_domain("energy"), config, ctx)
    assert [(r["epoch"], r["resumed"], r["resumed_after_epoch"]) for r in ctx.reports] == [(2, 1.0, 1.0)]


def test_a_run_restored_after_it_ended_trains_nothing_and_reports_its_last_result(
        fresh: tuple[dict[str, object], Recorder], tmp_path: Path) -> None:
    # Tune reruns a trial whose driver died before it heard the trial end; a rerun that reports
    # nothing fails the whole restored sweep.
    config, done = fresh
    ctx = Recorder(tmp_path, resume_from=done.checkpoints[-1])
    run_loop(get_domain("energy"), config, ctx)
    [again] = ctx.reports
    assert again == {**done.reports[-1], "resumed": 1.0, "resumed_after_epoch": 2.0}
    [checkpoint] = ctx.checkpoints
    assert (checkpoint / WEIGHTS_FILE).read_bytes() == (done.checkpoints[-1] / WEIGHTS_FILE).read_bytes()
