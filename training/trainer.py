"""Runs a domain's training on Ray Train and registers the best epoch as a candidate version."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from cluster.local import connect
from cluster.placement import check_placement, default_cpus_per_worker
from core.errors import ConfigError
from core.settings import Settings
from domains.base import Domain
from domains.tables import read_manifest
from training.loop import build_config
from training.registry import Version
from training.runs import (
    ensure_data,
    register_checkpoint,
    smoke_data_dir,
    torch_trainer,
)
from training.workspace import Workspace

PROFILES = ("smoke", "quick", "full")


def run_name(domain_name: str, profile: str) -> str:
    """A Train run's name, unique to the run: Ray Train V2 resumes a run from the checkpoints of any
    earlier run of the same name under the same storage path, so two runs started in the same second
    (two shells, or concurrent runs of one script) must not share one."""
    return f"{domain_name}-{profile}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def make_trainer(
    domain: Domain,
    settings: Settings,
    *,
    profile: str = "quick",
    num_workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
    epochs: int | None = None,
    max_failures: int = 2,
    overrides: dict[str, Any] | None = None,
    placement_strategy: str = "PACK",
    data_dir: Path | None = None,
) -> tuple[Any, dict[str, Any]]:
    """A `TorchTrainer` for one domain, and the data manifest it trains on.

    Args:
        domain: which domain.
        settings: data and storage locations.
        profile: smoke (seconds, tiny data), quick (what `make run` trains) or full.
        num_workers: Ray Train workers (DDP ranks).
        use_gpu: one GPU per worker; bf16 autocast.
        cpus_per_worker: CPUs per worker (also torch's thread count); default: the most that lets
            every worker run at once on the nodes alive now (`cluster.placement.default_cpus_per_worker`).
        epochs: overrides the profile's epochs.
        max_failures: worker failures survived, each resuming from the last checkpoint.
        overrides: other hyperparameters over the profile's.
        placement_strategy: how the workers are placed on the nodes (`cluster.placement.PLACEMENT_STRATEGIES`):
            PACK (the default) fills one node first, SPREAD puts them on different nodes where it can.
        data_dir: prepared data to train on (`cityserve retrain`'s, with feedback) instead of the
            profile's, which is prepared first where it is not yet.
    """
    import ray

    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {list(PROFILES)}", field="profile")
    if num_workers < 1:
        raise ConfigError(f"--num-workers must be at least 1, got {num_workers}", field="num_workers")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {epochs}", field="epochs")
    check_placement(placement_strategy)
    if data_dir is not None:
        manifest = read_manifest(data_dir, domain.name)
    else:
        data_dir = smoke_data_dir(settings) if profile == "smoke" else settings.data_dir
        manifest = ensure_data(domain, data_dir, smoke=profile == "smoke")

    connect(settings)
    if cpus_per_worker is None:
        nodes = [(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n["Alive"]]
        cpus_per_worker = default_cpus_per_worker(nodes, num_workers, use_gpu)
    threads = max(1, int(cpus_per_worker))
    config = build_config(domain, profile, data_dir, threads=threads,
                          overrides={**(overrides or {}), **({"epochs": epochs} if epochs else {})})
    config["num_workers"], config["use_gpu"] = num_workers, use_gpu
    trainer = torch_trainer(domain, config, name=run_name(domain.name, profile), storage_path=settings.storage_uri(),
                            num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                            gpus_per_worker=1.0 if use_gpu else 0.0, max_failures=max_failures,
                            placement_strategy=placement_strategy)
    return trainer, manifest


def register_result(domain: Domain, workspace: Workspace, result: Any, manifest: dict[str, Any],
                    config: dict[str, Any]) -> Version:
    """Registers a finished run's best checkpoint."""
    best = result.get_best_checkpoint(domain.metric, domain.mode)
    if best is None:
        raise ConfigError(f"{domain.name} training produced no checkpoint (see the log above)")
    metrics = next(m for c, m in result.best_checkpoints or [] if c.path == best.path)
    return register_checkpoint(domain, workspace, best, metrics=metrics, manifest=manifest, config=config,
                               lineage={"run": Path(result.path).name})


def train(domain: Domain, workspace: Workspace, **options: Any) -> Version:
    """Trains `domain` with Ray Train (options as `make_trainer`) and registers the best epoch."""
    trainer, manifest = make_trainer(domain, workspace.settings, **options)
    result = trainer.fit()
    return register_result(domain, workspace, result, manifest, trainer.train_loop_config)
