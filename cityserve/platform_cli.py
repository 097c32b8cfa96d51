"""`cityserve serve|tenants|usage|samples|monitor|batch`: run the platform, manage who may call it,
bill them, watch its models on live traffic."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cityserve.console import DOMAIN, console, friendly_errors, open_store, print_table, sparkline, workspace
from core.errors import ConfigError, InvalidInput
from core.settings import Settings, get_settings
from domains import DOMAINS

if TYPE_CHECKING:  # the commands import what they run when they run
    from services.monitor import VersionHealth

CONFIG_FILE = "serve-config.json"  # the config last deployed, beside platform.json
DEMO_TENANT = "demo"


# ---- serve -------------------------------------------------------------------------------------
@click.group()
def serve() -> None:
    """Start, inspect and stop the local platform (Ray, the four domains, the gateway)."""


def print_examples(settings: Settings, gateway_url: str, key: str, domains: Sequence[str]) -> None:
    """One curl per domain, its body the domain's documented example."""
    from services.platform import example_bodies

    console.print(f"\ngateway: {gateway_url}   docs: {gateway_url}/docs   demo key: {key}\n")
    for body, path in example_bodies(settings, domains).values():
        console.print(f"curl -s -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' "
                      f"-d @{shlex.quote(str(body))} {gateway_url}{path}", soft_wrap=True)


@serve.command("up")
@click.option("--env", "environment", default="local", show_default=True, help="Overlay in helm/serve/.")
@click.option("--port", type=int, default=8000, show_default=True, help="Gateway port on 127.0.0.1.")
@click.option("--num-cpus", type=int, default=os.cpu_count(), show_default=True)
@click.option("--domain", "domains", type=DOMAIN, multiple=True, help="Serve only these (repeatable).")
@click.option("--demo", is_flag=True, help="Create (or re-key) the demo tenant and print a curl per domain.")
@click.option("--detach", is_flag=True, help="Return once ready; `cityserve serve down` stops it.")
@friendly_errors
def serve_up(environment: str, port: int, num_cpus: int, domains: tuple[str, ...], demo: bool, detach: bool) -> None:
    """Start the platform (or re-apply the config to the running one) and wait until it answers."""
    from services.platform import demo_tenant, platform_down, platform_up, serve_config

    settings = get_settings()
    config = serve_config(workspace(), environment, domains, port)
    started = time.monotonic()
    with console.status("starting") as status:
        platform = platform_up(settings, config, num_cpus=num_cpus, progress=status.update)
    console.print(f"[green]ready[/green] in {time.monotonic() - started:.0f} s at {platform.gateway_url}")
    if demo:
        print_examples(settings, platform.gateway_url, demo_tenant(open_store()), domains or sorted(DOMAINS))
    if detach:
        return
    console.print("\nserving; Ctrl-C stops the platform")
    # SIGTERM (a supervisor, `kill`, a container stop) stops it the same way: in-flight requests
    # finish and every usage row is written; by default it would leave Ray running, orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while platform.alive():
            time.sleep(1)
        if _stopped_by_serve_down(settings.state_dir):
            console.print("stopped by `cityserve serve down`")
            return
        console.print("[red]Ray stopped unexpectedly[/red]; see state/ray-head.log")
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("stopping (in-flight requests finish first)")
        platform_down(settings, console.print)
        console.print("stopped")


def _stopped_by_serve_down(state_dir: Path, wait_s: float = 5) -> bool:
    """Whether the platform's record is gone: `serve down` removes it right after the head it
    stopped has exited (so it is waited for a moment); a head that died is still recorded."""
    from cluster.serve import STATE_FILE

    deadline = time.monotonic() + wait_s
    while (state_dir / STATE_FILE).exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@serve.command("status")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def serve_status(as_json: bool) -> None:
    """Deployments, their status and replicas, and the version each domain serves."""
    from cluster.serve import Platform, details, running_replicas
    from services.platform import serving_versions

    settings = get_settings()
    platform = Platform.load(settings.state_dir)
    if platform is None:
        raise ConfigError("no platform runs here; start it with `cityserve serve up`")
    apps = details(platform.dashboard_url).get("applications", {})
    try:
        serving = serving_versions(platform.gateway_url)
    except OSError:
        serving = {}
    rows = []
    for app in apps.values():
        for name, dep in app.get("deployments", {}).items():
            rows.append((name, dep.get("status", ""), running_replicas(dep), serving.get(name, ""),
                         dep.get("message", "")[:80]))
    print_table(f"platform at {platform.gateway_url} (Ray {platform.gcs_address})",
                ["deployment", "status", "replicas", "version", "message"], rows, as_json)


