"""The GPU proof's plumbing on the CPU: `python -m bench.gpu --cpu-smoke` runs every step (prepare,
the platform serving events with its device set, Ray Train against plain PyTorch, a sweep whose
trials all run at once) at tiny sizes and writes a schema-valid result file where it is told,
never bench/results/gpu.json.

It runs as a subprocess with clusters of its own: the session's cluster is not touched, the gateway's
port is chosen here, and neither RAY_ADDRESS nor a CITYSERVE_* setting of this session reaches it
(each of its steps pins its own cluster's address: RAY_NOTES trap 16). It builds the encoder with
random weights from the packaged config, as the GPU machine must (`--random-encoder-from`).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from bench.gpu import CHECKS, DEFAULT_OUT, ENCODER_PACKAGE, cpu_smoke_sizes
from cluster.local import free_ports

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO.parent / "shared" / "schemas" / "gpu.schema.json"
# ~3 minutes on 2 quiet cores (4.5 beside another job's cluster); the script's own step timeouts
# come first, so a hung step is a failed check in the results, not a killed run.
LIMIT_S = cpu_smoke_sizes().budget_s + 120

pytestmark = pytest.mark.slow


def test_the_gpu_proof_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    before = DEFAULT_OUT.read_bytes() if DEFAULT_OUT.is_file() else None
    (port,) = free_ports(1)
    encoder = Path(str(importlib.resources.files(ENCODER_PACKAGE) / "model"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("CITYSERVE_")}
    started = time.monotonic()
    # A process group of its own: if it ever outlives LIMIT_S, its steps and their Ray clusters go too.
    proc = subprocess.Popen([sys.executable, "-m", "bench.gpu", "--cpu-smoke", "--out", str(out),
                             "--work", str(tmp_path / "work"), "--port", str(port), "--random-encoder-from",
                             str(encoder)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    wall = time.monotonic() - started
    printed = [json.loads(line) for line in output.splitlines() if line.startswith('{"step"')]
    assert proc.returncode == 0, "\n".join([*map(json.dumps, printed), output[-4000:]])
    doc = json.loads(out.read_text())
    if SCHEMA.is_file():
        jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert doc["mode"] == "cpu-smoke" and doc["commit"] and doc["device"].startswith("cpu only")
    assert doc["encoder"].startswith("random weights")
    checks = {c["name"]: c for c in doc["checks"]}
    assert sorted(checks) == sorted(CHECKS.values())
    for check in checks.values():
        assert "error" not in check["figures"], (check["name"], check["figures"])
        assert check["command"] == "python -m bench.gpu --cpu-smoke"
    # Each step printed its line as it ended, and the file says what the lines said.
    assert [p["step"] for p in printed] == ["prepare", "serving", "training", "sweep"]
    assert [p["figures"] for p in printed[1:]] == [c["figures"] for c in doc["checks"]]

    serving = checks["gpu_serving"]["figures"]
    assert serving["errors"] == 0 and serving["gateway_items_per_s"] > 0 and serving["in_process_items_per_s"] > 0
    assert serving["replica"]["device"] == "cpu" and serving["in_process_dtype"] == "float32"
    assert serving["version"] == doc["prepare"]["version"]  # the platform served the version prepared
    assert serving["ratio"] == pytest.approx(serving["gateway_items_per_s"] / serving["in_process_items_per_s"],
                                             rel=0.01)

    training = checks["gpu_training"]["figures"]
    assert training["pairs"] == 2 and training["order"] == ["plain first", "ray first"]
    assert len(training["plain_runs"]) == len(training["ray_runs"]) == 2
    assert min(training["plain_runs"] + training["ray_runs"]) > 0

    sweep, trials = checks["gpu_sweep"]["figures"], cpu_smoke_sizes().sweep_trials
    assert len(sweep["trials"]) == trials and not any(t["error"] for t in sweep["trials"])
    assert all(t["end_s"] > t["start_s"] >= 0 for t in sweep["trials"])
    # All trials allowed at once on 2 CPUs (0.45 each): they all ran together, and it says so.
    assert sweep["max_running"] == trials and sweep["all_together_s"] > 1 and checks["gpu_sweep"]["passed"]

    assert (DEFAULT_OUT.read_bytes() if DEFAULT_OUT.is_file() else None) == before  # never overwritten
    steps = ", ".join(f"{p['step']} {p['figures']['step_wall_s']:.0f} s" for p in printed)
    print(f"bench.gpu --cpu-smoke: {wall:.0f} s ({steps}; load average {os.getloadavg()[0]:.1f})")


def test_the_cpu_smoke_run_refuses_to_write_the_gpu_results() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--cpu-smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--cpu-smoke needs --out" in done.stderr
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--cpu-smoke", "--out", str(DEFAULT_OUT)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--cpu-smoke needs --out" in done.stderr
