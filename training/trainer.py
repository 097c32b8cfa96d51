"""Runs a domain's training on Ray Train and registers the best epoch as a candidate version."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from cityserve.config import Settings
from cluster.local import connect
from domains import get_domain
from domains.errors import ConfigError
from training.data.common import read_manifest
from training.loop import build_config, train_loop_per_worker
from training.registry import Registry, Version

PROFILES = ("smoke", "quick", "full")


def smoke_data_dir(settings: Settings) -> Path:
    """Smoke runs use a tiny data set of their own, never the real prepared data."""
    return settings.data_dir / "_smoke"


def ensure_data(domain_name: str, data_dir: Path, *, smoke: bool) -> dict[str, Any]:
    """The domain's manifest, preparing the data first if it is not there yet."""
    try:
        return read_manifest(data_dir, domain_name)
    except Exception:  # not prepared yet: prepare it (errors in preparing propagate)
        return get_domain(domain_name).prepare(data_dir, smoke=smoke)


def train(
    domain_name: str,
    settings: Settings,
    *,
    profile: str = "quick",
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
    epochs: int | None = None,
    max_failures: int = 2,
    overrides: dict[str, Any] | None = None,
) -> Version:
    """Trains `domain_name` with `TorchTrainer` and registers the best checkpoint.

    Args:
        domain_name: which domain.
        settings: data, registry and storage locations.
        profile: smoke (seconds, tiny data), quick (what `make run` trains) or full.
        num_workers: Ray Train workers (DDP ranks).
        use_gpu: one GPU per worker; bf16 autocast.
        cpus_per_worker: CPUs per worker (also torch's thread count); default: the cluster's
            CPUs shared evenly.
        epochs: overrides the profile's epochs.
        max_failures: worker failures survived, each resuming from the last checkpoint.
        overrides: other hyperparameters over the profile's.

    Returns:
        The registered candidate version.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}", field="profile")
    if num_workers < 1:
        raise ConfigError(f"--num-workers must be at least 1, got {num_workers}", field="num_workers")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}", field="epochs")
    domain = get_domain(domain_name)
    data_dir = smoke_data_dir(settings) if profile == "smoke" else settings.data_dir
    manifest = ensure_data(domain_name, data_dir, smoke=profile == "smoke")

    connect(settings)
    if cpus_per_worker is None:
        cpus_per_worker = max(1.0, math.floor(ray.cluster_resources().get("CPU", 1) / num_workers))
    threads = max(1, int(cpus_per_worker))
    config = build_config(domain, profile, data_dir, threads=threads,
                          overrides={**(overrides or {}), **({"epochs": epochs} if epochs else {})})
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    run_name = f"{domain_name}-{profile}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=settings.storage_uri(),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=domain.metric, checkpoint_score_order=domain.mode
            ),
        ),
    )
    result = trainer.fit()
    best = result.get_best_checkpoint(domain.metric, domain.mode)
    if best is None:
        raise ConfigError(f"{domain_name} training produced no checkpoint (see the log above)")
    best_metrics = next(m for c, m in result.best_checkpoints or [] if c.path == best.path)
    registry = Registry(settings.registry_location())
    with best.as_directory() as model_dir:
        (Path(model_dir) / "train_state.pt").unlink(missing_ok=True)
        return registry.register(domain_name, Path(model_dir), {
            "profile": profile,
            "metrics": best_metrics,
            "metric": domain.metric,
            "mode": domain.mode,
            "config": config,
            "data": {"manifest_sha256": manifest["sha256"], "sources": manifest["sources"]},
            "lineage": {"run": run_name, "storage_path": settings.storage_uri(),
                        "checkpoint": best.path, "num_workers": num_workers, "use_gpu": use_gpu},
        })
