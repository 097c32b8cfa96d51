"""Shutdown mid-load: SIGTERM to a running `cityserve serve up`, restart it, and count usage rows
against what the clients were answered — every admitted request exactly one row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.load import Sent
from bench.reliability import Check, Target, command
from bench.reliability.serving import CLIENT_TIMEOUT_S, load
from cluster.local import free_port
from cluster.serve import wait_ready
from core.errors import ConfigError
from core.settings import Settings

NAME = "shutdown_durability"
# Statuses the gateway answers only after admitting a request (a lease taken, a row due). A 503
# may come before admission (admission actor away) or after (overloaded): it is matched either way.
ADMITTED_ONLY = {200, 504}


def check_shutdown_durability(settings: Settings, short: bool = False) -> Check:
    """A platform of its own (state and ledger in a temporary folder, models from `settings`'
    registry) serving energy under 16 clients; SIGTERM after `load_s`; restarted; then every
    answer the clients got is matched with the ledger by request id."""
    state = Path(tempfile.mkdtemp(prefix="cityserve-durability-"))
    env = {**os.environ, "CITYSERVE_STATE_DIR": str(state), "CITYSERVE_LEDGER_URL": f"sqlite:///{state}/ledger.db",
           "CITYSERVE_REGISTRY_URI": settings.registry_location()}
    own = Settings(state_dir=state, ledger_url=env["CITYSERVE_LEDGER_URL"], registry_uri=env["CITYSERVE_REGISTRY_URI"])
    port = free_port()
    cli = [str(Path(sys.executable).with_name("cityserve")), "serve", "up", f"--port={port}", "--domain=energy",
           "--num-cpus=2"]
    log = open(state / "serve-up.log", "ab")  # noqa: SIM115 - closed below, after the process ends
    target = Target(f"http://127.0.0.1:{port}", "", "", own, os.getpid())
    load_s = 6 if short else 20
    figures: dict[str, object] = {"load_s_before_sigterm": load_s}
    problems: list[str] = []
    try:
        proc = subprocess.Popen(cli, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while proc.poll() is None:  # `serve up` prints "ready" and stays; it exits only if it failed
            try:
                wait_ready(target.gateway_url, 5)
                break
            except ConfigError:
                if time.monotonic() > deadline:
                    proc.send_signal(signal.SIGTERM)
                    raise
        if proc.poll() is not None:
            raise ConfigError(f"`serve up` exited {proc.returncode} before serving; see {state / 'serve-up.log'}")
        _, key = target.tenant("durability", ["energy"])
        start = time.monotonic()
        out: list[list[Sent]] = []
        thread = threading.Thread(target=lambda: out.append(load(target, "energy", key, concurrency=16,
                                                                 until=start + load_s + 5)))
        thread.start()
        time.sleep(load_s)
        os.kill(proc.pid, signal.SIGTERM)
        termed = time.monotonic()
        proc.wait(timeout=300)
        figures["shutdown_s"] = round(time.monotonic() - termed, 1)
        figures["exit_code"] = proc.returncode
        thread.join(CLIENT_TIMEOUT_S + 10)
        sent = out[0] if out else []

        restarted = time.monotonic()
        subprocess.run([*cli, "--detach"], env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=900)
        figures["restart_s"] = round(time.monotonic() - restarted, 1)
        store = target.store()
        rows = store.usage()
        store.close()
    finally:
        subprocess.run([*cli[:2], "down"], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
        log.close()
    answered = {s.request_id: s.status for s in sent if s.status}
    per_id = Counter(r.request_id for r in rows)
    row_status = {r.request_id: r.status for r in rows}
    ok = [rid for rid, status in answered.items() if status in ADMITTED_ONLY]
    figures.update({
        "requests": len(sent), "answered": len(answered), "answered_200": sum(v == 200 for v in answered.values()),
        "not_answered": len(sent) - len(answered), "ledger_rows": len(rows),
        "duplicate_rows": sum(n - 1 for n in per_id.values() if n > 1),
        "admitted_without_row": sum(per_id[rid] != 1 for rid in ok),
        "rows_status_mismatch": sum(row_status[rid] != status for rid, status in answered.items() if rid in row_status),
        "rows_without_answer": sum(rid not in answered for rid in per_id),
    })
    for field, what in (("duplicate_rows", "duplicate usage rows"), ("admitted_without_row", "admitted requests "
                        "without exactly one row"), ("rows_status_mismatch", "rows whose status differs from the "
                        "answer"), ("rows_without_answer", "rows of requests whose answer never arrived")):
        if figures[field]:
            problems.append(f"{figures[field]} {what}")
    if figures.get("exit_code") != 0:
        problems.append(f"`serve up` exited {figures.get('exit_code')} on SIGTERM")
    return Check(NAME, not problems, figures, command(NAME), problems)

