"""Traffic data: real detector counts and the simulated network, prepared into time-ordered splits.

Two networks feed the one traffic model:

- ``intersection`` (subset ``real_counts``): the traffic-anomaly package's 15-minute vehicle counts from
  22 detectors at one signalised intersection (2024-04-18 to 2024-05-13), read by path from the
  package's data folder (importing the package itself pulls in ibis). A user may pass their own file
  instead with the columns of `SOURCE_COLUMNS` on a regular 15-minute grid.
- ``grid`` (subset ``simulated_network``): the uxsim-simulated 8x8 grid of `domains.traffic.simulation`.

Splits are by time: whole days, train < valid < test, for both networks. Prepared tables are long
format (network, episode, sensor, timestamp, count); a missing count is NaN (a dropout).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from core.errors import DataError
from core.io import sha256_file
from domains.tables import read_user_file, validate_frame, write_splits
from domains.traffic.simulation import (
    SIM_MODEL,
    SIM_NETWORK,
    SIM_SPECS,
    SIM_START,
    SimSize,
    demand_profile,
    simulate_network,
)

DOMAIN = "traffic"
REAL_NETWORK = "intersection"
REAL_STEP = pd.Timedelta(minutes=15)
# A user's own counts: one row per (sensor, 15-minute interval); `count` may be empty for a dropout.
SOURCE_COLUMNS: dict[str, Any] = {"timestamp": "datetime", "sensor": "str", "count": "float"}
SPLITS = ("train", "valid", "test")


# ---- real counts -------------------------------------------------------------------------------------
def packaged_counts_path() -> Path:
    """The traffic-anomaly package's sample counts, found without importing the package."""
    spec = importlib.util.find_spec("traffic_anomaly")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("traffic_anomaly", "package not installed; `pip install traffic-anomaly==2.5.4`")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "sample_counts.parquet"


def load_real_counts(source: Path | None = None) -> tuple[pd.DataFrame, str]:
    """Loads 15-minute counts as a complete (sensor x timestamp) long frame; gaps become NaN.

    Args:
        source: a user's CSV/Parquet with `SOURCE_COLUMNS`; the packaged counts when None.

    Returns:
        (frame with columns sensor, timestamp, count; a description of the source).

    Raises:
        DataError: the file misses a column, has a wrong type, a missing timestamp or sensor,
            timestamps that do not strictly increase per sensor or are off the 15-minute grid.
    """
    if source is None:
        path = packaged_counts_path()
        raw = pq.read_table(path).to_pandas()
        raw = raw.rename(columns={"detector": "sensor", "total": "count"})
        raw["sensor"] = "d" + raw["sensor"].astype(str)
        raw = raw.sort_values(["sensor", "timestamp"], kind="stable")
        described = f"traffic-anomaly==2.5.4:{path.name}"
    else:
        path = Path(source)
        raw = read_user_file(path)
        described = str(path)
    frame = validate_frame(
        raw, str(path), SOURCE_COLUMNS, nullable=["count"], time_column="timestamp", group_by="sensor"
    )
    off_grid = (frame["timestamp"] - frame["timestamp"].dt.floor(REAL_STEP)) != pd.Timedelta(0)
    if off_grid.any():
        row = int(np.flatnonzero(off_grid.to_numpy())[0])
        raise DataError(str(path), f"timestamp {frame['timestamp'].iloc[row]} is not on the 15-minute grid",
                        column="timestamp", row=row)
    negative = frame["count"] < 0
    if negative.any():
        row = int(np.flatnonzero(negative.fillna(False).to_numpy())[0])
        raise DataError(str(path), f"count {frame['count'].iloc[row]} is negative", column="count", row=row)
    frame["sensor"] = frame["sensor"].astype(str)
    # Complete grid: every sensor at every 15-minute step from the first to the last day.
    start = frame["timestamp"].min().floor("D")
    end = frame["timestamp"].max().floor("D") + pd.Timedelta(days=1) - REAL_STEP
    index = pd.MultiIndex.from_product(
        [sorted(frame["sensor"].unique()), pd.date_range(start, end, freq=REAL_STEP)], names=["sensor", "timestamp"]
    )
    full = frame.set_index(["sensor", "timestamp"])["count"].astype(float).reindex(index).reset_index()
    return full, described


