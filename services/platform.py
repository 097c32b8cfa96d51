"""The local platform's lifecycle: build the serve config from the registry, start Ray and Serve,
deploy, reload a domain after a promotion, stop. The CLI (`cityserve serve|run|models`) and the
reliability runner drive it; it prints nothing itself (`progress` callbacks say what it waits on).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cluster.serve import Platform, deploy, start_head, stop_head, stop_serve, wait_deployed, wait_ready
from core.errors import ConfigError, InvalidInput
from core.io import write_json_atomic
from core.redact import has_password, redact
from core.settings import LEDGER_ENV, Settings
from domains import DOMAINS, get_domain
from domains.base import request_example
from services.config import VERBS, ServeOverlay, build_config
from services.tenants import Store, Tenant
from training.workspace import Workspace

CONFIG_FILE = "serve-config.json"  # the config last deployed, beside platform.json
DEMO_TENANT = "demo"
Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """A progress callback that says nothing."""


def serve_config(workspace: Workspace, environment: str, domains: Sequence[str], port: int,
                 *extra: ServeOverlay) -> dict[str, Any]:
    """The environment's config plus this run's values (absolute paths, port, each domain's
    generation) and `extra` overlays."""
    settings, registry = workspace.settings, workspace.registry
    served = list(domains) or sorted(DOMAINS)
    ledger = f"env:{LEDGER_ENV}" if ledger_secrets(settings) else settings.ledger_location()
    run = ServeOverlay(http_options={"port": port},
                       args={"registry_uri": settings.registry_location(), "ledger_url": ledger,
                             "usage_spill_dir": str(settings.state_dir / "usage-spill")},
                       deployments={d: {"user_config": {"generation": registry.generation(d)}} for d in served})
    return build_config(environment, run, *extra, domains=served)


def ledger_secrets(settings: Settings) -> dict[str, str]:
    """What the Ray head's environment must hold for the ledger: a URL with a password goes there
    (the serve config, which Ray's dashboard shows to anyone who reaches it, names the variable)."""
    url = settings.ledger_location()
    return {LEDGER_ENV: url} if has_password(url) else {}


def platform_up(settings: Settings, config: dict[str, Any], *, num_cpus: int, timeout_s: float = 900,
                progress: Progress = _quiet) -> Platform:
    """Starts Ray (unless running), deploys `config`, waits until every domain answers."""
    state = settings.state_dir
    port = int(config["http_options"]["port"])
    secrets = ledger_secrets(settings)
    platform = Platform.load(state)
    if platform is None:
        progress(f"starting Ray (2-core machines: 10-30 s); log {state / 'ray-head.log'}")
        platform = start_head(state, num_cpus=num_cpus, http_port=port, secrets=secrets)
        platform.save(state)  # saved before deploying: `serve down` can stop a half-started platform
    elif not platform.gateway_url.endswith(f":{port}"):
        raise ConfigError(f"the platform already runs with its gateway at {platform.gateway_url}; "
                          "`cityserve serve down` first to change the port", field="port")
    elif secrets and not platform.started_with(secrets):  # a running head's environment is fixed
        raise ConfigError(f"the ledger URL {redact(secrets[LEDGER_ENV])} carries a password, which reaches the "
                          "replicas only through the environment Ray starts with: `cityserve serve down` first "
                          "to change the ledger", field="ledger_url")
    since = time.time()  # Serve stamps the deploy with this machine's clock: it runs here
    deploy(platform.dashboard_url, config)
    write_json_atomic(state / CONFIG_FILE, config)
    progress("deploying: replicas load their models")
    wait_deployed(platform.dashboard_url, since, timeout_s)
    wait_ready(platform.gateway_url, timeout_s, progress=lambda last: progress(f"waiting: {last[:100]}"))
    return platform


def platform_down(settings: Settings, progress: Progress = _quiet) -> bool:
    """Deletes the app (replicas finish in-flight requests) and stops our Ray head. False when no
    platform runs here."""
    platform = Platform.load(settings.state_dir)
    if platform is None:
        return False
    try:
        stop_serve(platform.dashboard_url)
    except Exception as exc:  # Ray already half gone: stopping the head is what is left to do
        progress(f"serve shutdown incomplete ({type(exc).__name__}); stopping Ray")
    stop_head(platform)
    (settings.state_dir / "platform.json").unlink(missing_ok=True)
    return True


def reload_domain(workspace: Workspace, domain: str, version: str, timeout_s: float = 300,
                  canary: str | None = None) -> bool:
    """After a promote, rollback or canary change: bump the domain's generation in the running
    config and wait until the gateway reports `version` as production and `canary` as its canary
    (None: none). False when no platform runs here (nothing to reload)."""
    state = workspace.settings.state_dir
    platform = Platform.load(state)
    path = state / CONFIG_FILE
    if platform is None or not path.exists():
        return False
    config = json.loads(path.read_text())
    (app,) = config["applications"]
    deployment = next((d for d in app["deployments"] if d["name"] == domain), None)
    if deployment is None:
        return False
    deployment.setdefault("user_config", {})["generation"] = workspace.registry.generation(domain)
    deploy(platform.dashboard_url, config)
    write_json_atomic(path, config)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = serving(platform.gateway_url).get(domain, {})
        if info.get("version") == version and (info.get("canary") or {}).get("version") == canary:
            return True
        time.sleep(1)
    raise ConfigError(f"{domain} did not report {version} within {timeout_s:.0f} s; see `cityserve serve status`")


def serving(gateway_url: str) -> dict[str, dict[str, Any]]:
    """What each domain's replica answered the gateway's /v1/models with: its version, canary, ..."""
    with urllib.request.urlopen(f"{gateway_url}/v1/models", timeout=10) as resp:
        return {d["domain"]: d for d in json.loads(resp.read())["domains"]}


def serving_versions(gateway_url: str) -> dict[str, str | None]:
    """The production version each domain's replica answered with."""
    return {domain: info.get("version") for domain, info in serving(gateway_url).items()}


def demo_tenant(store: Store) -> str:
    """A tenant granted every domain; a fresh key each run (the previous one stops working)."""
    try:
        return str(store.create_tenant(Tenant(DEMO_TENANT, sorted(DOMAINS), 600, 6000, 16), key_ttl_days=30))
    except InvalidInput:
        return str(store.rotate(DEMO_TENANT, key_ttl_days=30, grace_hours=0))


def example_bodies(settings: Settings, domains: Sequence[str]) -> dict[str, tuple[Path, str]]:
    """Per domain, its documented example request written to `state/examples/DOMAIN.json`, and the
    gateway path it goes to."""
    folder = settings.state_dir / "examples"
    out = {}
    for name in domains:
        body = folder / f"{name}.json"
        write_json_atomic(body, request_example(get_domain(name).request_model))
        out[name] = (body, f"/v1/{name}/{VERBS[name]}")
    return out
