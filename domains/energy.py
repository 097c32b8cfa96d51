"""Energy: a day-ahead electricity demand forecaster (the next 48 half-hours, P10/P50/P90).

One registry version serves every series it was trained on (packaged: ``victoria``, with
temperature, and ``england_wales``, without). Each series has a network of its own, held side by
side in one module so a version is one set of files.

What the model sees for a forecast starting at time t (the window's inputs):

- the last `HISTORY` = 336 half-hours (one week) of demand, divided by their mean (the window's
  *scale*), so the model works in relative terms across levels and units (GW, MW);
- for series with temperature: the same week of past temperature and a *forecast* of the next
  48 half-hours' temperature. The future's actual temperature is never an input: training adds
  fresh seeded forecast error to it (`training.data.energy.ar1_noise`), validation and the
  `victoria_2014` test use the prepared forecast column, `victoria_2014_oracle_temp` the actual
  temperature (a perfect forecast, to show what forecast error costs);
- per target step: time of day, weekday, work day (public holidays are non-work days), the demand
  at the same time yesterday and a week ago.

Architecture (`SeriesForecaster`): an MLP encodes the window into a context vector; a second MLP,
shared across the 48 steps, maps context + the step's own features + a step embedding to three
quantiles (P50, and P10/P90 as softplus offsets so they never cross), in units of the scale.
Training minimises the pinball loss; validation reports `val_mape` on day-ahead windows (midnight
starts), the mean over series.

Baselines (evaluation): ``same_time_last_week`` (with P10/P90 from its relative errors on the
validation split) and ``regression``: per-step gradient boosting on the same inputs (P10/P90 the
same way).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from threadpoolctl import threadpool_limits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from core.errors import InvalidInput
from domains import metrics
from domains.base import Batch, Domain, Evaluation, MetricRow, Predictor, SearchParam
from domains.tables import load_table, read_manifest
from training.data import energy as energy_data

DAY = energy_data.STEPS_PER_DAY
WEEK = 7 * DAY
HISTORY = WEEK  # W = 336 half-hours, so the same time last week is always in the window
HORIZON = 48  # the next day, half-hourly
CALENDAR_DIM = 10  # sin/cos time of day, 7 weekdays, work day
N_LAGS = 2  # same time yesterday, same time last week
STEP_EMBED = 16
QUANTILE_NAMES = ("p10", "p50", "p90")
EVAL_HORIZON = "day_ahead"
REGRESSION_STRIDE = 12  # the baseline's training windows start every 6 h: 45k rows on victoria


# ---- data contract -----------------------------------------------------------------------------
def _example_week(base: float, swing: float) -> list[float]:
    """A plausible week of half-hourly demand for the OpenAPI examples (a daily double hump)."""
    return [
        round(base + swing * (math.sin(2 * math.pi * (i % 48 - 14) / 48) + 0.3 * math.sin(4 * math.pi * i / 48)), 3)
        for i in range(HISTORY)
    ]


# Typed as JSON (Any) for pydantic's json_schema_extra; a unit test sends each one through a predictor.
REQUEST_EXAMPLES: list[Any] = [
    {
        "series": "victoria",
        "start": "2014-12-01T00:00:00",
        "demand": _example_week(4.5, 0.8),
        "temperature": [round(18 + 5 * math.sin(2 * math.pi * (i % 48 - 18) / 48), 1) for i in range(HISTORY)],
        "temperature_forecast": [round(20 + 6 * math.sin(2 * math.pi * (i - 18) / 48), 1) for i in range(HORIZON)],
    },
    {"series": "england_wales", "start": "2000-08-21T00:00:00", "demand": _example_week(29000, 5000)},
]

# Demand in any unit from watts up stays far below this. The network computes in float32: near
# 3e38 a forecast overflowed to infinity, which no JSON answer can carry (a 500).
MAX_DEMAND = 1e15
Demand = Annotated[float, Field(gt=0, le=MAX_DEMAND, allow_inf_nan=False)]
Celsius = Annotated[float, Field(ge=-60, le=60, allow_inf_nan=False)]


class EnergyRequest(BaseModel):
    """One day-ahead forecast request: a series, where the forecast starts, and its recent past."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": REQUEST_EXAMPLES})

    series: str = Field(description="Which trained series to forecast (`victoria`, `england_wales`).",
                         examples=["victoria"])
    start: datetime = Field(
        description="Wall-clock time of the first forecast half-hour, on the hour or half hour "
                    "(local time of the series; a time zone, if given, is dropped).",
        examples=["2014-12-01T00:00:00"],
    )
    demand: list[Demand] = Field(
        min_length=HISTORY, max_length=HISTORY,
        description=f"The last {HISTORY} half-hours of demand (one week), oldest first, the last one "
                    "ending where the forecast starts; in the series' unit (victoria GW, england_wales MW).",
        examples=[_example_week(4.5, 0.8)],
    )
    temperature: Annotated[list[Celsius], Field(min_length=HISTORY, max_length=HISTORY)] | None = Field(
        default=None,
        description=f"Series with temperature only: the same {HISTORY} half-hours' observed temperature, °C.",
    )
    temperature_forecast: Annotated[list[Celsius], Field(min_length=HORIZON, max_length=HORIZON)] | None = Field(
        default=None,
        description=f"Series with temperature only: a forecast of the next {HORIZON} half-hours' temperature, °C.",
    )
    workday: Annotated[list[bool], Field(min_length=HORIZON, max_length=HORIZON)] | None = Field(
        default=None,
        description=f"Optional: whether each of the {HORIZON} forecast half-hours falls on a work day "
                    "(false on public holidays). Default: Monday to Friday.",
    )

    @field_validator("start")
    @classmethod
    def _on_half_hour(cls, value: datetime) -> datetime:
        if value.minute % 30 or value.second or value.microsecond:
            raise ValueError(f"start must be on the hour or half hour, got {value.isoformat()!r}")
        return value.replace(tzinfo=None)


