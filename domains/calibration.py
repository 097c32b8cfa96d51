"""Confidence a person can read at face value: temperature scaling of a classifier's probabilities,
fitted on the validation split, its expected calibration error, and the threshold below which an
answer is flagged `uncertain`.

A fine-tuned classifier is overconfident: a softmax at 0.95 is right less than 95% of the time.
Dividing the logits by one temperature T > 1 fitted to the validation split's labels (the
negative log-likelihood's minimum) brings the confidence in line with the accuracy without
changing any answer (Guo et al., 2017). Probabilities serve as logits here: log p differs from the
logits by a constant per row, which the softmax drops.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# A text version's file of each backend's `Calibration` ({backend: fields}), fitted when its artifacts
# are made (`TextDomain.optimize`); a version without it answers uncalibrated, never uncertain.
CALIBRATION_FILE = "calibration.json"


def read_calibration(model_dir: Path) -> dict[str, Any]:
    """A model directory's `CALIBRATION_FILE`, or {} for a version without one."""
    path = Path(model_dir) / CALIBRATION_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def save_calibration(model_dir: Path, fitted: dict[str, Any]) -> dict[str, Any]:
    """Writes `fitted` as the model directory's `CALIBRATION_FILE`; returns it (the record's entry)."""
    (Path(model_dir) / CALIBRATION_FILE).write_text(json.dumps(fitted))
    return fitted


# Temperatures tried, log-spaced: a fine-tuned model's lies between 0.5 and 4 (a grid, not an
# optimiser: the same split always gives the same temperature).
TEMPERATURES = np.exp(np.linspace(np.log(0.25), np.log(8.0), 241))
THRESHOLDS = np.round(np.arange(0.30, 0.96, 0.01), 2)  # the `uncertain` cut-offs tried
TRUSTED_ACCURACY = 0.9  # on validation, the answers not flagged `uncertain` are right this often
BINS = 15  # expected calibration error's equal-width confidence bins, as Guo et al. report it
FLOOR = 1e-12  # a probability's floor before its log


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities (n, k) after dividing their logits by `temperature`."""
    logits = np.log(np.clip(probs, FLOOR, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return np.asarray(out / out.sum(axis=1, keepdims=True))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], FLOOR, 1.0))))


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature of `TEMPERATURES` with the lowest negative log-likelihood of labels `y`."""
    losses = [nll(scaled(probs, t), y) for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def ece(probs: np.ndarray, y: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the mean gap between confidence and accuracy over equal-width
    confidence bins, each weighted by its share of the answers."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            gap += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(gap)


def uncertain_below(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The lowest `THRESHOLDS` cut-off above which answers are right at least `TRUSTED_ACCURACY` of
    the time (the highest cut-off when none is, 0 when every answer is right).

    A flag means "have a person check this": what it promises is the accuracy of the answers it
    leaves alone, whatever the model's overall accuracy. (Separating wrong from right answers best,
    Youden's J, flagged most answers of a 75 %-accurate model.)"""
    for t in THRESHOLDS:
        kept = confidence >= t
        if kept.any() and correct[kept].mean() >= TRUSTED_ACCURACY:
            return 0.0 if correct.all() else float(t)
    return float(THRESHOLDS[-1])


@dataclass(frozen=True)
class Calibration:
    """How a version's answers turn into confidence: its temperature and `uncertain` threshold,
    fitted on the validation split, and what they did there."""

    temperature: float = 1.0
    uncertain_below: float = 0.0  # 0: never uncertain (an uncalibrated version)
    ece_before: float | None = None
    ece_after: float | None = None

    @classmethod
    def fit(cls, probs: np.ndarray, y: np.ndarray) -> Calibration:
        """Fitted on validation probabilities `probs` (n, k) and their true classes `y`."""
        temperature = fit_temperature(probs, y)
        after = scaled(probs, temperature)
        return cls(temperature, uncertain_below(after.max(axis=1), after.argmax(axis=1) == y),
                   round(ece(probs, y), 4), round(ece(after, y), 4))

    def apply(self, probs: np.ndarray) -> np.ndarray:
        return probs if self.temperature == 1.0 else scaled(probs, self.temperature)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def flagged(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float | None]:
    """On a labelled set: the share of answers flagged uncertain and the accuracy of the flagged
    and of the rest (None where there are none: a report is JSON, which has no NaN)."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    low = confidence < threshold

    def accuracy(picked: np.ndarray) -> float | None:
        return float(correct[picked].mean()) if picked.any() else None

    return {"share": float(low.mean()), "accuracy_flagged": accuracy(low), "accuracy_rest": accuracy(~low)}
