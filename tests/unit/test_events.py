"""Events domain: the generated corpus and its packaged phrases, template-disjoint splits, bad files,
the text limits, the served decision, the baseline's report rows and what a smoke fine-tune answers.
(What every domain promises is in `test_domain_contract.py`.)"""

from __future__ import annotations

import importlib.resources
import random
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from core.errors import DataError
from domains.events import (
    BASE_PRIORITY,
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
from domains.events import corpus as data
from domains.tables import load_table, read_manifest
from tests.unit.conftest import SmokeRun

DOMAIN = "events"  # the `run` and `data_dir` fixtures' domain

# The frozen generator: the committed model was trained on exactly this corpus. A change to the
# templates, slots, rates or sampling changes these; bump GENERATOR_VERSION and retrain if so.
FROZEN_FULL_SHA256 = "84229d288ad2e6c54fab3f2ac5735abda34a2fd691579d6d32c70c8499b81893"
FROZEN_SMOKE_SHA256 = "755e0b2d6d263dd7d5b11f6cfb29d0bb61a931c91f7de9d09f5cc273d63c8668"


@pytest.fixture(scope="module")
def corpus() -> dict[str, pd.DataFrame]:
    return data.generate_corpus()


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


def test_the_labels_are_the_heads_order_and_every_corpus_table_names_them() -> None:
    # The order of the committed model's heads: a reorder would silently swap served classes.
    assert LABELS == ("noise", "illegal_parking", "street_condition", "sanitation", "water_sewer",
                      "power_outage", "traffic_accident", "fire_hazard", "heat_hot_water", "fallen_tree")
    assert PRIORITIES == ("normal", "high", "emergency")
    for table in (data.TEMPLATES, data.CLASS_SHARES, BASE_PRIORITY):
        assert set(table) == set(LABELS)
    assert sorted(data.URGENCY) == sorted(LABELS)
    assert set(data.EMERGENCY_CUES) | set(data.HIGH_CUES) <= set(LABELS)
    assert set(BASE_PRIORITY.values()) <= set(PRIORITIES)


def test_the_phrases_are_packaged_data() -> None:
    packaged = importlib.resources.files("domains.events").joinpath(data.PHRASES_FILE)
    assert packaged.is_file()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert data.PHRASES_FILE in pyproject["tool"]["setuptools"]["package-data"]["domains.events"]
    phrases = data.load_phrases()
    assert set(phrases) == {"templates", "emergency_cues", "high_cues", "slots", "openers", "closers",
                            "connectors", "slang"}
    # Every slot a template or closer names has words to fill it.
    named = {m for text in [*data._CLOSERS, *(t for ts in data.TEMPLATES.values() for t in ts)]
             for m in re.findall(r"\{(\w+)\}", text)}
    assert named <= set(data._SLOTS)


def test_corpus_meets_its_size_and_template_counts(corpus: dict[str, pd.DataFrame]) -> None:
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


def test_prepared_splits_and_manifest(data_dir: Path) -> None:
    manifest = read_manifest(data_dir, "events")
    assert manifest["generator"]["generator_sha256"] == FROZEN_SMOKE_SHA256
    assert manifest["generator"]["seed"] == data.DEFAULT_SEED
    assert manifest["subsets"] == {"valid": "holdout_templates", "test": "template_disjoint"}
    sizes = {s: len(load_table(data_dir, "events", s)) for s in data.SPLITS}
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


@pytest.mark.parametrize("keep", [False, True])
def test_a_user_corpus_is_masked_before_it_is_written_unless_kept(tmp_path: Path, keep: bool) -> None:
    rows = _user_rows()
    rows.loc[0, "text"] = "loud music at 1420 Mission St, call me on (415) 555-0132"
    path = tmp_path / "mine.csv"
    rows.to_csv(path, index=False)
    manifest = EventsDomain().prepare(tmp_path / "root", source=path, mask=not keep)
    texts = pd.concat(load_table(tmp_path / "root", "events", s) for s in data.SPLITS)["text"].tolist()
    if keep:
        assert rows.loc[0, "text"] in texts and manifest["masked"] is None
    else:
        assert "loud music at <ADDRESS>, call me on <PHONE>" in texts
        assert not any("555-0132" in t for t in texts) and manifest["masked"] == {"ADDRESS": 1, "PHONE": 1}
    masked_or_not = {rows.loc[0, "text"], "loud music at <ADDRESS>, call me on <PHONE>"}
    assert set(texts) - masked_or_not == set(rows["text"][1:])  # the other reports as sent


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
def test_a_response_names_exactly_three_classes() -> None:
    with pytest.raises(ValidationError, match="top3"):
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
def test_configs_hold_every_key_the_model_and_data_need() -> None:
    for profile in ("smoke", "quick", "full"):
        config = EventsDomain().default_config(profile)
        assert {"max_len", "train_limit", "freeze_layers", "dropout", "balance"} <= set(config)


def test_balancing_weights_match_hand_values() -> None:
    targets = np.array([0, 0, 0, 1])  # 4 reports, 2 classes: class 0 has 3, class 1 has 1
    assert balancing_weights(targets, 2, 0.0).tolist() == [1, 1, 1, 1]
    assert balancing_weights(targets, 2, 1.0).tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2])
    assert balancing_weights(targets, 2, 0.5)[3] == pytest.approx(2**0.5)


