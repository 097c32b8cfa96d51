"""Training throughput: the same loop in plain PyTorch and inside Ray Train, same run, per domain.

Both sides run `training.loop.run_loop` with the same config and the same torch thread count; Ray
Train gets one worker holding all the CPUs (`resources_per_worker={"CPU": threads}`). The figure is
the median over epochs of each epoch's training samples/s (validation excluded). Writes
`bench/results/train_throughput.json` (the `train_throughput` result schema), replacing
each measured domain's row, and prints it.

    .venv/bin/python -m bench.train_throughput [--domain D ...] [--epochs 2] [--use-gpu]
"""

from __future__ import annotations

import argparse
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

# Fine-tuning MiniLM runs at ~10-30 samples/s on 2 cores: 640 texts an epoch (20 batches) keep
# each text-domain side near a minute; throughput does not depend on how many texts an epoch has.
SIZE = {"events": {"train_limit": 640}, "sentiment": {"train_limit": 640}}


def measure(domain: str, epochs: int, use_gpu: bool) -> dict[str, Any]:
    settings = get_settings()
    dom = get_domain(domain)
    threads = os.cpu_count() or 1
    trainer, _ = make_trainer(dom, settings, profile="quick", num_workers=1, use_gpu=use_gpu,
                              cpus_per_worker=threads, epochs=epochs,
                              overrides={"patience": epochs, **SIZE.get(domain, {})})
    config = trainer.train_loop_config
    with tempfile.TemporaryDirectory() as tmp:
        history = fit_plain(dom, config, Path(config["data_dir"]), Path(tmp) / "model",
                            device="cuda" if use_gpu else "cpu")
    plain = statistics.median(m["samples_per_s"] for m in history)
    result = trainer.fit()
    ray_rates = [m["samples_per_s"] for _, m in result.best_checkpoints or []]
    ray_rate = statistics.median(ray_rates)
    return {"domain": domain, "device": "cuda" if use_gpu else "cpu", "threads": int(config["threads"]),
            "plain_samples_per_s": round(plain, 2), "ray_samples_per_s": round(ray_rate, 2),
            "ratio": round(ray_rate / plain, 4), "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", action="append", choices=sorted(DOMAINS))
    parser.add_argument("--epochs", type=int, default=2, help="at most 2: Ray keeps the 2 best checkpoints")
    parser.add_argument("--use-gpu", action="store_true")
    args = parser.parse_args()
    connect(get_settings())
    name = "train_throughput_gpu.json" if args.use_gpu else "train_throughput.json"
    for domain in args.domain or sorted(DOMAINS):
        path = save_row(name, measure(domain, min(args.epochs, 2), args.use_gpu))
    print(path.read_text())


if __name__ == "__main__":
    main()
