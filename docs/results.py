"""The generated blocks of figures: evaluation reports (`reports/DOMAIN.json`), benchmarks and
the reliability suite (`bench/results/*.json`), with the targets each figure is judged against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docs.markdown import (
    Json,
    commit_of,
    file_commit,
    from_result,
    load,
    mark,
    missing,
    num,
    rate,
    result_table,
    rows_carry_commits,
    source,
    table,
    wrap,
)

# ---- evaluation reports (reports/DOMAIN.json) ----------------------------------------------------

# Targets the project set for the `full` models; the reports carry figures, not targets.
# Traffic's targets are ratios to the strongest of the report's baselines (lowest MAE) in each row.
TRAFFIC_TARGET_VS_STRONGEST = {("simulated_network", "15min"): 0.65, ("simulated_network", "30min"): 0.74,
                               ("simulated_network", "60min"): 0.85, ("real_counts", "15min"): 0.85}
TRAFFIC_BASELINES = {"historical_average": "hist. avg", "last_value": "last value", "seasonal_naive": "seasonal"}
COVERAGE_BAND = (0.75, 0.85)  # a P10-P90 band should hold ~80 % of actuals
ENERGY_TARGET_VS_LAST_WEEK = {"victoria_2014": 0.6}
EVENTS_TARGET_MACRO_F1 = 0.90
EVENTS_TARGET_POINTS_OVER_TFIDF = 5.0
# On the sets written by hand, as residents write: what a city would meet in its first week.
EVENTS_TARGET_HANDWRITTEN = 0.92  # macro-F1
SENTIMENT_TARGET_CITY_COMMENTS = 0.85  # accuracy


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
            base = {name: mae["baselines"][name] for name in TRAFFIC_BASELINES}
            strongest = min(base, key=base.__getitem__)
            vs_best = mae["model"] / base[strongest]
            target = TRAFFIC_TARGET_VS_STRONGEST.get((subset, horizon))
            best = f"{vs_best:.3f}" + (f" {mark(vs_best <= target)}" if target else "")
            cov = "—"
            if coverage is not None:
                low, high = COVERAGE_BAND
                cov = f"{coverage['model']:.3f} {mark(low <= coverage['model'] <= high)}"
            rows.append([subset, horizon.replace("min", " min"), f"{mae['model']:.2f}", TRAFFIC_BASELINES[strongest],
                         best, f"{mae['model'] / base['historical_average']:.3f}", cov])
    out = [table(["subset", "horizon", "MAE", "strongest", "× strongest", "× hist. avg", "P10–P90"], rows)]
    floor = metric(report, "real_counts", "mae", "15min")
    if floor is not None and "poisson_floor" in floor["baselines"]:
        value = floor["baselines"]["poisson_floor"]
        out.append(wrap(f"Poisson noise floor on `real_counts`: MAE {value:.2f} = "
                        f"**{value / floor['baselines']['historical_average']:.3f}×** historical average."))
    low, high = COVERAGE_BAND
    targets = ", ".join(f"{subset} {horizon.replace('min', ' min')} ≤ {bound:g}"
                        for (subset, horizon), bound in TRAFFIC_TARGET_VS_STRONGEST.items())
    out.append(report_caption(report, rel, "MAE in vehicles per 5 min (grid) / 15 min (intersection); "
                              "strongest: the baseline with the lowest MAE in the row (of historical average, "
                              f"last value, seasonal naive); targets for × strongest: {targets}; "
                              f"P10–P90 coverage target {low:g}–{high:g}"))
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
                       + "; gradient boosting is a regression on a summary of the model's inputs (its MAPE)")])


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
        bound = EVENTS_TARGET_HANDWRITTEN if subset == "handwritten" else EVENTS_TARGET_MACRO_F1
        rows.append([subset, f"{f1['model']:.3f} {mark(f1['model'] >= bound)}",
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
        report_caption(report, rel, f"targets: macro-F1 ≥ {EVENTS_TARGET_MACRO_F1:.2f} (handwritten: ≥ "
                       f"{EVENTS_TARGET_HANDWRITTEN:.2f}) and ≥ +{EVENTS_TARGET_POINTS_OVER_TFIDF:g} points over "
                       "TF-IDF + logistic regression")])


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
            passed: bool | None = None
            if subset == "city_comments":  # no training split of its own: judged by its accuracy target
                if name == "accuracy":
                    passed = row["model"] >= SENTIMENT_TARGET_CITY_COMMENTS
            else:
                passed = row["model"] > base["linear_probe"] and (subset != "tweets" or row["model"] > base["vader"])
            rows.append([subset, f"{row['model']:.3f}" + ("" if passed is None else f" {mark(passed)}"),
                         *[num(base.get(b), 3) for b in ("vader", "linear_probe", "majority")]])
        out += [f"{title}:", table(["subset", "model", "VADER", "linear probe", "majority"], rows)]
    labels = ["negative", "neutral", "positive"]
    rows = []
    for subset in subsets(report):
        cells = [metric(report, subset, "f1", label=label) for label in labels]
        rows.append([subset, *[f"{cell['model']:.2f}" if cell else "—" for cell in cells]])
    out += ["F1 per class (the model):", table(["subset", *labels], rows)]
    out.append(report_caption(report, rel, "✓: above the linear probe (and, on tweets, above VADER); "
                              f"city_comments: accuracy ≥ {SENTIMENT_TARGET_CITY_COMMENTS:.2f}"))
    return "\n\n".join(out)


def explained(report: Json, rel: str, subset: str) -> str:
    """The report's `explained` answers as a list: class, confidence, the text and its four
    weightiest words (a text is too long for a table at 80 columns)."""
    if not report.get("explained"):
        return wrap(f"*`{rel}` has no explained answers: `cityserve evaluate {report['domain']}` adds them.*")
    items = []
    for answer in report["explained"]:
        words = ", ".join(f"`{w['word']}` {w['weight']:+.2f}" for w in answer["words"][:4])
        items.append(wrap(f"- **{answer['label']}** ({answer['confidence']:.2f}): “{answer['text']}” — {words}",
                          indent="  "))
    return "\n".join(items) + "\n\n" + report_caption(
        report, rel, f"per class, the first `{subset}` text the model answers right; a word's weight is the "
        "fall in the log-odds of the answer's calibrated probability without it (0.69 halves the odds)")


@from_result("reports/events.json", "cityserve evaluate events")
def explained_events(report: Json, rel: str) -> str:
    return explained(report, rel, "handwritten")


@from_result("reports/sentiment.json", "cityserve evaluate sentiment")
def explained_sentiment(report: Json, rel: str) -> str:
    return explained(report, rel, "city_comments")


@from_result("bench/results/chinese_path.json", "python -m bench.chinese_path")
def chinese_path(document: Json, rel: str) -> str:
    rows = []
    for domain, (subset, name, target) in {"events": ("handwritten", "macro_f1", "events_macro_f1"),
                                           "sentiment": ("city_comments", "accuracy", "sentiment_accuracy")}.items():
        for variant, scored in document[domain].items():
            chinese, english = scored[f"{subset}_zh"][name], scored[subset][name]
            judged = variant == document["decision_variants"][domain]
            bound = document["thresholds"][target]
            rows.append([domain, variant, name.replace("_", "-"),
                         f"{chinese:.3f}" + (f" {mark(chinese >= bound)} (≥ {bound:g})" if judged else ""),
                         f"{english:.3f}"])
    return "\n\n".join([
        table(["domain", "heads trained on", "metric", "Chinese, by hand", "English, by hand"], rows, "lllrr"),
        source([rel], commit_of(document), f"decision: **{document['decision']}** Chinese",
               f"encoder {document['encoder']['package']} {document['encoder']['version']}",
               f"{document['throughput']['texts_per_s']['all']:g} texts/s on one thread")])


@from_result("bench/results/pii.json", "python -m bench.pii")
def pii(document: Json, rel: str) -> str:
    rows = []
    for name, figures in document["sets"].items():
        for kind in (*figures["by_type"], "structured"):
            cells = [figures] + [figures["by_language"][lang] for lang in ("en", "zh")]
            picked = [c["by_type"][kind] if kind in figures["by_type"] else c[kind] for c in cells]
            rows.append([name.replace("_", "-") if kind == "EMAIL" else "", kind.lower(),
                         *[f"{num(p['recall'], 3)} / {num(p['precision'], 3)}" for p in picked]])
    leaks = "; ".join(f"{name.replace('_', '-')} {f['leaks']['texts']} of {f['texts']} texts"
                      for name, f in document["sets"].items())
    timing = document["timing"]
    return "\n\n".join([
        table(["set", "type", "all: R / P", "English", "Chinese"], rows, "llrrr"),
        source([rel], commit_of(document), "R recall, P precision; a found span counts when it overlaps a labelled "
               f"one of its type; texts still holding a labelled value after masking: {leaks}",
               f"{timing['ms_per_text']:g} ms a text on one thread after a first pass of {timing['first_pass_s']:g} s "
               "that loads the libraries",
               f"target recall ≥ {document['target']['recall']:g} on each structured type: "
               f"{'met' if document['passed'] else 'missed'} on the held-out set"),
        *[wrap(f"Served {name} {f['version']} on `{f['subset']}` ({f['texts_masked']} of {f['texts']} texts "
               f"changed by masking): {f['metric'].replace('_', '-')} {f['as_written']:.3f} as written, "
               f"{f['masked']:.3f} masked; {f['answers_changed']} answers changed.")
          for name, f in document.get("served", {}).items() if f["measured"]]])


def eval_energy_sweep(root: Path) -> str:
    rel = "reports/energy.json"
    report = load(root, rel)
    if report is None or "sweep" not in report:
        return wrap(f"*No swept version in `{rel}` yet: `cityserve evaluate energy --sweep VERSION` adds one.*")
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
            rows, document, ["domain", "threads", "plain torch", "Ray Train", "ratio", "spread", "load"],
            "llrrrlr",
            lambda row: [row["domain"], str(row["threads"]), rate(row["plain_samples_per_s"]),
                         rate(row["ray_samples_per_s"]),
                         f"{row['ratio']:.2f} {mark(row['ratio'] >= TRAIN_RATIO_TARGET)}",
                         "–".join(f"{v:.2f}" for v in row["spread"]["ratio"]),
                         num(row.get("load_average"), 2)]))
        out.append(source([rel], file_commit(rows, document),
                          f"{', '.join(sorted({r['device'] for r in rows}))}; "
                          f"samples/s, medians of {rows[0]['repeats']} pairs of runs alternating which side "
                          "goes first, each pair checked to compute the same losses; ratio = Ray Train / plain, "
                          f"target ≥ {TRAIN_RATIO_TARGET:g}; spread = lowest–highest ratio of a pair; "
                          "load = load average while measured"))
    return "\n\n".join(out)


@from_result("bench/results/tune_efficiency.json", ".venv/bin/python -m bench.tune_efficiency")
def tune_efficiency(document: Json, rel: str) -> str:
    rows = document["rows"]

    def cells(row: Json) -> list[str]:
        gap, share = row.get("relative_gap"), row.get("compute_share")
        return [row["domain"], f"{row['grid']['best']:.4f}", f"{row['asha']['best']:.4f}",
                f"{gap:+.3f} {mark(gap <= TUNE_GAP_TARGET)}" if gap is not None else "—",
                f"{share:.2f} {mark(share <= TUNE_SHARE_TARGET)}" if share is not None else "—",
                f"{row['grid']['trial_epochs']} / {row['asha']['trial_epochs']}"]

    walls = ", ".join(f"{row['domain']} {num(row['grid'].get('wall_s'), 0)} / {num(row['asha'].get('wall_s'), 0)} s"
                      for row in rows)
    loads = ", ".join(f"{row['domain']} {num(row.get('load_average'), 2)}" for row in rows)
    metrics = ", ".join(f"{row['domain']} `{row['metric']}` ({'lower' if row['mode'] == 'min' else 'higher'} "
                        "is better)" for row in rows)
    return "\n\n".join([
        result_table(rows, document, ["domain", "grid best", "ASHA best", "gap", "compute", "epochs"],
                     "lrrrrr", cells),
        source([rel], file_commit(rows, document),
               f"best: the validation metric, {metrics}; "
               f"gap: how much worse ASHA's best is, relative (target ≤ {TUNE_GAP_TARGET:g}); compute: ASHA's "
               f"trial-epochs over the grid's (target ≤ {TUNE_SHARE_TARGET:g}); epochs: grid / ASHA "
               f"trial-epochs; wall time grid / ASHA: {walls}; load average: {loads}")])


# The text models' CPU backend against PyTorch fp32, same run (inference.json): items/s ratios at
# batch 64 and 1, how far its test macro-F1 may fall, and how often the fp32 export must agree.
INFERENCE_RATIO_TARGETS = {64: 2.5, 1: 2.0}
INFERENCE_METRIC_POINTS = 1.0
INFERENCE_AGREEMENT = 0.999


@from_result("bench/results/inference.json", ".venv/bin/python -m bench.inference")
def inference(document: Json, rel: str) -> str:
    rows = document["rows"]

    def cells(row: Json) -> list[str]:
        ratio, delta = row["ratio_to_torch_fp32"], 100 * row["metric_delta_to_torch_fp32"]
        target = INFERENCE_RATIO_TARGETS.get(row["batch_size"]) if row.get("served_on_cpu") else None
        agreement = row.get("label_agreement_with_torch_fp32")
        ok_agreement = row["backend"] != "onnx-fp32" or (agreement or 0) >= INFERENCE_AGREEMENT
        return [row["domain"], row["backend"], str(row["batch_size"]), rate(row["items_per_s"]),
                f"{ratio:.2f}" + (f" {mark(ratio >= target)}" if target else ""),
                f"{delta:+.2f}" + (f" {mark(delta >= -INFERENCE_METRIC_POINTS)}" if row["backend"] != "torch-fp32"
                                   else ""),
                f"{100 * agreement:.1f}%" + ("" if ok_agreement else " ✗") if agreement is not None else "—"]

    threads = sorted({row.get("threads") for row in rows if row.get("threads")})
    baselines = ", ".join(f"{row['domain']} {row['metric_value']:.4f}" for row in rows
                          if row["backend"] == "torch-fp32" and row["batch_size"] == rows[0]["batch_size"])
    return "\n\n".join([
        result_table(rows, document, ["domain", "backend", "batch", "items/s", "× fp32", "points", "same label"],
                     "lllrrrr", cells),
        source([rel], file_commit(rows, document),
               f"{document['device']}, {'/'.join(map(str, threads))} thread(s) for every backend",
               "items/s: median of the repetitions (the file has their min and max), end to end (request items "
               "in, answers out); × fp32: ratio to PyTorch fp32 at the same batch size in the same run, targets for "
               f"the backend a CPU replica serves (marked): ≥ {INFERENCE_RATIO_TARGETS[64]:g} at batch 64, "
               f"≥ {INFERENCE_RATIO_TARGETS[1]:g} at batch 1; points: test macro-F1 minus PyTorch fp32's (at most "
               f"{INFERENCE_METRIC_POINTS:g} below; PyTorch fp32's: {baselines}); same label: test texts labelled "
               f"as PyTorch fp32 does (the fp32 export: at least {100 * INFERENCE_AGREEMENT:g}%)",
               f"load average {num(document.get('load_average'), 2)} at the end")])


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
    ServeTarget("1 item: (c) ≥ 0.5 × (a)", ("events", "sentiment"), 64, 1,
                lambda r: r["gateway_items_per_s"] / r["in_process_items_per_s"], 0.5),
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
        # Not a target: what one plain HTTP process reaches at 1 item, the ceiling (c)'s 1-item rows meet.
        ceiling = [cells.get((d, 64, 1)) for d in ("events", "sentiment")]
        if all(ceiling):
            shown = " / ".join(f"{r['uvicorn_items_per_s'] / r['in_process_items_per_s']:.2f}" for r in ceiling if r)
            body.append(["1 item: (b) / (a), HTTP's ceiling, events / sentiment", shown, "—"])
        if "idle_rss_gb" in document:
            rss = document["idle_rss_gb"]
            body.append([f"idle platform ≤ {IDLE_RSS_TARGET_GB:g} GB resident", f"{rss:.2f} GB",
                         mark(rss <= IDLE_RSS_TARGET_GB)])
    if autoscale is not None:  # judged on the worst step: a city sizes for that
        up, worst = autoscale["scale_up_s"], autoscale["worst"]["scale_up_s"]
        body.append([f"scale-up ≤ {SCALE_UP_TARGET_S:g} s ({autoscale['domain']})",
                     f"median {up:.1f} s, worst {worst:.1f} s", mark(worst <= SCALE_UP_TARGET_S)])
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
    worst = document["worst"]
    body.append(["**worst**", f"**{worst['scale_up_s']:.1f}**", f"**{worst['scale_down_s']:.1f}**", ""])
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


def checks_block(document: Json, rel: str, columns: list[str], align: str, cells: Callable[[Json], list[str]],
                 intro: str, finding: Callable[[Json], str], note: str) -> str:
    """A result file of checks (reliability.json, cluster.json): a table of them, `intro`, one line per
    check (`finding`, then its problems) and where the figures come from."""
    checks = document["checks"]
    lines = []
    for check in checks:
        line = f"- `{check['name']}`: {finding(check)}"
        for problem in check.get("problems") or []:
            line += f". **Problem:** {problem}"
        lines.append(wrap(line.rstrip() + ".", "  "))
    return "\n\n".join([result_table(checks, document, columns, align, cells), wrap(intro), "\n".join(lines),
                        source([rel], file_commit(checks, document, "per check (column)"), note)])


def passed_of(checks: list[Json]) -> str:
    return f"{sum(1 for check in checks if check['passed'])} of {len(checks)} checks pass"


@from_result("bench/results/reliability.json", "make reliability")
def reliability(document: Json, rel: str) -> str:
    def finding(check: Json) -> str:
        shown, kept = [], 0
        for key, value in check["figures"].items():
            if key in ("seconds", "load_average"):
                continue
            text = figure(value)
            if text is None:
                kept += 1
            else:
                shown.append(f"{key} {text}")
        return ", ".join(shown) + (f"; {kept} more in the file" if kept else "")

    return checks_block(
        document, rel, ["check", "passed", "seconds", "load avg."], "llrr",
        lambda check: [f"`{check['name']}`", "yes" if check["passed"] else "**no**",
                       num(check["figures"].get("seconds"), 1), num(check["figures"].get("load_average"), 2)],
        f"**{passed_of(document['checks'])}.** Their figures (series longer than {SHORT_LIST} values and nested "
        "records stay in the file; `.venv/bin/python -m bench.reliability --table` prints it):",
        finding, "load avg.: the load average while the check ran")


# ---- the learning loop (bench/results/learning_loop.json) ----------------------------------------

def loop_finding(check: Json) -> str:
    """What one step of the loop showed, in a sentence."""
    f = check["figures"]
    name = check["name"]
    if name == "payload_sampling" and f:
        return (f"{f['requests_sampled_once']} of {f['requests']} sampled reports in the log once each; "
                f"{f['unsampled_tenant_rows']} rows of the {f['unsampled_tenant_requests']} requests of a tenant "
                "that does not sample")
    if name == "redaction" and f:
        return (f"{f['stored_masked']} of {f['reports_with_phone_and_email']} reports with a phone number and an "
                f"e-mail address stored masked, {f['leaked']} leaked, e.g. \"{f['example']}\"")
    if name == "feedback" and f:
        return f"{f['stored']} of {f['sent']} stored (statuses {figure(f['statuses'])})"
    if name == "drift" and f:
        return (f"{f['version']} over {f['items']} sampled items: largest PSI {num(f['max_psi'], 2)} "
                f"({f['max_psi_feature']}; alert band from {f['shift_threshold']}), live accuracy "
                f"{num(f['live_accuracy'], 3)} against {num(f['reference_accuracy'], 3)} on its validation split")
    if name == "retrain_gate" and f:
        return (f"{f['candidate']} against {f['production']}, {f['metric']} on the feedback hold-out "
                f"({f['holdout_items']} reports) {num(f['candidate_holdout'], 3)} against "
                f"{num(f['production_holdout'], 3)}, on the test split ({f['test_items']}) "
                f"{num(f['candidate_test'], 3)} against {num(f['production_test'], 3)}; trained on "
                f"{f['feedback_rows_trained_on']} feedback rows, {num(f['retrain_seconds'], 0)} s")
    if name == "shadow" and f:
        return (f"{f['requests']} requests, {f['failed']} failed, answered by {figure(f['answered_by'])}; "
                f"{f['candidate_shadow_rows']} shadow answers recorded")
    if name == "canary" and f:
        return (f"{f['requests']} requests through the canary at {f['weight_percent']:g} % and the promotion, "
                f"{f['failed']} failed; the candidate answered {f['candidate_share']:.0%} during the canary, "
                f"after promotion {figure(f['promoted_answered_by'])}")
    return "did not run"


@from_result("bench/results/learning_loop.json", ".venv/bin/python -m bench.learning_loop")
def learning_loop(document: Json, rel: str) -> str:
    return checks_block(
        document, rel, ["step", "passed"], "ll",
        lambda check: [f"`{check['name']}`", "yes" if check["passed"] else "**no**"],
        f"**{passed_of(document['checks'])}** ({document.get('device', '')}):", loop_finding,
        "each step's every figure is in the file")


# ---- several nodes (bench/results/cluster.json) --------------------------------------------------

def cluster_finding(check: Json) -> str:
    """What one multi-node check showed, in a sentence a reader can hold against its target."""
    f = check["figures"]
    name = check["name"]
    if name == "object_store":
        return (f"{f['domain']} trained on {f['trained_on']}, registered {f['registered']} and a report in the "
                f"bucket, loaded on {f['loaded_on']}; no local folder used")
    if name == "ddp_across_nodes":
        placed = ", ".join(f"rank {w['rank']} on {w['node']}" for w in f["ddp_workers"])
        return (f"{f['domain']}: {placed}; loss curves within {f['max_rel_diff']['val_loss']:.1%} (val) and "
                f"{f['max_rel_diff']['train_loss']:.1%} (train) of one worker at global batch "
                f"{f['global_batch']} (tolerance {f['tolerance_rel']:.0%})")
    if name == "serving_node_loss":
        return (f"{f['killed']['node']} killed at {f['killed']['at_s']:g} s under {f['concurrency']} clients: "
                f"{f['failed']} of {f['requests']:,} requests failed, slowest {f['slowest_s']:g} s (timeout "
                f"{f['timeout_s']:g} s), throughput back in {f['recovered_s']} s, last 15 s at "
                f"{f['rps_last_15s_vs_baseline']:.0%} of before on {f['capacity_share_left']:.0%} of the replicas")
    if name == "training_node_loss":
        return (f"{f['domain']}: {f['killed']['node']} killed after checkpoint {f['checkpoint_epoch_at_kill']}; "
                f"the worker group restarted on the remaining nodes, resumed after epoch "
                f"{f['resumed_after_epoch']} and finished epoch {f['final_epoch']} of {f['epochs']}")
    if name == "tune_across_nodes":
        return (f"{f['domain']}: {f['trials']} trials on {', '.join(f['nodes_used'])}, "
                f"{'overlapping' if f['overlapping_on_two_nodes'] else 'not overlapping'}; trials table and "
                f"figure in the bucket; best registered as {f['registered']} from there")
    return ", ".join(f"{key} {text}" for key, value in f.items() if (text := figure(value)) is not None)


@from_result("bench/results/cluster.json", "make cluster")
def cluster(document: Json, rel: str) -> str:
    return checks_block(
        document, rel, ["check", "passed", "seconds"], "llr",
        lambda check: [f"`{check['name']}`", "yes" if check["passed"] else "**no**",
                       num(check["figures"].get("seconds"), 1)],
        f"**{passed_of(document['checks'])}** on {document['device']}.",
        cluster_finding, "every figure, curve and node id is in the file")
