"""The simulated traffic network (``grid``, subset ``simulated_network``), generated with uxsim.

An 8x8 signal-free grid, 224 directed links of 500 m, simulated with uxsim's C++ engine at 5-minute
steps. uxsim's cost grows faster than simulated time, so each simulated day is built from 12
independent episodes of 2 hours, one starting every two hours: the first 15 minutes fill the empty
network and are dropped, the remaining 105 minutes (21 steps) are recorded. On odd days episodes
start 15 minutes earlier, so that the set records every time of day while each day's recordings
stay within that day. Demand follows the real counts' time-of-day profile (working days and
weekends apart) times a per-day level, with sensor noise, dropouts (NaN runs) and incidents (a
link's free-flow speed, and so its capacity, cut for 20-60 minutes).

The simulated set is generated once per size, seeded, and cached under ``DATA_DIR/_cache`` with a
SHA-256 beside it; `simulate_network` is the documented one-off step (``cityserve data prepare
traffic --full-sim`` simulates the "full" size). uxsim is imported only inside `simulate_episode`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.io import replacing, sha256_file, write_json_atomic

SIM_NETWORK = "grid"
SIM_STEP = pd.Timedelta(minutes=5)
SimSize = Literal["smoke", "quick", "full"]

# Network layout (see the module docstring).
GRID = 8
LINK_LENGTH_M = 500.0
FREE_FLOW_MS = 15.0
EPISODE_S = 2 * 3600
WARMUP_S = 15 * 60
DEMAND_SEGMENT_S = 600
OD_PAIRS = 90
# Simulator and sensor settings; part of the cache key, so changing one regenerates the set.
# Slow, noisy route updates: uxsim's default (all drivers bound for a destination switch to the
# current shortest path every 10 minutes) makes flows on the grid's many equal-length routes
# flip-flop, a swing no real network shows.
SIM_MODEL: dict[str, float] = {
    "deltan": 5, "duo_update_weight": 0.05, "duo_noise": 0.3, "base_flow_veh_s": 0.045,
    "day_level_sigma": 0.25, "incidents_per_episode": 1.2, "noise_sigma": 0.08,
    "dropout_run_p": 0.04, "dropout_point_p": 0.005,
}
SIM_START = pd.Timestamp("2024-01-01")  # a Monday, so simulated day d has weekday d % 7


@dataclass(frozen=True)
class SimSpec:
    """How big a simulated set is: `days` days of `episodes_per_day` episodes, split by day; the first
    episode of a day starts `first_start_s` after midnight."""

    days: int
    episodes_per_day: int
    split_days: tuple[int, int, int]
    seed: int = 2024
    first_start_s: int = 0


SIM_SPECS: dict[SimSize, SimSpec] = {
    # 10 days (240 simulated hours); train is a whole week, so every weekday occurs in it.
    "full": SimSpec(days=10, episodes_per_day=12, split_days=(7, 1, 2)),
    # 4 days: what `make run` generates on a fresh machine, short enough to wait for.
    "quick": SimSpec(days=4, episodes_per_day=12, split_days=(2, 1, 1)),
    # seconds: tests and --smoke-test (three busy-hour episodes).
    "smoke": SimSpec(days=3, episodes_per_day=1, split_days=(1, 1, 1), first_start_s=7 * 3600),
}



def demand_profile(real: pd.DataFrame) -> dict[str, np.ndarray]:
    """The real counts' mean total per 15-minute slot, for working days and weekends, mean 1 on workdays."""
    total = real.groupby("timestamp")["count"].sum(min_count=1).dropna()
    slot = total.index.hour * 4 + total.index.minute // 15
    weekend = total.index.dayofweek >= 5
    prof = {}
    for kind, sel in (("workday", ~weekend), ("weekend", weekend)):
        prof[kind] = total[sel].groupby(slot[sel]).mean().reindex(range(96)).interpolate().bfill().ffill().to_numpy()
    scale = prof["workday"].mean()
    return {k: v / scale for k, v in prof.items()}


