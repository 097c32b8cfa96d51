"""Shutdown mid-load: SIGTERM to a running `cityserve serve up`, restart it, and count usage rows
against what the clients were answered — every admitted request exactly one row."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from bench.load import Sent
from bench.reliability import Check, Target, command
from bench.reliability.serving import CLIENT_TIMEOUT_S, in_background, load
from cluster.local import free_port
from cluster.serve import wait_ready
from core.errors import ConfigError
from core.settings import Settings

NAME = "shutdown_durability"
# Statuses the gateway answers only after admitting a request (a lease taken, a row due). A 503
# may come before admission (admission actor away) or after (overloaded): it is matched either way.
ADMITTED_ONLY = {200, 504}


@dataclass
class OwnPlatform:
    """A `cityserve serve up` of a check's own, serving energy: its target, command line,
    environment, log and process (the foreground `serve up`, ready)."""

    target: Target
    cli: list[str]
    env: dict[str, str]
    log: BinaryIO
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def own_platform(settings: Settings, prefix: str, ledger_url: str | None = None) -> Iterator[OwnPlatform]:
    """Starts a platform of its own (state and, unless given, an SQLite ledger in a temporary
    folder; models from `settings`' registry) and stops it when the block ends."""
    state = Path(tempfile.mkdtemp(prefix=f"cityserve-{prefix}-"))
    ledger_url = ledger_url or f"sqlite:///{state}/ledger.db"
    env = {**os.environ, "CITYSERVE_STATE_DIR": str(state), "CITYSERVE_LEDGER_URL": ledger_url,
           "CITYSERVE_REGISTRY_URI": settings.registry_location()}
    own = Settings(state_dir=state, ledger_url=ledger_url, registry_uri=env["CITYSERVE_REGISTRY_URI"])
    port = free_port()
    cli = [str(Path(sys.executable).with_name("cityserve")), "serve", "up", f"--port={port}", "--domain=energy",
           "--num-cpus=2"]
    log = open(state / "serve-up.log", "ab")  # noqa: SIM115 - closed below, after the process ends
    target = Target(f"http://127.0.0.1:{port}", "", "", own, os.getpid())
    proc = None
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
        yield OwnPlatform(target, cli, env, log, proc)
    finally:
        subprocess.run([*cli[:2], "down"], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
        if proc is not None:  # the foreground `serve up` ends once its head is gone; none is left behind
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def match_ledger(sent: list[Sent], rows: list[Any]) -> tuple[dict[str, int], list[str]]:
    """Every answer the clients got matched with the ledger's rows by request id: figures, and
    what is wrong (an admitted request without exactly one row, a row without an answer...)."""
    answered = {s.request_id: s.status for s in sent if s.status}
    per_id = Counter(r.request_id for r in rows)
    row_status = {r.request_id: r.status for r in rows}
    ok = [rid for rid, status in answered.items() if status in ADMITTED_ONLY]
    figures = {
        "requests": len(sent), "answered": len(answered), "answered_200": sum(v == 200 for v in answered.values()),
        "not_answered": len(sent) - len(answered), "ledger_rows": len(rows),
        "duplicate_rows": sum(n - 1 for n in per_id.values() if n > 1),
        "admitted_without_row": sum(per_id[rid] != 1 for rid in ok),
        "rows_status_mismatch": sum(row_status[rid] != status for rid, status in answered.items() if rid in row_status),
        "rows_without_answer": sum(rid not in answered for rid in per_id),
    }
    problems = [f"{figures[field]} {what}" for field, what in (
        ("duplicate_rows", "duplicate usage rows"),
        ("admitted_without_row", "admitted requests without exactly one row"),
        ("rows_status_mismatch", "rows whose status differs from the answer"),
        ("rows_without_answer", "rows of requests whose answer never arrived")) if figures[field]]
    return figures, problems


def check_shutdown_durability(settings: Settings, short: bool = False) -> Check:
    """A platform of its own serving energy under 16 clients; SIGTERM after `load_s`; restarted;
    then every answer the clients got is matched with the ledger by request id."""
    load_s = 6 if short else 20
    figures: dict[str, Any] = {"load_s_before_sigterm": load_s}
    with own_platform(settings, "durability") as platform:
        target, proc = platform.target, platform.proc
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
        subprocess.run([*platform.cli, "--detach"], env=platform.env, stdout=platform.log,
                       stderr=subprocess.STDOUT, check=True, timeout=900)
        figures["restart_s"] = round(time.monotonic() - restarted, 1)
        store = target.store()
        rows = store.usage()
        store.close()
    matched, problems = match_ledger(sent, rows)
    figures.update(matched)
    if figures.get("exit_code") != 0:
        problems.append(f"`serve up` exited {figures.get('exit_code')} on SIGTERM")
    return Check(NAME, not problems, figures, command(NAME), problems)



OUTAGE = "ledger_outage"
# During the outage a tenant already known is admitted from the tenants read last; only keys never
# seen get 503. Its requests may see 503 (with Retry-After) for at most this long in all.
OUTAGE_503_S = 5
OUTAGE_LEDGER_ENV = "CITYSERVE_OUTAGE_LEDGER_URL"


def check_ledger_outage(settings: Settings, short: bool = False) -> Check:
    """A platform of its own whose ledger is a real PostgreSQL server (pgserver runs the postgres
    binaries), serving energy to 8 clients; the server is stopped for `down_s` and started again.
    The tenant keeps being answered (503 with Retry-After for at most OUTAGE_503_S seconds in all),
    and afterwards every admitted request has exactly one usage row: the rows written while the
    server was down wait on the admission actor's disk and reach the ledger once it is back."""
    import pgserver

    before_s, down_s, after_s = (5, 8, 10) if short else (15, 30, 30)
    figures: dict[str, Any] = {"before_s": before_s, "down_s": down_s, "after_s": after_s}
    folder = Path(tempfile.mkdtemp(prefix="cityserve-pg-"))
    server = pgserver.get_server(folder, cleanup_mode="stop")
    uri = server.get_uri()
    # The URL reaches the platform (and this process's store) through the environment, as a
    # Secret's would on Kubernetes.
    os.environ[OUTAGE_LEDGER_ENV] = uri
    try:
        with own_platform(settings, "ledger-outage", f"env:{OUTAGE_LEDGER_ENV}") as platform:
            target = platform.target
            name, key = target.tenant("outage", ["energy"])
            start = time.monotonic()
            thread, out = in_background(lambda: load(target, "energy", key, concurrency=8,
                                                     until=start + before_s + down_s + after_s))
            time.sleep(before_s)
            server.cleanup()  # pg_ctl stop: connections are cut, as in a server restart
            stopped = time.monotonic()
            time.sleep(down_s)
            server = pgserver.get_server(folder, cleanup_mode="stop")
            figures["same_uri_after_restart"] = server.get_uri() == uri
            started_again = time.monotonic()
            thread.join(before_s + down_s + after_s + CLIENT_TIMEOUT_S + 10)
            sent = out[0] if out else []
            admitted = sum(s.status in ADMITTED_ONLY for s in sent)
            rows, deadline = [], time.monotonic() + 60  # spilled rows are replayed once the store reconnects
            while time.monotonic() < deadline:
                store = target.store()
                try:
                    rows = store.usage(name)
                finally:
                    store.close()
                if len(rows) >= admitted:
                    break
                time.sleep(1)
            figures["rows_complete_s_after_restart"] = round(time.monotonic() - started_again, 1)
        # the block's `serve down`, run in another process, ends the foreground `serve up` too
        figures["serve_up_exit_code"] = platform.proc.returncode
    finally:
        server.cleanup()
        os.environ.pop(OUTAGE_LEDGER_ENV, None)
    refused = sorted({int(s.start - start) for s in sent if s.status == 503})
    figures.update({"statuses": {str(c): sum(s.status == c for s in sent) for c in sorted({s.status for s in sent})},
                    "seconds_with_503": len(refused), "outage_from_s": round(stopped - start, 1),
                    "answered_200_while_down": sum(s.status == 200 and stopped <= s.start < started_again
                                                   for s in sent)})
    matched, problems = match_ledger(sent, rows)
    figures.update(matched)
    if len(refused) > OUTAGE_503_S:
        problems.append(f"503 in {len(refused)} seconds of the run (at most {OUTAGE_503_S})")
    others = set(figures["statuses"]) - {"200", "503"}
    if others:
        problems.append(f"statuses {sorted(others)} besides 200 and 503")
        # When each came, from the outage's start, and what it said: which path refused it.
        figures["unexpected"] = [{"at_s": round(s.start - stopped, 2), "status": s.status, "body": s.error}
                                 for s in sent if str(s.status) in others][:20]
    if figures["serve_up_exit_code"] != 0:
        problems.append(f"`serve up` exited {figures['serve_up_exit_code']} after `serve down` in another process")
    if not figures["answered_200_while_down"]:
        problems.append("no request was answered while the ledger was down")
    if not figures["same_uri_after_restart"]:
        problems.append("the restarted server has another address; the check cannot tell reconnection from a move")
    return Check(OUTAGE, not problems, figures, command(OUTAGE), problems)
