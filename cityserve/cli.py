"""`cityserve`: one command, one group per noun (data, train, tune, retrain, evaluate, models, serve,
tenants, usage)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cityserve.cluster_cli import cluster
from cityserve.console import DOMAIN, console, friendly_errors, print_table, workspace
from cityserve.platform_cli import batch, monitor, samples, serve, serve_up, tenants, usage
from cluster.placement import PLACEMENT_STRATEGIES
from core.settings import get_settings
from domains import DOMAINS

if TYPE_CHECKING:  # the commands import what they run when they run
    from domains.base import Domain
    from training.registry import Version
    from training.workspace import Workspace


@click.group()
def main() -> None:
    """CityServe: train, evaluate, version and serve the city's models on Ray."""


# ---- data ------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Prepare the domains' data (Parquet splits and a manifest)."""


@data.command("prepare")
@click.argument("domain", type=DOMAIN)
@click.option("--source", type=click.Path(path_type=Path), help="Your own CSV/Parquet (documented columns).")
@click.option("--smoke-test", is_flag=True, help="A tiny set for tests, under DATA_DIR/_smoke.")
@click.option("--full-sim", is_flag=True,
              help="traffic only: simulate (once, cached) the full 10-day network set; ~3 CPU-minutes.")
@click.option("--keep-personal-data", is_flag=True,
              help="events and sentiment: keep the --source texts as they are (default: phone numbers, e-mails, "
                   "IDs, plates, addresses and names masked as <PHONE>, <EMAIL>, ... before anything is written).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def data_prepare(domain: str, source: Path | None, smoke_test: bool, full_sim: bool, keep_personal_data: bool,
                 as_json: bool) -> None:
    """Prepare DOMAIN's splits from its packaged source (or --source)."""
    from core.errors import ConfigError
    from domains import get_domain
    from domains.text import TextDomain
    from training.trainer import smoke_data_dir

    settings = get_settings()
    data_dir = smoke_data_dir(settings) if smoke_test else settings.data_dir
    dom = get_domain(domain)
    if keep_personal_data and not isinstance(dom, TextDomain):
        raise ConfigError("--keep-personal-data applies to the text domains (events, sentiment)",
                          field="keep_personal_data")
    if full_sim:
        if domain != "traffic" or smoke_test:
            raise ConfigError("--full-sim applies to `data prepare traffic` without --smoke-test", field="full_sim")
        from domains.traffic import TrafficDomain

        manifest = TrafficDomain().prepare(data_dir, source=source, sim="full")
    elif isinstance(dom, TextDomain):
        manifest = dom.prepare(data_dir, source=source, smoke=smoke_test, mask=not keep_personal_data)
    else:
        manifest = dom.prepare(data_dir, source=source, smoke=smoke_test)
    rows = [(name, f["rows"], " → ".join(f["time_range"] or []), f["sha256"][:12])
            for name, f in manifest["files"].items()]
    print_table(f"{domain} data ({manifest['sha256'][:12]})", ["table", "rows", "time range", "sha256"],
                rows, as_json)
    if manifest.get("masked") and not as_json:
        console.print("personal data masked: " + ", ".join(f"{n} {kind}" for kind, n in manifest["masked"].items()))


# ---- train / evaluate ------------------------------------------------------------------------
@main.command()
@click.argument("domain", type=DOMAIN)
@click.option("--profile", type=click.Choice(["quick", "full"]), default="quick", show_default=True)
@click.option("--num-workers", type=int, default=1, show_default=True, help="Ray Train workers (DDP).")
@click.option("--use-gpu", is_flag=True, help="One GPU per worker, bf16 autocast.")
@click.option("--cpus-per-worker", type=float,
              help="Default: the most that lets every worker run at once on the nodes there are.")
@click.option("--placement", type=click.Choice(PLACEMENT_STRATEGIES), default="PACK", show_default=True,
              help="PACK: workers on as few nodes as fit; SPREAD: on different nodes where they can.")
