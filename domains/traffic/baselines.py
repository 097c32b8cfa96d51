"""Traffic baselines (historical average, last value, seasonal naive), the Poisson floor of the
real counts, and the evaluation figure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from domains.traffic.contract import HORIZONS, NETWORKS, NetworkSpec
from domains.traffic.features import Windows, slot_keys


def historical_average(train: pd.DataFrame, sensors: Sequence[str], spec: NetworkSpec,
                       times: np.ndarray) -> np.ndarray:
    """Train mean at the same day type (working day or weekend) and time slot, shape
    times.shape + (sensors,).

    Working days are pooled: a weekday × slot mean rests on two or three training days per cell and
    carries their noise (it scored worse than the last value). Falls back to the slot alone, then
    the sensor's mean, where the training split has no such day type or slot (short simulated sets).
    """
    t = pd.DatetimeIndex(train["timestamp"])
    dow, slot = slot_keys(t, spec.step_minutes)
    frame = pd.DataFrame({"sensor": train["sensor"].to_numpy(), "weekend": dow >= 5, "slot": slot,
                          "count": train["count"].to_numpy()})
    flat = pd.DatetimeIndex(np.asarray(times).ravel())
    q_dow, q_slot = slot_keys(flat, spec.step_minutes)
    out = np.full((len(flat), len(sensors)), np.nan)
    for keys, q in ((["weekend", "slot"], [q_dow >= 5, q_slot]), (["slot"], [q_slot])):
        table = frame.groupby(["sensor", *keys])["count"].mean()
        for j, s in enumerate(sensors):
            idx = pd.MultiIndex.from_arrays([np.full(len(flat), s), *q]) if len(q) > 1 else \
                pd.MultiIndex.from_arrays([np.full(len(flat), s), q[0]])
            fill = table.reindex(idx).to_numpy()
            out[:, j] = np.where(np.isnan(out[:, j]), fill, out[:, j])
    sensor_mean = frame.groupby("sensor")["count"].mean().reindex(list(sensors)).to_numpy()
    out = np.where(np.isnan(out), sensor_mean[None, :], out)
    return out.reshape(*np.shape(times), len(sensors))


def last_value(win: Windows, fallback: np.ndarray) -> np.ndarray:
    """Last observed count of each window's history, broadcast to the horizons; `fallback` if none."""
    filled = pd.DataFrame(win.counts.reshape(-1, win.counts.shape[-1])).ffill(axis=1).to_numpy()[:, -1]
    last = filled.reshape(win.counts.shape[:2])[:, :, None].repeat(len(HORIZONS), axis=2)
    return np.where(np.isnan(last), fallback, last)


def seasonal_naive(history: pd.DataFrame, sensors: Sequence[str], win: Windows, lag: pd.Timedelta,
                   fallback: np.ndarray) -> np.ndarray:
    """The count `lag` earlier at each target time (mean over overlapping episodes); `fallback` if none."""
    table = history.groupby(["timestamp", "sensor"])["count"].mean()
    flat = pd.DatetimeIndex(win.target_times.ravel()) - lag
    out = np.stack([table.reindex(pd.MultiIndex.from_arrays([flat, np.full(len(flat), s)])).to_numpy()
                    for s in sensors], axis=-1)
    out = out.reshape(*win.target_times.shape, len(sensors)).transpose(0, 2, 1)
    return np.where(np.isnan(out), fallback, out)


def poisson_floor_mae(actual: np.ndarray, series: dict[int, tuple[np.ndarray, np.ndarray]],
                      win: Windows, sensors: Sequence[str]) -> float:
    """MAE of an oracle that knows each step's true Poisson mean: mean E|X - median(X)|, X ~ Poisson(mu).

    mu is estimated by smoothing the actual series (a centred 5-step, 75-minute moving average of the
    same sensor), the "true mean" a perfect forecaster could at best know; counts beyond it are noise.
    """
    from scipy import stats  # evaluation-only: serving never loads scipy

    mus: dict[tuple[Any, str], float] = {}
    for times, counts in series.values():
        smooth = pd.DataFrame(counts.T).rolling(5, center=True, min_periods=1).mean().to_numpy().T
        for j, s in enumerate(sensors):
            mus.update(zip(((t, s) for t in times), smooth[j], strict=True))
    mu = np.array([[[mus.get((t, s), np.nan) for t in win.target_times[i]] for s in sensors]
                   for i in range(len(win.target_times))])
    keep = ~np.isnan(actual) & ~np.isnan(mu)
    m = np.maximum(mu[keep], 1e-9)
    support = np.arange(int(m.max() + 10 * np.sqrt(m.max()) + 20))
    pmf = stats.poisson.pmf(support[None, :], m[:, None])
    median = stats.poisson.median(m)
    return float(np.mean((pmf * np.abs(support[None, :] - median[:, None])).sum(axis=1)))


def draw_forecasts(plots: dict[str, tuple[Windows, np.ndarray, list[str]]], figure: Path) -> None:
    """Three busy sensors per network: 15-minute-ahead P50 and P10-P90 band against actuals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(plots), 3, figsize=(15, 4 * len(plots)), squeeze=False)
    for r, (name, (win, q, sensors)) in enumerate(plots.items()):
        # The first 192 forecast origins in time order: two test days on either network.
        order = np.argsort(win.target_times[:, 0], kind="stable")
        keep = order[: min(len(order), 192)]
        busiest = np.argsort(-np.nanmean(win.actual[:, :, 0], axis=0))[:3]
        for c, j in enumerate(busiest):
            ax = axes[r, c]
            t = win.target_times[keep, 0]
            ax.fill_between(t, q[keep, j, 0, 0], q[keep, j, 0, 2], alpha=0.3, label="P10-P90", step="mid")
            ax.plot(t, q[keep, j, 0, 1], lw=1, label="P50 (15 min ahead)")
            ax.plot(t, win.actual[keep, j, 0], ".", ms=3, color="k", label="actual")
            ax.set_title(f"{NETWORKS[name].subset}: sensor {sensors[j]}")
            ax.tick_params(axis="x", labelrotation=30)
        axes[r, 0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    Path(figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=90)
    plt.close(fig)
