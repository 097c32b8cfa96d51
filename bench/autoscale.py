"""Autoscaling: a load step on one domain of a platform this script starts; seconds from load
start until an added replica is RUNNING (Serve routes to it from then on), and from load end
until it is gone; the median and the worst of `--rounds` steps (a platform team sizes for the
worst). Writes `bench/results/autoscale.json`
(the `autoscale` result schema).

    .venv/bin/python -m bench.autoscale [--domain energy] [--concurrency 96] [--rounds 5] [--port 8322]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from typing import Any

from bench import RESULTS, git_commit
from bench.serve_load import _drive, bench_platform
from cluster.serve import Platform, running
from core.io import write_json_atomic
from domains import DOMAINS, get_domain
from domains.base import request_example
from services.config import VERBS

ENVIRONMENT = "local"


def wait_for(predicate: Any, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.25)
    raise TimeoutError(f"not within {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--domain", default="energy", choices=sorted(DOMAINS))
    parser.add_argument("--concurrency", type=int, default=96, help="above 2x the target ongoing requests")
    parser.add_argument("--port", type=int, default=8322)
    parser.add_argument("--rounds", type=int, default=5, help="load steps; the figures are their median and worst")
    args = parser.parse_args()
    # The local serve config, which autoscales (the throughput bench pins one replica instead).
    with bench_platform([args.domain], args.port, environment=ENVIRONMENT) as (state, key):
        platform = Platform.load(state)
        assert platform is not None
        before = running(platform.dashboard_url, args.domain)
        body = json.dumps(request_example(get_domain(args.domain).request_model)).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        url = f"{platform.gateway_url}/v1/{args.domain}/{VERBS[args.domain]}"
        rounds = [step(platform.dashboard_url, args.domain, before, url, body, headers, args.concurrency)
                  for _ in range(args.rounds)]
    from services.config import build_config

    (app,) = build_config(ENVIRONMENT, domains=[args.domain])["applications"]
    dep = next(d for d in app["deployments"] if d["name"] == args.domain)
    result = {"commit": git_commit(), "domain": args.domain,
              "scale_up_s": round(statistics.median(r["scale_up_s"] for r in rounds), 2),
              "scale_down_s": round(statistics.median(r["scale_down_s"] for r in rounds), 2),
              "worst": {"scale_up_s": max(r["scale_up_s"] for r in rounds),
                        "scale_down_s": max(r["scale_down_s"] for r in rounds)},
              "config": {"autoscaling_config": dep["autoscaling_config"], "concurrency": args.concurrency,
                         "replicas_before": before},
              "rounds": rounds, "load_average": round(os.getloadavg()[0], 2)}
    write_json_atomic(RESULTS / "autoscale.json", result)
    print(json.dumps(result))


def step(dashboard_url: str, domain: str, before: int, url: str, body: bytes, headers: dict[str, str],
         concurrency: int) -> dict[str, Any]:
    """One load step: load until a replica is added (and 5 s more), then none until it is gone."""
    stop = threading.Event()
    load: dict[str, Any] = {}

    def drive() -> None:
        async def until_stopped() -> dict[str, Any]:
            tasks = [asyncio.create_task(_drive(url, body, headers, concurrency, 5.0))]
            while not stop.is_set():  # consecutive 5 s rounds keep the load on
                await tasks[-1]
                if not stop.is_set():
                    tasks.append(asyncio.create_task(_drive(url, body, headers, concurrency, 5.0)))
            return tasks[-1].result()

        load.update(asyncio.run(until_stopped()))

    thread = threading.Thread(target=drive)
    thread.start()
    try:
        up = wait_for(lambda: running(dashboard_url, domain) > before, 120)
        time.sleep(5)
    finally:
        stop.set()
        thread.join()
    down = wait_for(lambda: running(dashboard_url, domain) <= before, 300)
    row = {"scale_up_s": round(up, 2), "scale_down_s": round(down, 2), "load_errors_last_5s": load.get("errors")}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
