"""Metrics shared by every domain, as plain numpy functions (unit-tested against hand values).

Forecast metrics follow the METR-LA tables (MAE, RMSE, MAPE per horizon) plus quantile ones;
classification metrics follow scikit-learn's definitions without importing it at serve time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Array = npt.ArrayLike
QUANTILES = (0.1, 0.5, 0.9)


def _pair(y_true: Array, y_pred: Array) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"shapes differ: {t.shape} vs {p.shape}")
    keep = ~(np.isnan(t) | np.isnan(p))  # missing actuals (sensor dropouts) are not scored
    return t[keep], p[keep]


def mae(y_true: Array, y_pred: Array) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(t - p)))


def rmse(y_true: Array, y_pred: Array) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((t - p) ** 2)))


def mape(y_true: Array, y_pred: Array) -> float:
    """Mean absolute percentage error as a fraction, over non-zero actuals only."""
    t, p = _pair(y_true, y_pred)
    nz = t != 0
    return float(np.mean(np.abs(t[nz] - p[nz]) / np.abs(t[nz])))


def pinball(y_true: Array, q_pred: Array, quantiles: Sequence[float] = QUANTILES) -> float:
    """Mean pinball (quantile) loss over `quantiles`; `q_pred[..., k]` is quantile k."""
    q = np.asarray(q_pred, dtype=np.float64)
    t = np.asarray(y_true, dtype=np.float64)
    if q.shape[:-1] != t.shape or q.shape[-1] != len(quantiles):
        raise ValueError(f"quantile predictions {q.shape} do not match actuals {t.shape} x {len(quantiles)}")
    losses = []
    for k, tau in enumerate(quantiles):
        tt, pp = _pair(t, q[..., k])
        d = tt - pp
        losses.append(np.mean(np.maximum(tau * d, (tau - 1) * d)))
    return float(np.mean(losses))


def coverage(y_true: Array, lower: Array, upper: Array) -> float:
    """Share of actuals inside [lower, upper] (ideal 0.8 for P10-P90)."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    lo = np.asarray(lower, dtype=np.float64).ravel()
    hi = np.asarray(upper, dtype=np.float64).ravel()
    keep = ~np.isnan(t)
    return float(np.mean((t[keep] >= lo[keep]) & (t[keep] <= hi[keep])))


def accuracy(y_true: Array, y_pred: Array) -> float:
    t = np.asarray(y_true).ravel()
    return float(np.mean(t == np.asarray(y_pred).ravel()))


def f1_per_class(y_true: Array, y_pred: Array, labels: Sequence[object]) -> dict[object, float]:
    """F1 of each label (0 where a label has neither predictions nor actuals)."""
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    out: dict[object, float] = {}
    for lab in labels:
        tp = float(np.sum((t == lab) & (p == lab)))
        fp = float(np.sum((t != lab) & (p == lab)))
        fn = float(np.sum((t == lab) & (p != lab)))
        out[lab] = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
    return out


def macro_f1(y_true: Array, y_pred: Array, labels: Sequence[object]) -> float:
    return float(np.mean(list(f1_per_class(y_true, y_pred, labels).values())))
