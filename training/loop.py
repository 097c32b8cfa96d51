"""The one training loop. Ray Train runs it on every worker (`train_loop_per_worker`); `fit_plain`
runs the very same steps in one plain PyTorch process (the benchmark baseline and a quick local
check). Domains plug in data, model, loss and validation through `domains.base.Domain`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sized
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.utils.data import DataLoader

from domains import get_domain
from domains.base import CONFIG_FILE, META_FILE, WEIGHTS_FILE, Batch, Domain

# Hyperparameters every domain has; a domain's `default_config(profile)` sets them per profile.
COMMON_DEFAULTS: dict[str, Any] = {
    "epochs": 3,
    "batch_size": 32,
    "lr": 1e-3,
    "weight_decay": 0.01,
    "warmup_frac": 0.1,
    "grad_clip": 1.0,
    "patience": 2,
    "seed": 0,
}
TRAIN_STATE = "train_state.pt"  # optimizer, scheduler and early-stopping state for resuming
LOG_EVERY_S = 15.0  # seconds between in-epoch progress lines


class LoopContext(Protocol):
    """What differs between a Ray Train worker and a plain process."""

    world_rank: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...
    def prepare_loader(self, loader: DataLoader[Batch], *, distributed: bool) -> DataLoader[Batch]: ...
    def latest_checkpoint(self) -> Path | None: ...
    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (what gets saved and validated)."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, nn.Module)
    return inner


def is_better(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def _lr_lambda(total_steps: int, warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batch_size(batch: Batch) -> int:
    return len(next(iter(batch.values())))


class DeviceLoader:
    """Iterates a loader's batches moved to `device` (re-iterable, unlike a generator)."""

    def __init__(self, loader: DataLoader[Batch], device: torch.device) -> None:
        self.loader = loader
        self.device = device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


def write_model_dir(
    path: Path, model: nn.Module, config: dict[str, Any], meta: dict[str, Any], domain: Domain
) -> None:
    """Writes everything a predictor needs: weights, config, meta and the domain's extras."""
    path.mkdir(parents=True, exist_ok=True)
    torch.save(unwrap(model).state_dict(), path / WEIGHTS_FILE)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    (path / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    domain.save_extras(path, meta)


def run_loop(domain: Domain, config: dict[str, Any], ctx: LoopContext) -> None:
    """Trains one model end to end; reports validation metrics and a checkpoint each epoch."""
    data_dir = Path(config["data_dir"])
    torch.set_num_threads(int(config["threads"]))  # Ray sets OMP threads from num_cpus; be explicit
    torch.manual_seed(int(config["seed"]) + ctx.world_rank)
    say = print if ctx.world_rank == 0 else (lambda *a, **k: None)

    # [1] data: the domain's preprocessing, fitted on the training split only
    meta = domain.fit_meta(data_dir, config)
    train_ds, valid_ds = domain.datasets(data_dir, config, meta)
    train_loader = ctx.prepare_loader(
        DataLoader(train_ds, batch_size=int(config["batch_size"]), shuffle=True, collate_fn=domain.collate,
                   drop_last=len(cast(Sized, train_ds)) > int(config["batch_size"])),
        distributed=True,
    )
    valid_loader = ctx.prepare_loader(
        DataLoader(valid_ds, batch_size=2 * int(config["batch_size"]), collate_fn=domain.collate),
        distributed=False,  # every worker validates on the whole split, so all stop together
    )

    # [2] model (pretrained encoders come from their package)
    model = ctx.prepare_model(domain.build_model({**config, "pretrained": True}, meta))

    # [3] optimiser: AdamW, linear warmup then cosine decay
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    total_steps = int(config["epochs"]) * len(train_loader)
    warmup_steps = max(1, int(float(config["warmup_frac"]) * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup_steps))

    # [4] resume from the last checkpoint after a worker failure (FailureConfig restarts us) or in a
    # restored sweep (Tune reruns a trial that was running when its driver died)
    start_epoch, best, bad_epochs = 0, None, 0
    checkpoint = ctx.latest_checkpoint()
    if checkpoint is not None:
        unwrap(model).load_state_dict(torch.load(checkpoint / WEIGHTS_FILE, map_location=ctx.device,
                                                 weights_only=True))
        state = torch.load(checkpoint / TRAIN_STATE, map_location=ctx.device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, bad_epochs = state["epoch"] + 1, state["best"], state["bad_epochs"]
        say(f"resumed from checkpoint after epoch {start_epoch}")
        ended = start_epoch >= int(config["epochs"]) or bad_epochs >= int(config["patience"])
        if ended and "metrics" in state:
            # The run had ended (all epochs, or an early stop) before its driver died: train
            # nothing and say its last result again. A restored Tune trial that reports nothing
            # fails the whole sweep with "did not include the specified metric"; a restored trial
            # that Tune had not yet started has only this report, so it carries the checkpoint.
            ctx.report({**state["metrics"], "resumed": 1.0, "resumed_after_epoch": float(start_epoch)},
                       checkpoint if ctx.world_rank == 0 else None)
            return

    # [5] epochs: train, validate, checkpoint, stop early
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else nullcontext()
    )
    grad_clip = float(config["grad_clip"])
    for epoch in range(start_epoch, int(config["epochs"])):
        set_epoch = getattr(train_loader.sampler, "set_epoch", None)  # DistributedSampler reshuffles
        if set_epoch is not None:
            set_epoch(epoch)
        model.train()
        seen, loss_sum, steps = 0, 0.0, 0
        started = last_log = time.perf_counter()
        for batch in DeviceLoader(train_loader, ctx.device):
            with autocast:
                loss = domain.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            scheduler.step()
            seen += _batch_size(batch)
            loss_sum += float(loss.detach())
            steps += 1
            if time.perf_counter() - last_log > LOG_EVERY_S:
                last_log = time.perf_counter()
                say(f"  epoch {epoch + 1} step {steps}/{len(train_loader)} loss {loss_sum / steps:.4f} "
                    f"{seen / (last_log - started):.1f} samples/s", flush=True)
        train_s = time.perf_counter() - started
        model.eval()
        with torch.no_grad(), autocast:
            metrics = domain.validate(unwrap(model), DeviceLoader(valid_loader, ctx.device), meta)
        value = float(metrics[domain.metric])
        if is_better(value, best, domain.mode):
            best, bad_epochs = value, 0
        else:
            bad_epochs += 1
        metrics = {
            **{k: float(v) for k, v in metrics.items()},
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(1, steps),
            "samples_per_s": seen / train_s if train_s > 0 else 0.0,
            "train_s": train_s,
            "resumed": float(checkpoint is not None),
            "resumed_after_epoch": float(start_epoch),  # the checkpoint's epoch; 0: started afresh
        }
        say(f"epoch {epoch + 1}/{config['epochs']} loss {metrics['train_loss']:.4f} "
            f"{domain.metric} {value:.4f} {metrics['samples_per_s']:.1f} samples/s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt_dir = None
            if ctx.world_rank == 0:
                ckpt_dir = Path(tmp)
                write_model_dir(ckpt_dir, model, config, meta, domain)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "epoch": epoch, "best": best, "bad_epochs": bad_epochs, "metrics": metrics},
                           ckpt_dir / TRAIN_STATE)
            ctx.report(metrics, ckpt_dir)
        if bad_epochs >= int(config["patience"]):
            say(f"early stop: no {domain.metric} improvement for {bad_epochs} epochs")
            break


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train entry point (`TorchTrainer(train_loop_per_worker, ...)`)."""
    run_loop(get_domain(config["domain"]), config, RayContext())


class RayContext:
    """A Ray Train worker: DDP model, distributed sampler, checkpoints through `ray.train.report`."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self._torch = ray.train.torch
        # Ray Train logs every report and checkpoint at INFO (the whole metrics dict, twice an
        # epoch); the loop's own epoch line already says it once.
        from ray.train.v2._internal.execution import context, storage

        for name in (context.__file__, storage.__name__):
            logging.getLogger(name).setLevel(logging.WARNING)
        self.world_rank = ray.train.get_context().get_world_rank()
        self.device = ray.train.torch.get_device()
        # Where a resumed run's checkpoint is copied; deleted with the context when the loop ends.
        self._resume_dir: tempfile.TemporaryDirectory[str] | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        prepared: nn.Module = self._torch.prepare_model(model)
        return prepared

    def prepare_loader(self, loader: DataLoader[Batch], *, distributed: bool) -> DataLoader[Batch]:
        prepared: DataLoader[Batch] = self._torch.prepare_data_loader(
            loader, add_dist_sampler=distributed, move_to_device=False
        )
        return prepared

    def latest_checkpoint(self) -> Path | None:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            return None
        # Copy out: the checkpoint may live on remote storage (s3://, gs://).
        self._resume_dir = tempfile.TemporaryDirectory(prefix="cityserve-resume-")
        return Path(ckpt.to_directory(self._resume_dir.name))

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        ckpt = self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt)


