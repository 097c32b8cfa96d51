"""Generates every table of figures in docs/ and the chart's values reference, so none is typed by hand.

    .venv/bin/python docs/generate.py            # rewrite the generated blocks that are stale
    .venv/bin/python docs/generate.py --check    # exit 1 naming each stale page; write nothing

The pages are hand-written. A generated block sits between two markers,

    <!-- BEGIN GENERATED: name -->
    <!-- END GENERATED: name -->

and only what lies between them is replaced, from `bench/results/*.json`, `reports/*.json` (shapes:
`../shared/schemas/`) or `helm/values.yaml` (its `# --` comments, the way helm-docs reads a chart).
Every block names the file it comes from and the commit its figures were measured at, where the file
records one. Tables stay within 80 columns: one idea per table, the columns that matter.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "<!-- BEGIN GENERATED: {} -->"
END = "<!-- END GENERATED: {} -->"
BLOCK = re.compile(r"<!-- BEGIN GENERATED: (?P<name>[a-z0-9-]+) -->\n?(?P<body>.*?)<!-- END GENERATED: (?P=name) -->",
                   re.DOTALL)
MARKER = re.compile(r"<!-- (BEGIN|END) GENERATED: ([^ ]+) -->")

Json = dict[str, Any]


class StalePage(Exception):
    """A page whose markers are broken (unknown name, unpaired BEGIN/END)."""


# ---- reading result files ------------------------------------------------------------------------

def load(root: Path, rel: str) -> Json | None:
    """The JSON document at ROOT/REL, or None when the file does not exist (not measured yet)."""
    path = root / rel
    if not path.is_file():
        return None
    document: Json = json.loads(path.read_text())
    return document


def commit_of(*documents: Mapping[str, Any]) -> str:
    """The first `commit` found (a row's own before its file's), as a short hash or 'not recorded'."""
    for document in documents:
        commit = document.get("commit")
        if isinstance(commit, str) and commit:
            return f"`{commit[:10]}`"
    return "not recorded"


def rows_carry_commits(rows: Iterable[Mapping[str, Any]], top: Mapping[str, Any]) -> bool:
    """Whether some row was measured at another commit than its file says (then a column shows it)."""
    return any(row.get("commit") and row.get("commit") != top.get("commit") for row in rows)


def result_table(rows: Iterable[Mapping[str, Any]], document: Mapping[str, Any], header: Sequence[str],
                 align: str, cells: Callable[[Any], list[str]]) -> str:
    """A table of one result file's rows; a `commit` column when some row was measured at another
    commit than its file says."""
    rows = list(rows)
    by_row = rows_carry_commits(rows, document)
    body = [cells(row) + ([commit_of(row, document)] if by_row else []) for row in rows]
    return table([*header, *(["commit"] if by_row else [])], body, align + ("l" if by_row else ""))


def file_commit(rows: Iterable[Mapping[str, Any]], document: Mapping[str, Any], per_row: str = "per row") -> str:
    """The caption's commit: the file's, or where rows carry their own, where to find them."""
    return per_row if rows_carry_commits(rows, document) else commit_of(document)


def source(files: Sequence[str], commit: str, *extra: str) -> str:
    """The caption under a table: where the figures come from and which code they belong to."""
    names = ", ".join(f"`{name}`" for name in files)
    parts = [f"From {names}", f"commit {commit}", *extra]
    return wrap("*" + "; ".join(parts) + ".*")


def missing(rel: str, command: str) -> str:
    return wrap(f"*No `{rel}` yet: `{command}` writes it.*")


def from_result(rel: str, command: str) -> Callable[[Callable[[Json, str], str]], Callable[[Path], str]]:
    """A generated block built from one result file `rel`; where the file is missing, the block
    says which `command` writes it."""
    def block(build: Callable[[Json, str], str]) -> Callable[[Path], str]:
        @functools.wraps(build)
        def from_root(root: Path) -> str:
            document = load(root, rel)
            return missing(rel, command) if document is None else build(document, rel)
        return from_root
    return block


# ---- formatting ----------------------------------------------------------------------------------

def num(value: float | None, digits: int = 1) -> str:
    """A figure with thousands separators; `—` for a missing one."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def rate(value: float) -> str:
    """Items or samples a second: whole numbers from 1,000 up, one decimal below."""
    return num(value, 0 if abs(value) >= 1000 else 1)