class ForecastStep(BaseModel):
    """One forecast half-hour."""

    model_config = ConfigDict(extra="forbid")

    timestamp: datetime = Field(description="Start of the half-hour.", examples=["2014-12-01T00:00:00"])
    p10: float = Field(description="10th percentile of demand.", examples=[3.9])
    p50: float = Field(description="Median forecast of demand.", examples=[4.1])
    p90: float = Field(description="90th percentile of demand.", examples=[4.3])


class EnergyResponse(BaseModel):
    """A day-ahead forecast: 48 half-hours of P10/P50/P90 in the series' unit."""

    model_config = ConfigDict(extra="forbid")

    series: str = Field(description="The series forecast.", examples=["victoria"])
    unit: str = Field(description="Unit of demand (empty for a user's own series).", examples=["GW"])
    version: str = Field(description="Registry version that answered.", examples=["energy-20261127-1"])
    steps: list[ForecastStep] = Field(description=f"The {HORIZON} forecast half-hours, in order.")


# ---- preprocessing -----------------------------------------------------------------------------
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


def split_frames(data_dir: Path) -> dict[str, pd.DataFrame]:
    """The prepared splits, each sorted by series and time."""
    return {
        name: load_table(data_dir, energy_data.DOMAIN, name).sort_values(["series", "timestamp"], ignore_index=True)
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
        noise = torch.from_numpy(energy_data.ar1_noise(rng, (len(scale), HORIZON)).astype(np.float32))
        batch["temp_forecast"] = batch["temp_forecast"] + noise * scale[:, None]
    return batch


# ---- model -------------------------------------------------------------------------------------
def summarise_week(x: torch.Tensor) -> torch.Tensor:
    """(N, WEEK) -> (N, DAY + 7): the last day in full and the mean of each of the seven days.

    A compact view of the week: with one input per half-hour of the week the encoder overfit
    (victoria validation MAPE 3.2% against 2.7% with this summary, same `full` settings).
    """
    return torch.cat([x[:, -DAY:], x.reshape(x.shape[0], 7, DAY).mean(dim=-1)], dim=1)


class SeriesForecaster(nn.Module):
    """One series' network: window encoder + a step decoder shared across the 48 steps.

    Args:
        use_temperature: read past temperature and the temperature forecast.
        hidden: width of both MLPs.
        context: size of the window's context vector.
        dropout: after each hidden layer.
    """

    def __init__(self, *, use_temperature: bool, hidden: int, context: int, dropout: float) -> None:
        super().__init__()
        self.use_temperature = use_temperature
        enc_in = DAY + 7 + (DAY + 7 + HORIZON if use_temperature else 0)
        self.encoder = nn.Sequential(
            nn.Linear(enc_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, context), nn.GELU()
        )
        self.step = nn.Embedding(HORIZON, STEP_EMBED)
        # Per step: context, calendar, lags, step embedding and (with temperature) the step's
        # forecast temperature, the forecast's maximum (demand follows the day's heat build-up)
        # and the temperature at the same time yesterday (which explains yesterday's demand lag).
        dec_in = context + CALENDAR_DIM + N_LAGS + STEP_EMBED + (3 if use_temperature else 0)
        self.decoder = nn.Sequential(
            nn.Linear(dec_in, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, len(QUANTILE_NAMES)),
        )

    def forward(self, history: torch.Tensor, temp_history: torch.Tensor, temp_forecast: torch.Tensor,
                calendar: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
        """Relative quantiles (N, HORIZON, 3): P10 <= P50 <= P90, in units of the window's scale."""
        n = history.shape[0]
        window = [summarise_week(history)]
        if self.use_temperature:
            window += [summarise_week(temp_history), temp_forecast]
        ctx = self.encoder(torch.cat(window, dim=1))
        steps = [
            ctx[:, None, :].expand(n, HORIZON, ctx.shape[1]),
            calendar,
            lags,
            self.step.weight[None].expand(n, HORIZON, STEP_EMBED),
        ]
        if self.use_temperature:
            peak = temp_forecast.max(dim=1, keepdim=True).values.expand(n, HORIZON)
            yesterday = temp_history[:, HISTORY - DAY : HISTORY - DAY + HORIZON]
            steps.append(torch.stack([temp_forecast, peak, yesterday], dim=-1))
        out = self.decoder(torch.cat(steps, dim=-1))
        mid = out[..., 1]
        return torch.stack([mid - F.softplus(out[..., 0]), mid, mid + F.softplus(out[..., 2])], dim=-1)


class EnergyModel(nn.Module):
    """Every series' forecaster in one module; each window is answered by its own series' network.

    Each network runs on its own windows of the batch, an empty selection included: a network
    with no window in a batch still takes part in the graph (with zero gradients), as
    DistributedDataParallel requires of every parameter.
    """

    def __init__(self, series: Sequence[tuple[str, bool]], *, hidden: int, context: int, dropout: float) -> None:
        super().__init__()
        self.nets = nn.ModuleDict({
            name: SeriesForecaster(use_temperature=has_temp, hidden=hidden, context=context, dropout=dropout)
            for name, has_temp in series
        })

    def forward(self, series: torch.Tensor, history: torch.Tensor, temp_history: torch.Tensor,
                temp_forecast: torch.Tensor, calendar: torch.Tensor, lags: torch.Tensor) -> torch.Tensor:
        """Relative quantiles (N, HORIZON, 3) for windows of any mix of series."""
        out = history.new_zeros(history.shape[0], HORIZON, len(QUANTILE_NAMES))
        for k, net in enumerate(self.nets.values()):
            idx = torch.nonzero(series == k).squeeze(1)
            pred = net(history[idx], temp_history[idx], temp_forecast[idx], calendar[idx], lags[idx])
            out = out.index_copy(0, idx, pred.to(out.dtype))
        return out


MODEL_INPUTS = ("series", "history", "temp_history", "temp_forecast", "calendar", "lags")


def pinball_loss(target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss of (N, H, 3) quantile predictions (the differentiable `metrics.pinball`)."""
    taus = torch.tensor(metrics.QUANTILES, device=quantiles.device, dtype=torch.float32)
    diff = target.float()[..., None] - quantiles.float()
    return torch.maximum(taus * diff, (taus - 1) * diff).mean()


# ---- serving -----------------------------------------------------------------------------------
class EnergyPredictor(Predictor):
    """A loaded energy version: checks requests against the trained series and forecasts them."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], version: str, device: str = "cpu") -> None:
        super().__init__(version)
        self.model = model.to(device)
        self.meta = meta
        self.device = torch.device(device)

    def _check(self, item: EnergyRequest) -> None:
        """Refuses what depends on the version: an untrained series, temperature given or missing
        (the request model has checked lengths and ranges)."""
        series = self.meta["series"].get(item.series)
        if series is None:
            raise InvalidInput(f"unknown series {item.series!r}; this version serves "
                               f"{self.meta['series_names']}", field="series")
        expected = {"temperature": HISTORY, "temperature_forecast": HORIZON}
        for name, length in expected.items():
            values = getattr(item, name)
            if series["has_temperature"] and values is None:
                raise InvalidInput(f"series {item.series!r} needs {name} ({length} values)", field=name)
            if not series["has_temperature"] and values is not None:
                raise InvalidInput(f"series {item.series!r} has no temperature input; omit {name}", field=name)

    def raw_windows(self, items: Sequence[EnergyRequest]) -> RawWindows:
        """Checks request items and lays them out as raw windows."""
        for item in items:
            self._check(item)
        names = self.meta["series_names"]
        nan_past, nan_future = [math.nan] * HISTORY, [math.nan] * HORIZON
        start = np.array([np.datetime64(item.start, "m") for item in items])
        default_workday = pd.DatetimeIndex(
            (start[:, None] + np.arange(HORIZON) * np.timedelta64(30, "m")).ravel()
        ).weekday.to_numpy().reshape(len(items), HORIZON) < 5
        return RawWindows(
            series=np.array([names.index(item.series) for item in items], dtype=np.int64),
            demand=np.array([item.demand for item in items], dtype=float),
            temperature=np.array([item.temperature or nan_past for item in items], dtype=float),
            temperature_future=np.array([item.temperature_forecast or nan_future for item in items], dtype=float),
            start=start,
            workday=np.array([item.workday if item.workday is not None else default_workday[i]
                              for i, item in enumerate(items)], dtype=bool),
            target=np.full((len(items), HORIZON), np.nan),
        )

    def quantiles(self, raw: RawWindows) -> np.ndarray:
        """(N, HORIZON, 3) forecast quantiles in the series' units."""
        arrays = model_inputs(raw, self.meta)
        inputs = {k: torch.from_numpy(arrays[k]).to(self.device) for k in MODEL_INPUTS}
        with torch.no_grad():
            rel = self.model(**inputs).float().cpu().numpy()
        out: np.ndarray = arrays["scale"][:, None, None] * (1.0 + rel)
        return out

    def predict(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        requests = [EnergyRequest.model_validate(item) for item in items]
        if not requests:
            return []
        raw = self.raw_windows(requests)
        q = self.quantiles(raw)
        answers: list[BaseModel] = []
        for i, item in enumerate(requests):
            steps = [
                ForecastStep(timestamp=item.start + timedelta(minutes=30 * h),
                             p10=float(q[i, h, 0]), p50=float(q[i, h, 1]), p90=float(q[i, h, 2]))
                for h in range(HORIZON)
            ]
            answers.append(EnergyResponse(series=item.series, unit=self.meta["series"][item.series]["unit"],
                                          version=self.version, steps=steps))
        return answers


def requests_from_windows(
    raw: RawWindows, names: Sequence[str], has_temperature: dict[str, bool]
) -> list[EnergyRequest]:
    """Request items equivalent to raw windows (evaluation goes through the served contract)."""
    out = []
    for i in range(len(raw.series)):
        name = names[int(raw.series[i])]
        temp = has_temperature[name]
        out.append(EnergyRequest(
            series=name,
            start=pd.Timestamp(raw.start[i]).to_pydatetime(),
            demand=raw.demand[i].tolist(),
            temperature=raw.temperature[i].tolist() if temp else None,
            temperature_forecast=raw.temperature_future[i].tolist() if temp else None,
            workday=raw.workday[i].tolist(),
        ))
    return out


# ---- baselines ---------------------------------------------------------------------------------
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
    """One row per (window, step) of the same inputs the network sees, for the regression baseline.

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
    """The ``regression`` baseline: gradient-boosted trees on `step_table` rows (the same inputs as
    the network), P50 from the trees and P10/P90 from their relative errors on the validation split.

    Squared-error trees rather than quantile ones: sklearn's quantile loss recomputes a percentile
    per leaf per iteration, 10x slower here for no better median.
    """

    def __init__(self, seed: int = 0) -> None:
        from sklearn.ensemble import HistGradientBoostingRegressor

        self.model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.1, early_stopping=True,
                                                   n_iter_no_change=10, random_state=seed)
        self.band = (0.0, 0.0)

    def fit(self, train: RawWindows, valid: RawWindows, meta: dict[str, Any]) -> RegressionBaseline:
        arrays = model_inputs(train, meta)
        # One OpenMP thread: on a shared 2-core machine the default pool spun 25x slower (179 s vs 7 s).
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


# ---- the domain --------------------------------------------------------------------------------
class EnergyDomain(Domain):
    """Day-ahead demand, P10/P50/P90, one network per series in one version."""

    name = "energy"
    metric = "val_mape"
    mode: ClassVar[Literal["max", "min"]] = "min"
    request_model = EnergyRequest
    response_model = EnergyResponse

    def prepare(self, data_dir: Path, *, source: Path | None = None, smoke: bool = False) -> dict[str, Any]:
        return energy_data.prepare(data_dir, source=source, smoke=smoke)

    def default_config(self, profile: Literal["smoke", "quick", "full"]) -> dict[str, Any]:
        common = {"weight_decay": 1e-3, "warmup_frac": 0.05, "grad_clip": 1.0, "seed": 0, "forecast_noise": True,
                  "batch_size": 128, "context": 64, "dropout": 0.2}
        profiles: dict[str, dict[str, Any]] = {
            "smoke": {"epochs": 2, "lr": 1e-3, "patience": 2, "hidden": 32, "train_stride": 8},
            # quick: every other start, 8 epochs: about a minute of training on 2 cores.
            "quick": {"epochs": 8, "lr": 2e-3, "patience": 3, "hidden": 128, "train_stride": 2},
            "full": {"epochs": 30, "lr": 1e-3, "patience": 6, "hidden": 128, "train_stride": 1},
        }
        return {**common, **profiles[profile]}

    def search_space(self) -> dict[str, SearchParam]:
        return {
            "lr": SearchParam("loguniform", 3e-4, 1e-2),
            "weight_decay": SearchParam("loguniform", 1e-5, 1e-2),
            "hidden": SearchParam("choice", values=(64, 128, 192)),
            "context": SearchParam("choice", values=(32, 64, 128)),
            "dropout": SearchParam("uniform", 0.0, 0.4),
        }

    def fit_meta(self, data_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
        manifest = read_manifest(data_dir, self.name)
        train = load_table(data_dir, self.name, "train")
        series: dict[str, Any] = {}
        for name, info in sorted(manifest["series"].items()):
            temps = train.loc[train["series"] == name, "temperature"].to_numpy(dtype=float)
            has_temp = bool(info["has_temperature"])
            series[name] = {
                "unit": info["unit"],
                "has_temperature": has_temp,
                # Standardise temperature with training statistics only.
                "temp_mean": float(temps.mean()) if has_temp else 0.0,
                "temp_std": float(temps.std()) if has_temp else 1.0,
            }
        return {"series_names": sorted(series), "series": series, "history": HISTORY, "horizon": HORIZON,
                "data_sha256": manifest["sha256"]}

    def datasets(
        self, data_dir: Path, config: dict[str, Any], meta: dict[str, Any]
    ) -> tuple[WindowDataset, WindowDataset]:
        splits = split_frames(data_dir)
        noise = bool(config["forecast_noise"])
        # With noise, training windows carry the actual future temperature and the dataset adds
        # fresh forecast error per draw; without, they use the prepared forecast column.
        train = windows_for_split(splits, "train", meta, stride=int(config["train_stride"]), oracle=noise)
        valid = windows_for_split(splits, "valid", meta)
        return WindowDataset(train, meta, forecast_noise=noise), WindowDataset(valid, meta)

    def collate(self, items: list[Any]) -> Batch:
        return add_forecast_error(super().collate(items))

    def build_model(self, config: dict[str, Any], meta: dict[str, Any]) -> nn.Module:
        if not meta["series_names"]:
            raise ValueError("meta names no series")
        return EnergyModel(
            [(n, meta["series"][n]["has_temperature"]) for n in meta["series_names"]],
            hidden=int(config["hidden"]), context=int(config["context"]), dropout=float(config["dropout"]),
        )

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return pinball_loss(batch["target"], model(**{k: batch[k] for k in MODEL_INPUTS}))

    @torch.no_grad()
    def validate(self, model: nn.Module, loader: Iterable[Batch], meta: dict[str, Any]) -> dict[str, float]:
        series, actual, pred = [], [], []
        for batch in loader:
            rel = model(**{k: batch[k] for k in MODEL_INPUTS}).float()
            scale = batch["scale"].float()[:, None]
            actual.append((scale * (1 + batch["target"].float())).cpu().numpy())
            pred.append((scale[..., None] * (1 + rel)).cpu().numpy())
            series.append(batch["series"].cpu().numpy())
        s, y, q = np.concatenate(series), np.concatenate(actual), np.concatenate(pred)
        out: dict[str, float] = {}
        for k, name in enumerate(meta["series_names"]):
            mine = s == k
            if mine.any():
                out[f"val_mape_{name}"] = metrics.mape(y[mine], q[mine, :, 1])
                out[f"val_coverage_{name}"] = metrics.coverage(y[mine], q[mine, :, 0], q[mine, :, 2])
        # Each series counts equally, however many days it has.
        out["val_mape"] = float(np.mean([v for k, v in out.items() if k.startswith("val_mape_")]))
        out["val_coverage"] = metrics.coverage(y, q[..., 0], q[..., 2])
        return out

    def load_predictor(self, model_dir: Path, version: str, device: str = "cpu") -> EnergyPredictor:
        model, _, meta = self.load_model_files(model_dir)
        return EnergyPredictor(model, meta, version, device)

    def evaluate(self, predictor: Predictor, data_dir: Path, figure: Path) -> Evaluation:
        if not isinstance(predictor, EnergyPredictor):
            raise TypeError(f"expected an EnergyPredictor, got {type(predictor).__name__}")
        meta = predictor.meta
        splits = split_frames(data_dir)
        names = meta["series_names"]
        has_temp = {n: bool(meta["series"][n]["has_temperature"]) for n in names}
        rows: list[MetricRow] = []
        notes: list[str] = []
        shown: dict[str, tuple[RawWindows, np.ndarray, np.ndarray]] = {}
        for name in names:
            # Baselines are fitted on train and their P10/P90 bands on valid, never on test.
            valid = windows_for_split(splits, "valid", meta, series=name)
            regression = RegressionBaseline().fit(
                windows_for_split(splits, "train", meta, stride=REGRESSION_STRIDE, series=name), valid, meta)
            band = residual_band(valid.target, same_time_last_week(valid))
            year = pd.Timestamp(splits["test"].loc[splits["test"]["series"] == name, "timestamp"].min()).year
            for oracle in ([False, True] if has_temp[name] else [False]):
                subset = f"{name}_{year}" + ("_oracle_temp" if oracle else "")
                test = windows_for_split(splits, "test", meta, oracle=oracle, series=name)
                answers = predictor.predict(requests_from_windows(test, names, has_temp))
                model_q = np.array([[[s.p10, s.p50, s.p90] for s in a.steps] for a in answers])  # type: ignore[attr-defined]
                scores = {
                    "model": forecast_metrics(test.target, model_q),
                    "same_time_last_week": forecast_metrics(test.target, with_band(same_time_last_week(test), band)),
                    "regression": forecast_metrics(test.target, regression.predict(test, meta)),
                }
                for metric in scores["model"]:
                    rows.append(MetricRow(
                        subset=subset, horizon=EVAL_HORIZON, name=metric, model=scores["model"][metric],
                        baselines={b: scores[b][metric] for b in ("same_time_last_week", "regression")},
                    ))
                ratio = scores["model"]["mape"] / scores["same_time_last_week"]["mape"]
                notes.append(f"{subset}: {len(test.series)} test days; MAPE {scores['model']['mape']:.2%} = "
                             f"{ratio:.2f}x same_time_last_week; P10-P90 coverage "
                             f"{scores['model']['coverage_p10_p90']:.2f}")
                if not oracle:
                    shown[name] = (test, model_q, same_time_last_week(test))
        draw_figure(shown, {n: meta["series"][n]["unit"] for n in names}, figure)
        return Evaluation(rows=rows, figure=figure, notes=notes)


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