def _grid_links() -> list[tuple[str, str, str]]:
    """(link id, from node, to node) of the 8x8 grid: both directions between neighbours."""
    links = []
    for i in range(GRID):
        for j in range(GRID):
            for a, b in ((i + 1, j), (i, j + 1)):
                if a < GRID and b < GRID:
                    links.append((f"L{i}{j}-{a}{b}", f"n{i}{j}", f"n{a}{b}"))
                    links.append((f"L{a}{b}-{i}{j}", f"n{a}{b}", f"n{i}{j}"))
    return links


def sim_sensor_ids() -> list[str]:
    """The simulated network's sensor ids: one per directed link (224)."""
    return [name for name, _, _ in _grid_links()]


@dataclass(frozen=True)
class Episode:
    """One independent simulation: 2 hours of day `day` from `start_s` after midnight (negative: the
    warm-up starts the evening before)."""

    day: int
    start_s: int
    level: float
    seed: int


def _od_pairs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed origin-destination pairs of the network (mostly edge to edge, some to the centre)."""
    rng = np.random.default_rng(seed)
    nodes = [(i, j) for i in range(GRID) for j in range(GRID)]
    edge = [k for k, (i, j) in enumerate(nodes) if i in (0, GRID - 1) or j in (0, GRID - 1)]
    pairs: list[tuple[int, int]] = []
    while len(pairs) < OD_PAIRS:
        o = int(rng.choice(edge))
        d = int(rng.choice(edge)) if rng.random() < 0.7 else int(rng.integers(len(nodes)))
        if o != d:
            pairs.append((o, d))
    weights = rng.lognormal(0.0, 0.5, size=OD_PAIRS)
    return np.array(pairs), weights / weights.mean()


def simulate_episode(episode: Episode, profile: dict[str, np.ndarray]) -> np.ndarray:
    """Runs one episode; returns clean 5-minute link counts, shape (links, recorded steps)."""
    import uxsim  # heavy import, only where simulation happens

    world = uxsim.World(name="", deltan=int(SIM_MODEL["deltan"]), tmax=EPISODE_S,
                        duo_update_weight=SIM_MODEL["duo_update_weight"], duo_noise=SIM_MODEL["duo_noise"],
                        print_mode=0, save_mode=0, show_mode=0, random_seed=episode.seed, cpp=True)
    for i in range(GRID):
        for j in range(GRID):
            world.addNode(f"n{i}{j}", i, j)
    links = [world.addLink(name, a, b, length=LINK_LENGTH_M, free_flow_speed=FREE_FLOW_MS)
             for name, a, b in _grid_links()]
    pairs, weights = _od_pairs(SIM_SPECS["full"].seed)  # the same network demand pattern for every episode
    kind = "weekend" if episode.day % 7 >= 5 else "workday"
    rng = np.random.default_rng(episode.seed)
    for seg in range(0, EPISODE_S, DEMAND_SEGMENT_S):
        tod = (episode.start_s + seg + DEMAND_SEGMENT_S / 2) % 86400
        level = episode.level * float(np.interp(tod / 900.0, np.arange(96), profile[kind], period=96))
        for (o, d), w in zip(pairs, weights, strict=True):
            world.adddemand(f"n{o // GRID}{o % GRID}", f"n{d // GRID}{d % GRID}", seg, seg + DEMAND_SEGMENT_S,
                            flow=SIM_MODEL["base_flow_veh_s"] * level * w)
    # Incidents: a link's free-flow speed (and so capacity) drops for 20-60 minutes.
    events = []
    for _ in range(rng.poisson(SIM_MODEL["incidents_per_episode"])):
        start = float(rng.uniform(WARMUP_S - 600, EPISODE_S - 900))
        events.append((start, "cut", int(rng.integers(len(links)))))
        events.append((start + float(rng.uniform(1200, 3600)), "restore", events[-1][2]))
    for at, what, k in sorted(events):
        if at < EPISODE_S:
            world.exec_simulation(until_t=at)
            links[k].change_free_flow_speed(FREE_FLOW_MS / 5 if what == "cut" else FREE_FLOW_MS)
    world.exec_simulation()
    edges = np.arange(WARMUP_S, EPISODE_S + 1, int(SIM_STEP.total_seconds()))
    cumulative = np.array([[link.arrival_count(t) for t in edges] for link in links], dtype=float)
    return np.diff(cumulative, axis=1)


def _observe(counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor model: multiplicative noise, rounding, short dropout runs (NaN)."""
    seen = np.round(counts * rng.lognormal(0.0, SIM_MODEL["noise_sigma"], size=counts.shape))
    for s in range(seen.shape[0]):
        if rng.random() < SIM_MODEL["dropout_run_p"]:
            start = int(rng.integers(seen.shape[1]))
            seen[s, start:start + int(rng.integers(1, 7))] = np.nan
    seen[rng.random(seen.shape) < SIM_MODEL["dropout_point_p"]] = np.nan
    return seen


