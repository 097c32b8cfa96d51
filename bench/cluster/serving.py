"""Serving on several nodes: a worker node, with one of the two model replicas, killed under load.

The serving app is deployed as `cityserve serve up` deploys it (the serve config through the
dashboard's REST API), with an overlay that places it: the gateway and the admission actor (its
SQLite ledger is on the head's disk) on the head, one energy replica on each worker node. The
registry the replicas load from is in the bucket.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import numpy as np

from bench.cluster import ClusterEnv, verdict
from bench.cluster.nodes import HEAD_RESOURCE, REPLICA_SLOT
from bench.load import per_second
from bench.reliability import Check, Target
from bench.reliability.serving import CLIENT_TIMEOUT_S, TIMEOUT_S, in_background, load
from cluster.local import free_port
from cluster.serve import Platform, details, stop_serve
from services.config import APP_NAME, GATEWAY, ServeOverlay
from training.workspace import Workspace

DOMAIN = "energy"
# One gateway replica and the admission actor on the head (no CPUs there: they take none), one
# model replica per worker node (each node has one REPLICA_SLOT), fixed counts: autoscaling would
# blur what the kill does. Replicas re-read the registry's stages every second.
OVERLAY = ServeOverlay(
    args={"ledger_resource": HEAD_RESOURCE},
    deployments={
        GATEWAY: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                  "ray_actor_options": {"num_cpus": 0, "resources": {HEAD_RESOURCE: 0.01}}},
        DOMAIN: {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2},
                 "ray_actor_options": {"num_cpus": 0.25, "resources": {REPLICA_SLOT: 1}},
                 "user_config": {"poll_s": 1}},
    })
# A timeout is the domain's timeout_s; the gateway starts its clock after parsing and admitting a
# request, so an answer may come that much later than timeout_s, never more.
TIMEOUT_MARGIN_S = 1.0


def _replicas(dashboard_url: str) -> dict[str, list[dict[str, Any]]]:
    """RUNNING replicas of each deployment of the app (Serve's own record, with their node ids)."""
    app = details(dashboard_url).get("applications", {}).get(APP_NAME, {})
    return {name: [r for r in d.get("replicas", []) if r.get("state") == "RUNNING"]
            for name, d in app.get("deployments", {}).items()}


def _wait_replicas(dashboard_url: str, count: int, timeout_s: float) -> float | None:
    """Seconds until the model deployment has `count` RUNNING replicas (None: not within the timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if len(_replicas(dashboard_url).get(DOMAIN, [])) >= count:
            return round(time.monotonic() - started, 1)
        time.sleep(1)
    return None


def _admission_nodes(env: ClusterEnv) -> list[str]:
    """Where the admission actor (and so the SQLite ledger it writes) runs: the head, by its resource."""
    from ray.util.state import list_actors

    actors = list_actors(address=env.nodes.gcs_address, detail=True,
                         filters=[("class_name", "=", "Admission"), ("state", "=", "ALIVE")])
    return sorted(env.nodes.label(a["node_id"]) for a in actors)


def _retries_logged(env: ClusterEnv) -> int:
    """Lines of the gateway replicas' logs (they run on the head) saying a model replica was lost and
    the call went to another (`services.gateway`)."""
    logs = env.nodes.head_logs / "serve"
    return sum(line.count("replica lost") for path in logs.glob(f"replica_{APP_NAME}_{GATEWAY}_*.log")
               for line in path.read_text(errors="replace").splitlines())


def check_serving_node_loss(env: ClusterEnv, short: bool = False) -> Check:
    """Closed-loop load on energy through the gateway (on the head), its two replicas on the two
    worker nodes; after `before` s one worker node is killed (its raylet and workers, by PID) with
    its replica. Then ≤ 1% of requests may fail, none may wait past the domain's timeout (10 s, +1 s
    for the gateway's own work before its clock starts; the client gives up at 15 s), and 3-s
    throughput must be back within 60 s of the kill to 90% of the pre-kill median scaled to the
    replicas left (1 of 2: what the remaining capacity can serve if each replica carried its share).
    Afterwards a fresh worker node joins and the missing replica must start on it. Full: 20 s before,
    90 s after, 16 clients; short: 10 s and 20 s, 8 clients (its recovery time recorded, not judged)."""
    from bench.reliability.__main__ import ensure_production
    from services.platform import platform_up, serve_config

    name = "serving_node_loss"
    before, after, concurrency = (10, 20, 8) if short else (20, 90, 16)
    settings = env.settings
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    registry = Workspace.from_settings(settings).registry
    versions = registry.versions(DOMAIN)
    if versions and not registry.stages(DOMAIN).get("production"):  # an earlier check's, in the bucket
        registry.promote(DOMAIN, versions[-1].version)
    ensure_production(settings, [DOMAIN])  # else a smoke version, trained on the cluster
    port = free_port()
    gcs = env.nodes.gcs_address
    platform = Platform(os.getpid(), gcs, env.nodes.dashboard_url, f"http://127.0.0.1:{port}", "", "local")
    platform.save(settings.state_dir)  # our own process stands in for `ray start`'s
    problems: list[str] = []
    figures: dict[str, Any] = {"domain": DOMAIN, "concurrency": concurrency, "before_s": before, "after_s": after,
                               "nodes": env.nodes.node_table(), "registry_uri": settings.registry_location()}
    try:
        deploy_started = time.monotonic()
        platform_up(settings, serve_config(Workspace.from_settings(settings), "local", [DOMAIN], port, OVERLAY),
                    num_cpus=0, timeout_s=600)
        figures["deploy_s"] = round(time.monotonic() - deploy_started, 1)
        placed = _replicas(env.nodes.dashboard_url)
        models = placed.get(DOMAIN, [])
        figures["replicas_before"] = {DOMAIN: sorted(env.nodes.label(r["node_id"]) for r in models),
                                      GATEWAY: sorted(env.nodes.label(r["node_id"]) for r in placed.get(GATEWAY, []))}
        figures["admission_actor"] = _admission_nodes(env)
        spread = {r["node_id"] for r in models}
        if len(models) != 2 or spread != set(env.nodes.worker_ids()):
            problems.append(f"the replicas ran on {figures['replicas_before']}, not one on each worker node")
            return verdict(name, figures, problems, short)
        if figures["replicas_before"][GATEWAY] != ["head"] or figures["admission_actor"] != ["head"]:
            problems.append(f"the gateway ({figures['replicas_before'][GATEWAY]}) or the admission actor "
                            f"({figures['admission_actor']}) is not on the head")
        target = Target(platform.gateway_url, platform.dashboard_url, gcs, settings, os.getpid())
        _, key = target.tenant(name, [DOMAIN])

        # [1] load; the kill after `before` s
        start = time.monotonic()
        thread, out = in_background(lambda: load(target, DOMAIN, key, concurrency=concurrency,
                                                 until=start + before + after))
        time.sleep(max(0.0, start + before - time.monotonic()))
        victim = models[0]["node_id"]
        figures["killed"] = {**env.nodes.kill(victim), "at_s": round(time.monotonic() - start, 1)}
        thread.join(before + after + CLIENT_TIMEOUT_S + 30)
        sent = out[0] if out else []
        figures["replicas_after"] = sorted(env.nodes.label(r["node_id"])
                                           for r in _replicas(env.nodes.dashboard_url).get(DOMAIN, []))

        # [2] failures, the slowest answer, recovery
        series = per_second(sent, start, before + after)
        baseline = statistics.median(series[2:before])  # the first seconds warm connections up
        share = len(figures["replicas_after"]) / len(models)
        recovered = next((t for t in range(after - 2)
                          if np.mean(series[before + t:before + t + 3]) >= 0.9 * baseline * share), None)
        failed = [s for s in sent if s.status != 200]
        slowest = max((s.end - s.start for s in sent), default=0.0)
        figures.update(
            requests=len(sent), failed=len(failed), failed_pct=round(100 * len(failed) / max(1, len(sent)), 3),
            failed_statuses=sorted({s.status for s in failed}),
            failed_errors=sorted({s.error for s in failed if s.error}),
            slowest_s=round(slowest, 2), timeout_s=TIMEOUT_S, client_timeout_s=CLIENT_TIMEOUT_S,
            hung=sum(s.error == "timeout" for s in sent), baseline_rps=baseline, capacity_share_left=share,
            recovered_s=recovered, rps_last_15s_vs_baseline=round(float(np.mean(series[-15:])) / baseline, 3)
            if baseline else None, per_second=series)
        # The calls the gateway had in flight at the dead replica, which it sent again to the other
        # (its log says so): none would mean the kill was never in a request's way.
        figures["gateway_retried_model_calls"] = _retries_logged(env)
        if figures["failed_pct"] > 1:
            problems.append(f"{figures['failed_pct']}% of requests failed (limit 1%)")
        if figures["hung"] or slowest > TIMEOUT_S + TIMEOUT_MARGIN_S:
            problems.append(f"the slowest request took {slowest:.1f} s (timeout {TIMEOUT_S:g} s); "
                            f"{figures['hung']} unanswered after {CLIENT_TIMEOUT_S:g} s")
        if len(figures["replicas_after"]) != 1 or victim in {r["node_id"] for r in
                                                             _replicas(env.nodes.dashboard_url).get(DOMAIN, [])}:
            problems.append(f"after the kill the replicas run on {figures['replicas_after']}")
        timing = ([f"throughput not back to 90% of {baseline}/s x {share:g} within 60 s of the kill"]
                  if recovered is None or recovered > 60 else [])

        # [3] a fresh worker node: Serve starts the missing replica on it
        joined = time.monotonic()
        figures["replacement_node"] = env.nodes.label(env.nodes.add_worker())
        figures["replica_back_s_after_node_joined"] = _wait_replicas(env.nodes.dashboard_url, 2, 180)
        if figures["replica_back_s_after_node_joined"] is None:
            problems.append("no second replica within 180 s of a fresh worker node joining")
        figures["replica_back_total_s"] = round(time.monotonic() - joined, 1)
        return verdict(name, figures, problems, short, timing)
    finally:
        stop_serve(env.nodes.dashboard_url)
        (settings.state_dir / "platform.json").unlink(missing_ok=True)
