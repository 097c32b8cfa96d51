"""The local Ray cluster: join the configured one, or start one of our own bound to 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from typing import Any

from core.errors import ConfigError
from core.settings import Settings

# `--node-ip-address=127.0.0.1` is not enough: Ray swaps a loopback node address for the machine's
# reachable one, and its agents and client server then listen there, its GCS and raylet on every
# interface. This switch (meant for single-machine clusters on macOS/Windows) keeps the node on
# 127.0.0.1, so every Ray port listens on loopback only (checked: bench/reliability, `exposure`).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def loopback_replica_grpc() -> None:
    """On a loopback-only platform, binds each Serve replica's gRPC server on 127.0.0.1.

    Serve starts it on every interface (`[::]:0`, hard-coded in Ray 2.60, no setting) for calls
    between deployments; its callers reach it at the node's address, 127.0.0.1 here. Patched in
    the replica's process (our deployments' modules call this on import, before Serve starts the
    server); the `exposure` reliability check fails if a Ray upgrade moves it. Leaves a cluster of
    several nodes (Kubernetes) alone: there other nodes call in.
    """
    if any(os.environ.get(k) != v for k, v in LOOPBACK_ENV.items()):
        return
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback", False):
        return

    def loopback(server: Any, address: str) -> Any:
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    loopback.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


# The ports we choose for a platform's listeners (GCS, dashboard, HAProxy's pages, the gateway)
# come from between Ray's worker range (10002-19999) and the kernel's ephemeral range (32768 up),
# where every port-0 bind of Ray's lands: chosen and released, one cannot be taken by those before
# its owner binds it. Picked from the ephemeral range, a port released by one free_port() call can
# be handed out again by the next, so two listeners would be given one port.
OWN_PORTS = range(20000, 32768)


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (each held until all are found)."""
    chosen: list[int] = []
    with contextlib.ExitStack() as held:
        for port in random.sample(OWN_PORTS, len(OWN_PORTS)):
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
            chosen.append(port)
            if len(chosen) == n:
                return chosen
    raise ConfigError(f"fewer than {n} free ports on 127.0.0.1 in {OWN_PORTS.start}-{OWN_PORTS.stop - 1}")


def free_port() -> int:
    return free_ports(1)[0]


def connect(settings: Settings, *, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Initialises Ray once per process.

    `ray.init()` without an address attaches to whatever cluster it finds on the machine (possibly
    someone else's), so say what we mean: the configured address, or `"local"` for our own.
    """
    import ray

    if ray.is_initialized():
        return
    # Training output from workers reaches this driver; keep Ray's own progress bars quiet.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray's own actors find their cluster through the state API, which without RAY_ADDRESS guesses
    # from the machine's processes and gives up when two clusters run (tests beside `make run`).
    # Train's PlacementGroupCleaner then dies, so a trial stopped by ASHA leaks its workers' CPUs
    # and the next trials wait forever. So every worker of our jobs is told the address.
    if settings.ray_address:
        ray.init(address=settings.ray_address,
                 runtime_env=with_storage_env(_with_address(kwargs, settings.ray_address)), **kwargs)
        return
    temp = str(settings.ray_temp_dir.resolve()) if settings.ray_temp_dir else None
    port = free_port()  # our own cluster's address must be known before it starts
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    # Read by the cluster's processes as they start; this process read it when it imported ray.
    os.environ.update(LOOPBACK_ENV)
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", _temp_dir=temp,
                 runtime_env=with_storage_env(_with_address(kwargs, f"127.0.0.1:{port}")), **kwargs)
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


# Train gives a worker group 60 s to start, then fails the attempt; on a small busy machine starting
# one (a process importing torch) can take longer than that during a sweep. A set value is kept.
WORKER_START_TIMEOUT = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
# Train routes a worker's print() to its logger and also to the (wrapped) stdout Ray forwards, so
# each progress line reached the terminal twice; without the patch it is printed once, as written.
PRINT_PATCH = ("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def _with_address(kwargs: dict[str, Any], address: str) -> dict[str, Any]:
    """The caller's runtime_env (popped from kwargs) plus RAY_ADDRESS ("auto" already means "guess"),
    Train's worker start timeout and its print patch off, for every worker of this job."""
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    env = {**runtime_env.get("env_vars", {})}
    if address != "auto":
        env["RAY_ADDRESS"] = address
    for name, default in (WORKER_START_TIMEOUT, PRINT_PATCH):
        env.setdefault(name, os.environ.get(name, default))
    runtime_env["env_vars"] = env
    return runtime_env


# Object storage (registry, Train/Tune storage, reports, batch files on s3://) is reached with the
# endpoint and credentials in these variables; workers on other nodes have only what the job gives them.
STORAGE_ENV_PREFIX = "AWS_"
SETUP_HOOK = "worker_process_setup_hook"


def with_storage_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """`runtime_env` plus a worker setup hook that gives every worker of the job this process's AWS_*
    variables, so workers on any node reach object storage as this driver does (a variable the
    caller put in `env_vars` is left to it).

    Not as `env_vars`: Ray logs a job's env_vars in full (`runtime_env_agent.log` on every node),
    and these hold a secret key. The hook is stored in the cluster (GCS), not written to a log.
    """
    given = runtime_env.get("env_vars", {})
    values = {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIX) and k not in given}
    if not values:
        return runtime_env
    previous = runtime_env.get(SETUP_HOOK)
    if previous is not None and not callable(previous):
        raise ConfigError(f"runtime_env {SETUP_HOOK} must be a function to run beside the storage settings",
                          field=SETUP_HOOK)

    def set_storage_env() -> None:
        os.environ.update(values)
        if previous is not None:
            previous()

    return {**runtime_env, SETUP_HOOK: set_storage_env}
