"""Sweep efficiency: the same search space swept by grid search and by ASHA + Optuna, same run.

Both sweeps are `cityserve tune` (`training.tune.sweep`: every trial the same Ray Train run) on
bounded problems deep enough for early stopping to matter:
- sentiment: the MiniLM model with its encoder fully frozen, so each epoch trains only the heads
  over pooled features embedded once and cached (fine-tuning the encoder costs 10-19 min an
  epoch here); 4,000 training texts, 12 epochs a full trial.
- energy: the forecaster on every 16th training window, 9 epochs a full trial.
The loop's own early stopping is off (patience = epochs) so only the scheduler stops trials.
Compute is trial-epochs (epochs actually run, summed over trials); ASHA runs as many trials as the
grid has points. Each sweep gets a throwaway registry and storage. Each domain's row (grid and
ASHA from one run) replaces that domain's row in `bench/results/tune_efficiency.json`
(the `tune_efficiency` result schema) as soon as it is measured; the file is printed.

    .venv/bin/python -m bench.tune_efficiency [--domain sentiment|energy ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from typing import Any

from bench import save_row
from cluster.local import connect
from core.settings import get_settings
from domains import get_domain
from domains.base import SearchParam
from training.runs import ensure_data
from training.tune import SweepOptions, sweep
from training.workspace import Workspace

PROBLEMS: dict[str, dict[str, Any]] = {
    "sentiment": {
        "overrides": {"freeze_layers": 6, "max_len": 64, "train_limit": 4000, "epochs": 12, "patience": 12},
        "space": {"lr": SearchParam("loguniform", 3e-4, 3e-2), "dropout": SearchParam("uniform", 0.0, 0.4),
                  "batch_size": SearchParam("choice", values=(64, 512))},
    },
    "energy": {
        "overrides": {"train_stride": 16, "epochs": 9, "patience": 9},
        "space": {"lr": SearchParam("loguniform", 3e-4, 1e-2), "dropout": SearchParam("uniform", 0.0, 0.4),
                  "hidden": SearchParam("choice", values=(64, 192))},
    },
}
GRID_POINTS = 3  # per continuous axis
CPUS_PER_TRIAL = 0.9  # two concurrent trials on 2 cores, each driver taking 0.05


def _warm_cache(domain: str) -> None:
    """Embeds the sentiment corpus once, before the trials, instead of in every trial at once."""
    if domain != "sentiment":
        return
    from domains.sentiment import split_embeddings

    split_embeddings(get_settings().data_dir, int(PROBLEMS[domain]["overrides"]["max_len"]))


def run_sweep(domain: str, options: SweepOptions) -> dict[str, Any]:
    problem = PROBLEMS[domain]
    dom = get_domain(domain)
    with tempfile.TemporaryDirectory() as tmp:
        settings = get_settings().model_copy(update={"registry_uri": f"{tmp}/registry",
                                                     "storage_path": f"{tmp}/ray_results"})
        start = time.monotonic()
        _, trials, _ = sweep(dom, Workspace.from_settings(settings), options, space=problem["space"],
                             overrides=problem["overrides"])
        wall = time.monotonic() - start
    if trials["error"].notna().any():
        raise RuntimeError(f"{domain}: trials failed: {trials['error'].dropna().tolist()}")
    values = trials[dom.metric]
    return {"best": float(values.max() if dom.mode == "max" else values.min()),
            "trial_epochs": int(trials["epochs"].sum()), "trials": len(trials), "wall_s": round(wall, 1)}


def measure(domain: str) -> dict[str, Any]:
    dom = get_domain(domain)
    ensure_data(dom, get_settings().data_dir, smoke=False)
    _warm_cache(domain)
    common = SweepOptions(max_concurrent=2, cpus_per_trial=CPUS_PER_TRIAL, grid_points=GRID_POINTS)
    grid = run_sweep(domain, replace(common, search="grid", scheduler="fifo"))
    asha = run_sweep(domain, replace(common, search="optuna", scheduler="asha", num_samples=grid["trials"]))
    gap = (grid["best"] - asha["best"]) if dom.mode == "max" else (asha["best"] - grid["best"])
    return {"domain": domain, "metric": dom.metric, "mode": dom.mode, "grid": grid, "asha": asha,
            "relative_gap": round(gap / abs(grid["best"]), 4),
            "compute_share": round(asha["trial_epochs"] / grid["trial_epochs"], 4),
            "problem": dict(PROBLEMS[domain]["overrides"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", action="append", choices=sorted(PROBLEMS))
    args = parser.parse_args()
    connect(get_settings())
    for domain in args.domain or sorted(PROBLEMS):
        path = save_row("tune_efficiency.json", measure(domain))
    print(path.read_text())


if __name__ == "__main__":
    main()
