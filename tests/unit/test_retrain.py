"""`cityserve retrain`'s parts: feedback joined to its samples, deduplicated and held out by request,
the data it trains on, the gate, and the whole step with the smoke-trained events model (trained
here without Ray: tests/integration/test_serve.py runs it on a Ray cluster behind live traffic)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cityserve import cli
from core.errors import ConfigError, RegistryError
from domains import get_domain
from domains.tables import load_table, read_manifest
from services import retrain as rt
from services import samples
from tests.unit.conftest import SmokeRun
from training.registry import Registry
from training.runs import fitted
from training.workspace import Workspace

DOMAIN = "events"
NOW = time.time()


def sample(request_id: str, item: int, text: str, tenant: str = "hotline", shadow: bool = False,
           at: float = NOW) -> dict[str, Any]:
    return {"domain": DOMAIN, "request_id": request_id, "item": item, "at": at, "tenant": tenant,
            "model_version": "v2" if shadow else "v1", "latency_ms": 5.0, "request": json.dumps({"text": text}),
            "answer": json.dumps({"label": "noise", "priority": "low", "confidence": 0.5}), "shadow": shadow}


def feedback(request_id: str, item: int, label: str, tenant: str = "hotline", at: float = NOW) -> dict[str, Any]:
    return {"domain": DOMAIN, "request_id": request_id, "item": item, "at": at, "tenant": tenant,
            "truth": json.dumps({"label": label})}


def test_the_hold_out_is_stable_whole_per_request_and_near_its_share() -> None:
    ids = [f"r{n}" for n in range(20_000)]
    held = [rt.held_out("hotline", i, 0.2) for i in ids]
    assert held == [rt.held_out("hotline", i, 0.2) for i in ids]  # the same every run
    assert 0.19 < sum(held) / len(ids) < 0.21
    assert all(rt.held_out("hotline", i, 0.3) for i, h in zip(ids, held, strict=True) if h)  # a larger share keeps it


def test_feedback_joins_its_samples_once_per_item(tmp_path: Path) -> None:
    samples.write(tmp_path, "samples", [
        sample("a", 0, "hydrant gushing on Elm"), sample("a", 1, "dead rat in the alley"),
        sample("a", 0, "hydrant gushing on Elm", shadow=True),  # the shadow's row of the same item
        sample("b", 0, "hydrant gushing on Elm", at=NOW + 5),  # the same text, asked again later
        sample("c", 0, "music all night", tenant="press"),
    ])
    samples.write(tmp_path, "feedback", [
        feedback("a", 0, "noise"), feedback("a", 0, "water_sewer", at=NOW + 1),  # a resend replaces
        feedback("a", 1, "sanitation"), feedback("b", 0, "street_condition"),
        feedback("c", 0, "noise", tenant="hotline"),  # another tenant's request id: not this sample
        feedback("z", 0, "noise"),  # nothing sampled
    ])
    cases = rt.feedback_cases(tmp_path, DOMAIN, 0.5)
    assert (cases.feedback, cases.unsampled, cases.duplicates) == (5, 2, 1)
    got = sorted((c.item["text"], c.truth["label"]) for c in [*cases.train, *cases.holdout])
    # of the text asked twice, the truth about the later request
    assert got == [("dead rat in the alley", "sanitation"), ("hydrant gushing on Elm", "street_condition")]
    for case in cases.holdout:
        assert rt.held_out(case.tenant, case.request_id, 0.5)


def test_the_gate_needs_a_gain_on_the_hold_out_and_no_loss_on_the_test_split() -> None:
    def gate(held: tuple[float, float], test: tuple[float, float], mode: str = "max", **kw: float) -> rt.Gate:
        return rt.judge(rt.Gate("m", mode, {"holdout": {"m": held[0]}, "test": {"m": test[0]}},
                                {"holdout": {"m": held[1]}, "test": {"m": test[1]}}, 40, 500,
                                kw.get("min_gain", 0.0), kw.get("max_test_loss", 0.01)))

    assert gate((0.60, 0.80), (0.90, 0.895)).passed  # lost half a percent of the test figure: within 1%
    refused = gate((0.60, 0.60), (0.90, 0.95))
    assert not refused.passed and "not better" in refused.reasons[0]
    assert not gate((0.60, 0.64), (0.90, 0.95), min_gain=0.05).passed
    worse = gate((0.60, 0.80), (0.90, 0.85))
    assert not worse.passed and "test split" in worse.reasons[0]
    assert gate((12.0, 9.0), (10.0, 10.05), mode="min").passed  # an error: lower is better
    assert not gate((12.0, 9.0), (10.0, 10.5), mode="min").passed
    empty = rt.judge(rt.Gate("m", "min", {"holdout": {}, "test": {"m": 1.0}}, {"holdout": {}, "test": {"m": 1.0}},
                             40, 500, 0.0, 0.01))
    assert not empty.passed and "nothing to score" in empty.reasons[0]


def test_options_out_of_range_are_refused() -> None:
    for bad in ({"holdout": 0.0}, {"holdout": 1.0}, {"min_holdout": 0}, {"max_test_loss": -0.1}):
        with pytest.raises(ConfigError):
            rt.RetrainOptions(**bad)


def cases_of(texts: list[tuple[str, str]]) -> rt.Cases:
    train = [rt.Case("hotline", f"r{n}", {"text": t}, {"label": lab}) for n, (t, lab) in enumerate(texts)]
    return rt.Cases(train, [], len(texts), 0, 0)


def test_feedback_joins_a_copy_of_the_data_production_started_from(run: SmokeRun) -> None:
    domain = run.domain
    before = load_table(run.data_dir, DOMAIN, "train")
    out, data = rt.training_data(domain, run.data_dir, cases_of([("hydrant gushing on Elm", "water_sewer"),
                                                                 ("a fire hydrant is spraying", "water_sewer")]))
    assert out.parent == run.data_dir / rt.RETRAIN_DIR and data["added"] == 2
    train = load_table(out, DOMAIN, "train")
    assert len(train) == len(before) + 2
    assert train.tail(2)[["text", "label", "priority"]].values.tolist() == [
        ["hydrant gushing on Elm", "water_sewer", "high"], ["a fire hydrant is spraying", "water_sewer", "high"]]
    base, made = read_manifest(run.data_dir, DOMAIN), read_manifest(out, DOMAIN)
    for split in ("valid", "test"):  # judged on the same splits
        assert made["files"][split]["sha256"] == base["files"][split]["sha256"]
    assert made["feedback"]["base"] == str(run.data_dir) and made["sources"][-1] == "feedback:2 cases"
    # A sampled training run keeps every feedback row: they are what it is for.
    config = {**run.config, "train_limit": 3}
    kept = domain.training_rows(out, config)  # type: ignore[attr-defined]
    assert len(kept) == 5 and kept.tail(2)["template"].tolist() == ["feedback", "feedback"]
    # A retrain of a retrained version starts again from the base, not from the feedback it holds.
    again, data = rt.training_data(domain, out, cases_of([("sewer smell on 3rd", "water_sewer")]))
    assert len(load_table(again, DOMAIN, "train")) == len(before) + 1
    assert read_manifest(again, DOMAIN)["feedback"]["base"] == str(run.data_dir)


def test_sentiment_feedback_takes_its_classs_median_rating(smoke: Any) -> None:
    sentiment = smoke("sentiment")
    train = load_table(sentiment.data_dir, "sentiment", "train")
    rows = get_domain("sentiment").feedback_rows(train, [{"text": "great new bus lane"}], [{"label": "positive"}])
    assert rows is not None
    positive = train[train["label"] == 2]
    assert rows.iloc[0]["rating"] == positive["rating"].median() and rows.iloc[0]["subset"] == "feedback"
    assert get_domain("traffic").feedback_rows(train, [], []) is None  # a forecaster's feedback only judges


@pytest.fixture
def workspace(run: SmokeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Workspace]:
    """A registry whose production is the smoke model, and the CLI's settings pointing at it."""
    from core.settings import get_settings

    monkeypatch.setenv("CITYSERVE_REGISTRY_URI", str(tmp_path / "registry"))
    monkeypatch.setenv("CITYSERVE_DATA_DIR", str(run.data_dir))
    get_settings.cache_clear()
    ws = Workspace.from_settings(get_settings())
    register(run, ws.registry, tmp_path)
    ws.registry.promote(DOMAIN, "v1")
    yield ws
    get_settings.cache_clear()


