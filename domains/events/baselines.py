"""The events baseline (`tfidf_logreg`), the report rows and the confusion-matrix figure.

The baseline is scored on the same test split as the model: TF-IDF of word 1-2-grams and character
2-5-grams (within words: robust to the corpus's typos) with logistic regression, one classifier
for the class and one for the priority, each fitted on the training split with its C chosen on
the validation split.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from domains.base import MetricRow
from domains.events.contract import LABELS, PRIORITIES, decide, encode_targets
from domains.metrics import macro_f1
from domains.text import classification_rows, plot_confusion, score_row

# Around sklearn's default C=1: larger values (weaker regularisation) did worse on held-out
# templates, and these converge fast.
TFIDF_C = (0.3, 1.0, 3.0)


class TfidfBaseline:
    """TF-IDF (word 1-2-grams + character 2-5-grams within words) and logistic regression, one
    classifier for the class and one for the priority, each C chosen on the validation split."""

    def __init__(self, vectorizer: Any, label_clf: Any, priority_clf: Any, c_label: float, c_priority: float) -> None:
        self.vectorizer = vectorizer
        self.label_clf = label_clf
        self.priority_clf = priority_clf
        self.c_label = c_label
        self.c_priority = c_priority

    @classmethod
    def fit(cls, train: Any, valid: Any) -> TfidfBaseline:
        # Evaluation-only imports: serving never loads scikit-learn.
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_union

        vectorizer = make_union(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
        )
        x_train = vectorizer.fit_transform(train["text"])
        x_valid = vectorizer.transform(valid["text"])
        y_train, y_valid = encode_targets(train), encode_targets(valid)
        chosen: dict[str, tuple[float, float, Any]] = {}
        for target, n_classes in (("label", len(LABELS)), ("priority", len(PRIORITIES))):
            for c in TFIDF_C:
                clf = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train[target])
                f1 = macro_f1(y_valid[target], clf.predict(x_valid), range(n_classes))
                if target not in chosen or f1 > chosen[target][0]:
                    chosen[target] = (f1, c, clf)
        return cls(vectorizer, chosen["label"][2], chosen["priority"][2], chosen["label"][1], chosen["priority"][1])

    def predict(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(class index, priority index) per text; the priority gets the same class floor as the model."""
        x = self.vectorizer.transform(list(texts))
        return decide(self.label_clf.predict_proba(x), self.priority_clf.predict_proba(x))


# ---- report ----------------------------------------------------------------------------------
def metric_rows(
    subset: str, y: np.ndarray, y_priority: np.ndarray,
    predictions: dict[str, tuple[np.ndarray, np.ndarray]], *, per_class: bool,
) -> list[MetricRow]:
    """accuracy, macro_f1, priority_macro_f1 (and per-class f1) of the model and each baseline.

    Args:
        subset: the report subset.
        y, y_priority: true class and priority indices.
        predictions: "model" and each baseline -> (class indices, priority indices).
        per_class: add one `f1` row per class.
    """
    rows = classification_rows(subset, y, {k: p for k, (p, _) in predictions.items()}, LABELS, per_class=per_class)
    priority = score_row(subset, "priority_macro_f1",
                         {k: macro_f1(y_priority, q, range(len(PRIORITIES))) for k, (_, q) in predictions.items()})
    return [*rows[:2], priority, *rows[2:]]


def draw_confusion(figure: Path, y: np.ndarray, pred: np.ndarray, version: str) -> None:
    """The row-normalised confusion matrix of the classes on template_disjoint, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(LABELS)
    fig, ax = plt.subplots(figsize=(8, 7))
    plot_confusion(ax, y, pred, LABELS, fontsize=8, skip_zero=True)
    ax.set_xticks(range(k), LABELS, rotation=45, ha="right")
    ax.set_yticks(range(k), LABELS)
    ax.set_ylabel("true")
    ax.set_title(f"events {version}: template_disjoint (macro-F1 {macro_f1(y, pred, range(k)):.3f}; "
                 "rows normalised, counts shown)", fontsize=10)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)
