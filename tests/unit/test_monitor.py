"""Drift and live quality: the population-stability index, a version's reference made at
registration, and `health` / `cityserve monitor` reading the sample log and feedback back — with
the smoke-trained events model answering its own validation split as "live" traffic."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from cityserve import cli
from core.settings import get_settings
from domains import drift
from domains.drift import MIN_ITEMS, SHIFT, SOME_SHIFT
from services import samples
from services.monitor import health
from services.tenants import Store, Usage
from tests.unit.conftest import SmokeRun
from training.registry import Registry
from training.runs import fitted

DOMAIN = "events"


def test_psi_is_zero_for_the_reference_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(0)
    rows: list[dict[str, drift.Feature]] = [{"x": float(v), "c": "a" if v > 0 else "b"}
                                            for v in rng.normal(0, 1, 2000)]
    reference = {"features": drift.fit(rows)}
    assert len(reference["features"]["x"]["edges"]) == drift.BINS - 1
    same = drift.drift(reference, rows)
    assert same["x"] < 1e-9 and same["c"] < 1e-9
    nearby = drift.drift(reference, [{"x": float(v)} for v in rng.normal(0, 1, 2000)])
    assert nearby["x"] < SOME_SHIFT  # a fresh draw of the same distribution
    moved = drift.drift(reference, [{"x": float(v) + 1, "c": "new"} for v in rng.normal(0, 1, 2000)])
    assert moved["x"] > SHIFT and moved["c"] > SHIFT  # the category never seen lands in the "other" bin
    assert drift.shares(reference["features"]["c"], ["new"])[-1] == (0.0, 1.0)


@pytest.fixture(scope="module")
def version(run: SmokeRun, tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, Path, Path]:
    """The smoke model registered with its calibration and reference, as registration makes them;
    the registry's root (where the sample log goes), and the model's folder."""
    assert run.history  # trained
    root = tmp_path_factory.mktemp("monitor")
    work = root / "model"
    shutil.copytree(run.model_dir, work)
    entries = fitted(run.domain, work, run.data_dir)
    registry = Registry(str(root / "registry"))
    registry.register(DOMAIN, work, {"metric": "val_macro_f1", "metrics": {}, "profile": "smoke", **entries})
    return registry, work, root / "registry"


def live_traffic(run: SmokeRun, work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                       list[dict[str, Any]]]:
    """The validation cases as requests, the version's answers, and the truths."""
    items, truths = run.domain.cases(work, run.data_dir)
    return items, run.domain.answers(run.domain.load_predictor(work, "v1"), items), truths


def test_the_reference_holds_the_validation_splits_features_and_quality(version: tuple[Registry, Path, Path],
                                                                      run: SmokeRun) -> None:
    registry, work, _ = version
    record = registry.get(DOMAIN, "v1").record
    reference = json.loads(registry.version_file(registry.get(DOMAIN, "v1"), drift.REFERENCE_FILE) or b"")
    assert record["reference"] == {"items": reference["items"], "quality": reference["quality"]}
    assert record["profile"] == "smoke"  # the training profile's entry, which the reference must not replace
    assert set(reference["features"]) == {"label", "priority", "confidence", "length"}
    _, answers, truths = live_traffic(run, work)
    assert reference["items"] == len(answers) >= MIN_ITEMS
    assert reference["quality"] == run.domain.score(answers, truths)
    assert run.domain.score(answers, [{"label": a["label"]} for a in answers])["accuracy"] == 1.0


@pytest.fixture(scope="module")
def traffic(version: tuple[Registry, Path, Path], run: SmokeRun) -> tuple[float, list[dict[str, Any]],
                                                                          list[dict[str, Any]]]:
    """Two days of sampled traffic and feedback in the log; the time, answers and truths."""
    _, work, root = version
    items, answers, truths = live_traffic(run, work)
    now = time.time()
    rows, feedback = [], []
    # Yesterday the validation reports as they are; today the same reports, each written out three times.
    for day, at in (("before", now - 86400), ("after", now)):
        for n, (item, answer, truth) in enumerate(zip(items, answers, truths, strict=True)):
            text = item["text"] if day == "before" else " ".join([item["text"]] * 3)
            rows.append(samples.Sample(DOMAIN, f"{day}-{n}", at, "hotline", "v1", 5.0, [{"text": text}], [answer]))
            feedback.append({"domain": DOMAIN, "request_id": f"{day}-{n}", "item": 0, "at": at, "tenant": "hotline",
                             "truth": json.dumps(truth)})
    samples.write(root, "samples", samples.sample_rows(rows))
    samples.write(root, "feedback", feedback)
    samples.write(root, "feedback", [{**feedback[0], "at": now + 1, "truth": json.dumps({"label": "noise"})}])
    return now, answers, truths