def register(run: SmokeRun, registry: Registry, tmp: Path, data_dir: Path | None = None) -> str:
    assert run.history  # trained
    work = tmp / f"model-{len(registry.versions(DOMAIN))}"
    shutil.copytree(run.model_dir, work)
    data = data_dir or run.data_dir
    record = {"metric": "val_macro_f1", "metrics": {}, "profile": "smoke", "config": {"data_dir": str(data)}}
    return registry.register(DOMAIN, work, {**record, **fitted(run.domain, work, data)}).version


def traffic_with_feedback(ws: Workspace, run: SmokeRun, n: int) -> None:
    """`n` sampled reports of the validation split with their true classes as feedback."""
    items, truths = run.domain.cases(run.model_dir, run.data_dir)
    rows = [sample(f"q{k}", 0, items[k % len(items)]["text"] + f" (case {k})") for k in range(n)]
    samples.write(ws.settings.registry_location(), "samples", rows)
    samples.write(ws.settings.registry_location(), "feedback", [
        {**feedback(f"q{k}", 0, truths[k % len(items)]["label"])} for k in range(n)])


def test_too_little_held_out_feedback_is_refused_before_training(workspace: Workspace, run: SmokeRun) -> None:
    traffic_with_feedback(workspace, run, 10)
    result = CliRunner().invoke(cli.main, ["retrain", DOMAIN, "--min-holdout", "20"])
    assert result.exit_code != 0 and "the gate needs 20" in result.output, result.output
    assert len(workspace.registry.versions(DOMAIN)) == 1  # nothing trained


