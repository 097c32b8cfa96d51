"""The cluster the checks run on: a Ray head and two worker nodes on this machine (separate
raylets, as Ray's own multi-node tests start them with `ray.cluster_utils.Cluster`), and an
S3-compatible server (moto, in a process of its own) holding everything the checks store.

The head has no CPUs, as on a KubeRay head given `num-cpus: 0`: training workers, sweep trials
and model replicas can only run on the worker nodes, and what must stay on the head (Serve's
gateway, the admission actor and its SQLite ledger) asks for the head's own custom resource.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.local import free_port, free_ports
from cluster.serve import auth_headers
from core.errors import ConfigError
from core.storage import s3_endpoint

HEAD_RESOURCE = "cityserve_head"  # only the head has it: the gateway and the admission actor ask for it
REPLICA_SLOT = "cityserve_replica_slot"  # one per worker node: a model replica takes one
WORKER_CPUS = 2  # per worker node: a DDP run whose other node died fits on the one left
BUCKET = "cityserve-cluster"
# Test credentials only (moto accepts any); the AWS_* variables a developer may have set are hidden
# while the checks run, so nothing reaches AWS.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "cityserve-cluster-key", "AWS_SECRET_ACCESS_KEY": "cityserve-cluster-secret",
                  "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_server(root: Path) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 in a process of its own, and this process's AWS_* variables
    pointing at it (Ray nodes started afterwards inherit them, as each pod on Kubernetes gets them
    from a Secret); yields `s3://BUCKET`, the bucket made."""
    port = free_port()
    with open(root / "s3.log", "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", server, root / "s3.log")
        with s3_endpoint(f"http://127.0.0.1:{port}", S3_CREDENTIALS, BUCKET) as bucket:
            yield bucket
    finally:
        _stop(server)


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    """Returns once `url` answers anything over HTTP (401 included)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"{url} exited ({process.returncode}) before answering; see {log}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    raise ConfigError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class Worker:
    """Where one Ray Train worker ran: its rank, node (id and our label) and process."""

    rank: int
    node_id: str
    node: str
    pid: int


@dataclass(frozen=True)
class Attempt:
    """One attempt of a Ray Train run (a restart after a failure is a new one): its workers by rank,
    and when it started and ended (ns since the epoch; `end_ns` None while it runs)."""

    workers: list[Worker]
    start_ns: int
    end_ns: int | None

    @property
    def nodes(self) -> set[str]:
        return {w.node_id for w in self.workers}


@dataclass
class RayNodes:
    """The running cluster: the `Cluster` handle, the head's addresses, and a label per node id
    (`head`, `worker-1`, `worker-2`, then `worker-3`... for nodes added in place of killed ones)."""

    cluster: Any
    gcs_address: str
    dashboard_url: str
    worker_args: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def head_id(self) -> str:
        return str(self.cluster.head_node.node_id)

    @property
    def head_logs(self) -> Path:
        """The head's Ray log folder (Serve's under `serve/`)."""
        return Path(self.cluster.head_node.get_logs_dir_path())

    def worker_ids(self) -> list[str]:
        """The worker nodes alive now, oldest first."""
        alive = {str(n.node_id) for n in self.cluster.worker_nodes}
        return [i for i in self.labels if i in alive]

    def label(self, node_id: str) -> str:
        return self.labels.get(node_id, f"unknown:{node_id[:8]}")

    def add_worker(self) -> str:
        """Starts one more worker node (as the two first); returns its id once it has joined."""
        node = self.cluster.add_node(**self.worker_args)
        self.labels[str(node.node_id)] = f"worker-{sum(v.startswith('worker-') for v in self.labels.values()) + 1}"
        return str(node.node_id)

    def kill(self, node_id: str) -> dict[str, Any]:
        """Kills a worker node at once: SIGKILL to its raylet and the node's other processes, by PID
        (`Cluster.remove_node(allow_graceful=False)`); its workers die with the raylet. Returns what
        was killed."""
        import ray

        if node_id == self.head_id:
            raise ConfigError("the checks never kill the head: the driver and Serve's controller live there")
        node = next(n for n in self.cluster.worker_nodes if str(n.node_id) == node_id)
        raylet = node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        started = time.monotonic()
        self.cluster.remove_node(node, allow_graceful=False)
        return {"node": self.label(node_id), "node_id": node_id, "raylet_pid": raylet,
                "kill_s": round(time.monotonic() - started, 2)}

    def node_table(self) -> dict[str, str]:
        """label -> node id, for the figures."""
        return {label: node_id for node_id, label in self.labels.items()}

    def train_runs(self, prefix: str) -> dict[str, list[Attempt]]:
        """Every Ray Train run whose name starts with `prefix` (one run, or a sweep's trials), by
        name: its attempts, oldest first, and where each one's workers ran. From Train's own record,
        through the dashboard's Train API (what its Train page shows)."""
        request = urllib.request.Request(f"{self.dashboard_url}/api/train/v2/runs/v1", headers=auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                runs = json.loads(resp.read())["train_runs"]
        except urllib.error.HTTPError as exc:
            # Train makes its state actor with the cluster's first run: until then it has no runs
            if exc.code == 500 and b"Train state data is not available" in exc.read():
                return {}
            raise
        out: dict[str, list[Attempt]] = {}
        for run in runs:
            if not run["name"].startswith(prefix):
                continue
            for a in run["attempts"]:
                if a["workers"]:  # an attempt whose workers never started ran nowhere
                    workers = [Worker(int(w["world_rank"]), w["node_id"], self.label(w["node_id"]), int(w["pid"]))
                               for w in sorted(a["workers"], key=lambda w: int(w["world_rank"]))]
                    end = a.get("end_time_ns")
                    out.setdefault(run["name"], []).append(
                        Attempt(workers, int(a["start_time_ns"]), int(end) if end else None))
        return {name: sorted(tried, key=lambda a: a.start_ns) for name, tried in sorted(out.items())}

    def train_attempts(self, run_name: str) -> list[Attempt]:
        """`train_runs` of one run (empty while Train has not placed its workers yet)."""
        return self.train_runs(run_name).get(run_name, [])


@contextlib.contextmanager
def ray_nodes(root: Path, *, workers: int = 2) -> Iterator[RayNodes]:
    """A head (no CPUs, the dashboard on a free port) and `workers` worker nodes of WORKER_CPUS each,
    all bound to 127.0.0.1, with Ray's files under `root/ray`; removed afterwards.

    The nodes' processes inherit this process's environment: set what the cluster needs (token
    auth, Serve's settings, the S3 variables) before calling this. `Cluster` records its address in
    Ray's address file (`/tmp/ray/ray_current_cluster`, what a bare `ray.init()` joins); the file
    as it was is put back afterwards, so another cluster on the machine is found again."""
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    _ensure_token()
    address_file = Path(get_ray_address_file(None))
    address_file.parent.mkdir(parents=True, exist_ok=True)
    previous = address_file.read_text() if address_file.is_file() else None
    gcs_port, dashboard_port = free_ports(2)
    common = {"node_ip_address": "127.0.0.1", "temp_dir": str(root / "ray"), "dashboard_agent_listen_port": 0}
    head_args = {**common, "num_cpus": 0, "resources": {HEAD_RESOURCE: 1}, "gcs_server_port": gcs_port,
                 "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port}
    worker_args = {**common, "num_cpus": WORKER_CPUS, "resources": {REPLICA_SLOT: 1}}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    head: Any = cluster.head_node
    try:
        nodes = RayNodes(cluster, cluster.gcs_address, f"http://127.0.0.1:{dashboard_port}", worker_args,
                         {str(head.node_id): "head"})
        for _ in range(workers):
            nodes.add_worker()
        cluster.wait_for_nodes()
        _wait_dashboard(nodes.dashboard_url)
        yield nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if previous is not None and not address_file.exists():
            address_file.write_text(previous)


def _ensure_token() -> None:
    """Token auth stays on: `ray start` (and a Cluster's head) refuses to make the token itself."""
    if not auth_headers():
        ray = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray, "get-auth-token", "--generate"], check=True, capture_output=True,
                       env={**os.environ, "RAY_AUTH_MODE": "token"})


def _wait_dashboard(url: str, timeout_s: float = 120) -> None:
    """The head's dashboard answers (Serve's REST API and Train's state are behind it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"{url}/api/version", headers=auth_headers())
            urllib.request.urlopen(request, timeout=2).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise ConfigError(f"the head's dashboard {url} did not answer within {timeout_s:.0f} s")