WIDTH = 80
LINE_START = re.compile(r"^([-+*>]|#+|\d+[.)])$")  # what would start a list, quote or heading


def wrap(text: str, indent: str = "") -> str:
    """TEXT as lines of at most 80 characters (a longer word stands alone), continuation lines
    indented by INDENT; never starts a line with a word Markdown would read as a list or heading."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > WIDTH and not LINE_START.match(word):
            lines.append(line)
            line = indent + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines)


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table; `align` is one letter per column (l or r), right for figures by default."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


# ---- evaluation reports (reports/DOMAIN.json) ----------------------------------------------------

# Targets the project set for the `full` models; the reports carry figures, not targets.
TRAFFIC_TARGET_VS_HISTORICAL = {("simulated_network", "15min"): 0.65, ("simulated_network", "30min"): 0.74,
                                ("simulated_network", "60min"): 0.85, ("real_counts", "15min"): 0.85}
COVERAGE_BAND = (0.75, 0.85)  # a P10-P90 band should hold ~80 % of actuals
ENERGY_TARGET_VS_LAST_WEEK = {"victoria_2014": 0.6}
EVENTS_TARGET_MACRO_F1 = 0.90
EVENTS_TARGET_POINTS_OVER_TFIDF = 5.0


def metric(report: Json, subset: str, name: str, horizon: str | None = None, label: str | None = None,
           key: str = "metrics") -> Json | None:
    """One metric row of a report (or of its `sweep`, key='sweep')."""
    rows = report["sweep"]["metrics"] if key == "sweep" else report["metrics"]
    for row in rows:
        if (row["subset"], row["name"], row.get("horizon"), row.get("label")) == (subset, name, horizon, label):
            found: Json = row
            return found
    return None


def subsets(report: Json) -> list[str]:
    """The report's subsets in the order they first appear."""
    return list(dict.fromkeys(row["subset"] for row in report["metrics"]))


def report_caption(report: Json, rel: str, *extra: str) -> str:
    return source([rel], commit_of(report), f"{report['domain']} {report['version']}, profile "
                  f"`{report['profile']}`", *extra)


@from_result("reports/traffic.json", "cityserve evaluate traffic")
def eval_traffic(report: Json, rel: str) -> str:
    rows = []
    for subset in subsets(report):
        for horizon in ("15min", "30min", "60min"):
            mae = metric(report, subset, "mae", horizon)
            coverage = metric(report, subset, "coverage_p10_p90", horizon)
            if mae is None:
                continue
            base = mae["baselines"]
            vs_hist = mae["model"] / base["historical_average"]
            target = TRAFFIC_TARGET_VS_HISTORICAL.get((subset, horizon))
            hist = f"{vs_hist:.3f}" + (f" {mark(vs_hist <= target)}" if target else "")
            cov = "—"
            if coverage is not None:
                low, high = COVERAGE_BAND
                cov = f"{coverage['model']:.3f} {mark(low <= coverage['model'] <= high)}"
            rows.append([subset, horizon.replace("min", " min"), f"{mae['model']:.2f}", hist,
                         f"{mae['model'] / base['last_value']:.3f}", f"{mae['model'] / base['seasonal_naive']:.3f}",
                         cov])
    out = [table(["subset", "horizon", "MAE", "× hist. avg", "× last", "× seasonal", "P10–P90"], rows)]
    floor = metric(report, "real_counts", "mae", "15min")
    if floor is not None and "poisson_floor" in floor["baselines"]:
        value = floor["baselines"]["poisson_floor"]
        out.append(wrap(f"Poisson noise floor on `real_counts`: MAE {value:.2f} = "
                        f"**{value / floor['baselines']['historical_average']:.3f}×** historical average."))
    low, high = COVERAGE_BAND
    targets = ", ".join(f"{subset} {horizon.replace('min', ' min')} ≤ {bound:g}"
                        for (subset, horizon), bound in TRAFFIC_TARGET_VS_HISTORICAL.items())
    out.append(report_caption(report, rel, "MAE in vehicles per 5 min (grid) / 15 min (intersection); "
                              f"targets for × hist. avg: {targets}; P10–P90 coverage target {low:g}–{high:g}"))
    return "\n\n".join(out)