@click.option("--epochs", type=int, help="Override the profile's epochs.")
@click.option("--smoke-test", is_flag=True, help="Tiny data and model: finishes in seconds.")
@click.option("--promote", is_flag=True, help="Make the new version production.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def train(domain: str, profile: str, num_workers: int, use_gpu: bool, cpus_per_worker: float | None,
          placement: str, epochs: int | None, smoke_test: bool, promote: bool, as_json: bool) -> None:
    """Fine-tune DOMAIN's model with Ray Train and register it as a candidate version."""
    from domains import get_domain
    from training.trainer import train as run_training

    ws, dom = workspace(), get_domain(domain)
    version = run_training(dom, ws, profile="smoke" if smoke_test else profile, num_workers=num_workers,
                           use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, epochs=epochs,
                           placement_strategy=placement)
    if promote:
        version = _promote(dom, ws, version.version)
    metrics = {k: v for k, v in version.metrics.items() if k.startswith("val_") or k == "epoch"}
    print_table(f"{domain} {version.version} ({version.stage})", ["metric", "value"],
                sorted(metrics.items()), as_json)


@main.command()
@click.argument("domain", type=DOMAIN)
@click.option("--num-samples", type=int, default=8, show_default=True, help="Trials (grid: the grid's size).")
@click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default="asha", show_default=True)
@click.option("--search", type=click.Choice(["optuna", "random", "grid"]), default="optuna", show_default=True)
@click.option("--max-concurrent", type=int, default=2, show_default=True)
@click.option("--cpus-per-trial", type=float, default=1.0, show_default=True, help="The Train worker's CPUs.")
@click.option("--gpus-per-trial", type=float, default=0.0, show_default=True, help="Fractions share a GPU.")
@click.option("--time-budget-s", type=float, help="Stop starting trials after this long.")
@click.option("--grid-points", type=int, default=3, show_default=True, help="Points per continuous axis (grid).")
@click.option("--profile", type=click.Choice(["quick", "full"]), default="quick", show_default=True)
@click.option("--epochs", type=int, help="Epochs of a full trial (ASHA's max_t).")
@click.option("--space", type=click.Path(path_type=Path), help="A JSON search space instead of the domain's.")
@click.option("--resume", "resume", metavar="SWEEP_ID", help="Continue an interrupted sweep.")
@click.option("--smoke-test", is_flag=True, help="Tiny data: finishes in about a minute.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def tune(domain: str, num_samples: int, scheduler: str, search: str, max_concurrent: int, cpus_per_trial: float,
         gpus_per_trial: float, time_budget_s: float | None, grid_points: int, profile: str, epochs: int | None,
         space: Path | None, resume: str | None, smoke_test: bool, as_json: bool) -> None:
    """Sweep DOMAIN's hyperparameters with Ray Tune; register the best trial as a candidate."""
    from domains import get_domain
    from training.tune import SweepOptions, load_space, sweep

    options = SweepOptions(num_samples=num_samples, scheduler=scheduler, search=search,
                           max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial,
                           gpus_per_trial=gpus_per_trial, time_budget_s=time_budget_s, grid_points=grid_points,
                           profile="smoke" if smoke_test else profile)
    sweep_id, trials, version = sweep(get_domain(domain), workspace(), options,
                                      space=load_space(space) if space else None,
                                      overrides={"epochs": epochs} if epochs else None, resume=resume)
    print_table(f"{sweep_id}: trials", list(trials.columns), [tuple(r) for r in trials.itertuples(index=False)],
                as_json)
    if version is not None and not as_json:
        console.print(f"best trial registered as {domain} {version.version} (candidate); "
                      f"promote with `cityserve models promote {domain} {version.version}`")


@main.command()
@click.argument("domain", type=DOMAIN)
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of requests whose feedback only judges (chosen by a hash of the "
              "request id: the same every run).")
@click.option("--min-holdout", type=click.IntRange(min=1), default=20, show_default=True,
              help="Held-out feedback cases needed; fewer: refused before training.")
@click.option("--min-gain", type=float, default=0.0, show_default=True,
              help="On the hold-out the candidate must beat production by more than this (in the metric's units).")
@click.option("--max-test-loss", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="On the test split it may lose at most this share of production's figure.")
@click.option("--weight", type=click.FloatRange(0, 100, min_open=True), default=10, show_default=True,
              help="Percent of requests the candidate answers once it passes the gate.")
