"""Energy features: forecast windows of the prepared splits and the model's scaled inputs.

What the model sees for a forecast starting at time t (the window's inputs):

- the last `HISTORY` = 336 half-hours (one week) of demand, divided by their mean (the window's
  *scale*), so the model works in relative terms across levels and units (GW, MW);
- for series with temperature: the same week of past temperature and a *forecast* of the next
  48 half-hours' temperature. The future's actual temperature is never an input: training adds
  fresh seeded forecast error to it (`domains.energy.temperature.ar1_noise`), validation and the
  `victoria_2014` test use the prepared forecast column, `victoria_2014_oracle_temp` the actual
  temperature (a perfect forecast, to show what forecast error costs);
- per target step: time of day, weekday, work day (public holidays are non-work days), the demand
  at the same time yesterday and a week ago.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from domains.base import Batch
from domains.energy.contract import DAY, HISTORY, HORIZON, WEEK
from domains.energy.temperature import ar1_noise
from domains.tables import load_table

CALENDAR_DIM = 10  # sin/cos time of day, 7 weekdays, work day
N_LAGS = 2  # same time yesterday, same time last week


@dataclass
class RawWindows:
    """Forecast windows in raw units, before scaling: N windows of one or more series."""

    series: np.ndarray  # (N,) index into meta["series_names"]
    demand: np.ndarray  # (N, HISTORY)
    temperature: np.ndarray  # (N, HISTORY), NaN for series without temperature
    temperature_future: np.ndarray  # (N, HORIZON): the forecast (or the actual, for the oracle)
    start: np.ndarray  # (N,) datetime64 of the first target half-hour
    workday: np.ndarray  # (N, HORIZON) bool
    target: np.ndarray  # (N, HORIZON), NaN where unknown (serving)


def calendar_features(start: np.ndarray, workday: np.ndarray) -> np.ndarray:
    """(N, HORIZON, CALENDAR_DIM): sin/cos time of day, weekday one-hot, work day, per target step."""
    stamps = pd.DatetimeIndex(
        (start.astype("datetime64[m]")[:, None] + np.arange(HORIZON) * np.timedelta64(30, "m")).ravel()
    )
    phase = 2 * np.pi * (stamps.hour.to_numpy() * 2 + stamps.minute.to_numpy() // 30) / DAY
    weekday = np.eye(7)[stamps.weekday.to_numpy()]
    feats = np.column_stack([np.sin(phase), np.cos(phase), weekday, workday.ravel().astype(float)])
    return feats.reshape(len(start), HORIZON, CALENDAR_DIM).astype(np.float32)


def model_inputs(raw: RawWindows, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """Scales raw windows into the model's inputs (float32 arrays) plus `scale` and relative `target`.

    Demand is divided by the window's mean demand; temperature is standardised with the series'
    training mean and std (zero where a series has none).
    """
    scale = raw.demand.mean(axis=1)
    rel = raw.demand / scale[:, None] - 1.0
    steps = np.arange(HORIZON)
    lags = np.stack([rel[:, HISTORY - DAY + steps], rel[:, HISTORY - WEEK + steps]], axis=-1)
    names = meta["series_names"]
    mean = np.array([meta["series"][n]["temp_mean"] for n in names])[raw.series][:, None]
    std = np.array([meta["series"][n]["temp_std"] for n in names])[raw.series][:, None]
    # A series trained without temperature reads zeros, whatever a caller passed.
    used = np.array([meta["series"][n]["has_temperature"] for n in names])[raw.series][:, None]
    return {
        "series": raw.series.astype(np.int64),
        "history": rel.astype(np.float32),
        "temp_history": np.where(used, np.nan_to_num((raw.temperature - mean) / std), 0.0).astype(np.float32),
        "temp_forecast": np.where(used, np.nan_to_num((raw.temperature_future - mean) / std), 0.0).astype(np.float32),
        "calendar": calendar_features(raw.start, raw.workday),
        "lags": lags.astype(np.float32),
        "scale": scale.astype(np.float32),
        "target": np.nan_to_num(raw.target / scale[:, None] - 1.0).astype(np.float32),
    }


def _flatten_demand(arrays: dict[str, np.ndarray], days: slice, lag: int) -> dict[str, np.ndarray]:
    """`arrays` with the window's demand in `days` (a slice of HISTORY) replaced by its own mean,
    and the lag that reads those days (0: yesterday, 1: last week) with it."""
    history, lags = arrays["history"].copy(), arrays["lags"].copy()
    mean = history[:, days].mean(axis=1, keepdims=True)
    history[:, days] = mean
    lags[..., lag] = mean
    return {**arrays, "history": history, "lags": lags}


def _with(arrays: dict[str, np.ndarray], name: str, columns: slice, value: float | None = None
          ) -> dict[str, np.ndarray]:
    """`arrays` with `name`'s last-axis `columns` set to `value` (None: each window's own mean)."""
    out = arrays[name].copy()
    out[..., columns] = out[..., columns].mean(axis=-1, keepdims=True) if value is None else value
    return {**arrays, name: out}


# `EnergyPredictor.explain`'s groups of model inputs, each with how to take it away: a series
# becomes its own mean (level kept, shape gone), a time feature a day's or a week's average.
OCCLUDED: dict[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]] = {
    "demand, last 24 hours": lambda a: _flatten_demand(a, slice(HISTORY - DAY, HISTORY), 0),
    "demand, 2 to 7 days before": lambda a: _flatten_demand(a, slice(0, HISTORY - DAY), 1),
    "time of day": lambda a: _with(a, "calendar", slice(0, 2), 0.0),
    "day of week": lambda a: _with(a, "calendar", slice(2, 9), 1 / 7),
    "work day or holiday": lambda a: _with(a, "calendar", slice(9, 10), 5 / 7),
    "temperature, past week": lambda a: _with(a, "temp_history", slice(None)),
    "temperature forecast": lambda a: _with(a, "temp_forecast", slice(None)),
}
# The groups only a series with temperature reads (the others see zeros there, whatever is sent).
TEMPERATURE_GROUPS = frozenset({"temperature, past week", "temperature forecast"})


def split_frames(data_dir: Path) -> dict[str, pd.DataFrame]:
    """The prepared splits, each sorted by series and time."""
    return {
        name: load_table(data_dir, "energy", name).sort_values(["series", "timestamp"], ignore_index=True)
        for name in ("train", "valid", "test")
    }


def windows_for_split(
    splits: dict[str, pd.DataFrame],
    split: str,
    meta: dict[str, Any],
    *,
    stride: int | None = None,
    oracle: bool = False,
    series: str | None = None,
) -> RawWindows:
    """Forecast windows whose 48 targets lie inside `split`; inputs may reach into earlier splits.

    Args:
        splits: the prepared splits (`split_frames`).
        split: "train", "valid" or "test".
        meta: fitted preprocessing (`EnergyDomain.fit_meta`).
        stride: windows start every `stride` half-hours from the split's first possible start;
            None means day-ahead windows (every midnight), as forecasts are scored.
        oracle: use the actual future temperature instead of the prepared forecast.
        series: only this series.
    """
    order = ["train", "valid", "test"]
    upto = pd.concat([splits[s] for s in order[: order.index(split) + 1]], ignore_index=True)
    parts: list[RawWindows] = []
    for k, name in enumerate(meta["series_names"]):
        if series is not None and name != series:
            continue
        frame = upto[upto["series"] == name].sort_values("timestamp", ignore_index=True)
        first = max(HISTORY, len(frame) - int((splits[split]["series"] == name).sum()))
        last = len(frame) - HORIZON  # the last start whose targets all exist
        stamps = frame["timestamp"].to_numpy()
        if stride is None:
            candidates = np.arange(first, last + 1)
            starts = candidates[pd.DatetimeIndex(stamps[candidates]).normalize() == stamps[candidates]]
        else:
            starts = np.arange(first, last + 1, stride)
        demand = frame["demand"].to_numpy(dtype=float)
        temp = frame["temperature"].to_numpy(dtype=float)
        future = temp if oracle else frame["temperature_forecast"].to_numpy(dtype=float)
        past_idx = starts[:, None] + np.arange(-HISTORY, 0)
        next_idx = starts[:, None] + np.arange(HORIZON)
        parts.append(RawWindows(
            series=np.full(len(starts), k, dtype=np.int64),
            demand=demand[past_idx], temperature=temp[past_idx], temperature_future=future[next_idx],
            start=stamps[starts], workday=frame["workday"].to_numpy(dtype=bool)[next_idx], target=demand[next_idx],
        ))
    return RawWindows(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in RawWindows.__dataclass_fields__})


class WindowDataset(Dataset[Batch]):
    """Model inputs of a set of windows, one dict of tensors per window.

    With `forecast_noise`, the stored future temperature must be the *actual* one: each item then
    carries `noise_scale` (1 / the series' temperature std; 0 without temperature) and
    `EnergyDomain.collate` adds fresh forecast error, a new draw every batch.
    """

    def __init__(self, raw: RawWindows, meta: dict[str, Any], *, forecast_noise: bool = False) -> None:
        arrays = model_inputs(raw, meta)
        names = meta["series_names"]
        has_temp = np.array([meta["series"][n]["has_temperature"] for n in names])[raw.series]
        std = np.array([meta["series"][n]["temp_std"] for n in names])[raw.series]
        arrays["noise_scale"] = np.where(has_temp & forecast_noise, 1.0 / std, 0.0).astype(np.float32)
        self.tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.tensors["series"])

    def __getitem__(self, i: int) -> Batch:
        return {k: v[i] for k, v in self.tensors.items()}


def add_forecast_error(batch: Batch) -> Batch:
    """Adds AR(1) temperature-forecast error (σ = 2 °C) where a window's `noise_scale` is non-zero.

    The generator is seeded from torch's, which the training loop seeds: runs are repeatable.
    """
    scale = batch.pop("noise_scale")
    if bool(scale.any()):
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))
        noise = torch.from_numpy(ar1_noise(rng, (len(scale), HORIZON)).astype(np.float32))
        batch["temp_forecast"] = batch["temp_forecast"] + noise * scale[:, None]
    return batch