def test_health_sees_live_traffic_as_its_reference_and_then_a_shift(
        version: tuple[Registry, Path, Path], run: SmokeRun,
        traffic: tuple[float, list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    registry, _, root = version
    now, answers, truths = traffic
    (report,) = health(registry, root, DOMAIN, now=now + 2)
    before, after = report.days
    n = len(answers)
    assert (report.items, report.feedback, before.items, after.items) == (2 * n, 2 * n, n, n)
    assert before.max_psi is not None and before.max_psi < 1e-9  # the reference itself
    assert after.max_psi is not None and after.max_psi > SHIFT and report.max_psi == ("length", report.drift["length"])
    # Live quality is scored as the reference was: on the validation split it is the same figure,
    # except where the resent feedback (the latest counts) changed one answer's truth.
    expected = run.domain.score(answers, [{"label": "noise"}, *truths[1:]])["accuracy"]
    assert before.quality == pytest.approx(expected) and after.quality == report.reference["accuracy"]


def test_monitor_prints_within_80_columns_and_json(
        version: tuple[Registry, Path, Path], traffic: tuple[float, list[dict[str, Any]], list[dict[str, Any]]],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CITYSERVE_REGISTRY_URI", str(version[2]))
    monkeypatch.setenv("CITYSERVE_LEDGER_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("COLUMNS", "80")
    get_settings.cache_clear()
    now = traffic[0]
    # The ledger's rows of v1: every request, sampled or not; another domain's, a feedback row, one
    # refused before any model saw it and one from before the window do not count.
    ledger = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.record([Usage(f"r{n}", now, "hotline", DOMAIN, 1, status, 5.0, "v1")
                   for n, status in enumerate([200, 200, 200, 422, 500])])
    ledger.record([Usage("x1", now, "hotline", "energy", 1, 200, 5.0, "v1"),
                   Usage("x2", now, "hotline", DOMAIN, 1, 200, 5.0, "v1", route="feedback"),
                   Usage("x3", now, "hotline", DOMAIN, 1, 429, 5.0, ""),
                   Usage("x4", now - 30 * 86400, "hotline", DOMAIN, 1, 200, 5.0, "v1")])
    ledger.close()
    try:
        out = CliRunner().invoke(cli.main, ["monitor", DOMAIN])
        assert out.exit_code == 0, out.output
        assert max(len(line) for line in out.output.splitlines()) <= 80
        assert "v1" in out.output and "length" in out.output and "(shift)" in out.output
        assert "5 (1, 1)" in out.output  # requests (refused, failed)
        as_json = json.loads(CliRunner().invoke(cli.main, ["monitor", DOMAIN, "--json"]).output)
        assert as_json[0]["drift"]["length"] > SHIFT and len(as_json[0]["days"]) == 2
        assert as_json[0]["statuses"] == {"200": 3, "422": 1, "500": 1}
    finally:
        get_settings.cache_clear()


class Recorded:
    """A gauge that keeps what it was set to, by tags."""

    def __init__(self) -> None:
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.values[tuple(sorted(tags.items()))] = value


def test_the_monitor_exports_health_and_blanks_what_left_the_window(
        version: tuple[Registry, Path, Path], traffic: tuple[float, list[dict[str, Any]], list[dict[str, Any]]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import services.monitor

    root = version[2]
    exporter = services.monitor.Monitor(str(root), [DOMAIN], {"window_days": 7})
    gauges = {name: Recorded() for name in ("psi", "live", "reference", "sampled", "judged")}
    for name, gauge in gauges.items():
        setattr(exporter, name, gauge)
    exporter.update()
    (report,) = health(exporter.registry, root, DOMAIN)
    v1 = (("domain", DOMAIN), ("version", "v1"))
    assert gauges["sampled"].values == {v1: report.items} and gauges["judged"].values == {v1: report.feedback}
    assert gauges["psi"].values[(*v1[:1], ("feature", "length"), v1[1])] == report.drift["length"] > SHIFT
    assert gauges["live"].values[(*v1[:1], ("metric", "accuracy"), v1[1])] == report.quality["accuracy"]
    assert gauges["reference"].values[(*v1[:1], ("metric", "accuracy"), v1[1])] == report.reference["accuracy"]
    monkeypatch.setattr(services.monitor, "health", lambda *args: [])  # the version left the window
    exporter.update()
    assert all(np.isnan(v) for gauge in gauges.values() for v in gauge.values.values())
    assert exporter.updated_at is not None and not exporter.shown