@click.option("--shadow", is_flag=True, help="Canary as a shadow (answers a copy, never returned).")
@click.option("--num-workers", type=int, default=1, show_default=True, help="Ray Train workers (DDP).")
@click.option("--use-gpu", is_flag=True, help="One GPU per worker, bf16 autocast.")
@click.option("--cpus-per-worker", type=float, help="As `cityserve train`'s.")
@click.option("--epochs", type=int, help="Override the profile's epochs.")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def retrain(domain: str, holdout: float, min_holdout: int, min_gain: float, max_test_loss: float, weight: float,
            shadow: bool, num_workers: int, use_gpu: bool, cpus_per_worker: float | None, epochs: int | None,
            as_json: bool) -> None:
    """Retrain DOMAIN with the feedback tenants sent (masked, deduplicated, a hold-out kept apart),
    with production's profile; judge the candidate against production on the feedback hold-out and
    the test split; where it passes, start a canary. Never promotes (docs/learning-loop.md)."""
    from domains import get_domain
    from services.retrain import RetrainOptions
    from services.retrain import retrain as run_retrain

    ws = workspace()
    options = RetrainOptions(holdout=holdout, min_holdout=min_holdout, min_gain=min_gain,
                             max_test_loss=max_test_loss, weight=weight, shadow=shadow)
    done = run_retrain(get_domain(domain), ws, options, num_workers=num_workers, use_gpu=use_gpu,
                       cpus_per_worker=cpus_per_worker, epochs=epochs)
    if as_json:
        click.echo(json.dumps(done.as_json(), indent=2))
        return
    gate, data = done.gate, done.data
    console.print(f"{domain}: {data['feedback']} feedback items, {data['unsampled']} about items not sampled, "
                  f"{data['duplicates']} duplicates; {data['added']} joined the training data, {data['holdout']} "
                  "held out")
    rows = [(f"feedback hold-out ({gate.holdout_items})", gate.production["holdout"].get(gate.metric),
             gate.candidate["holdout"].get(gate.metric)),
            (f"test split ({gate.test_items})", gate.production["test"].get(gate.metric),
             gate.candidate["test"].get(gate.metric))]
    print_table(f"{domain} {gate.metric}", ["judged on", f"{done.production} (production)",
                                            f"{done.candidate} (candidate)"], rows, False)
    if done.canary:
        console.print(f"gate passed: {done.candidate} now answers {'a shadow copy of ' if shadow else ''}{weight:g}% "
                      f"of requests; `cityserve monitor {domain}` compares them, then `models promote` or "
                      "`models abort`")
        _reload(ws, domain)
    else:
        console.print(f"gate failed: {done.candidate} stays a candidate ({'; '.join(gate.reasons)})")


@main.command()
@click.argument("domain", type=DOMAIN)
@click.option("--version", "ref", default="production", show_default=True, help="Version id or alias.")
@click.option("--out", metavar="PATH|URI",
              help="Report folder, local or a URI such as s3://bucket/reports (default: CITYSERVE_REPORTS_DIR).")
@click.option("--sweep", "sweep_ref", metavar="VERSION", help="Also score this swept version (report key `sweep`).")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def evaluate(domain: str, ref: str, out: str | None, sweep_ref: str | None, as_json: bool) -> None:
    """Score a version of DOMAIN on its test split; writes reports/DOMAIN.json and a PNG."""
    from core.storage import join
    from domains import get_domain
    from training.evaluate import evaluate as run_evaluation

    ws = workspace()
    out = out or ws.settings.reports_dir
    report, evaluation = run_evaluation(get_domain(domain), ws, ref, out, sweep_ref)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    swept = report.get("sweep")
    swept_by_key = {(m["subset"], m.get("horizon", ""), m.get("label", ""), m["name"]): m["model"]
                    for m in (swept["metrics"] if swept else [])}
    rows = []
    for r in evaluation.rows:
        base = ", ".join(f"{k} {v:.4g}" for k, v in r.baselines.items())
        key = (r.subset, r.horizon or "", r.label or "", r.name)
        rows.append((*key, r.model, swept_by_key.get(key, ""), base) if swept else (*key, r.model, base))
    columns = ["subset", "horizon", "label", "metric", report["version"]]
    columns += [f"{swept['version']} (swept)"] if swept else []
    print_table(f"{domain} on the test split", [*columns, "baselines"], rows, False)
    fitted = evaluation.calibration
    if fitted:
        title = f"confidence: temperature {fitted['temperature']:.2f}, uncertain below {fitted['uncertain_below']:.2f}"
        print_table(title,
                    ["subset", "ECE before", "ECE after", "flagged", "accuracy flagged", "accuracy rest"],
                    [(name, c["ece_before"], c["ece_after"], f"{c['share']:.0%}",
                      *("—" if c[k] is None else c[k] for k in ("accuracy_flagged", "accuracy_rest")))
                     for name, c in fitted["subsets"].items()], False)
    for note in evaluation.notes:
        console.print(f"- {note}")
    console.print(f"report: {join(out, domain + '.json')}; figure: {evaluation.figure or join(out, domain + '.png')}")


