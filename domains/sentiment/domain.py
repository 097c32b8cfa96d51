"""Sentiment: negative / neutral / positive with a score in [-1, 1], for any short text.

Model: the packaged all-MiniLM-L6-v2 encoder (`domains.text.TextClassifier`), mean pooling, a
3-way `label` head and a tanh `score` head, fine-tuned on the VADER paper's human-rated texts
(tweets, NYT editorials, Amazon and movie reviews; `domains.sentiment.data`). The loss is
cross-entropy on the label plus `SCORE_WEIGHT` × MSE between the score and the raters' mean / 4.

Baselines (`domains.sentiment.baselines`): `vader`, `linear_probe` and `majority`, scored on the
same held-out test split, per subset; the model and `vader` also on `city_comments`, comments on
city services written by hand as residents write (`city_comments.jsonl`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset

from domains.base import Batch, Evaluation, Predictor
from domains.metrics import accuracy, macro_f1
from domains.sentiment.baselines import (
    VADER_CUTS,
    draw_confusion,
    linear_probe_labels,
    majority_labels,
    metric_rows,
    subset_counts,
    subset_rank,
    vader_compound,
    vader_cut,
    vader_labels,
)
from domains.sentiment.contract import LABELS, SentimentRequest, SentimentResponse, SentimentTruth
from domains.sentiment.embeddings import split_embeddings
from domains.tables import load_table, read_manifest
from domains.text import FeatureDataset, TextDomain, TextPredictor, classification_rows

CITY_COMMENTS = "city_comments"  # the evaluation set written by hand (`TextDomain.written_by_hand`)
# The score's MSE (targets in [-1, 1]) ends an order of magnitude below the label's cross-entropy:
# weight 1 lets the score learn without pulling the shared encoder away from the label.
SCORE_WEIGHT = 1.0


class SentimentPredictor(TextPredictor):
    """A fine-tuned sentiment model and its tokenizer, loaded from a model directory."""

    request_type = SentimentRequest
    output_names = ("label", "score")  # class probabilities (n, 3) in `LABELS` order, scores (n,)

    def predict(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        probs, scores = self.outputs(self.texts(items))
        return [
            SentimentResponse(
                label=LABELS[int(np.argmax(p))],
                score=float(np.clip(s, -1.0, 1.0)),
                confidence=confidence,
                uncertain=uncertain,
                probabilities={lab: float(v) for lab, v in zip(LABELS, p, strict=True)},
            )
            for p, s, (confidence, uncertain) in zip(probs, scores, self.judged(probs), strict=True)
        ]


class SentimentDomain(TextDomain):
    """Three-class sentiment with a score, fine-tuned from MiniLM (see the module docstring)."""

    name = "sentiment"
    request_model = SentimentRequest
    response_model = SentimentResponse
    truth_model = SentimentTruth
    predictor_class = SentimentPredictor
    labels = LABELS
    hand_written = CITY_COMMENTS
    data_module = "domains.sentiment.data"
    score_head = True
    defaults: ClassVar[dict[str, Any]] = {"lr": 1e-4, "batch_size": 32, "train_limit": 0,
                # Embeddings (half of MiniLM's 22.7 M weights) and the first two layers stay
                # frozen: no backward pass or AdamW state for them, so cheaper CPU steps.
                "freeze_layers": 2}
    profiles: ClassVar[dict[str, dict[str, Any]]] = {
        # Seconds on CPU: the made-up smoke set, one epoch.
        "smoke": {"epochs": 1, "batch_size": 16, "max_len": 32},
        # `make run`: a sample drawn from all subsets, one epoch, small enough for a 2-core laptop.
        "quick": {"epochs": 1, "train_limit": 3000},
        # The committed model: one epoch over the whole training split.
        "full": {"epochs": 1, "train_limit": 0},
    }

    # ---- data and training -------------------------------------------------------------------
    def meta_extras(self, data_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        subsets = load_table(data_dir, self.name, "train")["subset"].unique().tolist()
        return {"subsets": sorted(subsets, key=subset_rank)}

    def targets(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        return {"label": frame["label"].to_numpy(np.int64), "score": frame["score"].to_numpy(np.float32)}

    def feedback_rows(self, train: pd.DataFrame, items: Sequence[dict[str, Any]], truths: Sequence[dict[str, Any]]
                      ) -> pd.DataFrame:
        """Texts with their sentiment (subset `feedback`); feedback gives a class, not a rating, so
        a row's rating and score are the medians of the training texts of its class."""
        label = np.array([LABELS.index(t["label"]) for t in truths], dtype=np.int64)
        median = train.groupby("label")[["rating", "score"]].median()
        return pd.DataFrame({"text": [i["text"] for i in items], "rating": median["rating"].reindex(label).to_numpy(),
                             "score": median["score"].reindex(label).to_numpy(np.float32), "label": label,
                             "subset": "feedback"})

    def datasets(
        self, data_dir: Path, config: dict[str, Any], meta: dict[str, Any]
    ) -> tuple[Dataset[Batch], Dataset[Batch]]:
        train = self.training_rows(data_dir, config)
        valid = load_table(data_dir, self.name, "valid")
        max_len = int(meta["max_len"])
        if int(config["freeze_layers"]) < int(meta["encoder"]["num_hidden_layers"]):
            return self.text_dataset(train, max_len), self.text_dataset(valid, max_len)
        # A fully frozen encoder gives every text the same pooled vector each epoch: embed once
        # (cached on disk), then each epoch trains only the heads, in well under a second.
        emb = split_embeddings(data_dir, max_len)
        return (FeatureDataset(emb["train"][train.index.to_numpy()], self.targets(train)),
                FeatureDataset(emb["valid"], self.targets(valid)))

    def output_loss(self, out: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """Cross-entropy on the label + SCORE_WEIGHT x MSE on the score."""
        ce = F.cross_entropy(out["label"].float(), batch["label"])
        mse = F.mse_loss(out["score"].float(), batch["score"].float())
        return ce + SCORE_WEIGHT * mse

    def validate(self, model: nn.Module, loader: Iterable[Batch], meta: dict[str, Any]) -> dict[str, float]:
        seen = self.collect(model, loader)
        y, p = seen.targets["label"], seen.outputs["label"].argmax(-1)
        return {
            "val_macro_f1": macro_f1(y, p, range(len(LABELS))),
            "val_accuracy": accuracy(y, p),
            "val_score_mae": float(np.abs(seen.outputs["score"] - seen.targets["score"]).mean()),
            "val_loss": seen.loss,
        }

    # ---- evaluation --------------------------------------------------------------------------
    def evaluate(self, predictor: Predictor, data_dir: Path, figure: Path) -> Evaluation:
        if not isinstance(predictor, SentimentPredictor):
            raise TypeError(f"expected a SentimentPredictor, got {type(predictor).__name__}")
        tables = self.splits(data_dir)
        test = tables["test"]
        probs, scores = predictor.outputs(test["text"].tolist())
        cut = vader_cut(tables["valid"])
        y = test["label"].to_numpy()
        predictions = {
            "model": probs.argmax(-1),
            "vader": vader_labels(vader_compound(test["text"].tolist()), cut),
            "majority": majority_labels(tables["train"], test),
        }
        probe, probe_c = linear_probe_labels(data_dir, tables, read_manifest(data_dir, self.name)["sha256"])
        predictions["linear_probe"] = probe
        rows = metric_rows(test["subset"].to_numpy(), y, predictions)
        comments = self.written_by_hand(CITY_COMMENTS)
        texts = comments["text"].tolist()
        y_comments = comments["label"].map(LABELS.index).to_numpy(np.int64)
        comment_probs = predictor.outputs(texts)[0]
        rows += classification_rows(CITY_COMMENTS, y_comments,
                                    {"model": comment_probs.argmax(-1),
                                     "vader": vader_labels(vader_compound(texts), cut)},
                                    LABELS, per_class=True)
        draw_confusion(figure, test["subset"].to_numpy(), y, predictions["model"], predictor.version)
        rating = test["score"].to_numpy(np.float64)
        notes = [
            f"vader: compound ≥ {cut:g} positive, ≤ −{cut:g} negative, else neutral (cut chosen on valid "
            f"from {', '.join(f'{c:g}' for c in VADER_CUTS)})",
            f"linear_probe: logistic regression (C={probe_c:g}, chosen on valid) on frozen mean-pooled MiniLM",
            "majority: each subset's most frequent training label",
            f"score vs rating/4 on test: MAE {np.mean(np.abs(scores - rating)):.3f}, "
            f"Pearson r {np.corrcoef(scores, rating)[0, 1]:.3f}",
            f"test texts: {len(test)} ({', '.join(f'{s} {n}' for s, n in subset_counts(test).items())})",
            f"{CITY_COMMENTS}: {len(comments)} comments on city services written by hand as residents write "
            f"(sarcasm, hedged praise, questions), never drawn from a training corpus "
            f"(domains/sentiment/{CITY_COMMENTS}.jsonl)",
            self.language_note(test, CITY_COMMENTS),
        ]
        calibration = predictor.calibration_report({"test": (probs, y), CITY_COMMENTS: (comment_probs, y_comments)})
        return Evaluation(rows=rows, figure=figure, notes=notes, calibration=calibration,
                          explained=predictor.explained_examples(texts, y_comments, comment_probs.argmax(-1), LABELS))