def test_a_candidate_that_is_no_better_stays_a_candidate_and_one_that_is_gets_a_canary(
        workspace: Workspace, run: SmokeRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    traffic_with_feedback(workspace, run, 60)
    trained: list[Path] = []

    def train(domain: Any, ws: Workspace, *, profile: str, data_dir: Path, **options: Any) -> Any:
        """Ray Train's stand-in: registers the smoke model again, as trained on `data_dir`."""
        assert profile == "smoke" and set(options) <= {"num_workers", "use_gpu", "cpus_per_worker", "epochs"}
        trained.append(data_dir)
        return ws.registry.get(DOMAIN, register(run, ws.registry, tmp_path, data_dir))

    monkeypatch.setattr("training.trainer.train", train)
    result = CliRunner().invoke(cli.main, ["retrain", DOMAIN, "--min-holdout", "5"])
    assert result.exit_code == 0, result.output
    assert "gate failed: v2 stays a candidate" in result.output and "not better" in result.output
    assert max(map(len, result.output.splitlines())) <= 80
    data = read_manifest(trained[0], DOMAIN)["feedback"]
    assert (data["train"] + data["holdout"], data["unsampled"], data["duplicates"]) == (60, 0, 0)
    record = workspace.registry.get(DOMAIN, "v2").record["retrain"]
    assert record["data"]["added"] == data["train"] and record["data"]["data_dir"] == str(trained[0])
    # The same model on both sides: no gain on the hold-out, so no canary.
    gate = record["gate"]
    assert gate["production"] == gate["candidate"] and gate["holdout_items"] == data["holdout"] > 0
    assert gate["test_items"] > 0 and gate["passed"] is False and workspace.registry.canary(DOMAIN) is None
    options = rt.RetrainOptions(min_holdout=5)
    # Allowed to lose a little on the hold-out, the same model passes: a canary, never a promotion.
    done = rt.retrain(run.domain, workspace, rt.RetrainOptions(min_holdout=5, min_gain=-0.01, weight=25))
    assert done.canary and workspace.registry.canary(DOMAIN) == {"version": done.candidate, "weight": 25,
                                                                 "shadow": False}
    assert workspace.registry.get(DOMAIN).version == "v1"
    with pytest.raises(RegistryError, match="canary"):  # one loop at a time
        rt.retrain(run.domain, workspace, options)
    result = CliRunner().invoke(cli.main, ["retrain", DOMAIN, "--json"])
    assert result.exit_code != 0 and "abort it before retraining" in result.output