@serve.command("down")
@friendly_errors
def serve_down() -> None:
    """Stop the platform started by `serve up` (in-flight requests finish first)."""
    from services.platform import platform_down

    if platform_down(get_settings(), console.print):
        console.print("stopped")
    else:
        console.print("no platform runs here")


# ---- tenants -----------------------------------------------------------------------------------
@click.group()
def tenants() -> None:
    """Tenant apps: keys (shown once), domain grants, quotas; every change goes to the audit log."""


GRANT = click.option("--grant", "grants", type=DOMAIN, multiple=True, help="A domain it may call (repeatable).")
RPM = click.option("--requests-per-minute", "rpm", type=int,
                   help="Requests in any 60 s window, paced evenly over it (10 at once).")
IPM = click.option("--items-per-minute", "ipm", type=int, help="Items in any 60 s window.")
CONCURRENCY = click.option("--max-concurrent", "concurrency", type=int, help="Requests in flight at once.")
SAMPLE_RATE = click.option("--sample-rate", type=click.FloatRange(0, 1),
                           help="Share of its answered requests kept, masked, in the sample log (0: none).")
KEY_TTL = click.option("--key-ttl-days", type=float, default=90, show_default=True, help="Key lifetime.")


@tenants.command("create")
@click.argument("name")
@GRANT
@RPM
@IPM
@CONCURRENCY
@SAMPLE_RATE
@KEY_TTL
@friendly_errors
def tenants_create(name: str, grants: tuple[str, ...], rpm: int | None, ipm: int | None, concurrency: int | None,
                   sample_rate: float | None, key_ttl_days: float) -> None:
    """Add tenant NAME (default: no grants, 600 requests / 6,000 items a minute, 8 concurrent, no
    requests sampled)."""
    from services.tenants import Tenant

    tenant = Tenant(name, list(grants), rpm or 600, ipm or 6000, concurrency or 8, sample_rate=sample_rate or 0.0)
    key = open_store().create_tenant(tenant, key_ttl_days)
    console.print(f"tenant {name} created; its key (shown once, store it now):")
    click.echo(key)


@tenants.command("list")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def tenants_list(as_json: bool) -> None:
    """Tenants with grants, quotas, live keys (ids only: secrets are never stored) and what manages
    them: the tenants file, or this CLI."""
    store = open_store()
    now = time.time()
    from_file = store.file_managed()
    rows = []
    for t in store.tenants():
        live = [k.key_id for k in store.api_keys(t.name) if k.problem(now) is None]
        rows.append((t.name, ",".join(t.grants), t.requests_per_minute, t.items_per_minute, t.max_concurrent,
                     t.sample_rate, ",".join(live), "revoked" if t.revoked_at else "active",
                     "file" if t.name in from_file else "cli"))
    print_table("tenants", ["tenant", "grants", "requests/min", "items/min", "concurrent", "sampled", "live keys",
                            "state", "managed by"], rows, as_json)


@tenants.command("new-key")
@click.option("--json", "as_json", is_flag=True)
def tenants_new_key(as_json: bool) -> None:
    """Print a fresh key, without storing it, and its entry for a tenants file (a Kubernetes Secret),
    which lists key ids and digests only: the key goes to the tenant, the entry into the file."""
    from services.tenants import KeyEntry, new_key

    key = new_key()[0]
    entry = KeyEntry.of(key)
    if as_json:
        click.echo(json.dumps({"key": key, **entry.model_dump(exclude_none=True)}, indent=2))
        return
    console.print("key for the tenant (shown once, stored nowhere):")
    click.echo(key)
    console.print("entry for its `keys` in the tenants file:")
    click.echo(f"- {entry.line()}")


@tenants.command("key-entry")
@friendly_errors
def tenants_key_entry() -> None:
    """Print the tenants-file entry of each key read on stdin, one a line: to convert a tenants file
    that lists whole keys. Keys come on stdin, not as arguments, which other users' `ps` would show."""
    from services.tenants import KeyEntry

    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            click.echo(f"- {KeyEntry.of(line.strip()).line()}")
        except ValueError as exc:  # never quote the line: it may be a key with a typo
            raise InvalidInput(f"line {number}: {exc}", field="stdin") from None


@tenants.command("rotate")
@click.argument("name")
@click.option("--grace-hours", type=float, default=24, show_default=True, help="Old keys keep working this long.")
@KEY_TTL
@friendly_errors
def tenants_rotate(name: str, grace_hours: float, key_ttl_days: float) -> None:
    """A new key for NAME; its current keys expire after the grace period."""
    key = open_store().rotate(name, key_ttl_days, grace_hours)
    console.print(f"new key for {name} (shown once); old keys expire in {grace_hours:g} h:")
    click.echo(key)