def _run(args: tuple[Episode, dict[str, np.ndarray]]) -> np.ndarray:
    return simulate_episode(*args)


def simulate_network(cache_dir: Path, size: SimSize, profile: dict[str, np.ndarray],
                     processes: int = 2) -> Path:
    """Generates the simulated set of a size once (seeded) and caches it with a checksum.

    Args:
        cache_dir: where the Parquet file and its `.json` (spec, rows, sha256) live.
        size: "smoke", "quick" or "full" (`SIM_SPECS`).
        profile: the real counts' daily demand profile (`demand_profile`).
        processes: simulation processes (episodes are independent).

    Returns:
        The cached Parquet file (network, episode, sensor, timestamp, count).
    """
    spec = SIM_SPECS[size]
    key = {"spec": asdict(spec), "model": SIM_MODEL,
           "profile": {k: np.round(v, 6).tolist() for k, v in profile.items()}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"traffic_sim_{size}_{digest}.parquet"
    info = path.with_suffix(".json")
    if path.is_file() and info.is_file() and json.loads(info.read_text())["sha256"] == sha256_file(path):
        return path
    rng = np.random.default_rng(spec.seed)
    # Day-to-day demand swings (weather, events, holidays) that an average of past days cannot know.
    levels = rng.lognormal(0.0, SIM_MODEL["day_level_sigma"], size=spec.days)
    stride = 86400 // spec.episodes_per_day
    episodes = [Episode(day=d, start_s=spec.first_start_s + k * stride - (d % 2) * WARMUP_S, level=float(levels[d]),
                        seed=int(rng.integers(2**31)))
                for d in range(spec.days) for k in range(spec.episodes_per_day)]
    jobs = [(e, profile) for e in episodes]
    if processes > 1:
        with get_context("spawn").Pool(processes) as pool:
            clean = pool.map(_run, jobs)
    else:
        clean = [_run(j) for j in jobs]
    sensors = sim_sensor_ids()
    frames = []
    for k, (episode, counts) in enumerate(zip(episodes, clean, strict=True)):
        seen = _observe(counts, np.random.default_rng(episode.seed + 1))
        first = SIM_START + pd.Timedelta(days=episode.day, seconds=episode.start_s + WARMUP_S)
        times = pd.date_range(first, periods=seen.shape[1], freq=SIM_STEP)
        frames.append(pd.DataFrame({
            "network": SIM_NETWORK, "episode": k,
            "sensor": np.repeat(sensors, seen.shape[1]), "timestamp": np.tile(times, len(sensors)),
            "count": seen.ravel(),
        }))
    table = pd.concat(frames, ignore_index=True)
    with replacing(path) as tmp:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)
    write_json_atomic(info, {"spec": asdict(spec), "model": SIM_MODEL, "rows": len(table), "sha256": sha256_file(path)})
    return path
