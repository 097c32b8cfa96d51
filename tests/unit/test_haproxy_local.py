"""`cluster/haproxy-local`, the HAProxy the local platform runs: the config Ray wrote narrowed
before the real binary starts, and never a wrapper that runs itself (what a `serve up` started
from a test session's environment did: its HAProxy never came up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.serve import HAPROXY_WRAPPER, serve_env

CONFIG = """frontend stats
    bind *:8404
frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
defaults
    errorfile 502 /tmp/x/500.http
    errorfile 503 /tmp/x/500.http
    errorfile 504 /tmp/x/500.http
"""


def run_wrapper(config: Path, binary: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HAPROXY_WRAPPER), "-db", "-f", str(config)], capture_output=True, text=True,
                          timeout=30, env={**os.environ, "CITYSERVE_HAPROXY": str(binary)})


def test_binds_go_to_loopback_and_error_pages_to_our_json_503(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    fake = tmp_path / "haproxy"  # stands in for the binary: says what it was started with
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint(sys.argv[1:])\n")
    fake.chmod(0o755)
    out = run_wrapper(config, fake)
    assert out.returncode == 0 and out.stdout.strip() == str(["-db", "-f", str(config)])
    text = config.read_text()
    assert "bind 127.0.0.1:8404" in text and "bind 127.0.0.1:9101" in text and "bind 127.0.0.1:8000" in text
    page = tmp_path / "cityserve-503.http"
    assert text.count("errorfile 50") == 3 and text.count(str(page)) == 3 and "500.http" not in text
    head, body = page.read_bytes().decode().split("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503") and "Retry-After: 1" in head and f"Content-Length: {len(body)}" in head


def test_a_wrapper_named_as_the_binary_refuses_to_run_itself(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    out = run_wrapper(config, HAPROXY_WRAPPER)
    assert out.returncode == 2 and "names this wrapper" in out.stderr


def test_an_environment_already_pointing_at_the_wrapper_still_gives_the_real_binary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = serve_env()["CITYSERVE_HAPROXY"]
    assert Path(real).name == "haproxy" and real != str(HAPROXY_WRAPPER)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(HAPROXY_WRAPPER))  # as in a test session's children
    monkeypatch.setenv("CITYSERVE_HAPROXY", real)
    assert serve_env()["CITYSERVE_HAPROXY"] == real
