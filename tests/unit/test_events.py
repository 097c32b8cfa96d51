"""Events domain: the generated corpus, template-disjoint splits, bad files, the request contract,
the served decision, the baseline's report rows and a smoke fine-tune."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from core.errors import DataError, InvalidInput
from domains import get_domain
from domains.events import (
    LABELS,
    MAX_TEXT_CHARS,
    PRIORITIES,
    EventRequest,
    EventResponse,
    EventsDomain,
    EventsPredictor,
    balancing_weights,
    decide,
    metric_rows,
)
from domains.tables import load_table, read_manifest
from tests.schemas import validate_report
from training.data import events as data

# The frozen generator: the committed model was trained on exactly this corpus. A change to the
# templates, slots, rates or sampling changes these; bump GENERATOR_VERSION and retrain if so.
FROZEN_FULL_SHA256 = "84229d288ad2e6c54fab3f2ac5735abda34a2fd691579d6d32c70c8499b81893"
FROZEN_SMOKE_SHA256 = "755e0b2d6d263dd7d5b11f6cfb29d0bb61a931c91f7de9d09f5cc273d63c8668"


@pytest.fixture(scope="module")
def corpus() -> dict[str, pd.DataFrame]:
    return data.generate_corpus()


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("events-smoke")
    EventsDomain().prepare(root, smoke=True)
    return root


def _user_rows(n_templates: int = 4) -> pd.DataFrame:
    rows = [
        {"text": f"report {lab} {t} {i}", "label": lab, "priority": "normal", "template": f"t{t}"}
        for lab in ("noise", "sanitation") for t in range(n_templates) for i in range(3)
    ]
    return pd.DataFrame(rows)


# ---- the generated corpus --------------------------------------------------------------------
def test_generator_is_frozen(corpus: dict[str, pd.DataFrame]) -> None:
    assert data.corpus_sha256(corpus) == FROZEN_FULL_SHA256
    assert data.corpus_sha256(data.generate_corpus(data.DEFAULT_SEED, data.SIZES["smoke"])) == FROZEN_SMOKE_SHA256
    assert data.corpus_sha256(data.generate_corpus(data.DEFAULT_SEED + 1, data.SIZES["smoke"])) != FROZEN_SMOKE_SHA256


def test_corpus_meets_the_issues_size_and_template_counts(corpus: dict[str, pd.DataFrame]) -> None:
    assert set(data.TEMPLATES) == set(LABELS)
    assert all(len(set(patterns)) >= 30 for patterns in data.TEMPLATES.values())
    assert len(corpus["train"]) >= 5000
    assert set(corpus["train"]["label"]) == set(corpus["test"]["label"]) == set(LABELS)
    counts = corpus["train"]["label"].value_counts()
    assert counts.idxmax() == "noise" and counts["illegal_parking"] > counts["heat_hot_water"] > counts["fire_hazard"]
    for frame in corpus.values():
        assert not frame["text"].str.contains(r"[\[\]{}|]").any()  # every slot and alternative expanded
        assert frame["label"].isin(LABELS).all() and frame["priority"].isin(PRIORITIES).all()


def test_splits_are_template_disjoint(corpus: dict[str, pd.DataFrame]) -> None:
    used = {
        split: set(frame["template"]) | set(frame["second_template"]) - {""} for split, frame in corpus.items()
    }
    assert not used["train"] & used["valid"] and not used["train"] & used["test"] and not used["valid"] & used["test"]
    assignment = data.split_groups(
        {lab: [data.template_id(lab, i) for i in range(len(data.TEMPLATES[lab]))] for lab in LABELS}, data.DEFAULT_SEED
    )
    for lab in LABELS:
        held_out = sum(split == "test" for (label, _), split in assignment.items() if label == lab)
        assert held_out / len(data.TEMPLATES[lab]) >= 0.25


def test_two_problem_reports_go_to_the_more_urgent_class(corpus: dict[str, pd.DataFrame]) -> None:
    assert data.more_urgent("noise", "fire_hazard") == "fire_hazard"
    assert data.more_urgent("heat_hot_water", "water_sewer") == "water_sewer"
    assert data.more_urgent("illegal_parking", "sanitation") == "sanitation"
    two = corpus["train"][corpus["train"]["second_label"] != ""]
    assert 0.08 < len(two) / len(corpus["train"]) < 0.16
    primary = two["template"].str.split("/").str[0]
    expected = [data.more_urgent(a, b) for a, b in zip(primary, two["second_label"], strict=True)]
    assert two["label"].tolist() == expected


def test_priority_rule_matches_hand_values() -> None:
    assert data.priority_of(["noise"], None) == "normal"
    assert data.priority_of(["noise"], "high") == "high"
    assert data.priority_of(["fire_hazard"], None) == "emergency"
    assert data.priority_of(["noise", "water_sewer"], None) == "high"
    assert data.priority_of(["street_condition"], "emergency") == "emergency"


def test_fill_expands_alternatives_then_slots_deterministically() -> None:
    a = data.fill("[x|y] at {street}", random.Random(1))
    assert a == data.fill("[x|y] at {street}", random.Random(1))
    assert re.fullmatch(r"[xy] at .+", a) and a.split(" at ")[1] in data._STREETS


def test_prepared_splits_and_manifest(smoke_dir: Path) -> None:
    manifest = read_manifest(smoke_dir, "events")
    assert manifest["generator"]["generator_sha256"] == FROZEN_SMOKE_SHA256
    assert manifest["generator"]["seed"] == data.DEFAULT_SEED
    assert manifest["subsets"] == {"valid": "holdout_templates", "test": "template_disjoint"}
    sizes = {s: len(load_table(smoke_dir, "events", s)) for s in data.SPLITS}
    assert sizes == data.SIZES["smoke"]


# ---- a user's own corpus ---------------------------------------------------------------------
def test_user_corpus_is_split_by_template(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    _user_rows().to_csv(path, index=False)
    manifest = EventsDomain().prepare(tmp_path / "root", source=path)
    frames = {s: load_table(tmp_path / "root", "events", s) for s in data.SPLITS}
    groups = {s: set(zip(f["label"], f["template"], strict=True)) for s, f in frames.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["valid"]
    assert sum(len(f) for f in frames.values()) == 24 and manifest["sources"] == [str(path)]


@pytest.mark.parametrize(
    ("mutate", "column", "row"),
    [
        (lambda f: f.drop(columns="template"), "template", None),
        (lambda f: f.assign(text=f["text"].where(f.index != 4, None)), "text", 4),
        (lambda f: f.assign(text=f["text"].where(f.index != 2, "   ")), "text", 2),
        (lambda f: f.assign(label=f["label"].where(f.index != 5, "graffiti")), "label", 5),
        (lambda f: f.assign(priority=f["priority"].where(f.index != 7, "urgent")), "priority", 7),
        (lambda f: f.assign(text=np.arange(len(f))), "text", 0),
    ],
    ids=["missing-column", "nan-text", "blank-text", "unknown-label", "unknown-priority", "wrong-type"],
)
def test_bad_user_files_are_refused_and_nothing_is_written(
    tmp_path: Path, mutate: Callable[[pd.DataFrame], pd.DataFrame], column: str, row: int | None
) -> None:
    path = tmp_path / "bad.parquet"
    mutate(_user_rows()).to_parquet(path)
    with pytest.raises(DataError) as err:
        EventsDomain().prepare(tmp_path / "root", source=path)
    assert err.value.column == column and err.value.row == row and str(path) in err.value.message
    assert not (tmp_path / "root" / "events").exists()


def test_empty_and_unsplittable_user_files_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label,priority,template\n")
    with pytest.raises(DataError, match="no rows"):
        EventsDomain().prepare(tmp_path / "root", source=empty)
    few = tmp_path / "few.csv"
    _user_rows(n_templates=1).to_csv(few, index=False)
    with pytest.raises(DataError, match="too few templates") as err:
        EventsDomain().prepare(tmp_path / "root", source=few)
    assert err.value.column == "template"
    assert not (tmp_path / "root" / "events").exists()


# ---- request contract ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [{"text": ""}, {"text": "   \n\t"}, {"text": "x" * (MAX_TEXT_CHARS + 1)}, {}, {"text": "ok", "lang": "en"},
     {"text": 7}],
    ids=["empty", "whitespace", "too-long", "missing", "extra-field", "not-a-string"],
)
def test_request_contract_refuses(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EventRequest.model_validate(body)


def test_request_and_response_examples_validate() -> None:
    for model in (EventRequest, EventResponse):
        extra = model.model_config.get("json_schema_extra")
        assert isinstance(extra, dict)
        for example in cast(list[dict[str, Any]], extra["examples"]):
            model.model_validate(example)
    with pytest.raises(ValidationError):  # top3 has exactly three entries
        EventResponse.model_validate({"label": "noise", "priority": "normal", "top3": []})


# ---- decision and report ---------------------------------------------------------------------
def test_served_priority_never_falls_below_the_class_base() -> None:
    labels = np.zeros((3, len(LABELS)))
    labels[0, LABELS.index("fire_hazard")] = 1  # head says normal: fire is always an emergency
    labels[1, LABELS.index("noise")] = 1  # head says high: kept
    labels[2, LABELS.index("water_sewer")] = 1  # head says normal: water/sewer is at least high
    priorities = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])
    label, priority = decide(labels, priorities)
    assert [LABELS[i] for i in label] == ["fire_hazard", "noise", "water_sewer"]
    assert [PRIORITIES[i] for i in priority] == ["emergency", "high", "high"]


def test_metric_rows_match_hand_values() -> None:
    y = np.array([0, 0, 1, 2])
    y_pri = np.array([0, 1, 1, 2])
    predictions = {"model": (np.array([0, 1, 1, 2]), np.array([0, 1, 1, 2])),
                   "tfidf_logreg": (np.array([0, 0, 0, 0]), np.array([0, 0, 0, 0]))}
    rows = metric_rows("template_disjoint", y, y_pri, predictions, per_class=True)
    by = {(r.name, r.label): r for r in rows}
    assert by[("accuracy", None)].model == pytest.approx(0.75)
    assert by[("accuracy", None)].baselines == {"tfidf_logreg": pytest.approx(0.5)}
    # model f1: class 0 2/3, class 1 2/3, class 2 1, the other seven 0.
    assert by[("macro_f1", None)].model == pytest.approx((2 / 3 + 2 / 3 + 1) / len(LABELS))
    assert by[("f1", "noise")].baselines["tfidf_logreg"] == pytest.approx(2 / 3)
    assert by[("priority_macro_f1", None)].model == pytest.approx(1.0)
    assert {r.label for r in rows if r.name == "f1"} == set(LABELS)
    assert not [r for r in metric_rows("holdout_templates", y, y_pri, predictions, per_class=False) if r.label]


# ---- model -----------------------------------------------------------------------------------
def test_configs_hold_every_key_the_loop_needs() -> None:
    for profile in ("smoke", "quick", "full"):
        config = EventsDomain().default_config(profile)
        assert {"epochs", "batch_size", "lr", "weight_decay", "warmup_frac", "grad_clip", "patience", "seed",
                "max_len", "train_limit", "freeze_layers", "dropout", "balance"} <= set(config)


def test_balancing_weights_match_hand_values() -> None:
    targets = np.array([0, 0, 0, 1])  # 4 reports, 2 classes: class 0 has 3, class 1 has 1
    assert balancing_weights(targets, 2, 0.0).tolist() == [1, 1, 1, 1]
    assert balancing_weights(targets, 2, 1.0).tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2])
    assert balancing_weights(targets, 2, 0.5)[3] == pytest.approx(2**0.5)


def test_shapes_and_loss(smoke_dir: Path) -> None:
    domain = EventsDomain()
    config = domain.default_config("smoke")
    meta = domain.fit_meta(smoke_dir, config)
    json.dumps(meta)  # saved as meta.json
    train, valid = domain.datasets(smoke_dir, config, meta)
    assert len(train) == config["train_limit"] and len(valid) == data.SIZES["smoke"]["valid"]  # type: ignore[arg-type]
    batch = domain.collate([train[i] for i in range(5)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 5
    assert batch["input_ids"].shape[1] <= config["max_len"]
    assert batch["label_weight"].shape == (5,) and "label_weight" not in valid[0]
    model = domain.build_model({**config, "pretrained": False}, meta)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out["label"].shape == (5, len(LABELS)) and out["priority"].shape == (5, len(PRIORITIES))
    loss = domain.loss(model, batch)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    metrics = domain.validate(model.eval(), [domain.collate([valid[i] for i in range(12)])], meta)
    assert {"val_macro_f1", "val_accuracy", "val_priority_macro_f1"} <= set(metrics)
    assert 0 <= metrics["val_macro_f1"] <= 1


def test_smoke_fine_tune_predicts_and_evaluates(smoke_dir: Path, tmp_path: Path) -> None:
    from training.loop import fit_plain

    domain = EventsDomain()
    history = fit_plain(get_domain("events"), domain.default_config("smoke"), smoke_dir, tmp_path / "model")
    assert len(history) == 1 and np.isfinite(history[0]["train_loss"])
    predictor = domain.load_predictor(tmp_path / "model", "v1")
    assert isinstance(predictor, EventsPredictor)
    answers = predictor.predict([EventRequest(text="smoke pouring from the roof at 12 Main St"),
                                 EventRequest(text="no heat in apt 4B")])
    assert len(answers) == 2
    for answer in answers:
        assert isinstance(answer, EventResponse)
        probs = [c.probability for c in answer.top3]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert answer.top3[0].label == answer.label and len({c.label for c in answer.top3}) == 3
        floor = PRIORITIES.index(data.BASE_PRIORITY[answer.label])
        assert PRIORITIES.index(answer.priority) >= floor
    with pytest.raises(InvalidInput):
        predictor.predict([answers[0]])  # a response is not a request

    evaluation = domain.evaluate(predictor, smoke_dir, tmp_path / "cm.png")
    assert evaluation.figure is not None and evaluation.figure.stat().st_size > 0
    names = {(r.subset, r.name) for r in evaluation.rows}
    assert {(s, m) for s in ("template_disjoint", "holdout_templates")
            for m in ("accuracy", "macro_f1", "priority_macro_f1")} <= names
    assert all(set(r.baselines) == {"tfidf_logreg"} for r in evaluation.rows)
    assert {r.label for r in evaluation.rows if r.name == "f1"} == set(LABELS)
    validate_report({"domain": "events", "version": "v1", "profile": "quick", "command": "test",
                     "data": {"manifest_sha256": "x", "sources": []},
                     "metrics": [r.as_json() for r in evaluation.rows]})
