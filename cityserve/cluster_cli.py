"""`cityserve cluster deploy|status|scale|upgrade|train|tune|retrain|delete`: the platform on Kubernetes,
as a KubeRay RayService rendered from the chart in helm/. The Kubernetes work is cluster/kube.py's;
this module is the click glue: options, tables, progress lines."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from cityserve.console import DOMAIN, console, friendly_errors, print_table
from cluster import kube as k8s
from core.errors import ConfigError


@click.group()
def cluster() -> None:
    """Deploy and run CityServe on Kubernetes (KubeRay): deploy, status, scale, upgrade, train, tune,
    retrain, delete."""


def kube_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the connection options and hands the command a connected `Kube` and the release name;
    connection errors, like every platform error, end as one line (friendly_errors)."""

    @click.option("--kubeconfig", type=click.Path(dir_okay=False), help="Default: $KUBECONFIG, ~/.kube/config, "
                  "else the pod's service account.")
    @click.option("--context", help="A kubeconfig context (default: the current one).")
    @click.option("-n", "--namespace", help="Default: the context's namespace, else 'default'.")
    @click.option("--release", default=k8s.RELEASE, show_default=True,
                  help=f"The Helm release: its objects carry {k8s.INSTANCE_LABEL}=RELEASE.")
    @wraps(func)
    @friendly_errors
    def wrapper(*args: Any, kubeconfig: str | None, context: str | None, namespace: str | None, release: str,
                **kwargs: Any) -> Any:
        return func(*args, kube=k8s.Kube.connect(kubeconfig, context, namespace), release=release, **kwargs)

    return wrapper


def _say(line: str) -> None:
    console.print(f"  {line}")


def _wait(read: Callable[[], Any], done: Callable[[Any], bool], describe: Callable[[Any], str], timeout_s: float,
          what: str, quiet: bool = False) -> Any:
    """Polls with a spinner, printing each new state (`quiet`: nothing, for --json output)."""
    if quiet:
        return k8s.wait_for(read, done, describe, timeout_s=timeout_s, what=what)
    with console.status(f"waiting for {what}"):
        return k8s.wait_for(read, done, describe, timeout_s=timeout_s, what=what, on_change=_say)


# ---- deploy / delete ---------------------------------------------------------------------------
@cluster.command()
@click.option("--chart", type=click.Path(file_okay=False, path_type=Path), default=k8s.CHART_DIR,
              show_default="helm/ of this checkout", help="The CityServe Helm chart.")
