"""The sentiment baselines, the report rows per subset and the confusion-matrix figure.

Baselines, scored on the same held-out test split as the model:
- `vader`: the vaderSentiment lexicon's compound score, ≥ cut positive, ≤ −cut negative, else
  neutral, the cut chosen on the valid split like every other baseline's setting (the package's
  documented 0.05 among the candidates);
- `linear_probe`: logistic regression on standardised frozen (not fine-tuned) mean-pooled
  MiniLM embeddings of the whole train split, its C chosen on the valid split;
- `majority`: each subset's most frequent training label.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from domains.base import MetricRow
from domains.metrics import accuracy, macro_f1
from domains.sentiment.contract import LABELS, SUBSETS
from domains.sentiment.embeddings import frozen_embeddings
from domains.text import classification_rows, plot_confusion

VADER_CUTS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # the neutral band's half-width; 0.05 is vaderSentiment's README cut
PROBE_MAX_LEN = 64  # the linear probe reads what the fine-tuned model reads


def vader_compound(texts: Sequence[str]) -> np.ndarray:
    """VADER's compound score (−1 … 1) per text."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # evaluation-only import

    analyser = SentimentIntensityAnalyzer()
    return np.array([analyser.polarity_scores(t)["compound"] for t in texts])


def vader_labels(compound: np.ndarray, cut: float) -> np.ndarray:
    """VADER's 3-class call: compound ≥ cut positive, ≤ −cut negative, else neutral."""
    return np.where(compound >= cut, 2, np.where(compound <= -cut, 0, 1))


def vader_cut(valid: pd.DataFrame) -> float:
    """The neutral band's half-width with the best macro-F1 on the valid split."""
    compound = vader_compound(valid["text"].tolist())
    return max(VADER_CUTS, key=lambda cut: macro_f1(valid["label"], vader_labels(compound, cut), range(len(LABELS))))


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


# ---- report ----------------------------------------------------------------------------------
def subset_rank(subset: str) -> tuple[int, str]:
    """Sort key: the packaged subsets in `SUBSETS` order, then any other alphabetically."""
    return (SUBSETS.index(subset) if subset in SUBSETS else len(SUBSETS), subset)


def subset_counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = frame["subset"].value_counts()
    return {s: int(counts[s]) for s in sorted(counts.index, key=subset_rank)}


def metric_rows(subsets: np.ndarray, y: np.ndarray, predictions: dict[str, np.ndarray]) -> list[MetricRow]:
    """accuracy, macro_f1 and per-class f1 of the model and each baseline, per subset.

    Args:
        subsets: each text's subset.
        y: true class indices.
        predictions: "model" and each baseline -> predicted class indices.
    """
    rows: list[MetricRow] = []
    for subset in sorted(set(subsets.tolist()), key=subset_rank):
        keep = subsets == subset
        rows += classification_rows(subset, y[keep], {name: p[keep] for name, p in predictions.items()}, LABELS,
                                    per_class=True)
    return rows


def draw_confusion(figure: Path, subsets: np.ndarray, y: np.ndarray, pred: np.ndarray, version: str) -> None:
    """One row-normalised confusion matrix per subset, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(subsets.tolist()), key=subset_rank)
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