def day_splits(days: Sequence[pd.Timestamp], fractions: tuple[float, float] = (0.7, 0.15)) -> dict[str, list]:
    """Assigns whole days to train < valid < test (at least one day each)."""
    n = len(days)
    if n < 3:
        raise DataError("traffic", f"need at least 3 days of counts to split by time, got {n}")
    n_valid = max(1, round(fractions[1] * n))
    n_train = max(1, min(n - 2 * n_valid, round(fractions[0] * n)))
    n_test = n - n_train - n_valid
    if n_test < 1:
        n_train -= 1
    ordered = sorted(days)
    return {"train": ordered[:n_train], "valid": ordered[n_train:n_train + n_valid],
            "test": ordered[n_train + n_valid:]}


# ---- preparation -------------------------------------------------------------------------------------
def prepare(data_dir: Path, *, source: Path | None = None, smoke: bool = False,
            sim: SimSize | Literal["auto"] = "auto", processes: int = 2) -> dict[str, Any]:
    """Prepares both networks' splits under `data_dir/traffic` (atomically) with a manifest.

    Args:
        data_dir: the data root.
        source: a user's 15-minute counts (`SOURCE_COLUMNS`) instead of the packaged ones.
        smoke: a tiny set (a week of real counts, the "smoke" simulation) for tests.
        sim: which simulated set; "auto" uses the full set when it is cached, else the quick one.
        processes: simulation processes.

    Returns:
        The manifest.
    """
    real, real_source = load_real_counts(source)
    days = sorted(real["timestamp"].dt.floor("D").unique())
    if smoke:
        days = days[-8:]  # a week plus a day: seasonal naive still has its week-earlier value
        real = real[real["timestamp"].dt.floor("D").isin(days)]
    real_days = day_splits(days, (0.7, 0.15)) if not smoke else {
        "train": days[:6], "valid": days[6:7], "test": days[7:]}
    cache = Path(data_dir) / "_cache"
    # The simulated network's demand follows the real counts' training days only: a profile drawn
    # from the test days would let their shape reach the simulated training data.
    profile = demand_profile(real[real["timestamp"].dt.floor("D").isin(real_days["train"])])
    if smoke:
        size: SimSize = "smoke"
    elif sim == "auto":
        size = "full" if any(cache.glob("traffic_sim_full_*.parquet")) else "quick"
    else:
        size = sim
    sim_path = simulate_network(cache, size, profile, processes=1 if smoke else processes)
    simulated = pq.read_table(sim_path).to_pandas()
    spec = SIM_SPECS[size]
    sim_day = (simulated["timestamp"] - SIM_START).dt.days
    bounds = np.cumsum(spec.split_days)
    sim_split = np.select([sim_day < bounds[0], sim_day < bounds[1]], ["train", "valid"], "test")

    real = real.assign(network=REAL_NETWORK, episode=0)[["network", "episode", "sensor", "timestamp", "count"]]
    splits: dict[str, pd.DataFrame] = {}
    for split in SPLITS:
        keep = real["timestamp"].dt.floor("D").isin(real_days[split])
        splits[f"{REAL_NETWORK}_{split}"] = real[keep].reset_index(drop=True)
        splits[f"{SIM_NETWORK}_{split}"] = simulated[sim_split == split].reset_index(drop=True)
    return write_splits(
        data_dir, DOMAIN, splits,
        sources=[real_source, f"uxsim==1.15.1 8x8 grid, {size} set ({sim_path.name})"],
        extra={"simulation": {"size": size, **asdict(spec), **SIM_MODEL, "cache_sha256": sha256_file(sim_path),
                              "demand_profile_days": [str(pd.Timestamp(d).date()) for d in real_days["train"]]},
               "networks": {REAL_NETWORK: {"subset": "real_counts", "step_minutes": 15},
                            SIM_NETWORK: {"subset": "simulated_network", "step_minutes": 5}}},
    )
