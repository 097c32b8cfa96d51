"""Hyperparameter sweeps with Ray Tune over the one Ray Train run.

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer(...))` raises; the supported pattern (Ray's
"Train V2 + Tune" guide) makes each Tune trial a small function (`run_trial`) that launches the
same `TorchTrainer(train_loop_per_worker)` as `cityserve train`, with `TuneReportCallback` passing
each epoch's validation metric to the scheduler. The Train run of a trial is named after the
sweep and the trial id, which Tune keeps across `Tuner.restore`, so a restored sweep resumes a
trial from its last checkpoint instead of retraining it.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cluster.local import connect
from core.errors import ConfigError, Interrupted
from core.settings import Settings
from core.storage import Location
from domains import get_domain
from domains.base import Domain, SearchParam
from training.loop import build_config
from training.registry import Version
from training.runs import ensure_data, register_checkpoint, smoke_data_dir, torch_trainer
from training.workspace import Workspace

SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("optuna", "random", "grid")
# Each trial's Tune driver only launches the Train run: with the default 1 CPU, two concurrent
# trials on a 2-CPU cluster would leave nothing for the Train workers and the sweep would hang.
DRIVER_CPU = 0.05
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what TuneReportCallback adds to each report
TRIALS_FILE = "trials.parquet"
FIGURE_FILE = "sweep.png"
SWEEP_KEYS = ("sweep_id", "storage_path")  # bookkeeping in a trial's config, not hyperparameters
TUNE_KEYS = {"time_this_iter_s", "time_total_s", "time_since_restore", "timestamp", "training_iteration",
             "iterations_since_restore", "pid", "done", CHECKPOINT_PATH_KEY}


@dataclass(frozen=True)
class SweepOptions:
    """Everything a sweep is told on the command line; `validate` refuses bad values up front."""

    num_samples: int = 8
    scheduler: str = "asha"
    search: str = "optuna"
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    time_budget_s: float | None = None
    grid_points: int = 3
    profile: str = "quick"

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be at least 1, got {self.num_samples}", field="num_samples")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"--scheduler {self.scheduler!r}: choose one of {list(SCHEDULERS)}", field="scheduler")
        if self.search not in SEARCHERS:
            raise ConfigError(f"--search {self.search!r}: choose one of {list(SEARCHERS)}", field="search")
        if self.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be at least 1, got {self.max_concurrent}",
                              field="max_concurrent")
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"--cpus-per-trial must be positive, got {self.cpus_per_trial}", field="cpus_per_trial")
        if not 0 <= self.gpus_per_trial <= 8:
            raise ConfigError(f"--gpus-per-trial must be in [0, 8], got {self.gpus_per_trial}", field="gpus_per_trial")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"--time-budget-s must be positive, got {self.time_budget_s}", field="time_budget_s")
        if self.grid_points < 2:
            raise ConfigError(f"--grid-points must be at least 2, got {self.grid_points}", field="grid_points")


def validate_space(space: dict[str, SearchParam], base: dict[str, Any]) -> None:
    """Refuses a search space naming an unknown hyperparameter or with impossible bounds."""
    if not space:
        raise ConfigError("the search space is empty", field="space")
    for name, param in space.items():
        where = f"search space {name!r}"
        if name not in base:
            raise ConfigError(f"{where}: not a hyperparameter of this domain; known: {sorted(base)}", field=name)
        if param.kind == "choice":
            if not param.values:
                raise ConfigError(f"{where}: a choice needs at least one value", field=name)
            continue
        if param.low is None or param.high is None or not param.low < param.high:
            raise ConfigError(f"{where}: needs low < high, got low={param.low} high={param.high}", field=name)
        if param.kind == "loguniform" and param.low <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {param.low}", field=name)


def load_space(path: Path) -> dict[str, SearchParam]:
    """A user's search space from JSON: {"lr": {"kind": "loguniform", "low": 1e-5, "high": 1e-3}, ...}."""
    try:
        raw = json.loads(Path(path).read_text())
        return {name: SearchParam(**spec) for name, spec in raw.items()}
    except (OSError, json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a search space ({exc})", field="space") from exc


def _grid_values(param: SearchParam, points: int) -> list[Any]:
    if param.kind == "choice":
        return list(param.values)
    assert param.low is not None and param.high is not None
    if param.kind == "loguniform":
        lo, hi = math.log(param.low), math.log(param.high)
        return [float(math.exp(lo + (hi - lo) * i / (points - 1))) for i in range(points)]
    values = [param.low + (param.high - param.low) * i / (points - 1) for i in range(points)]
    return sorted({round(v) for v in values}) if param.kind == "randint" else values


def tune_space(space: dict[str, SearchParam], search: str, grid_points: int) -> dict[str, Any]:
    """Ray Tune sampling objects for `space` (grid search: every axis on `grid_points` points)."""
    from ray import tune

    if search == "grid":
        return {k: tune.grid_search(_grid_values(p, grid_points)) for k, p in space.items()}
    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.kind == "choice":
            out[name] = tune.choice(list(p.values))
            continue
        low, high = float(p.low or 0), float(p.high or 0)  # validate_space checked both are set
        if p.kind == "loguniform":
            out[name] = tune.loguniform(low, high)
        elif p.kind == "uniform":
            out[name] = tune.uniform(low, high)
        else:
            out[name] = tune.randint(int(low), int(high) + 1)
    return out


def run_trial(config: dict[str, Any]) -> None:
    """One Tune trial: the same TorchTrainer run as `cityserve train`, reporting to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    torch_trainer(
        get_domain(config["domain"]), config,
        # Stable across Tuner.restore: a resumed trial continues from its last checkpoint.
        name=f"{config['sweep_id']}-{ray.tune.get_context().get_trial_id()}",
        storage_path=config["storage_path"], num_workers=int(config["num_workers"]),
        cpus_per_worker=float(config["cpus_per_worker"]), gpus_per_worker=float(config["gpus_per_worker"]),
        max_failures=1, callbacks=[TuneReportCallback()],
    ).fit()


def _tuner(domain: Domain, sweep_id: str, settings: Settings, options: SweepOptions,
           space: dict[str, SearchParam], base: dict[str, Any]) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    epochs = int(base["epochs"])
    # Rungs count the loop's own epochs, not Tune's iterations, which restart at 1 when a restored
    # trial resumes from its epoch-5 checkpoint.
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=3)
                 if options.scheduler == "asha" else FIFOScheduler())
    search_alg = None
    if options.search == "optuna":
        search_alg = ConcurrencyLimiter(OptunaSearch(seed=int(base["seed"])), max_concurrent=options.max_concurrent)
    return tune.Tuner(
        tune.with_resources(run_trial, {"CPU": DRIVER_CPU}),
        param_space={**base, **tune_space(space, options.search, options.grid_points)},
        tune_config=tune.TuneConfig(
            metric=domain.metric, mode=domain.mode, scheduler=scheduler, search_alg=search_alg,
            num_samples=1 if options.search == "grid" else options.num_samples,
            max_concurrent_trials=options.max_concurrent, time_budget_s=options.time_budget_s,
        ),
        run_config=tune.RunConfig(name=sweep_id, storage_path=settings.storage_uri(), verbose=1),
    )


def sweep(
    domain: Domain,
    workspace: Workspace,
    options: SweepOptions,
    *,
    space: dict[str, SearchParam] | None = None,
    overrides: dict[str, Any] | None = None,
    resume: str | None = None,
) -> tuple[str, pd.DataFrame, Version | None]:
    """Runs (or resumes) a sweep; registers the best trial's best epoch as a candidate.

    Returns:
        The sweep id, one row per trial, and the registered version (None when no trial reported).
    """
    from ray import tune

    options.validate()
    settings = workspace.settings
    data_dir = smoke_data_dir(settings) if options.profile == "smoke" else settings.data_dir
    manifest = ensure_data(domain, data_dir, smoke=options.profile == "smoke")
    space = space if space is not None else domain.search_space()
    threads = max(1, int(options.cpus_per_trial))
    base = build_config(domain, options.profile, data_dir, threads=threads, overrides=overrides)
    validate_space(space, base)
    sweep_id = resume or f"sweep-{domain.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.update(sweep_id=sweep_id, storage_path=settings.storage_uri(), num_workers=1,
                cpus_per_worker=options.cpus_per_trial, gpus_per_worker=options.gpus_per_trial)

    connect(settings)
    if resume:
        path = str(Location.of(settings.storage_uri()).join(resume))
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"no sweep {resume!r} to resume under {settings.storage_uri()}", field="resume")
        tuner = tune.Tuner.restore(path, trainable=tune.with_resources(run_trial, {"CPU": DRIVER_CPU}),
                                   resume_unfinished=True, resume_errored=True)
    else:
        tuner = _tuner(domain, sweep_id, settings, options, space, base)
    grid, interrupted = _fit(tuner)
    if interrupted:  # a half-run sweep has no winner yet
        raise Interrupted(f"sweep {sweep_id} was interrupted; nothing registered. Continue it with "
                          f"`cityserve tune {domain.name} --resume {sweep_id}`")
    trials = trial_table(grid, domain, list(space))
    write_results(grid, trials, domain, list(space), Location.of(settings.storage_uri()).join(sweep_id))
    version = register_best(grid, domain, workspace, manifest, sweep_id) if len(trials) else None
    return sweep_id, trials, version


def write_results(grid: Iterable[Any], trials: pd.DataFrame, domain: Domain, keys: list[str],
                  out: str | Location) -> Location:
    """Writes the trials table (`TRIALS_FILE`) and the sweep figure (`FIGURE_FILE`) into the sweep's
    folder `out` in Ray storage, a local path or a URI; each file whole or not at all.

    Args:
        grid: the sweep's results (a Tune `ResultGrid`, or any iterable of `Result`).
        trials: `trial_table(grid, ...)`.
        domain: names the metric.
        keys: the searched hyperparameters.
        out: the sweep's folder.
    """
    out = Location.of(out)
    with out.join(TRIALS_FILE).writing() as path:
        trials.to_parquet(path)
    with out.join(FIGURE_FILE).writing() as path:
        draw_sweep(grid, trials, domain, keys, path)
    return out


def _fit(tuner: Any) -> tuple[Any, bool]:
    """Runs the sweep; says whether Ctrl-C (or SIGUSR1) ended it early.

    Tune answers the first Ctrl-C by saving its state and returning normally, marking the running
    trials terminated, so the results cannot tell. Its handler, once fired, puts back the SIGINT
    handler it found; unfired, it stays installed (Tune never removes it; we do). Tune installs it
    only in the main thread, so elsewhere a sweep cannot be interrupted this way.
    """
    tune_catches = os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    if threading.current_thread() is not threading.main_thread() or not tune_catches:
        return tuner.fit(), False
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    try:
        grid = tuner.fit()
    finally:
        fired = signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return grid, fired


def trial_table(grid: Any, domain: Domain, keys: list[str]) -> pd.DataFrame:
    """One row per trial: its sampled config, best metric, epochs run, whether it stopped early and
    whether it was resumed from a checkpoint (after a failure or `--resume`)."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        if history is None or domain.metric not in history:
            continue
        values = history[domain.metric]
        best = values.max() if domain.mode == "max" else values.min()
        epochs = int(history["epoch"].max())
        rows.append({"trial_id": Path(result.path).name, **{k: result.config.get(k) for k in keys},
                     domain.metric: float(best), "epochs": epochs,
                     "stopped_early": epochs < int(result.config["epochs"]),
                     "resumed": bool(history["resumed"].max()),
                     "error": None if result.error is None else str(result.error)[:200]})
    return pd.DataFrame(rows)


def important_params(trials: pd.DataFrame, metric: str, keys: list[str]) -> list[str]:
    """Numeric hyperparameters ordered by |Spearman correlation| with the trial's best metric."""
    scores = {}
    for key in keys:
        column = pd.to_numeric(trials[key], errors="coerce")
        if column.nunique() > 1:
            corr = column.rank().corr(trials[metric].rank())
            scores[key] = 0.0 if pd.isna(corr) else abs(float(corr))
    return sorted(scores, key=lambda k: -scores[k])


def draw_sweep(grid: Iterable[Any], trials: pd.DataFrame, domain: Domain, keys: list[str], path: Path) -> None:
    """Metric per trial over epochs, and the metric against the two most important hyperparameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = important_params(trials, domain.metric, keys)[:2] if len(trials) else []
    fig, axes = plt.subplots(1, 1 + len(top), figsize=(5 * (1 + len(top)), 4), squeeze=False)
    for result in grid:
        history = result.metrics_dataframe
        if history is not None and domain.metric in history:
            axes[0][0].plot(history["epoch"], history[domain.metric], marker="o", alpha=0.7)
    axes[0][0].set(xlabel="epoch", ylabel=domain.metric, title=f"{domain.name}: {len(trials)} trials")
    for ax, key in zip(axes[0][1:], top, strict=True):
        ax.scatter(pd.to_numeric(trials[key]), trials[domain.metric], c=trials["epochs"], cmap="viridis")
        ax.set(xlabel=key, ylabel=f"best {domain.metric}", title="colour: epochs run")
        if key in ("lr", "weight_decay"):
            ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # `path` may be a temporary name without the suffix
    plt.close(fig)


def register_best(grid: Any, domain: Domain, workspace: Workspace, manifest: dict[str, Any],
                  sweep_id: str) -> Version:
    """Registers the best epoch of the best trial (its Train checkpoint) with the sweep as lineage."""
    from ray.train import Checkpoint

    best = grid.get_best_result(metric=domain.metric, mode=domain.mode, scope="all")
    history = best.metrics_dataframe.dropna(subset=[CHECKPOINT_PATH_KEY])
    values = history[domain.metric]
    row = history.loc[values.idxmax() if domain.mode == "max" else values.idxmin()]
    # What the loop reported (Tune adds its clocks and a copy of the config: not model metrics).
    metrics = {k: float(v) for k, v in row.items()
               if isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_)
               and not k.startswith("config/") and k not in TUNE_KEYS}
    config = {k: v for k, v in best.config.items() if k not in SWEEP_KEYS}
    # The reported path is one in the storage's filesystem (on S3 `bucket/x/…`, no scheme): alone it
    # would be taken for a local path.
    storage = Location.of(workspace.settings.storage_uri())
    checkpoint = Checkpoint(path=row[CHECKPOINT_PATH_KEY], filesystem=storage.fs)
    return register_checkpoint(domain, workspace, checkpoint, metrics=metrics,
                               manifest=manifest, config=config,
                               lineage={"sweep": sweep_id, "trial": Path(best.path).name})