@tenants.command("revoke")
@click.argument("name")
@click.option("--key", "key_id", help="Revoke only this key id (see `tenants list`).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def tenants_revoke(name: str, key_id: str | None, yes: bool) -> None:
    """Revoke tenant NAME (all its keys), or one key. Gateways refuse it within 2 s."""
    if not yes:
        click.confirm(f"Revoke {'key ' + key_id + ' of ' if key_id else 'tenant '}{name}?", abort=True)
    open_store().revoke(name, key_id)
    console.print(f"revoked {'key ' + key_id if key_id else 'tenant ' + name}")


@tenants.command("set-quota")
@click.argument("name")
@GRANT
@RPM
@IPM
@CONCURRENCY
@SAMPLE_RATE
@friendly_errors
def tenants_set_quota(name: str, grants: tuple[str, ...], rpm: int | None, ipm: int | None,
                      concurrency: int | None, sample_rate: float | None) -> None:
    """Change NAME's grants (replaced when given), limits and sample rate. Gateways apply it within 2 s."""
    tenant = open_store().set_quota(name, grants=list(grants) or None, requests_per_minute=rpm,
                                items_per_minute=ipm, max_concurrent=concurrency, sample_rate=sample_rate)
    console.print(f"{name}: grants {tenant.grants}, {tenant.requests_per_minute} requests/min, "
                  f"{tenant.items_per_minute} items/min, {tenant.max_concurrent} concurrent, "
                  f"{tenant.sample_rate:g} of requests sampled")


@tenants.command("audit")
@click.option("--tenant", help="Only this tenant.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def tenants_audit(tenant: str | None, as_json: bool) -> None:
    """The audit log: every admin action, who ran it, when."""
    log = open_store().audit_log(tenant)
    rows = [(_iso(at), actor, action, name, detail) for at, actor, action, name, detail in log]
    print_table("audit log", ["at", "actor", "action", "tenant", "detail"], rows, as_json)


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


# ---- usage -------------------------------------------------------------------------------------
def parse_since(value: str | None, now: float) -> float | None:
    """'24h', '7d', '30m' ago, or an ISO date/time (UTC unless it says otherwise)."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([mhd])", value.strip())
    if match:
        return now - float(match.group(1)) * {"m": 60, "h": 3600, "d": 86400}[match.group(2)]
    from datetime import UTC, datetime

    try:
        stamp = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput(f"--since {value!r}: use 30m, 24h, 7d or an ISO date", field="since") from exc
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


@click.command()
@click.option("--tenant", help="Only this tenant.")
@click.option("--since", help="30m, 24h, 7d, or an ISO date/time.")
@click.option("--detail", is_flag=True, help="Every request instead of totals.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout (for chargeback spreadsheets).")
@friendly_errors
def usage(tenant: str | None, since: str | None, detail: bool, as_json: bool, as_csv: bool) -> None:
    """Metered usage from the ledger: per tenant and domain, or per request with --detail."""
    from services.tenants import USAGE_COLUMNS, USAGE_SUMMARY_COLUMNS, summarise_usage

    rows = open_store().usage(tenant, parse_since(since, time.time()))
    if detail:
        columns: list[str] = list(USAGE_COLUMNS)
        table = [u.row() for u in rows]
    else:
        columns = list(USAGE_SUMMARY_COLUMNS)
        table = summarise_usage(rows)
    if as_csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(table)
        return
    print_table("usage" + (f" since {since}" if since else ""), columns, table, as_json)


# ---- samples -----------------------------------------------------------------------------------
@click.group()
def samples() -> None:
    """The sample log and feedback kept under the registry (docs/learning-loop.md)."""


@samples.command("list")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def samples_list(as_json: bool) -> None:
    """Each day of samples and feedback per domain: files, rows, size."""
    from services.samples import partitions

    rows = [(p.kind, p.domain, p.day, p.files, p.rows, p.bytes) for p in partitions(get_settings().registry_location())]
    print_table("sample log", ["kind", "domain", "day", "files", "rows", "bytes"], rows, as_json)


@samples.command("sweep")
@click.option("--retention-days", type=click.IntRange(1), default=30, show_default=True,
              help="Keep this many days (the serve config's samples.retention_days).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def samples_sweep(retention_days: int, as_json: bool) -> None:
    """Delete the days of samples and feedback older than the retention (the gateways also do it hourly)."""
    from services.samples import sweep

    gone = sweep(get_settings().registry_location(), retention_days)
    print_table(f"deleted {len(gone)} days older than {retention_days} days", ["kind", "domain", "day", "rows"],
                [(p.kind, p.domain, p.day, p.rows) for p in gone], as_json)


# ---- monitor -----------------------------------------------------------------------------------
@click.command()
@click.argument("domains", nargs=-1, type=DOMAIN)
@click.option("--days", type=click.IntRange(1, 3650), default=7, show_default=True, help="The window, in days.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def monitor(domains: tuple[str, ...], days: int, as_json: bool) -> None:
    """Each version's live traffic from the sample log, feedback and usage ledger: its requests
    (refused: 4xx by the model, failed: 5xx), drift from its reference (PSI: < 0.1 stable, > 0.25
    a shift) and quality on feedback against the validation split's, with a day-by-day line of
    each (docs/learning-loop.md)."""
    from domains.drift import SHIFT, reading
    from services.monitor import health

    ws = workspace()
    with contextlib.closing(open_store()) as store:
        reports = {d: health(ws.registry, ws.settings.registry_location(), d, days, ledger=store)
                   for d in domains or sorted(DOMAINS)}
    if as_json:
        click.echo(json.dumps([r.as_json() for found in reports.values() for r in found], indent=2))
        return
    for domain, found in reports.items():
        if not found:
            continue
        rows = []
        for r in found:  # side by side: production and a canary (or shadow) of the same days
            top = r.max_psi
            role = " shadow" if r.shadowed == r.items else ""
            requests = sum(r.statuses.values())
            refused = sum(n for status, n in r.statuses.items() if 400 <= status < 500)
            failed = sum(n for status, n in r.statuses.items() if status >= 500)
            rows.append((r.version + role, f"{requests:,} ({refused}, {failed})", r.items, r.feedback,
                         round(r.latency_p50_ms),
                         f"{top[1]:.2f} {top[0]} ({reading(top[1])})" if top else reading(None),
                         sparkline([d.max_psi for d in r.days], 0.0, 2 * SHIFT),
                         f"{_figure(r.quality.get(r.metric))} vs {_figure(r.reference.get(r.metric))}",
                         sparkline([d.quality for d in r.days], *_quality_scale(r))))
        print_table(f"{domain}: last {days} days of samples and feedback", [
            "version", "requests (refused, failed)", "sampled", "judged", "p50 ms", "drift: worst feature", "by day",
            f"{found[0].metric}: live vs validation", "by day"], rows, False)
        for r in found:
            if r.note:
                console.print(f"{domain} {r.version}: {r.note}")
    if not any(reports.values()):
        console.print("nothing sampled in the window: turn sampling on with `cityserve tenants set-quota NAME "
                      "--sample-rate R`")


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _quality_scale(report: VersionHealth) -> tuple[float, float]:
    """A day's quality line runs from half the reference to one and a half times it, so the
    reference sits mid-line whichever way better is (0 to 1 without a reference)."""
    ref = report.reference.get(report.metric)
    return (0.0, 1.0) if ref is None else (ref / 2, ref * 1.5)


# ---- batch -------------------------------------------------------------------------------------
@click.command()
@click.argument("domain", type=DOMAIN)
@click.argument("source", metavar="SOURCE")  # a local path or a URI (s3://bucket/in.csv): click.Path would mangle one
@click.argument("dest", metavar="DEST")
@click.option("--version", "ref", default="production", show_default=True, help="Version id or alias.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--concurrency", type=int, default=1, show_default=True, help="Scoring actors (each loads the model).")
@click.option("--gpus-per-actor", type=float, default=0.0, show_default=True,
              help="GPUs each scoring actor holds (0.5: two share one); it runs the model there. 0: CPU.")
@click.option("--keep-personal-data", is_flag=True,
              help="Write text cells as they are (default: phone numbers, e-mails, IDs, plates, addresses and "
                   "names masked as <PHONE>, <EMAIL>, ...).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def batch(domain: str, source: str, dest: str, ref: str, batch_size: int, concurrency: int, gpus_per_actor: float,
          keep_personal_data: bool, as_json: bool) -> None:
    """Score SOURCE (Parquet or CSV, one request item per row) into the Parquet file DEST; each a local
    path or a URI such as s3://bucket/scored.parquet. Personal data in DEST's text cells is masked."""
    from domains import get_domain
    from services.batch import score_file

    report = score_file(get_domain(domain), workspace(), source, dest, ref=ref, batch_size=batch_size,
                        concurrency=concurrency, gpus=gpus_per_actor, mask=not keep_personal_data)
    if as_json:
        click.echo(json.dumps(report.__dict__, indent=2))
        return
    console.print(f"{domain} {report.version}: {report.scored} of {report.rows} rows scored into {report.output}")
    if report.failed_count:
        print_table(f"{report.failed_count} rows refused (first {len(report.failed)}; `error` column in the output)",
                    ["row", "reason"], report.failed[:20], False)
