"""Runs a domain's training on Ray Train and registers the best epoch as a candidate version."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cityserve.config import Settings
from cluster.local import connect
from domains import get_domain
from domains.errors import ConfigError
from training.data.common import read_manifest
from training.loop import TRAIN_STATE, build_config, train_loop_per_worker
from training.registry import Registry, Version

PROFILES = ("smoke", "quick", "full")


def smoke_data_dir(settings: Settings) -> Path:
    """Smoke runs use a tiny data set of their own, never the real prepared data."""
    return settings.data_dir / "_smoke"


def run_name(domain_name: str, profile: str) -> str:
    """A Train run's name, unique to the run: Ray Train V2 resumes a run from the checkpoints of any
    earlier run of the same name under the same storage path, so two runs started in the same second
    (two shells, or concurrent runs of one script) must not share one."""
    return f"{domain_name}-{profile}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def ensure_data(domain_name: str, data_dir: Path, *, smoke: bool) -> dict[str, Any]:
    """The domain's manifest, preparing the data first if it is not there yet."""
    try:
        return read_manifest(data_dir, domain_name)
    except Exception:  # not prepared yet: prepare it (errors in preparing propagate)
        return get_domain(domain_name).prepare(data_dir, smoke=smoke)


def make_trainer(
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
) -> tuple[Any, dict[str, Any]]:
    """A `TorchTrainer` for one domain, and the data manifest it trains on.

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
    config["num_workers"], config["use_gpu"] = num_workers, use_gpu
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name(domain_name, profile),
            storage_path=settings.storage_uri(),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=domain.metric, checkpoint_score_order=domain.mode
            ),
        ),
    )
    return trainer, manifest


def register_checkpoint(domain_name: str, settings: Settings, checkpoint: Any, *, metrics: dict[str, Any],
                        manifest: dict[str, Any], config: dict[str, Any], lineage: dict[str, Any]) -> Version:
    """Registers a Train checkpoint (a model directory) as a candidate version with its lineage."""
    domain = get_domain(domain_name)
    # A copy without the resume state: a local checkpoint's directory is the checkpoint itself,
    # which a restored sweep may still resume from.
    with checkpoint.as_directory() as stored, tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        shutil.copytree(stored, model_dir, ignore=shutil.ignore_patterns(TRAIN_STATE))
        return Registry(settings.registry_location()).register(domain_name, Path(model_dir), {
            "profile": config["profile"],
            "metrics": metrics,
            "metric": domain.metric,
            "mode": domain.mode,
            "config": config,
            "data": {"manifest_sha256": manifest["sha256"], "sources": manifest["sources"]},
            "lineage": {**lineage, "checkpoint": checkpoint.path, "storage_path": settings.storage_uri()},
        })


def register_result(domain_name: str, settings: Settings, result: Any, manifest: dict[str, Any],
                    config: dict[str, Any]) -> Version:
    """Registers a finished run's best checkpoint."""
    domain = get_domain(domain_name)
    best = result.get_best_checkpoint(domain.metric, domain.mode)
    if best is None:
        raise ConfigError(f"{domain_name} training produced no checkpoint (see the log above)")
    metrics = next(m for c, m in result.best_checkpoints or [] if c.path == best.path)
    return register_checkpoint(domain_name, settings, best, metrics=metrics, manifest=manifest, config=config,
                               lineage={"run": Path(result.path).name})


def train(domain_name: str, settings: Settings, **options: Any) -> Version:
    """Trains `domain_name` with Ray Train (options as `make_trainer`) and registers the best epoch."""
    trainer, manifest = make_trainer(domain_name, settings, **options)
    result = trainer.fit()
    return register_result(domain_name, settings, result, manifest, trainer.train_loop_config)
