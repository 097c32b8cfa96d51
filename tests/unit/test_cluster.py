"""What every worker of our Ray jobs is told (the cluster's address, Train's start timeout), and how
the local platform's head is found running or not."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import serve
from cluster.local import OWN_PORTS, PRINT_PATCH, WORKER_START_TIMEOUT, _with_address, free_ports
from core.errors import ConfigError


def test_workers_learn_the_address_and_keep_the_callers_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_START_TIMEOUT[0], raising=False)
    monkeypatch.delenv(PRINT_PATCH[0], raising=False)
    kwargs = {"runtime_env": {"env_vars": {"A": "1"}, "pip": []}, "num_gpus": 0}
    env = _with_address(kwargs, "127.0.0.1:6380")
    assert env == {"pip": [], "env_vars": {"A": "1", "RAY_ADDRESS": "127.0.0.1:6380",
                                           WORKER_START_TIMEOUT[0]: WORKER_START_TIMEOUT[1],
                                           PRINT_PATCH[0]: PRINT_PATCH[1]}}
    assert kwargs == {"num_gpus": 0}  # runtime_env is passed once, not twice


def test_auto_is_not_an_address_and_a_set_timeout_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_START_TIMEOUT[0], "45")
    env = _with_address({}, "auto")["env_vars"]
    assert "RAY_ADDRESS" not in env and env[WORKER_START_TIMEOUT[0]] == "45"


def test_a_deploy_serve_gave_up_on_fails_at_once_with_serves_message(monkeypatch: pytest.MonkeyPatch) -> None:
    app = {"status": "DEPLOY_FAILED", "last_deployed_time_s": time.time(),
           "message": "energy has no production version; promote one with `cityserve models promote`"}
    monkeypatch.setattr(serve, "details", lambda url: {"applications": {"cityserve": app}})
    started = time.monotonic()
    with pytest.raises(ConfigError, match="failed to deploy: cityserve: energy has no production version"):
        serve.wait_deployed("http://127.0.0.1:1", since=time.time() - 5, timeout_s=600)
    assert time.monotonic() - started < 5


def test_free_ports_are_distinct_bindable_and_outside_rays_ranges() -> None:
    ports = free_ports(200)
    assert len(set(ports)) == 200 and all(p in OWN_PORTS for p in ports)
    assert all(19999 < p < 32768 for p in ports)  # Ray's workers below, the kernel's port-0 binds above
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))


def test_a_head_that_exited_is_not_alive_though_not_yet_reaped() -> None:
    # A foreground `serve up` is the head's parent: until it reaps the exited head, kill(pid, 0)
    # still finds the zombie, and `serve down` in another shell waited out its 60 s for it.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    platform = serve.Platform(child.pid, "", "", "", "", "local")
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child never exited"
        time.sleep(0.05)
    assert not platform.alive()
    assert not Path(f"/proc/{child.pid}").exists()  # reaped, not only reported dead