def test_meta_shapes_and_validation_metrics(data_dir: Path) -> None:
    domain = EventsDomain()
    config = domain.default_config("smoke")
    meta = domain.fit_meta(data_dir, config)
    assert meta["labels"] == list(LABELS) and meta["priorities"] == list(PRIORITIES)
    assert meta["generator"]["generator_sha256"] == FROZEN_SMOKE_SHA256
    train, valid = domain.datasets(data_dir, config, meta)
    assert len(train) == config["train_limit"] and len(valid) == data.SIZES["smoke"]["valid"]  # type: ignore[arg-type]
    batch = domain.collate([train[i] for i in range(5)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 5
    assert batch["input_ids"].shape[1] <= config["max_len"]
    assert batch["label_weight"].shape == (5,) and "label_weight" not in valid[0]
    model = domain.build_model({**config, "pretrained": False}, meta)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out["label"].shape == (5, len(LABELS)) and out["priority"].shape == (5, len(PRIORITIES))
    metrics = domain.validate(model.eval(), [domain.collate([valid[i] for i in range(12)])], meta)
    assert {"val_macro_f1", "val_accuracy", "val_priority_macro_f1", "val_loss"} <= set(metrics)
    assert 0 <= metrics["val_macro_f1"] <= 1


def test_a_training_sample_is_seeded_and_keeps_the_split_order(data_dir: Path) -> None:
    domain = EventsDomain()
    config = domain.default_config("smoke")
    sample = domain.training_rows(data_dir, config)
    assert len(sample) == config["train_limit"] and sample.index.is_monotonic_increasing
    assert sample.equals(domain.training_rows(data_dir, config))
    assert not sample.index.equals(domain.training_rows(data_dir, {**config, "seed": 1}).index)
    assert len(domain.training_rows(data_dir, {**config, "train_limit": 0})) == data.SIZES["smoke"]["train"]


def test_smoke_fine_tune_ranks_three_classes_and_keeps_the_base_priority(run: SmokeRun) -> None:
    predictor = run.predictor
    assert isinstance(predictor, EventsPredictor)
    answers = predictor.predict([EventRequest(text="smoke pouring from the roof at 12 Main St"),
                                 EventRequest(text="no heat in apt 4B")])
    assert len(answers) == 2
    for answer in answers:
        assert isinstance(answer, EventResponse)
        probs = [c.probability for c in answer.top3]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert answer.top3[0].label == answer.label and len({c.label for c in answer.top3}) == 3
        floor = PRIORITIES.index(BASE_PRIORITY[answer.label])
        assert PRIORITIES.index(answer.priority) >= floor


def test_evaluation_scores_the_template_and_handwritten_subsets_against_tfidf(run: SmokeRun) -> None:
    evaluation = run.evaluation
    names = {(r.subset, r.name) for r in evaluation.rows}
    assert {(s, m) for s in ("template_disjoint", "holdout_templates", "handwritten")
            for m in ("accuracy", "macro_f1", "priority_macro_f1")} <= names
    assert all(set(r.baselines) == {"tfidf_logreg"} for r in evaluation.rows)
    assert {r.label for r in evaluation.rows if r.name == "f1"} == set(LABELS)
    assert not [r for r in evaluation.rows if r.label and r.subset != "template_disjoint"]
    # at most one explained answer per class: a hand-written report of that class the model answers right
    hand = EventsDomain().written_by_hand("handwritten")
    for shown in evaluation.explained:
        of_class = hand[hand["label"] == shown["label"]]["text"].tolist()
        assert shown["text"] in of_class and shown["words"] and 0 < shown["confidence"] <= 1
        [answer] = run.predictor.predict([EventRequest(text=shown["text"])])
        assert answer.label == shown["label"]  # type: ignore[attr-defined]
    assert len({shown["label"] for shown in evaluation.explained}) == len(evaluation.explained)


def test_the_handwritten_reports_cover_every_class_and_obey_the_priority_floors() -> None:
    hand = EventsDomain().written_by_hand("handwritten")
    assert len(hand) >= 200 and not hand["text"].duplicated().any()
    assert hand["label"].value_counts().nunique() == 1 and set(hand["label"]) == set(LABELS)  # balanced
    floors = hand["label"].map(lambda label: PRIORITIES.index(BASE_PRIORITY[label]))
    assert (hand["priority"].map(PRIORITIES.index) >= floors).all()
    assert hand["text"].str.len().max() <= MAX_TEXT_CHARS