# ---- models ----------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """List, inspect, promote and roll back registered model versions."""


def _promote(domain: Domain, ws: Workspace, version: str) -> Version:
    """Makes `version` production once it loads as the domain's predictor."""
    return ws.registry.promote(domain.name, version, verify=lambda path: domain.load_predictor(path, version))


def _announce(ws: Workspace, domain: str, version: str) -> None:
    """Says what changed, and has the running platform (if any) reload the domain without a restart."""
    console.print(f"{domain} production is now {version}")
    _reload(ws, domain)


@models.command("list")
@click.argument("domain", type=DOMAIN, required=False)
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def models_list(domain: str | None, as_json: bool) -> None:
    """Versions of one domain (or all) with stage, profile and validation metric."""
    registry = workspace().registry
    rows = []
    for name in [domain] if domain else sorted(DOMAINS):
        for v in registry.versions(name):
            metric = v.record.get("metric", "")
            created = v.record.get("created", "")
            rows.append((name, v.version, v.stage, v.record.get("profile", ""), metric,
                         v.metrics.get(metric, float("nan")),
                         created if as_json else created[:16].replace("T", " ")))  # to the minute, for people
    print_table("model versions", ["domain", "version", "stage", "profile", "metric", "value", "created"],
                rows, as_json)


@models.command("show")
@click.argument("domain", type=DOMAIN)
@click.argument("version", default="production")
@friendly_errors
def models_show(domain: str, version: str) -> None:
    """Everything recorded about a version: metrics, data checksum, code revision, lineage."""
    v = workspace().registry.get(domain, version)
    click.echo(json.dumps({**v.record, "stage": v.stage}, indent=2, default=str))


@models.command("optimize")
@click.argument("domain", type=DOMAIN)
@click.argument("version")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def models_optimize(domain: str, version: str, as_json: bool) -> None:
    """(Re)make VERSION's ONNX artifacts (fp32 and int8) and score each on the test split."""
    from domains import get_domain
    from training.runs import optimize_version

    v = optimize_version(get_domain(domain), workspace(), version)
    if "inference_error" in v.record:
        raise click.ClickException(f"{domain} {v.version}: {v.record['inference_error']}; it serves PyTorch")
    inference = v.record["inference"]
    rows = [(name, "yes" if b.get("kept", True) else "no (below the gate)", b["value"],
             100 * b.get("delta", 0.0), b.get("agreement", 1.0)) for name, b in inference["backends"].items()]
    print_table(f"{domain} {v.version}: backends on the test split ({inference['texts']} texts)",
                ["backend", "kept", inference["metric"], "points vs torch", "same label as torch"], rows, as_json)


@models.command("calibrate")
@click.argument("domain", type=DOMAIN)
@click.argument("version")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def models_calibrate(domain: str, version: str, as_json: bool) -> None:
    """(Re)fit VERSION's calibration on its validation split: the text models' temperature and
    `uncertain` threshold per backend, the forecasters' P10-P90 widths; then its reference,
    what drift and live quality are measured against (both made at registration; this is for a
    version registered before)."""
    from domains import get_domain
    from training.runs import calibrate_version

    v = calibrate_version(get_domain(domain), workspace(), version)
    fitted = {"calibration": v.record.get("calibration", {}), "reference quality": v.record["reference"]["quality"]}
    rows = [(" ".join(path), value) for path, value in _leaves(fitted)]
    print_table(f"{domain} {v.version}: fitted on the validation split ({v.record['reference']['items']} cases)",
                ["what", "value"], rows, as_json)


