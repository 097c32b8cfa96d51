"""What every Ray Train run needs, whoever starts it (`cityserve train` or a sweep's trial): its
data, its `TorchTrainer`, and the registration of its best checkpoint as a candidate version."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cluster.placement import check_placement
from core.errors import ConfigError, DataError
from core.settings import Settings
from core.storage import Location
from domains.base import Domain
from domains.calibration import CALIBRATION_FILE
from domains.drift import REFERENCE_FILE
from domains.onnx_text import ARTIFACTS, ExportError
from domains.tables import read_manifest
from training.loop import TRAIN_STATE, train_loop_per_worker
from training.registry import Version, check_files
from training.workspace import Workspace

logger = logging.getLogger(__name__)
# What `fitted` makes in a model directory.
FITTED_FILES = (CALIBRATION_FILE, REFERENCE_FILE)


def smoke_data_dir(settings: Settings) -> Path:
    """Smoke runs use a tiny data set of their own, never the real prepared data."""
    return settings.data_dir / "_smoke"


def ensure_data(domain: Domain, data_dir: Path, *, smoke: bool) -> dict[str, Any]:
    """The domain's manifest, preparing the data first if it is not there yet."""
    try:
        return read_manifest(data_dir, domain.name)
    except DataError:  # not prepared yet: prepare it (errors in preparing propagate)
        return domain.prepare(data_dir, smoke=smoke)


def torch_trainer(domain: Domain, config: dict[str, Any], *, name: str, storage_path: str, num_workers: int,
                  cpus_per_worker: float, gpus_per_worker: float, max_failures: int, callbacks: list[Any] | None = None,
                  placement_strategy: str = "PACK") -> Any:
    """The `TorchTrainer` running `train_loop_per_worker` on `config`.

    Args:
        domain: ranks the checkpoints by its metric.
        config: the loop's config (`training.loop.build_config`).
        name: the run's name under `storage_path`; Train resumes a run of the same name from its checkpoints.
        storage_path: where checkpoints go (absolute path or URI).
        num_workers: Ray Train workers (DDP ranks).
        cpus_per_worker: CPUs each worker holds.
        gpus_per_worker: GPUs each worker holds (a fraction shares one); 0 trains on CPU.
        max_failures: worker failures survived, each resuming from the last checkpoint.
        callbacks: Train callbacks (a sweep's trial reports to Tune through one).
        placement_strategy: how the workers are placed on the nodes (`cluster.placement`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_placement(placement_strategy)
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus_per_worker > 0,
                                     resources_per_worker=resources, placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=FailureConfig(max_failures=max_failures),
            # Two: a trial restored after it had ended reports its last checkpoint again (a copy
            # scoring the same); with one kept, the copy could evict the original that the trial's
            # earlier report names, and registering the best trial would find nothing there.
            checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=domain.metric,
                                               checkpoint_score_order=domain.mode),
        ),
    )


def optimized(domain: Domain, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """The record entries of what a model directory serves with, made in it: `inference`, its
    optimised artifacts with their test figures (`Domain.optimize`), or `inference_error` saying why
    there are none (the version then serves its PyTorch model); and those of `fitted`."""
    try:
        inference = domain.optimize(model_dir, data_dir)
        entries: dict[str, Any] = {"inference": inference} if inference is not None else {}
    except ExportError as exc:
        logger.warning("%s: no optimised artifacts (%s); the version serves PyTorch", domain.name, exc.message)
        entries = {"inference_error": exc.message}
    return {**entries, **fitted(domain, model_dir, data_dir)}


def fitted(domain: Domain, model_dir: Path, data_dir: Path) -> dict[str, Any]:
    """The record entries of what is fitted on the validation split, made in the model directory:
    `calibration` (`Domain.calibrate`, for each artifact it serves with), then `reference`, its
    calibrated answers' features and quality that drift and live quality are measured against
    (`Domain.reference`)."""
    calibration = domain.calibrate(model_dir, data_dir)
    return {**({"calibration": calibration} if calibration is not None else {}),
            "reference": domain.reference(model_dir, data_dir)}


def optimize_version(domain: Domain, workspace: Workspace, ref: str) -> Version:
    """(Re)makes a registered version's optimised artifacts and their test figures (`cityserve
    models optimize`), and its calibration for each, replacing any it had: for a version registered
    before they existed, or after the gate or the export changed."""
    if domain.backends == Domain.backends:
        raise ConfigError(f"{domain.name} has no optimised artifacts: its models serve with PyTorch",
                          field="domain")
    made = [*ARTIFACTS.values(), *FITTED_FILES]
    with _working_copy(workspace, domain, ref, without=made) as (version, work):
        entries = optimized(domain, work, workspace.data_dir_of(version))
        return workspace.registry.add_files(domain.name, version.version, _made(work, made),
                                            {"inference": None, "inference_error": None, "calibration": None,
                                             "reference": None, **entries})


def calibrate_version(domain: Domain, workspace: Workspace, ref: str) -> Version:
    """(Re)fits a registered version's calibration and reference on its validation split
    (`cityserve models calibrate`): for a version registered before they existed."""
    with _working_copy(workspace, domain, ref, without=list(FITTED_FILES)) as (version, work):
        entries = fitted(domain, work, workspace.data_dir_of(version))
        return workspace.registry.add_files(domain.name, version.version, _made(work, FITTED_FILES),
                                            {"calibration": None, "reference": None, **entries})


def _made(work: Path, names: Iterable[str]) -> dict[str, Path | None]:
    """Each of `names` as `Registry.add_files` takes it: the file made in `work`, or None (remove it)
    where none was made."""
    return {name: work / name if (work / name).is_file() else None for name in names}


@contextlib.contextmanager
def _working_copy(workspace: Workspace, domain: Domain, ref: str, *, without: list[str]
                  ) -> Iterator[tuple[Version, Path]]:
    """A registered version and a local copy of its checked files, less those named `without`."""
    registry = workspace.registry
    version = registry.get(domain.name, ref)
    with tempfile.TemporaryDirectory() as tmp, registry.model_dir(domain.name, version.version) as path:
        check_files(version, path)
        work = Path(tmp) / "model"
        shutil.copytree(path, work, ignore=shutil.ignore_patterns(*without))
        yield version, work


def register_checkpoint(domain: Domain, workspace: Workspace, checkpoint: Any, *, metrics: dict[str, Any],
                        manifest: dict[str, Any], config: dict[str, Any], lineage: dict[str, Any]) -> Version:
    """Registers a Train checkpoint (a model directory, local or in object storage) as a candidate
    version with its lineage and its optimised inference artifacts."""
    stored = Location.from_fs(checkpoint.filesystem, checkpoint.path)
    # A copy without the resume state (optimizer and scheduler: not part of the model, and as large):
    # a local checkpoint's directory is the checkpoint itself, which a restored sweep may resume from.
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        stored.download_dir(model_dir, skip=[TRAIN_STATE])
        return workspace.registry.register(domain.name, model_dir, {
            **optimized(domain, model_dir, Path(config["data_dir"])),
            "profile": config["profile"],
            "metrics": metrics,
            "metric": domain.metric,
            "mode": domain.mode,
            "config": config,
            "data": {"manifest_sha256": manifest["sha256"], "sources": manifest["sources"]},
            "lineage": {**lineage, "checkpoint": str(stored), "storage_path": workspace.settings.storage_uri()},
        })
