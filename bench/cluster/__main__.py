"""`make cluster`: the multi-node checks, full size, on one cluster this script starts.

    .venv/bin/python -m bench.cluster [--only NAME ...] [--short] [--json-out FILE]

Starts an S3 server (moto) and a Ray cluster of a head and two worker nodes on this machine,
runs each check on them (everything stored goes to the bucket), and writes
`bench/results/cluster.json`, replacing only the checks run. `--short` runs the versions
`make test` runs: printed (and written to `--json-out`), never saved over the full-size figures.
Exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.cluster import CHECKS, RESULT_FILE, RUNNER, ClusterEnv, document, save
from bench.reliability import Check, timed_check
from cluster.local import LOOPBACK_ENV

# What the cluster's processes must have in their environment before the nodes start (they
# inherit it): the token auth this process talks to them with, loopback-only nodes, and Train's
# record of each run (where its workers ran, what `RayNodes.train_runs` reads).
CLUSTER_ENV = {"RAY_AUTH_MODE": "token", "RAY_TRAIN_ENABLE_STATE_TRACKING": "1", **LOOPBACK_ENV}


def checks() -> dict[str, Callable[[ClusterEnv, bool], Check]]:
    from bench.cluster import serving, training

    return {"object_store": training.check_object_store, "ddp_across_nodes": training.check_ddp_across_nodes,
            "tune_across_nodes": training.check_tune_across_nodes, "serving_node_loss": serving.check_serving_node_loss,
            "training_node_loss": training.check_training_node_loss}


def run(names: list[str], short: bool) -> list[Check]:
    """Starts the S3 server and the cluster, runs the checks `names` in CHECKS' order, stops both."""
    from cluster.serve import serve_env

    # Serve's settings (and HAProxy's ports) for the nodes' processes, as `serve up` gives its head
    os.environ.update({**serve_env(), **CLUSTER_ENV})
    # Short: the socket paths under it must stay within the kernel's 107 characters.
    root = Path(tempfile.mkdtemp(prefix="cs-cluster-"))
    results: list[Check] = []
    try:
        _run_on_cluster(root, names, short, results)
    finally:
        # Ray's logs and the S3 server's stay for a look when something failed
        if results and all(c.passed for c in results) and len(results) == len(names):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept in {root}", flush=True)
    return results


def _run_on_cluster(root: Path, names: list[str], short: bool, results: list[Check]) -> None:
    """Runs the checks on a cluster and S3 server under `root`, appending each outcome to `results`
    as it comes (a check that takes the run down still leaves those before it)."""
    from bench.cluster.nodes import ray_nodes, s3_server
    from cluster.local import connect
    from core.settings import get_settings

    started = time.monotonic()
    with s3_server(root) as bucket_root, ray_nodes(root) as nodes:
        bucket = f"{bucket_root}/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        state = root / "state"  # the head's own disk: the platform record, the SQLite ledger
        settings = get_settings().model_copy(update={
            "registry_uri": f"{bucket}/registry", "storage_path": f"{bucket}/ray_results",
            "reports_dir": f"{bucket}/reports", "ray_address": nodes.gcs_address, "ray_temp_dir": None,
            "state_dir": state, "ledger_url": f"sqlite:///{state}/ledger.db"})
        connect(settings)  # every worker of this job gets RAY_ADDRESS and the S3 variables
        _same_node_as_head(nodes.head_id)
        print(json.dumps({"cluster": nodes.node_table(), "bucket": bucket,
                          "up_s": round(time.monotonic() - started, 1)}), flush=True)
        env = ClusterEnv(nodes, settings, bucket)
        every = checks()
        for name in CHECKS:
            if name in names:
                results.append(timed_check(name, partial(every[name], env, short), runner=RUNNER,
                                           save=None if short else save))


def _same_node_as_head(head_id: str) -> None:
    """The driver must sit on the head: the checks kill worker nodes, never the driver's."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    if here != head_id:
        raise RuntimeError(f"the driver joined node {here}, not the head {head_id}")


def _stop_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM ends the run as Ctrl-C would: through the `finally`s that stop the nodes and the S3
    server (Python's default for SIGTERM skips them and leaves the nodes' processes behind)."""
    raise SystemExit(128 + signum)


def main() -> None:
    # Before ray is imported: it reads these when imported (token auth, loopback-only nodes).
    os.environ.update(CLUSTER_ENV)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS), metavar="NAME",
                        help=f"checks to run, of {', '.join(CHECKS)}")
    parser.add_argument("--short", action="store_true", help="the short versions `make test` runs (not saved)")
    parser.add_argument("--json-out", type=Path, help="also write this run's checks here, as cluster.json has them")
    args = parser.parse_args()
    started = time.monotonic()
    results = run(args.only, args.short)
    if args.json_out:
        args.json_out.write_text(json.dumps(document(results), indent=2) + "\n")
    if args.short:
        print(json.dumps(document(results)))
    print(f"{sum(c.passed for c in results)}/{len(results)} passed in {time.monotonic() - started:.0f} s"
          + ("" if args.short else f"; {RESULT_FILE}"), flush=True)
    sys.exit(0 if all(c.passed for c in results) else 1)


if __name__ == "__main__":
    main()