def _leaves(tree: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of each leaf of nested dicts; a list is a leaf, its numbers rounded."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, str(key)))
    else:
        yield path, ", ".join(f"{v:.4g}" for v in tree) if isinstance(tree, list) else tree


@models.command("promote")
@click.argument("domain", type=DOMAIN)
@click.argument("version")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def models_promote(domain: str, version: str, yes: bool) -> None:
    """Make VERSION of DOMAIN production (refused if its files do not load or an optimised
    artifact scores more than 1 point below its PyTorch model)."""
    from domains import get_domain

    if not yes:
        click.confirm(f"Make {domain} {version} production?", abort=True)
    ws = workspace()
    v = _promote(get_domain(domain), ws, version)
    _announce(ws, domain, v.version)


@models.command("rollback")
@click.argument("domain", type=DOMAIN)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def models_rollback(domain: str, yes: bool) -> None:
    """Return DOMAIN's production to the version that served before."""
    if not yes:
        click.confirm(f"Roll {domain} production back to its previous version?", abort=True)
    ws = workspace()
    v = ws.registry.rollback(domain)
    _announce(ws, domain, v.version)


@models.command("canary")
@click.argument("domain", type=DOMAIN)
@click.argument("version")
@click.option("--weight", type=click.FloatRange(0, 100, min_open=True), default=10, show_default=True,
              help="Percent of the domain's requests it answers (or, with --shadow, answers a copy of).")
@click.option("--shadow", is_flag=True, help="Answer a copy of that share beside production, never returned: its "
              "answers are recorded in the sample log (tenants that sample) for `cityserve monitor`.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def models_canary(domain: str, version: str, weight: float, shadow: bool, yes: bool) -> None:
    """Try VERSION of DOMAIN on a share of live traffic beside production (checked as promote
    checks it); answers carry X-Model-Version. End it with `models promote` or `models abort`.
    Run again with another --weight to change the share."""
    from domains import get_domain

    share = f"a shadow copy of {weight:g}%" if shadow else f"{weight:g}%"
    if not yes:
        click.confirm(f"Send {share} of {domain} requests to {version}?", abort=True)
    ws = workspace()
    dom = get_domain(domain)
    v = ws.registry.start_canary(domain, version, weight, shadow=shadow,
                                 verify=lambda path: dom.load_predictor(path, version))
    console.print(f"{domain} {v.version} now answers {share} of requests")
    _reload(ws, domain)


@models.command("abort")
@click.argument("domain", type=DOMAIN)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly_errors
def models_abort(domain: str, yes: bool) -> None:
    """End DOMAIN's canary without promoting it: production answers every request again."""
    if not yes:
        click.confirm(f"End {domain}'s canary?", abort=True)
    ws = workspace()
    version = ws.registry.abort_canary(domain)
    console.print(f"{domain} canary of {version} ended; production answers every request")
    _reload(ws, domain)


def _reload(ws: Workspace, domain: str) -> None:
    """Has the running platform (if any) take up the domain's stages, and says so."""
    from services.platform import reload_domain

    production, canary = ws.registry.get(domain).version, ws.registry.canary(domain)
    if reload_domain(ws, domain, production, canary=canary["version"] if canary else None):
        console.print(f"the running platform took it up ({domain} production {production}"
                      f"{', canary ' + canary['version'] if canary else ''})")


# ---- run -------------------------------------------------------------------------------------
def ensure_production(domains: Sequence[str], profile: str) -> None:
    """Every domain gets a production model: trained with PROFILE (and promoted) where it has none."""
    from core.errors import RegistryError
    from domains import get_domain
    from training.trainer import train as run_training

    ws = workspace()
    for domain in domains:
        try:
            console.print(f"[green]{domain}[/green]: production is {ws.registry.get(domain, 'production').version}")
        except RegistryError:
            console.rule(f"{domain}: no production model, training the {profile} profile")
            dom = get_domain(domain)
            version = _promote(dom, ws, run_training(dom, ws, profile=profile).version)
            console.print(f"{domain}: {version.version} trained and promoted")


@main.command()
@click.option("--profile", type=click.Choice(["quick", "full"]), default="quick", show_default=True,
              help="What to train for a domain without a production model.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--domain", "domains", type=DOMAIN, multiple=True, help="Only these domains (repeatable).")
@click.pass_context
@friendly_errors
def run(ctx: click.Context, profile: str, port: int, domains: tuple[str, ...]) -> None:
    """The whole platform: production models (training where none), Ray, Serve, a demo tenant."""
    import signal

    import ray

    ensure_production(domains or sorted(DOMAINS), profile)
    # Training ran on a Ray cluster of this process's own: the platform starts its own head, so this
    # one would only hold memory. And Ray Train left its SIGINT handler (abort the training run)
    # installed, which swallowed Ctrl-C: the platform never stopped.
    if ray.is_initialized():
        ray.shutdown()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ctx.invoke(serve_up, port=port, domains=domains, demo=True)


main.add_command(serve)
main.add_command(tenants)
main.add_command(usage)
main.add_command(samples)
main.add_command(monitor)
main.add_command(batch)
main.add_command(cluster)