class PlainContext:
    """One plain PyTorch process: keeps the best epoch's model directory and the metric history."""

    world_rank = 0

    def __init__(self, domain: Domain, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.domain = domain
        self.history: list[dict[str, float]] = []
        self.best_dir = Path(tempfile.mkdtemp(prefix="cityserve-plain-"))
        self._best: float | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader[Batch], *, distributed: bool) -> DataLoader[Batch]:
        return loader

    def latest_checkpoint(self) -> Path | None:
        return None

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        self.history.append(metrics)
        value = metrics[self.domain.metric]
        if checkpoint_dir is not None and is_better(value, self._best, self.domain.mode):
            self._best = value
            shutil.rmtree(self.best_dir)
            shutil.copytree(checkpoint_dir, self.best_dir)


def build_config(domain: Domain, profile: str, data_dir: Path, *, threads: int,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full run config: common defaults, the domain's profile, then explicit overrides."""
    return {
        **COMMON_DEFAULTS,
        **domain.default_config(profile),  # type: ignore[arg-type]
        **(overrides or {}),
        "domain": domain.name,
        "profile": profile,
        "data_dir": str(Path(data_dir).resolve()),
        "threads": threads,
    }


def fit_plain(domain: Domain, config: dict[str, Any], data_dir: Path, model_dir: Path,
              device: str = "cpu") -> list[dict[str, float]]:
    """Runs the training loop in this process without Ray; writes the best epoch to `model_dir`.

    Args:
        domain: which domain.
        config: hyperparameters (missing common keys take `COMMON_DEFAULTS`).
        data_dir: the data root (prepared already).
        model_dir: where the best epoch's model directory is written.
        device: "cpu" or "cuda".

    Returns:
        The metrics reported after each epoch.
    """
    full = {**COMMON_DEFAULTS, "threads": torch.get_num_threads(), **config,
            "domain": domain.name, "data_dir": str(Path(data_dir).resolve())}
    ctx = PlainContext(domain, device)
    try:
        run_loop(domain, full, ctx)
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.copytree(ctx.best_dir, model_dir)
    finally:
        shutil.rmtree(ctx.best_dir, ignore_errors=True)
    (Path(model_dir) / TRAIN_STATE).unlink(missing_ok=True)
    return ctx.history
