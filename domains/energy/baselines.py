"""Energy baselines (``same_time_last_week``, ``regression``), the report's metrics and the figure.

``same_time_last_week`` takes its P10/P90 from its relative errors on the validation split;
``regression`` is per-step gradient boosting on a summary of the network's inputs — calendar, the
demand lags, the step's forecast temperature, the forecast's max and mean, the last observed
demand and temperature — not the whole history window the network reads (P10/P90 the same way as
above). Both are fitted on train (bands on valid), never on test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from domains import metrics
from domains.energy.contract import HISTORY, HORIZON, WEEK
from domains.energy.features import RawWindows, model_inputs

REGRESSION_STRIDE = 12  # the baseline's training windows start every 6 h: 45k rows on victoria


def same_time_last_week(raw: RawWindows) -> np.ndarray:
    """(N, HORIZON): the demand exactly one week before each target half-hour."""
    out: np.ndarray = raw.demand[:, HISTORY - WEEK : HISTORY - WEEK + HORIZON]
    return out


def residual_band(actual: np.ndarray, point: np.ndarray) -> tuple[float, float]:
    """P10 and P90 of the relative error actual/point - 1: a point forecast's empirical band."""
    rel = actual.ravel() / point.ravel() - 1.0
    lo, hi = np.quantile(rel, [metrics.QUANTILES[0], metrics.QUANTILES[-1]])
    return float(lo), float(hi)


def with_band(point: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """(N, H, 3) quantiles from a point forecast and a relative band."""
    return np.stack([point * (1 + band[0]), point, point * (1 + band[1])], axis=-1)


def step_table(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """One row per (window, step) of features drawn from what the network sees, for the regression baseline.

    Columns: calendar, lags, the step's forecast temperature, the forecast's max and mean, the last
    observed demand and temperature, and the step index.
    """
    n = len(arrays["series"])
    per_window = np.column_stack([
        arrays["temp_forecast"].max(axis=1), arrays["temp_forecast"].mean(axis=1),
        arrays["history"][:, -1], arrays["temp_history"][:, -1],
    ])
    table = np.concatenate([
        arrays["calendar"], arrays["lags"], arrays["temp_forecast"][..., None],
        np.repeat(per_window[:, None, :], HORIZON, axis=1),
        np.broadcast_to(np.arange(HORIZON, dtype=np.float32)[None, :, None], (n, HORIZON, 1)),
    ], axis=-1)
    return table.reshape(n * HORIZON, -1)


class RegressionBaseline:
    """The ``regression`` baseline: gradient-boosted trees on `step_table` rows (a summary of the
    network's inputs, not its whole history window), P50 from the trees and P10/P90 from their
    relative errors on the validation split.

    Squared-error trees rather than quantile ones: sklearn's quantile loss recomputes a percentile
    per leaf per iteration, far slower for no better median.
    """

    def __init__(self, seed: int = 0) -> None:
        from sklearn.ensemble import HistGradientBoostingRegressor

        self.model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.1, early_stopping=True,
                                                   n_iter_no_change=10, random_state=seed)
        self.band = (0.0, 0.0)

    def fit(self, train: RawWindows, valid: RawWindows, meta: dict[str, Any]) -> RegressionBaseline:
        arrays = model_inputs(train, meta)
        # One OpenMP thread: on a small shared machine the default thread pool spins and fits far slower.
        with threadpool_limits(1):
            self.model.fit(step_table(arrays), arrays["target"].ravel())
        self.band = residual_band(valid.target, self.point(valid, meta))
        return self

    def point(self, raw: RawWindows, meta: dict[str, Any]) -> np.ndarray:
        """(N, HORIZON) forecast in the series' units."""
        arrays = model_inputs(raw, meta)
        with threadpool_limits(1):
            rel = self.model.predict(step_table(arrays)).reshape(-1, HORIZON)
        out: np.ndarray = arrays["scale"][:, None] * (1.0 + rel)
        return out

    def predict(self, raw: RawWindows, meta: dict[str, Any]) -> np.ndarray:
        """(N, HORIZON, 3) quantiles in the series' units."""
        return with_band(self.point(raw, meta), self.band)


def forecast_metrics(actual: np.ndarray, q: np.ndarray) -> dict[str, float]:
    """The report's day-ahead metrics of (N, H, 3) quantile forecasts."""
    return {
        "mape": metrics.mape(actual, q[..., 1]),
        "mae": metrics.mae(actual, q[..., 1]),
        "pinball": metrics.pinball(actual, q),
        "coverage_p10_p90": metrics.coverage(actual, q[..., 0], q[..., 2]),
    }


FIGURE_DAYS = 4


def draw_figure(shown: dict[str, tuple[RawWindows, np.ndarray, np.ndarray]], units: dict[str, str],
                path: Path) -> None:
    """Per series: the last `FIGURE_DAYS` test days' P10-P90 band, P50, actual and last week's demand."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 1, figsize=(11, 3.2 * len(shown)), squeeze=False)
    for ax, (name, (raw, q, naive)) in zip(axes[:, 0], shown.items(), strict=True):
        days = slice(max(0, len(raw.series) - FIGURE_DAYS), len(raw.series))
        stamps = (raw.start[days, None] + np.arange(HORIZON) * np.timedelta64(30, "m")).ravel()
        ax.fill_between(stamps, q[days, :, 0].ravel(), q[days, :, 2].ravel(), alpha=0.3, label="P10-P90")
        ax.plot(stamps, q[days, :, 1].ravel(), label="P50")
        ax.plot(stamps, raw.target[days].ravel(), color="black", lw=1, label="actual")
        ax.plot(stamps, naive[days].ravel(), color="grey", lw=0.8, ls="--", label="same time last week")
        ax.set_title(f"{name}: day-ahead forecasts, last {FIGURE_DAYS} test days")
        ax.set_ylabel(f"demand ({units[name]})" if units[name] else "demand")
        ax.legend(loc="upper left", fontsize=8, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
