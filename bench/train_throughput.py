"""Training throughput: the same loop in plain PyTorch and inside Ray Train, same run, per domain.

Both sides run `training.loop.run_loop` with the same config, seed and torch thread count; Ray
Train gets one worker holding all the CPUs (`resources_per_worker={"CPU": threads}`). Each side
runs `--repeats` times, alternating which side goes first (so neither always meets a warm or a
cold machine), and every pair must compute the same per-epoch training losses: a difference
means the two sides did not run the same work and the ratio would mean nothing. A side's figure
for one repeat is the median over epochs of each epoch's training samples/s (validation
excluded); the row gives the median over repeats, their spread (min, max) and `ratio`, the
median of the per-repeat ray / plain ratios. Writes `bench/results/train_throughput.json` (the
`train_throughput` result schema), replacing each measured domain's row, and prints it.

    .venv/bin/python -m bench.train_throughput [--domain D ...] [--epochs 2] [--repeats 3] [--use-gpu]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import save_row
from cluster.local import connect
from core.settings import get_settings
from domains import DOMAINS, get_domain
from training.loop import fit_plain
from training.trainer import make_trainer

# Fine-tuning MiniLM runs at ~10-30 samples/s on 2 cores: 384 texts an epoch (12 batches) keep
# each text-domain side under a minute; throughput does not depend on how many texts an epoch has.
SIZE = {"events": {"train_limit": 384}, "sentiment": {"train_limit": 384}}
# Same seed, data and threads give the same arithmetic on both sides; this bounds only the
# printing of float32 sums, not a real difference in the work.
LOSS_RTOL = 1e-5


class UnequalWork(AssertionError):
    """The plain and the Ray Train side computed different losses."""


def require_equal_work(domain: str, plain: list[float], ray: list[float]) -> None:
    """Raises `UnequalWork` unless both sides report the same per-epoch training losses."""
    same = len(plain) == len(ray) and all(
        math.isclose(a, b, rel_tol=LOSS_RTOL) for a, b in zip(plain, ray, strict=True))
    if not same:
        raise UnequalWork(f"{domain}: per-epoch training losses differ: plain {plain}, Ray Train {ray}")


def one_pair(domain: str, epochs: int, use_gpu: bool, ray_first: bool) -> dict[str, Any]:
    """One plain run and one Ray Train run of the same config; their rates and losses."""
    settings = get_settings()
    dom = get_domain(domain)
    threads = os.cpu_count() or 1
    trainer, _ = make_trainer(dom, settings, profile="quick", num_workers=1, use_gpu=use_gpu,
                              cpus_per_worker=threads, epochs=epochs,
                              overrides={"patience": epochs, **SIZE.get(domain, {})})
    config = trainer.train_loop_config

    def plain() -> list[dict[str, float]]:
        with tempfile.TemporaryDirectory() as tmp:
            return fit_plain(dom, config, Path(config["data_dir"]), Path(tmp) / "model",
                             device="cuda" if use_gpu else "cpu")

    def ray() -> list[dict[str, float]]:
        result = trainer.fit()
        return sorted((m for _, m in result.best_checkpoints or []), key=lambda m: m["epoch"])

    sides = {"ray": ray, "plain": plain} if ray_first else {"plain": plain, "ray": ray}
    histories = {name: run() for name, run in sides.items()}
    losses = {name: [m["train_loss"] for m in h] for name, h in histories.items()}
    require_equal_work(domain, losses["plain"], losses["ray"])
    rates = {name: statistics.median(m["samples_per_s"] for m in h) for name, h in histories.items()}
    return {"threads": int(config["threads"]), "ray_first": ray_first, "train_loss": losses["plain"],
            "plain_samples_per_s": round(rates["plain"], 2), "ray_samples_per_s": round(rates["ray"], 2),
            "ratio": round(rates["ray"] / rates["plain"], 4)}


def measure(domain: str, epochs: int, repeats: int, use_gpu: bool) -> dict[str, Any]:
    pairs = [one_pair(domain, epochs, use_gpu, ray_first=i % 2 == 1) for i in range(repeats)]

    def summary(key: str) -> tuple[float, list[float]]:
        values = [p[key] for p in pairs]
        return round(statistics.median(values), 4), [min(values), max(values)]

    (plain, plain_spread), (ray, ray_spread), (ratio, ratio_spread) = (
        summary("plain_samples_per_s"), summary("ray_samples_per_s"), summary("ratio"))
    return {"domain": domain, "device": "cuda" if use_gpu else "cpu", "threads": pairs[0]["threads"],
            "plain_samples_per_s": plain, "ray_samples_per_s": ray, "ratio": ratio,
            "spread": {"plain_samples_per_s": plain_spread, "ray_samples_per_s": ray_spread,
                       "ratio": ratio_spread},
            "epochs": epochs, "repeats": repeats, "losses_equal": True, "pairs": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", action="append", choices=sorted(DOMAINS))
    parser.add_argument("--epochs", type=int, default=2, help="at most 2: Ray keeps the 2 best checkpoints")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs, alternating which side goes first")
    parser.add_argument("--use-gpu", action="store_true")
    args = parser.parse_args()
    connect(get_settings())
    name = "train_throughput_gpu.json" if args.use_gpu else "train_throughput.json"
    for domain in args.domain or sorted(DOMAINS):
        path = save_row(name, measure(domain, min(args.epochs, 2), args.repeats, args.use_gpu))
    print(path.read_text())


if __name__ == "__main__":
    main()