@from_result("reports/energy.json", "cityserve evaluate energy")
def eval_energy(report: Json, rel: str) -> str:
    rows = []
    for subset in subsets(report):
        mape = metric(report, subset, "mape", "day_ahead")
        coverage = metric(report, subset, "coverage_p10_p90", "day_ahead")
        if mape is None:
            continue
        base = mape["baselines"]
        ratio = mape["model"] / base["same_time_last_week"]
        target = ENERGY_TARGET_VS_LAST_WEEK.get(subset)
        vs = f"{ratio:.3f}" + (f" {mark(ratio <= target)}" if target else "")
        rows.append([subset, f"{mape['model']:.4f}", vs, f"{base['regression']:.4f}",
                     f"{coverage['model']:.3f}" if coverage else "—"])
    return "\n\n".join([
        table(["subset", "MAPE", "× last week", "grad. boost.", "P10–P90"], rows),
        report_caption(report, rel, "day-ahead, 48 half-hours; × last week: MAPE over same time last week's, "
                       "target " + ", ".join(f"{subset} ≤ {bound:g}" for subset, bound in
                                             ENERGY_TARGET_VS_LAST_WEEK.items())
                       + "; gradient boosting is a regression on the same inputs (its MAPE)")])


@from_result("reports/events.json", "cityserve evaluate events")
def eval_events(report: Json, rel: str) -> str:
    rows = []
    for subset in subsets(report):
        f1 = metric(report, subset, "macro_f1")
        accuracy = metric(report, subset, "accuracy")
        priority = metric(report, subset, "priority_macro_f1")
        if f1 is None:
            continue
        tfidf = f1["baselines"]["tfidf_logreg"]
        points = 100 * (f1["model"] - tfidf)
        rows.append([subset, f"{f1['model']:.3f} {mark(f1['model'] >= EVENTS_TARGET_MACRO_F1)}",
                     f"{points:+.1f} {mark(points >= EVENTS_TARGET_POINTS_OVER_TFIDF)}",
                     f"{accuracy['model']:.3f}" if accuracy else "—",
                     f"{priority['model']:.3f}" if priority else "—", f"{tfidf:.3f}"])
    first = subsets(report)[0]
    classes = sorted((row for row in report["metrics"] if row["name"] == "f1" and row["subset"] == first),
                     key=lambda row: -row["model"])
    per_class = table(["class", "F1", "TF-IDF F1"],
                      [[row["label"], f"{row['model']:.2f}", f"{row['baselines']['tfidf_logreg']:.2f}"]
                       for row in classes])
    return "\n\n".join([
        table(["subset", "macro-F1", "pts > TF-IDF", "accuracy", "priority F1", "TF-IDF F1"], rows),
        f"Per class, `{first}`:",
        per_class,
        report_caption(report, rel, f"targets: macro-F1 ≥ {EVENTS_TARGET_MACRO_F1:.2f} and ≥ "
                       f"+{EVENTS_TARGET_POINTS_OVER_TFIDF:g} points over TF-IDF + logistic regression")])


