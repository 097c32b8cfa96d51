"""Serving throughput, per domain, in one run: (a) the model in-process on batches of 64 items —
the limit; (b) the same model behind one plain FastAPI/uvicorn process — what a user would pick
instead; (c) the full gateway path (auth, quotas, metering on) of a platform this script starts.

The three get the same compute for the model: the production version with the same backend
(`auto`: the int8 ONNX artifact of a text model on the CPU) and the same thread count, and the
platform runs the `fixed` serve overlay, one replica per model deployment, so (c) cannot win by
scaling out. Every cell (concurrency 1/16/64 × 1/16 items per request) runs the same aiohttp
client for the same time against (b) and (c), which never run at the same time. Latency
percentiles are of answered (200) requests; other answers are counted apart, with their own.
Also records the idle platform's resident memory (all four domains, gateway, Ray). Writes
`bench/results/serve_load.json` (the `serve_load` result schema; every row carries the commit)
and prints each row with its ratios.

    .venv/bin/python -m bench.serve_load [--domain D ...] [--seconds 10] [--port 8321]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform as host
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI

from bench import RESULTS, git_commit
from bench.load import hammer, summary, tree_rss_gb
from cluster.local import free_port
from core.io import write_json_atomic
from core.settings import get_settings
from domains import DOMAINS, get_domain
from domains.base import Predictor, request_example
from services.config import VERBS

CONCURRENCY = (1, 16, 64)
ITEMS = (1, 16)
THREADS = 1  # base.yaml's torch_threads for every domain
IN_PROCESS_BATCH = 64
ENVIRONMENT = "fixed"  # helm/serve/fixed.yaml: one replica per model deployment


def production_predictor(domain: str) -> Predictor:
    """The domain's production model with torch on the replicas' thread count."""
    import torch

    from training.registry import Registry

    torch.set_num_threads(THREADS)
    return Registry(get_settings().registry_location()).load_predictor(get_domain(domain))


def in_process_rates(domain: str, seconds: float) -> tuple[list[float], str]:
    """Items/s of `predict` on batches of `IN_PROCESS_BATCH` items, one figure per round (at least
    3), and the backend that computed them."""
    dom = get_domain(domain)
    predictor = production_predictor(domain)
    batch = [dom.request_model.model_validate(request_example(dom.request_model))] * IN_PROCESS_BATCH
    predictor.predict(batch)  # warm-up
    rates: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(rates) < 3:
        start = time.perf_counter()
        predictor.predict(batch)
        rates.append(IN_PROCESS_BATCH / (time.perf_counter() - start))
    return rates, predictor.backend


async def _drive(url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float) -> dict[str, Any]:
    await hammer(url, body, headers, concurrency=concurrency, until=time.monotonic() + 1.0)  # warm-up
    started = time.monotonic()
    sent = await hammer(url, body, headers, concurrency=concurrency, until=started + seconds)
    return summary(sent, time.monotonic() - started)


def drive(url: str, domain: str, items: int, concurrency: int, seconds: float, key: str = "") -> dict[str, Any]:
    example = request_example(get_domain(domain).request_model)
    body = json.dumps(example if items == 1 else [example] * items).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    result = asyncio.run(_drive(url, body, headers, concurrency, seconds))
    result["items_per_s"] = result["requests_per_s"] * items
    return result


# ---- (b): one plain FastAPI + uvicorn process -------------------------------------------------
def plain_app(domain: str) -> Any:
    """What a user would write: validate, call the model per request (FastAPI's thread pool)."""
    predictor = production_predictor(domain)
    app = FastAPI()
    model = get_domain(domain).request_model

    @app.post("/predict")
    def predict(body: Annotated[Any, Body()]) -> Any:  # one item or a list, like the gateway
        items = [model.model_validate(i) for i in (body if isinstance(body, list) else [body])]
        out = [a.model_dump(mode="json") for a in predictor.predict(items)]
        return out if isinstance(body, list) else out[0]

    return app


def _wait_http(url: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def plain_rates(domain: str, seconds: float) -> dict[tuple[int, int], dict[str, Any]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.serve_load", "--plain-server", domain, "--port", str(port)],
                            env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    try:
        _wait_http(f"http://127.0.0.1:{port}/docs", 120)
        return {(c, n): drive(f"http://127.0.0.1:{port}/predict", domain, n, c, seconds)
                for c in CONCURRENCY for n in ITEMS}
    finally:
        proc.terminate()
        proc.wait(30)


# ---- (c): the platform -------------------------------------------------------------------------
def cityserve(*args: str, env: dict[str, str]) -> str:
    return subprocess.run([str(Path(sys.executable).with_name("cityserve")), *args], env=env, check=True,
                          capture_output=True, text=True).stdout


def platform_rss_gb(state: Path) -> float:
    """Resident memory of the platform: the Ray head process and everything it started."""
    from cluster.serve import Platform

    platform = Platform.load(state)
    if platform is None:
        raise RuntimeError("the platform is not running")
    return tree_rss_gb(platform.pid, with_root=True)


@contextlib.contextmanager
def bench_platform(domains: list[str], port: int, environment: str = ENVIRONMENT) -> Iterator[tuple[Path, str]]:
    """A platform of the benchmark's own (state and ledger in a temporary folder) serving
    `domains` with the serve config of `environment`, and the key of a tenant whose quotas never
    bind (it works at once: the admission actor re-reads tenants on an unknown key); stopped
    afterwards."""
    state = Path(tempfile.mkdtemp(prefix="cityserve-bench-"))
    env = {**os.environ, "CITYSERVE_STATE_DIR": str(state), "CITYSERVE_LEDGER_URL": f"sqlite:///{state}/ledger.db"}
    cityserve("serve", "up", "--detach", f"--env={environment}", f"--port={port}", *[f"--domain={d}" for d in domains],
              env=env)
    try:
        key = cityserve("tenants", "create", "bench", *[f"--grant={d}" for d in domains],
                        "--requests-per-minute=10000000", "--items-per-minute=100000000", "--max-concurrent=1000",
                        env=env).strip().splitlines()[-1]
        yield state, key
    finally:
        cityserve("serve", "down", env=env)


def gateway_rates(domains: list[str], seconds: float, port: int,
                  idle: dict[str, float]) -> dict[str, dict[tuple[int, int], dict[str, Any]]]:
    with bench_platform(domains, port) as (state, key):
        time.sleep(10)  # settled: replicas loaded, nothing in flight
        idle["idle_rss_gb"] = round(platform_rss_gb(state), 2)
        url = f"http://127.0.0.1:{port}"
        return {d: {(c, n): drive(f"{url}/v1/{d}/{VERBS[d]}", d, n, c, seconds, key)
                    for c in CONCURRENCY for n in ITEMS} for d in domains}


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", action="append", choices=sorted(DOMAINS))
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell, after a 1 s warm-up")
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--plain-server", metavar="DOMAIN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        import uvicorn

        uvicorn.run(plain_app(args.plain_server), host="127.0.0.1", port=args.port, log_level="warning")
        return
    domains = args.domain or sorted(DOMAINS)
    commit = git_commit()
    measured = {d: in_process_rates(d, args.seconds) for d in domains}
    rounds = {d: rates for d, (rates, _) in measured.items()}
    backends = {d: backend for d, (_, backend) in measured.items()}
    limit = {d: statistics.median(r) for d, r in rounds.items()}
    plain = {d: plain_rates(d, args.seconds) for d in domains}
    idle: dict[str, float] = {}
    gateway = gateway_rates(domains, args.seconds, args.port, idle)
    rows = []
    for d in domains:
        for c in CONCURRENCY:
            for n in ITEMS:
                b, g = plain[d][(c, n)], gateway[d][(c, n)]
                row = {"domain": d, "concurrency": c, "items_per_request": n, "commit": commit,
                       "in_process_items_per_s": round(limit[d], 1),
                       "in_process_items_per_s_spread": [round(min(rounds[d]), 1), round(max(rounds[d]), 1)],
                       "in_process_batch": IN_PROCESS_BATCH, "backend": backends[d],
                       "uvicorn_items_per_s": round(b["items_per_s"], 1),
                       "uvicorn_p50_ms": rounded(b["p50_ms"]), "uvicorn_p99_ms": rounded(b["p99_ms"]),
                       "uvicorn_errors": int(b["errors"]),
                       "gateway_items_per_s": round(g["items_per_s"], 1),
                       "gateway_p50_ms": rounded(g["p50_ms"]), "gateway_p99_ms": rounded(g["p99_ms"]),
                       "errors": int(g["errors"]), "gateway_error_p99_ms": rounded(g["error_p99_ms"]),
                       "uvicorn_error_p99_ms": rounded(b["error_p99_ms"]),
                       "gateway_vs_in_process": round(g["items_per_s"] / limit[d], 3),
                       "gateway_vs_uvicorn": round(g["items_per_s"] / max(b["items_per_s"], 1e-9), 3)}
                rows.append(row)
                print(json.dumps(row))
    result = {"commit": commit, "device": f"cpu: {os.cpu_count()} cores ({host.processor() or host.machine()})",
              "environment": ENVIRONMENT,
              "load_average": round(os.getloadavg()[0], 2), "torch_threads": THREADS,
              "seconds_per_cell": args.seconds, **idle, "rows": rows}
    write_json_atomic(RESULTS / "serve_load.json", result)


if __name__ == "__main__":
    main()