@click.option("-f", "--values", "values", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Values files, as for helm (repeatable).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Values, as for helm (repeatable).")
@click.option("--wait", is_flag=True, help="Wait until the RayService serves.")
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds --wait waits.")
@click.option("--json", "as_json", is_flag=True)
@kube_options
def deploy(kube: k8s.Kube, release: str, chart: Path, values: tuple[Path, ...], sets: tuple[str, ...], wait: bool,
           timeout: float, as_json: bool) -> None:
    """Render the chart (helm template) and create or update each of its objects."""
    objects, hooks = k8s.render_chart(chart, release, kube.namespace, values, sets, kube.api_versions())
    rows = k8s.deploy(kube, objects)
    print_table(f"release {release} in namespace {kube.namespace}", ["kind", "name", "action"],
                [*rows, *[(h, "", "skipped (helm hook)") for h in hooks]], as_json)
    if wait:
        _wait(lambda: kube.rayservice(release), k8s.settled, k8s.progress, timeout, f"RayService {release} to serve",
              quiet=as_json)
        if not as_json:
            console.print(f"RayService {release} serves")


@cluster.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@kube_options
def delete(kube: k8s.Kube, release: str, yes: bool) -> None:
    """Delete the release's objects: RayJobs, the RayService (and its Ray clusters) and the rest."""
    found = [(kind, obj["metadata"]["name"]) for kind in reversed(k8s.KINDS) for obj in kube.labelled(kind, release)]
    if not found:
        console.print(f"nothing labelled {k8s.INSTANCE_LABEL}={release} in namespace {kube.namespace}")
        return
    print_table(f"release {release} in namespace {kube.namespace}", ["kind", "name"], found, False)
    if not yes:
        data_loss = " (PersistentVolumeClaims lose their data)" if any(k == "PersistentVolumeClaim" for k, _ in found) \
            else ""
        click.confirm(f"Delete these {len(found)} objects{data_loss}?", abort=True)
    for kind, name in found:
        kube.delete(kind, name)
    console.print(f"deleted {len(found)} objects; Kubernetes removes their pods in the background")


# ---- status / scale ----------------------------------------------------------------------------
@cluster.command()
@click.option("--json", "as_json", is_flag=True)
@kube_options
def status(kube: k8s.Kube, release: str, as_json: bool) -> None:
    """The RayService's state: conditions, active and pending Ray clusters, Serve apps, worker groups."""
    info = k8s.summary(kube.rayservice(release))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    state = "serving" if info["ready"] else "not ready"
    print_table(f"RayService {kube.namespace}/{release}: {state} (serviceStatus {info['serviceStatus'] or '-'}, "
                f"{info['numServeEndpoints']} serve endpoints)", ["condition", "status", "reason", "message"],
                [tuple(c.values()) for c in info["conditions"]], False)
    clusters = info["clusters"].items()
    print_table("Ray clusters", ["role", "cluster", "state", "workers ready/desired"],
                [(role, c["rayClusterName"], c["state"], f"{c['workers']['ready'] or 0}/{c['workers']['desired'] or 0}")
                 for role, c in clusters], False)
    print_table("Serve applications", ["cluster", "app", "status", "deployment", "status", "message"],
                [(role, app, a["status"], dep, d["status"], d["message"] or a["message"])
                 for role, c in clusters for app, a in c["applications"].items()
                 for dep, d in (a["deployments"] or {"": {"status": "", "message": ""}}).items()], False)
    print_table("worker groups (spec)", ["group", "replicas", "min", "max", "image"],
                [tuple(g.values()) for g in info["workerGroups"]], False)


@cluster.command()
@click.argument("group")
@click.option("--replicas", type=int, help="Workers now (within [min, max]).")
@click.option("--min", "min_replicas", type=int, help="The autoscaler's lower bound.")
@click.option("--max", "max_replicas", type=int, help="The autoscaler's upper bound.")
@click.option("--json", "as_json", is_flag=True)
@kube_options
def scale(kube: k8s.Kube, release: str, group: str, replicas: int | None, min_replicas: int | None,
          max_replicas: int | None, as_json: bool) -> None:
    """Set worker GROUP's replicas and bounds (groups: cpu, gpu). With autoscaling on, the
    autoscaler moves replicas within [min, max]."""
    rs = kube.rayservice(release)
    ops, changes = k8s.scale_ops(rs, group, replicas, min_replicas, max_replicas)
    if ops:
        kube.json_patch("RayService", rs["metadata"]["name"], ops)
    print_table(f"worker group {group}" + ("" if ops else ": nothing changes"), ["field", "before", "after"],
                [(field, before, after) for field, (before, after) in changes.items()], as_json)


# ---- upgrade -----------------------------------------------------------------------------------
@cluster.command()
@click.option("--image", help="A new image for every Ray container: KubeRay rolls a new cluster, zero downtime.")
@click.option("--model", nargs=2, type=(DOMAIN, str), metavar="DOMAIN VERSION",
              help="Make VERSION production in the registry; replicas pick it up without a restart.")
@click.option("--registry", help="The registry URI (default: the RayService's serve config registry_uri).")
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds to wait for the change.")
@kube_options
def upgrade(kube: k8s.Kube, release: str, image: str | None, model: tuple[str, str] | None, registry: str | None,
            timeout: float) -> None:
    """Roll a new image (--image) or a new model version (--model DOMAIN VERSION), and wait until it serves."""
    if image is not None and model is None:
        _upgrade_image(kube, release, image, timeout)
    elif model is not None and image is None:
        _upgrade_model(kube, kube.rayservice(release), *model, registry, timeout)
    else:
        raise ConfigError("give exactly one of --image IMAGE or --model DOMAIN VERSION", field="image")


def _upgrade_image(kube: k8s.Kube, release: str, image: str, timeout: float) -> None:
    rs = kube.rayservice(release)
    ops = k8s.image_ops(rs, image)
    if not ops:
        console.print(f"every Ray container already runs {image}: nothing to roll")
        return
    old = k8s.cluster_name(rs, "active")
    kube.json_patch("RayService", rs["metadata"]["name"], ops)
    console.print(f"RayService {rs['metadata']['name']} now asks for {image}; "
                  f"KubeRay builds a new cluster beside {old or 'none'}")
    _wait(lambda: kube.rayservice(release), k8s.upgraded(old), k8s.progress, timeout,
          f"a new Ray cluster running {image} to take over")
    console.print(f"{image} serves; the old cluster {old or '-'} is being removed")


def _upgrade_model(kube: k8s.Kube, rs: dict[str, Any], domain: str, version: str, registry: str | None,
                   timeout: float) -> None:
    # The RayService is not edited: replicas watch the registry stage and reload on their own.
    from training.registry import Registry

    uri = registry or k8s.registry_uri(rs)
    store = Registry(uri)
    before = store.stages(domain).get("production")
    promoted = store.promote(domain, version)
    console.print(f"{domain} production is now {promoted.version} in {uri} (was {before or 'none'})")
    service, port = k8s.gateway(rs)

    def read() -> dict[str, Any]:
        try:
            return kube.gateway_models(service, port)
        except k8s.KubeError as exc:  # the gateway may restart or briefly lack endpoints: keep asking
            if exc.status in (401, 403) or exc.status is None:
                raise
            return {"error": exc.message}

    def describe(models: dict[str, Any]) -> str:
        return models.get("error") or f"the gateway serves {domain} {k8s.served_version(models, domain) or '(none)'}"

    try:
        _wait(read, lambda models: k8s.served_version(models, domain) == promoted.version, describe, timeout,
              f"the gateway to serve {domain} {promoted.version}")
    except k8s.KubeTimeout as exc:  # production has moved all the same: say how to move it back
        back = f"; `cityserve cluster upgrade --model {domain} {before}` moves it back" if before else ""
        raise k8s.KubeTimeout(f"{exc.message}. The registry's production is {promoted.version}{back}") from None
    console.print(f"{domain} {promoted.version} serves")


# ---- train / tune / retrain ------------------------------------------------------------------
def _job_command(verb: str) -> click.Command:
    """`cityserve cluster train|tune|retrain DOMAIN [ARGS]`: ARGS are `cityserve VERB`'s own
    options, checked here against that command and run in a RayJob on a copy of the RayService's
    cluster."""

    @cluster.command(verb, context_settings={"ignore_unknown_options": True})
    @click.argument("domain", type=DOMAIN)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.option("--follow/--no-follow", default=True, show_default=True, help="Wait for the job and report it.")
    @click.option("--timeout", type=float, default=24 * 3600, show_default=True, help="Seconds to follow.")
    @click.option("--ttl", type=int, default=600, show_default=True, help="Seconds KubeRay keeps a finished job.")
    @click.option("--deadline", type=click.IntRange(min=1), default=k8s.JOB_DEADLINE_S, show_default=True,
                  help="Seconds after which KubeRay fails a job still running (activeDeadlineSeconds).")
    @click.option("--prepare-data", is_flag=True, help="Run `cityserve data prepare DOMAIN` first (shared volume).")
    @kube_options
    @click.pass_context
    def command(ctx: click.Context, kube: k8s.Kube, release: str, domain: str, args: tuple[str, ...], follow: bool,
                timeout: float, ttl: int, deadline: int, prepare_data: bool) -> None:
        root = ctx.find_root()
        runner = root.command.get_command(root, verb) if isinstance(root.command, click.Group) else None
        if runner is not None:  # `cityserve train|tune|retrain` refuses unknown options and bad values before we submit
            runner.make_context(verb, [domain, *args], parent=root)
        job = k8s.rayjob(kube.rayservice(release), release, [verb, domain, *args], ttl, prepare_data, deadline)
        kube.create(job)
        name = job["metadata"]["name"]
        console.print(f"submitted RayJob {name}: {job['spec']['entrypoint']}")
        if not follow:
            return
        job = _wait(lambda: kube.get("RayJob", name), k8s.job_finished, k8s.job_phase, timeout, f"RayJob {name}")
        if not k8s.job_succeeded(job):
            status = job.get("status") or {}
            raise k8s.KubeError(f"RayJob {name} ended {k8s.job_phase(job)}: {status.get('message') or 'no message'} "
                                f"(kubectl describe rayjob {name} -n {kube.namespace}; the driver log stays on the "
                                f"head of Ray cluster {status.get('rayClusterName') or '-'} for --ttl seconds)")
        console.print(f"RayJob {name} succeeded; see `cityserve models list {domain}`")

    command.help = (f"Run `cityserve {verb} DOMAIN [ARGS]` as a RayJob on a copy of the RayService's Ray "
                    f"cluster (ARGS: the options of `cityserve {verb}`, e.g. --profile full).")
    return command


train = _job_command("train")
tune = _job_command("tune")
retrain = _job_command("retrain")
