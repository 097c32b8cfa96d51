"""What the serving tests share: the app they deploy on the session's Ray cluster, and plain HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from cluster.local import free_port
from cluster.serve import Platform, stop_serve
from domains import get_domain
from services.config import ServeOverlay
from services.platform import platform_up, serve_config
from services.tenants import KeyEntry, new_key
from training.trainer import train
from training.workspace import Workspace

SERVED = ("energy", "events", "traffic")
# Two gateway replicas; one replica per model, no autoscaling: the cluster has 2 CPUs. Replicas
# re-read the registry's stages every second, not every 10.
TEST_OVERLAY = ServeOverlay(deployments={
    "Gateway": {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}, "ray_actor_options": {"num_cpus": 0.2}},
    **{d: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.2},
           "user_config": {"poll_s": 1}} for d in SERVED}})
GRID_KEY = new_key()[0]  # the key of the tenants file's tenant, which the file lists by id and digest
GRID = {"name": "grid", "grants": ["energy"], "requests_per_minute": 1000, "items_per_minute": 10_000,
        "max_concurrent": 8, "keys": [KeyEntry.of(GRID_KEY).model_dump(exclude_none=True)]}


def write_tenants(path: Path, *tenants: dict[str, Any]) -> None:
    """Replaced, not edited in place: how Kubernetes updates a mounted Secret."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"tenants": list(tenants)}))
    os.replace(tmp, path)


def ensure_versions(workspace: Workspace, domain: str, count: int) -> list[str]:
    """At least `count` versions (training and sweeping tests leave some; train smoke runs for the rest)."""
    while len(workspace.registry.versions(domain)) < count:
        train(get_domain(domain), workspace, profile="smoke", num_workers=1, cpus_per_worker=1)
    return [v.version for v in workspace.registry.versions(domain)]


def http(method: str, url: str, body: Any = None, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    """(status, headers with lower-case names, JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read())


@contextlib.contextmanager
def session_app(workspace: Workspace, *overlays: ServeOverlay) -> Iterator[Platform]:
    """The SERVED app deployed on the session cluster with `overlays`; deleted afterwards."""
    import ray

    node = ray._private.worker.global_worker.node
    assert node is not None, "the session's Ray cluster is not running"
    port = free_port()
    record = Platform(os.getpid(), node.gcs_address, f"http://{node.webui_url}", f"http://127.0.0.1:{port}", "",
                      "local")
    state = workspace.settings.state_dir
    record.save(state)  # our own process stands in for `ray start`'s
    platform_up(workspace.settings, serve_config(workspace, "local", SERVED, port, *overlays), num_cpus=2,
                timeout_s=600)
    try:
        yield record
    finally:
        stop_serve(record.dashboard_url)
        (state / "platform.json").unlink()