@from_result("reports/sentiment.json", "cityserve evaluate sentiment")
def eval_sentiment(report: Json, rel: str) -> str:
    out = []
    for name, title in (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")):
        rows = []
        for subset in subsets(report):
            row = metric(report, subset, name)
            if row is None:
                continue
            base = row["baselines"]
            beats = row["model"] > base["linear_probe"] and (subset != "tweets" or row["model"] > base["vader"])
            rows.append([subset, f"{row['model']:.3f} {mark(beats)}", f"{base['vader']:.3f}",
                         f"{base['linear_probe']:.3f}", f"{base['majority']:.3f}"])
        out += [f"{title}:", table(["subset", "model", "VADER", "linear probe", "majority"], rows)]
    labels = ["negative", "neutral", "positive"]
    rows = []
    for subset in subsets(report):
        cells = [metric(report, subset, "f1", label=label) for label in labels]
        rows.append([subset, *[f"{cell['model']:.2f}" if cell else "—" for cell in cells]])
    out += ["F1 per class (the model):", table(["subset", *labels], rows)]
    out.append(report_caption(report, rel, "✓: above the linear probe (and, on tweets, above VADER)"))
    return "\n\n".join(out)


def eval_energy_sweep(root: Path) -> str:
    rel = "reports/energy.json"
    report = load(root, rel)
    if report is None or "sweep" not in report:
        return f"*No swept version in `{rel}` yet: `cityserve evaluate energy --sweep VERSION` adds one.*"
    sweep = report["sweep"]
    names = {"mape": "MAPE", "coverage_p10_p90": "P10–P90 cov.", "pinball": "pinball"}
    rows = []
    for subset in subsets(report):
        for name, title in names.items():
            ours = metric(report, subset, name, "day_ahead")
            swept = metric(report, subset, name, "day_ahead", key="sweep")
            if ours is None or swept is None:
                continue
            def shown(value: float, name: str = name) -> str:
                if name == "pinball":  # in the series' units: GW (~0.06) or MW (~130)
                    return num(value, 4 if abs(value) < 1 else 1)
                return f"{value:.4f}" if name == "mape" else f"{value:.3f}"

            regression = ours["baselines"].get("regression")
            cells = [shown(ours["model"]), shown(swept["model"])]
            if name == "mape":
                best = min(range(2), key=lambda i: (ours["model"], swept["model"])[i])
                cells[best] = f"**{cells[best]}**"
            rows.append([subset, title, *cells, shown(regression) if regression is not None else "—"])
    return "\n\n".join([
        table(["subset", "metric", f"prod. {report['version']}", f"swept {sweep['version']}", "grad. boost."],
              rows, "llrrr"),
        source([rel], commit_of(sweep, report), f"key `sweep`: `{sweep['sweep_id']}`; pinball in the "
               "series' units (GW for Victoria, MW for England & Wales)")])


# ---- benchmarks (bench/results/*.json) -----------------------------------------------------------

TRAIN_RATIO_TARGET = 0.9
TUNE_GAP_TARGET = 0.02        # tune_efficiency.schema.json: relative_gap <= 0.02
TUNE_SHARE_TARGET = 0.35      # tune_efficiency.schema.json: compute_share <= 0.35


def train_throughput(root: Path) -> str:
    files = [rel for rel in ("bench/results/train_throughput.json", "bench/results/train_throughput_gpu.json")
             if (root / rel).is_file()]
    if not files:
        return missing("bench/results/train_throughput.json", ".venv/bin/python -m bench.train_throughput")
    out = []
    for rel in files:
        document = load(root, rel) or {}
        rows = document["rows"]
        out.append(result_table(
            rows, document, ["domain", "device", "threads", "plain torch", "Ray Train", "ratio", "load"], "lllrrrr",
            lambda row: [row["domain"], row["device"], str(row["threads"]), rate(row["plain_samples_per_s"]),
                         rate(row["ray_samples_per_s"]),
                         f"{row['ratio']:.2f} {mark(row['ratio'] >= TRAIN_RATIO_TARGET)}",
                         num(row.get("load_average"), 2)]))
        out.append(source([rel], file_commit(rows, document),
                          f"samples/s; ratio = Ray Train / plain, target ≥ {TRAIN_RATIO_TARGET:g}; "
                          "load = load average while measured"))
    return "\n\n".join(out)


@from_result("bench/results/tune_efficiency.json", ".venv/bin/python -m bench.tune_efficiency")
def tune_efficiency(document: Json, rel: str) -> str:
    rows = document["rows"]

    def cells(row: Json) -> list[str]:
        gap, share = row.get("relative_gap"), row.get("compute_share")
        return [row["domain"], f"`{row['metric']}`", f"{row['grid']['best']:.4f}", f"{row['asha']['best']:.4f}",
                f"{gap:+.3f} {mark(gap <= TUNE_GAP_TARGET)}" if gap is not None else "—",
                f"{share:.2f} {mark(share <= TUNE_SHARE_TARGET)}" if share is not None else "—",
                f"{row['grid']['trial_epochs']} / {row['asha']['trial_epochs']}"]

    walls = ", ".join(f"{row['domain']} {num(row['grid'].get('wall_s'), 0)} / {num(row['asha'].get('wall_s'), 0)} s"
                      for row in rows)
    loads = ", ".join(f"{row['domain']} {num(row.get('load_average'), 2)}" for row in rows)
    return "\n\n".join([
        result_table(rows, document, ["domain", "metric", "grid best", "ASHA best", "gap", "compute", "epochs"],
                     "llrrrrr", cells),
        source([rel], file_commit(rows, document),
               f"gap: how much worse ASHA's best is, relative (target ≤ {TUNE_GAP_TARGET:g}); compute: ASHA's "
               f"trial-epochs over the grid's (target ≤ {TUNE_SHARE_TARGET:g}); epochs: grid / ASHA "
               f"trial-epochs; wall time grid / ASHA: {walls}; load average: {loads}")])


def serve_rows(document: Json) -> dict[str, list[Json]]:
    grouped: dict[str, list[Json]] = {}
    for row in document["rows"]:
        grouped.setdefault(row["domain"], []).append(row)
    return grouped


def serve_caption(document: Json, rel: str, what: str) -> str:
    rows = document["rows"]
    commit = "per row (column)" if rows_carry_commits(rows, document) else commit_of(document)
    extra = [what, document["device"]]
    if "torch_threads" in document:
        extra.append(f"{document['torch_threads']} torch thread(s) per model")
    if "seconds_per_cell" in document:
        extra.append(f"{document['seconds_per_cell']:g} s per cell")
    if "load_average" in document:
        extra.append(f"load average {document['load_average']:g} at the end")
    return source([rel], commit, *extra)


def serve_throughput_table(document: Json, rel: str) -> str:
    def cells(row: Json) -> list[str]:
        gateway = row["gateway_items_per_s"]
        return [row["domain"], f"{row['concurrency']} × {row['items_per_request']}",
                rate(row["in_process_items_per_s"]), rate(row["uvicorn_items_per_s"]), rate(gateway),
                f"{gateway / row['in_process_items_per_s']:.2f}", f"{gateway / row['uvicorn_items_per_s']:.2f}",
                f"{row['errors']:,}"]

    rows = [row for grouped in serve_rows(document).values() for row in grouped]  # a domain's rows together
    header = ["domain", "conc × items", "(a)", "(b)", "(c)", "c/a", "c/b", "(c) err"]
    return "\n\n".join([result_table(rows, document, header, "lrrrrrrr", cells),
                        serve_caption(document, rel, "items/s")])


def serve_latency_table(document: Json, rel: str) -> str:
    body = []
    for domain, rows in serve_rows(document).items():
        for row in rows:
            uvicorn = (f"{row['uvicorn_p50_ms']:,.0f} / {row['uvicorn_p99_ms']:,.0f}"
                       if "uvicorn_p50_ms" in row else "—")
            body.append([domain, f"{row['concurrency']} × {row['items_per_request']}", uvicorn,
                         f"{row['gateway_p50_ms']:,.0f} / {row['gateway_p99_ms']:,.0f}"])
    return "\n\n".join([table(["domain", "conc × items", "(b) p50 / p99", "(c) p50 / p99"], body),
                        serve_caption(document, rel, "milliseconds per request")])


def serve_throughput(root: Path) -> str:
    rel = "bench/results/serve_load.json"
    document = load(root, rel)
    return serve_throughput_table(document, rel) if document else missing(rel, ".venv/bin/python -m bench.serve_load")


def serve_latency(root: Path) -> str:
    rel = "bench/results/serve_load.json"
    document = load(root, rel)
    return serve_latency_table(document, rel) if document else missing(rel, ".venv/bin/python -m bench.serve_load")


def serve_gpu(root: Path) -> str:
    rel = "bench/results/serve_gpu.json"
    document = load(root, rel)
    if document is None:
        return "*No `bench/results/serve_gpu.json` yet: serving has not been measured on a GPU.*"
    return "\n\n".join([serve_throughput_table(document, rel), serve_latency_table(document, rel)])


@dataclass(frozen=True)
class ServeTarget:
    """One serving target: a ratio (or p99) in one cell of serve_load.json, compared with a bound."""

    what: str
    domains: tuple[str, ...]
    concurrency: int
    items: int
    value: Callable[[Json], float]
    bound: float
    at_most: bool = False
    unit: str = ""


SERVE_TARGETS = (
    ServeTarget("16 items: (c) ≥ 0.7 × (a)", ("events", "sentiment"), 64, 16,
                lambda r: r["gateway_items_per_s"] / r["in_process_items_per_s"], 0.7),
    ServeTarget("16 items: (c) ≥ 0.3 × (a)", ("traffic", "energy"), 64, 16,
                lambda r: r["gateway_items_per_s"] / r["in_process_items_per_s"], 0.3),
    ServeTarget("1 item: (c) ≥ 0.35 × (a)", ("events", "sentiment"), 64, 1,
                lambda r: r["gateway_items_per_s"] / r["in_process_items_per_s"], 0.35),
    ServeTarget("1 item: (c) ≥ 0.8 × (b)", ("events", "sentiment"), 64, 1,
                lambda r: r["gateway_items_per_s"] / r["uvicorn_items_per_s"], 0.8),
    ServeTarget("p99 ≤ 250 ms, conc. 16, 1 item", ("events", "sentiment"), 16, 1,
                lambda r: r["gateway_p99_ms"], 250, at_most=True, unit=" ms"),
)
SCALE_UP_TARGET_S = 15.0
IDLE_RSS_TARGET_GB = 6.0


def serve_targets(root: Path) -> str:
    rel, auto_rel = "bench/results/serve_load.json", "bench/results/autoscale.json"
    document, autoscale = load(root, rel), load(root, auto_rel)
    body = []
    if document is not None:
        cells = {(r["domain"], r["concurrency"], r["items_per_request"]): r for r in document["rows"]}
        for target in SERVE_TARGETS:
            values = [cells.get((d, target.concurrency, target.items)) for d in target.domains]
            if any(v is None for v in values):
                continue
            figures = [target.value(v) for v in values if v is not None]
            ok = [f <= target.bound if target.at_most else f >= target.bound for f in figures]
            shown = " / ".join(f"{f:.0f}" if target.unit else f"{f:.2f}" for f in figures)
            body.append([f"{target.what}, {' / '.join(target.domains)}", shown + target.unit,
                         " / ".join(mark(o) for o in ok)])
        if "idle_rss_gb" in document:
            rss = document["idle_rss_gb"]
            body.append([f"idle platform ≤ {IDLE_RSS_TARGET_GB:g} GB resident", f"{rss:.2f} GB",
                         mark(rss <= IDLE_RSS_TARGET_GB)])
    if autoscale is not None:
        up = autoscale["scale_up_s"]
        body.append([f"scale-up ≤ {SCALE_UP_TARGET_S:g} s ({autoscale['domain']})", f"{up:.1f} s",
                     mark(up <= SCALE_UP_TARGET_S)])
    if not body:
        return missing(rel, ".venv/bin/python -m bench.serve_load")
    commits = list(dict.fromkeys(commit_of(d) for d in (document, autoscale) if d is not None))
    return "\n\n".join([
        table(["target (concurrency 64 unless said)", "measured", ""], body, "lrl"),
        source([f for f, d in ((rel, document), (auto_rel, autoscale)) if d is not None], " / ".join(commits))])


@from_result("bench/results/autoscale.json", ".venv/bin/python -m bench.autoscale")
def autoscale(document: Json, rel: str) -> str:
    rounds = document.get("rounds", [])
    body = [[str(i), f"{r['scale_up_s']:.1f}", f"{r['scale_down_s']:.1f}", str(r.get("load_errors_last_5s", "—"))]
            for i, r in enumerate(rounds, 1)]
    body.append(["**median**", f"**{document['scale_up_s']:.1f}**", f"**{document['scale_down_s']:.1f}**", ""])
    config = document.get("config", {})
    scaling = config.get("autoscaling_config", {})
    setting = ", ".join(f"`{k}` {v}" for k, v in scaling.items())
    extra = [f"{document['domain']}, {config.get('concurrency', '?')} clients per step",
             "scale-up: load start → the added replica answers; scale-down: load end → it is gone"]
    if setting:
        extra.append(f"settings during the run: {setting}")
    if "load_average" in document:
        extra.append(f"load average {document['load_average']:g}")
    return "\n\n".join([table(["step", "scale-up s", "scale-down s", "errors, last 5 s"], body),
                        source([rel], commit_of(document), *extra)])


# ---- reliability (bench/results/reliability.json) ------------------------------------------------

SHORT_LIST = 20  # series longer than this stay in the file (e.g. requests per second over a run)
SHORT_RECORD = 8  # records of more keys, or of nested values, stay in the file


def figure(value: Any) -> str | None:
    """A figure as the reader sees it; None for structures too big for a page (they stay in the file)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) <= SHORT_LIST and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return "[" + ", ".join(figure(v) or "" for v in value) + "]"
    if isinstance(value, list) and not value:
        return "[]"
    if isinstance(value, dict) and len(value) <= SHORT_RECORD:
        shown = {key: figure(v) for key, v in value.items() if not isinstance(v, dict | list)}
        if len(shown) == len(value):
            return "{" + ", ".join(f"{key}: {text}" for key, text in shown.items()) + "}"
    return None


@from_result("bench/results/reliability.json", "make reliability")
def reliability(document: Json, rel: str) -> str:
    checks = document["checks"]
    passed = sum(1 for check in checks if check["passed"])
    out = [result_table(checks, document, ["check", "passed", "seconds", "load avg."], "llrr",
                        lambda check: [f"`{check['name']}`", "yes" if check["passed"] else "**no**",
                                       num(check["figures"].get("seconds"), 1),
                                       num(check["figures"].get("load_average"), 2)]),
           wrap(f"**{passed} of {len(checks)} checks pass.** Their figures (series longer than {SHORT_LIST} "
                "values and nested records stay in the file; `.venv/bin/python -m bench.reliability --table` "
                "prints it):")]
    for check in checks:
        shown, kept = [], 0
        for key, value in check["figures"].items():
            if key in ("seconds", "load_average"):
                continue
            text = figure(value)
            if text is None:
                kept += 1
            else:
                shown.append(f"{key} {text}")
        line = f"- `{check['name']}`: " + ", ".join(shown)
        if kept:
            line += f"; {kept} more in the file"
        for problem in check.get("problems") or []:
            line += f". **Problem:** {problem}"
        out.append(wrap(line.rstrip() + ".", "  "))
    out.append(source([rel], file_commit(checks, document, "per check (column)"),
                      "load avg.: the load average while the check ran"))
    return "\n\n".join(out[:2]) + "\n\n" + "\n".join(out[2:-1]) + "\n\n" + out[-1]


# ---- the chart's values reference (helm/values.yaml) ---------------------------------------------

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")


@dataclass(frozen=True)
class Value:
    """One documented key of values.yaml."""

    key: str
    type: str
    default: str
    description: str


def documented_keys(text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for each key preceded by a `# --` comment, in file order. A comment
    block starts at `# --`, goes on over the `#` lines after it and belongs to the next key; lines of
    list items (`- ...` and what is indented under them) are values, never keys."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    comment: list[str] | None = None
    list_indent: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if not stripped:
            comment = None
            continue
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if stripped.startswith("# --"):
                comment = [stripped[4:].strip()]
            elif comment is not None:
                comment.append(body)
            continue
        if list_indent is not None and (indent > list_indent or (indent == list_indent and stripped.startswith("-"))):
            continue
        list_indent = None
        if stripped.startswith("-"):
            list_indent = indent
            continue
        match = KEY_LINE.match(line)
        if match is None:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if comment is not None:
            out.append((".".join(key for _, key in stack), " ".join(part for part in comment if part)))
            comment = None
    return out


def lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def schema_at(schema: Json, dotted: str) -> Json:
    node: Json = schema
    for part in dotted.split("."):
        node = node.get("properties", {}).get(part, {})
    return node


def type_name(value: Any, schema: Json) -> str:
    """The value's type as helm-docs writes it; the schema decides for a null default."""
    names = {"string": "string", "integer": "int", "number": "float", "boolean": "bool", "array": "list",
             "object": "object", "null": "null", "str": "string"}
    declared = schema.get("type")
    if value is None and declared:
        kinds = [str(kind) for kind in (declared if isinstance(declared, list) else [declared])]
        return " or ".join(names.get(kind, kind) for kind in kinds)
    if value is None and "enum" in schema:
        kinds = sorted({type(v).__name__ for v in schema["enum"] if v is not None})
        return " or ".join([names.get(kind, kind) for kind in kinds] + ["null"])
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object" if isinstance(value, dict) else "null"


def chart_values(root: Path) -> list[Value]:
    text = (root / "helm/values.yaml").read_text()
    values = yaml.safe_load(text)
    schema_path = root / "helm/values.schema.json"
    schema: Json = json.loads(schema_path.read_text()) if schema_path.is_file() else {}
    keys = documented_keys(text)
    names = [key for key, _ in keys]
    out = []
    for key, description in keys:
        value = lookup(values, key)
        children = [name[len(key) + 1:] for name in names if name.startswith(key + ".")]
        default = "`" + json.dumps(without(value, children), separators=(",", ":"), ensure_ascii=False) + "`"
        if children:  # documented in rows of their own: the default shows only what they leave out
            default = "keys below" if default == "`{}`" else f"{default} and keys below"
        out.append(Value(key, type_name(value, schema_at(schema, key)), default, description))
    return out


def without(tree: Any, dotted: Iterable[str]) -> Any:
    """TREE less the DOTTED keys (and what is left empty by removing them)."""
    if not isinstance(tree, dict):
        return tree
    drop = list(dotted)
    out = {}
    for key, value in tree.items():
        if key in drop:
            continue
        below = [name[len(key) + 1:] for name in drop if name.startswith(key + ".")]
        if below:
            value = without(value, below)
            if value == {}:
                continue
        out[key] = value
    return out


def helm_values(root: Path) -> str:
    rows = [[f"`{v.key}`", v.type, v.default, v.description] for v in chart_values(root)]
    return "\n\n".join([table(["key", "type", "default", "description"], rows, "llll"),
                        "*From the `# --` comments of `helm/values.yaml`; types from `helm/values.schema.json` "
                        "where the default is null.*"])


# ---- pages ---------------------------------------------------------------------------------------

BLOCKS: dict[str, Callable[[Path], str]] = {
    "eval-traffic": eval_traffic,
    "eval-energy": eval_energy,
    "eval-events": eval_events,
    "eval-sentiment": eval_sentiment,
    "eval-energy-sweep": eval_energy_sweep,
    "train-throughput": train_throughput,
    "tune-efficiency": tune_efficiency,
    "serve-throughput": serve_throughput,
    "serve-latency": serve_latency,
    "serve-targets": serve_targets,
    "serve-gpu": serve_gpu,
    "autoscale": autoscale,
    "reliability": reliability,
    "helm-values": helm_values,
}


def pages(root: Path) -> list[Path]:
    """The pages that may hold generated blocks: docs/*.md and the chart's README."""
    found = sorted((root / "docs").glob("*.md"))
    chart = root / "helm" / "README.md"
    return found + ([chart] if chart.is_file() else [])


def render(text: str, root: Path, where: str = "page") -> str:
    """TEXT with every generated block rebuilt; raises StalePage on a broken or unknown marker."""
    names = MARKER.findall(text)
    opened: list[str] = []
    for kind, name in names:
        if name not in BLOCKS:
            raise StalePage(f"{where}: unknown generated block {name!r} (known: {', '.join(sorted(BLOCKS))})")
        if kind == "BEGIN":
            if opened:
                raise StalePage(f"{where}: block {name!r} begins inside {opened[-1]!r}")
            opened.append(name)
        elif not opened or opened.pop() != name:
            raise StalePage(f"{where}: END of block {name!r} without its BEGIN")
    if opened:
        raise StalePage(f"{where}: block {opened[-1]!r} has no END marker")

    def rebuild(match: re.Match[str]) -> str:
        name = match["name"]
        return f"{BEGIN.format(name)}\n{BLOCKS[name](root).rstrip()}\n{END.format(name)}"

    return BLOCK.sub(rebuild, text)


def stale(root: Path = ROOT) -> list[Path]:
    """The pages whose committed text differs from what this script generates."""
    return [page for page in pages(root) if render(page.read_text(), root, str(page)) != page.read_text()]


def blocks_used(root: Path = ROOT) -> set[str]:
    """Names of the generated blocks the pages hold."""
    return {name for page in pages(root) for kind, name in MARKER.findall(page.read_text()) if kind == "BEGIN"}


def write(root: Path = ROOT) -> list[Path]:
    """Rewrites the stale pages; returns them."""
    changed = stale(root)
    for page in changed:
        page.write_text(render(page.read_text(), root, str(page)))
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 naming each stale page; write nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            out_of_date = stale()
            for page in out_of_date:
                print(f"stale: {page.relative_to(ROOT)} (run `.venv/bin/python docs/generate.py`)", file=sys.stderr)
            return 1 if out_of_date else 0
        for page in write():
            print(f"wrote {page.relative_to(ROOT)}")
    except StalePage as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
