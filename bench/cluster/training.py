"""Training on several nodes: the bucket as the only store the nodes share, DDP across two nodes
against one worker, a worker node lost mid-epoch, and a sweep whose trials spread over the nodes.

Every run here keeps its checkpoints in the bucket (`storage_path` is an `s3://` URI) and
registers into the registry there; where each Train worker ran comes from Train's own record
of the run (`RayNodes.train_runs`), never from where it was asked to run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from bench.cluster import ClusterEnv, verdict
from bench.cluster.nodes import Attempt
from bench.reliability import Check
from bench.reliability.training_faults import SNAPSHOT
from bench.reliability.training_faults import _Background as Background
from core.storage import Location
from domains import get_domain
from training.workspace import Workspace


def _files(where: Location) -> int:
    """Objects under a folder of the bucket."""
    infos = where.fs.get_file_info(pafs.FileSelector(where.path, recursive=True, allow_not_found=True))
    return sum(info.type == pafs.FileType.File for info in infos)


def _keep_every_epoch(trainer: Any) -> Any:
    """Keeps every epoch's checkpoint (the runs here are small), so that the run's result holds the
    metrics of every epoch (Train V2's `metrics_dataframe` has those of the kept checkpoints only)."""
    from ray.train import CheckpointConfig

    trainer.run_config.checkpoint_config = CheckpointConfig(num_to_keep=None)
    return trainer


def _history(result: Any) -> list[dict[str, Any]]:
    """Every epoch's reported metrics, in epoch order."""
    rows = [metrics for _, metrics in result.best_checkpoints or []]
    return sorted(rows, key=lambda m: int(m["epoch"]))


# ---- object_store --------------------------------------------------------------------------------
OBJECT_DOMAIN = "energy"  # a smoke run takes seconds


def check_object_store(env: ClusterEnv, short: bool = False) -> Check:
    """What one node makes, another finds in the bucket: a Train run's worker (on a worker node: the
    head has no CPUs) writes its checkpoints there; the driver, on the head, registers the best one
    from there into the registry there and writes the evaluation report and figure there; then a
    task on the *other* worker node loads that version from the registry in the bucket and answers
    the domain's documented example. The one thing the nodes still read from a local path is the
    training data (`training_data`; every node of this one machine sees it). Same size short and
    full (a smoke run)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from training.evaluate import evaluate
    from training.trainer import make_trainer, register_result

    name = "object_store"
    settings = env.settings
    domain = get_domain(OBJECT_DOMAIN)
    workspace = Workspace.from_settings(settings)
    storage, registry = Location.of(settings.storage_uri()), Location.of(settings.registry_location())
    reports = Location.of(settings.reports_dir)
    problems: list[str] = []
    figures: dict[str, Any] = {"bucket": env.bucket, "s3_endpoint": os.environ.get("AWS_ENDPOINT_URL"),
                               "domain": OBJECT_DOMAIN, "nodes": env.nodes.node_table(),
                               "registry_uri": str(registry), "storage_path": str(storage), "reports": str(reports)}

    # [1] a Train run checkpoints into the bucket; the driver registers its best epoch from there
    trainer, manifest = make_trainer(domain, settings, profile="smoke", num_workers=1, cpus_per_worker=1)
    result = trainer.fit()
    version = register_result(domain, workspace, result, manifest, trainer.train_loop_config)
    attempts = env.nodes.train_attempts(trainer.run_config.name)
    trained_on = attempts[-1].workers[0].node_id if attempts else ""
    checkpoint = str(version.record["lineage"]["checkpoint"])
    version_dir = registry.join(OBJECT_DOMAIN, version.version)
    figures.update(train_run=trainer.run_config.name, trained_on=env.nodes.label(trained_on), checkpoint=checkpoint,
                   registered=version.version, version_files=sorted(i.base_name for i in version_dir.children()))
    if trained_on not in env.nodes.worker_ids():
        problems.append(f"the Train worker ran on {env.nodes.label(trained_on)}, not on a worker node")
    if not checkpoint.startswith(f"{storage}/{trainer.run_config.name}/checkpoint_"):
        problems.append(f"the registered checkpoint {checkpoint} is not in the run's folder in the bucket")
    if not figures["version_files"]:
        problems.append(f"no files under {version_dir}")

    # [2] the evaluation report and its figure go to the bucket
    evaluate(domain, workspace, version.version)
    report = json.loads(reports.join(f"{OBJECT_DOMAIN}.json").read_bytes())
    figure = reports.join(f"{OBJECT_DOMAIN}.png")
    figures.update(report_version=report["version"], report_metrics=len(report["metrics"]),
                   report_figure_bytes=len(figure.read_bytes()) if figure.is_file() else 0)
    if report["version"] != version.version or not figures["report_figure_bytes"]:
        problems.append(f"the report in the bucket is of {report['version']} (want {version.version}), figure "
                        f"{figures['report_figure_bytes']} bytes")

    # [3] a task on the other worker node loads the version from the bucket and answers
    def load_and_answer(registry_uri: str, domain_name: str, ref: str) -> dict[str, Any]:
        import ray

        from domains import get_domain
        from domains.base import request_example
        from training.registry import Registry

        served = get_domain(domain_name)
        predictor = Registry(registry_uri).load_predictor(served, ref)
        [answer] = predictor.predict([served.request_model.model_validate(request_example(served.request_model))])
        return {"node_id": ray.get_runtime_context().get_node_id(), "version": predictor.version,
                "answer": answer.model_dump(mode="json")}

    other = next((n for n in env.nodes.worker_ids() if n != trained_on), env.nodes.worker_ids()[0])
    loaded = ray.get(ray.remote(load_and_answer).options(
        num_cpus=0.5, scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False),
    ).remote(str(registry), OBJECT_DOMAIN, version.version), timeout=300)
    domain.response_model.model_validate(loaded["answer"])  # raises: a check that raises failed
    figures.update(loaded_on=env.nodes.label(loaded["node_id"]), loaded_version=loaded["version"])
    if loaded["node_id"] != other or loaded["node_id"] == trained_on or loaded["version"] != version.version:
        problems.append(f"the version was loaded on {figures['loaded_on']} as {loaded['version']}; want "
                        f"{version.version} on the worker node that did not train it")

    # [4] what the bucket holds, and nothing under a local folder named after a URI
    figures["objects"] = {"registry": _files(registry), "ray_results": _files(storage), "reports": _files(reports)}
    figures["local_s3_folder"] = Path("s3:").exists()
    empty = [area for area, count in figures["objects"].items() if not count]
    if empty or figures["local_s3_folder"]:
        problems.append(f"empty in the bucket: {empty}; a local 's3:' folder: {figures['local_s3_folder']}")
    # What the bucket does not hold: the training data, read from a local path that every node of
    # this one machine sees (on separate hosts it comes with the image or a volume on each node).
    figures["training_data"] = str(Path(trainer.train_loop_config["data_dir"]))
    return verdict(name, figures, problems, short)


# ---- ddp_across_nodes ----------------------------------------------------------------------------
DDP_DOMAIN = "events"
# How far, relative, the DDP run's per-epoch losses (training and validation) may lie from the
# one-worker run's. Not zero: the two see each epoch's samples in another order (Ray gives a
# 2-worker run a DistributedSampler, a 1-worker run keeps the DataLoader's own shuffle) and draw
# other dropout masks, so they take different steps; the DDP run's training loss is also rank 0's,
# the mean over its half of each global batch. Both runs are deterministic (a rerun repeats each
# curve to 5 decimals), so the tolerance is not there for flakiness but must admit that noise
# (measured: up to 5% at full size; a one-worker run with another seed, which also draws another
# initial head, lies up to 11% away) and refuse a run whose global batch is wrong (one worker with
# half or twice the batch on the same data lies 27-81% away): 10% sits between.
DDP_TOLERANCE = 0.10
LOSSES = ("train_loss", "val_loss")


def _ddp_sizes(short: bool) -> tuple[str, int, dict[str, Any]]:
    """(profile, global batch, overrides). Short: the smoke corpus, 64 training reports, 3 epochs of
    4 steps. Full: the generated corpus, 960 reports (max 32 tokens), 3 epochs of 30 steps."""
    if short:
        return "smoke", 16, {"epochs": 3, "train_limit": 64, "patience": 3}
    return "quick", 32, {"epochs": 3, "train_limit": 960, "max_len": 32, "patience": 3}


def _max_rel_diff(a: list[float], b: list[float]) -> float | None:
    """The largest relative difference of `a` from `b`, epoch by epoch (None: not comparable)."""
    if len(a) != len(b) or not a:
        return None
    return round(max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)), 5)


def check_ddp_across_nodes(env: ClusterEnv, short: bool = False) -> Check:
    """`train events --num-workers 2` with SPREAD placement: its two DDP workers must run on the two
    worker nodes (Train's record of the run), its checkpoints go to the bucket, and its per-epoch
    training and validation loss must match one worker with the same global batch (2 workers x B/2
    against 1 worker x B, same seed) within DDP_TOLERANCE. At full size a second one-worker run
    (seed 1) shows, beside, how far two runs differing only in their random draws lie apart. The
    one-worker runs train beside the DDP run once its workers are placed."""
    from training.trainer import make_trainer

    name = "ddp_across_nodes"
    domain = get_domain(DDP_DOMAIN)
    profile, batch, overrides = _ddp_sizes(short)
    problems: list[str] = []

    def trainer(workers: int, seed: int, **options: Any) -> Any:
        made, _ = make_trainer(domain, env.settings, profile=profile, num_workers=workers, cpus_per_worker=1,
                               overrides={**overrides, "batch_size": batch // workers, "seed": seed}, **options)
        return _keep_every_epoch(made)

    # The DDP run is placed first, on an idle cluster: SPREAD is a preference, and with one node
    # already filled by the one-worker runs Ray would put both its workers on the other.
    ddp = trainer(2, 0, placement_strategy="SPREAD")
    ddp_run = ddp.run_config.name
    runs = {"ddp": Background(ddp.fit)}
    deadline = time.monotonic() + 600
    while not env.nodes.train_attempts(ddp_run) and time.monotonic() < deadline:
        time.sleep(0.5)
    # The seed-1 run only informs the tolerance (the file's `seed_max_rel_diff`): not in a short run.
    seeds = {"one_worker": 0} if short else {"one_worker": 0, "one_worker_seed1": 1}
    runs.update({label: Background(trainer(1, seed).fit) for label, seed in seeds.items()})
    results = {label: run.result(3600) for label, run in runs.items()}
    curves = {label: {key: [round(float(m[key]), 5) for m in _history(r)] for key in (*LOSSES, domain.metric)}
              for label, r in results.items()}
    attempts = env.nodes.train_attempts(ddp_run)
    placed = attempts[-1].workers if attempts else []
    diff = {key: _max_rel_diff(curves["ddp"][key], curves["one_worker"][key]) for key in LOSSES}
    figures: dict[str, Any] = {
        "domain": DDP_DOMAIN, "profile": profile, "epochs": overrides["epochs"],
        "train_limit": overrides["train_limit"], "global_batch": batch,
        "per_worker_batch": {"ddp": batch // 2, "one_worker": batch},
        "nodes": env.nodes.node_table(), "run": ddp_run, "storage": f"{env.settings.storage_uri()}/{ddp_run}",
        "ddp_workers": [{"rank": w.rank, "node": w.node, "node_id": w.node_id, "pid": w.pid} for w in placed],
        "ddp_attempts": len(attempts), "curves": curves, "tolerance_rel": DDP_TOLERANCE,
        "max_rel_diff": diff,
    }
    if "one_worker_seed1" in curves:
        figures["seed_max_rel_diff"] = {key: _max_rel_diff(curves["one_worker_seed1"][key], curves["one_worker"][key])
                                        for key in LOSSES}
    on = {w.node_id for w in placed}
    if len(placed) != 2 or len(on) != 2 or not on <= set(env.nodes.worker_ids()):
        problems.append(f"the DDP workers ran on {[w.node for w in placed]}, not on two different worker nodes")
    if not str(results["ddp"].path).startswith(Location.of(env.settings.storage_uri()).path):
        problems.append(f"the DDP run's storage {results['ddp'].path} is not in the bucket")
    lengths = {label: len(c["val_loss"]) for label, c in curves.items()}
    if set(lengths.values()) != {overrides["epochs"]}:
        problems.append(f"not every run trained {overrides['epochs']} epochs: {lengths}")
    far = {key: d for key, d in diff.items() if d is None or d > DDP_TOLERANCE}
    if far:
        problems.append(f"DDP's loss curves lie up to {far} (relative) from one worker's; tolerance {DDP_TOLERANCE}")
    return verdict(name, figures, problems, short)


# ---- training_node_loss --------------------------------------------------------------------------
KILL_DOMAIN = "traffic"  # as the single-node `train_worker_kill` reliability check


def _latest_epoch(run: Location) -> int:
    """The epoch of the run's latest checkpoint that Train has registered (0: none yet), from Train's
    record in the bucket (what `train_worker_kill` reads from a local folder)."""
    try:
        latest = json.loads(run.join(SNAPSHOT).read_bytes())["latest_checkpoint_result"]
    except (OSError, json.JSONDecodeError):  # none yet, or caught mid-write: the next poll sees
        return 0
    return int(latest["metrics"]["epoch"]) if latest else 0


def check_training_node_loss(env: ClusterEnv, short: bool = False) -> Check:
    """A DDP run (traffic, 2 workers, SPREAD: one per worker node) loses a whole worker node, its
    raylet and workers killed by PID, in the epoch after its `kill_after`-th checkpoint (the
    approach of the single-node `train_worker_kill` check, with a node instead of a process). The
    run must restart its worker group on the nodes left (none on the dead one), resume from that
    checkpoint or a later one, and finish every epoch. Full: 12 epochs, kill after the 5th
    checkpoint; short: 6 epochs, after the 2nd. A fresh worker node replaces the dead one afterwards."""
    from training.trainer import make_trainer

    name = "training_node_loss"
    epochs, kill_after = (6, 2) if short else (12, 5)
    domain = get_domain(KILL_DOMAIN)
    problems: list[str] = []
    trainer, _ = make_trainer(domain, env.settings, profile="smoke", num_workers=2, cpus_per_worker=1, epochs=epochs,
                              overrides={"patience": epochs}, placement_strategy="SPREAD")
    run_name = trainer.run_config.name
    run_dir = Location.of(env.settings.storage_uri()).join(run_name)
    figures: dict[str, Any] = {"domain": KILL_DOMAIN, "epochs": epochs, "kill_after_checkpoint": kill_after,
                               "nodes": env.nodes.node_table(), "run": run_name, "storage": str(run_dir)}

    # [1] start it and see where its workers run; once Train has registered the `kill_after`-th
    # checkpoint the next epoch is under way: kill the node of rank 0 (the rank that writes checkpoints)
    run = Background(trainer.fit)
    deadline = time.monotonic() + 900
    first: list[Any] = []
    while not first and time.monotonic() < deadline:
        time.sleep(0.5)
        placed = env.nodes.train_attempts(run_name)
        first = placed[-1].workers if placed else []
    while _latest_epoch(run_dir) < kill_after and time.monotonic() < deadline:
        time.sleep(0.1)
    at_kill = _latest_epoch(run_dir)
    figures["checkpoint_epoch_at_kill"] = at_kill
    figures["workers_before"] = [{"rank": w.rank, "node": w.node, "pid": w.pid} for w in first]
    victim, killed_at = None, 0.0
    if at_kill < kill_after or at_kill >= epochs or len({w.node_id for w in first}) != 2:
        problems.append(f"no node to kill mid-run: checkpoint epoch {at_kill} of {epochs}, workers on "
                        f"{[w.node for w in first]}")
    else:
        victim = first[0].node_id
        figures["killed"] = env.nodes.kill(victim)
        killed_at = time.monotonic()
        # Train registers a checkpoint a moment after rank 0 reports it: one reported just before the
        # kill may still count (the run then resumes after that one)
        figures["checkpoint_epoch_just_after_kill"] = _latest_epoch(run_dir)

    # [2] the run ends (or fails); where each attempt's workers ran
    try:
        result = run.result(1800)
    except Exception as exc:  # a check reports what broke, whatever it is
        problems.append(f"the run failed: {type(exc).__name__}: {str(exc)[-600:]}")
        result = None
    if victim is not None:
        figures["run_s_after_kill"] = round(time.monotonic() - killed_at, 1)
    attempts = env.nodes.train_attempts(run_name)
    figures["attempts"] = [[{"rank": w.rank, "node": w.node, "pid": w.pid} for w in a.workers] for a in attempts]
    if result is not None:
        end = result.metrics or {}
        figures.update(resumed=bool(end.get("resumed")), resumed_after_epoch=int(end.get("resumed_after_epoch", 0)),
                       final_epoch=int(end.get("epoch", 0)), final_metric={domain.metric: end.get(domain.metric)})
        if not end.get("resumed") or not at_kill <= int(end.get("resumed_after_epoch", 0)) < epochs:
            problems.append(f"the run resumed after epoch {end.get('resumed_after_epoch')}, not from its checkpoint "
                            f"at the kill (epoch {at_kill}) or a later one")
        if int(end.get("epoch", 0)) != epochs:
            problems.append(f"the run ended at epoch {end.get('epoch')} of {epochs}")
    if victim is not None:
        last = attempts[-1].workers if attempts else []
        if len(attempts) < 2 or any(w.node_id == victim for w in last) or len(last) != 2:
            problems.append(f"no restarted worker group away from the dead node: attempts {figures['attempts']}")

    # [3] capacity back for the checks after this one
    started = time.monotonic()
    figures["replacement_node"] = env.nodes.label(env.nodes.add_worker())
    figures["replacement_join_s"] = round(time.monotonic() - started, 1)
    return verdict(name, figures, problems, short)


# ---- tune_across_nodes ---------------------------------------------------------------------------
TUNE_DOMAIN = "energy"  # smoke epochs take about a second
# A trial's Train worker takes 1.5 of a worker node's 2 CPUs: two trials at once cannot share a node,
# so whenever two run they run on both worker nodes (the trials' drivers take 0.05 each).
TRIAL_CPUS = 1.5


def check_tune_across_nodes(env: ClusterEnv, short: bool = False) -> Check:
    """A sweep (random search, two trials at a time) whose trials' Train runs spread over both worker
    nodes (Train's record of each trial's run) and none on the head; its results (every trial's
    checkpoints, the trials table, the figure) in the bucket, read back from there; the best trial's
    best epoch registered from its checkpoint in the bucket. Short: 2 trials; full: 6."""
    import pandas as pd

    from training.tune import FIGURE_FILE, TRIALS_FILE, SweepOptions, sweep

    name = "tune_across_nodes"
    samples = 2 if short else 6
    domain = get_domain(TUNE_DOMAIN)
    workspace = Workspace.from_settings(env.settings)
    options = SweepOptions(num_samples=samples, scheduler="fifo", search="random", max_concurrent=2,
                           cpus_per_trial=TRIAL_CPUS, profile="smoke")
    problems: list[str] = []
    sweep_id, trials, version = sweep(domain, workspace, options)
    runs = env.nodes.train_runs(f"{sweep_id}-")
    out = Location.of(env.settings.storage_uri()).join(sweep_id)
    with out.join(TRIALS_FILE).reading() as path:
        stored = pd.read_parquet(path)
    placed = {run.removeprefix(f"{sweep_id}-"): sorted({w.node for a in attempts for w in a.workers})
              for run, attempts in runs.items()}
    used = {n for attempts in runs.values() for a in attempts for n in a.nodes}
    figures: dict[str, Any] = {
        "domain": TUNE_DOMAIN, "trials": samples, "max_concurrent": 2, "cpus_per_trial": TRIAL_CPUS,
        "nodes": env.nodes.node_table(), "sweep_id": sweep_id, "results": str(out),
        "trial_nodes": placed, "nodes_used": sorted(env.nodes.label(n) for n in used),
        "overlapping_on_two_nodes": _overlapped([a for attempts in runs.values() for a in attempts]),
        "trials_table_in_bucket": len(stored), "figure_in_bucket": out.join(FIGURE_FILE).is_file(),
        "objects_in_sweep_folder": _files(out),
        "registered": version.version if version else None,
        "registered_checkpoint": version.record["lineage"]["checkpoint"] if version else None,
        "best": {domain.metric: version.metrics.get(domain.metric) if version else None},
    }
    errors = trials["error"].notna().sum() if len(trials) else 0
    if len(trials) != samples or errors:
        problems.append(f"{len(trials)} of {samples} trials reported, {errors} with an error")
    if len(runs) != samples:
        problems.append(f"Train recorded {len(runs)} trial runs of {samples}")
    if used != set(env.nodes.worker_ids()):
        problems.append(f"the trials ran on {figures['nodes_used']}, not on both worker nodes alone")
    if sorted(stored["trial_id"]) != sorted(trials["trial_id"]) or not figures["figure_in_bucket"]:
        problems.append("the trials table or the figure in the bucket is not the sweep's")
    if version is None or version.record["lineage"].get("sweep") != sweep_id or \
            not str(version.record["lineage"]["checkpoint"]).startswith(f"{out}-"):
        problems.append(f"no version registered from the sweep's checkpoints in the bucket: "
                        f"{figures['registered_checkpoint']}")
    return verdict(name, figures, problems, short)


def _overlapped(attempts: list[Attempt]) -> bool:
    """Whether two trials' Train runs trained at the same time on different nodes."""
    now = time.time_ns()
    return any(a.start_ns < (b.end_ns or now) and b.start_ns < (a.end_ns or now) and a.nodes != b.nodes
               for i, a in enumerate(attempts) for b in attempts[i + 1:])
