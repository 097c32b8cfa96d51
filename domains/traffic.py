"""Traffic: one multi-horizon, multi-sensor quantile forecaster serving two networks.

Model (`TrafficNet`): every sensor's recent window is encoded by one MLP shared across all sensors of
both networks (weights shared across sensors); sensor identity enters as a learned embedding. The
sensors then exchange information through an adaptive adjacency learned per network from source and
target node embeddings (Graph WaveNet's `softmax(relu(E1 E2^T))`), in residual mixing blocks. The head
gives P10/P50/P90 at 15, 30 and 60 minutes as corrections to the sensor's smoothed daily profile,
in units of the sensor's mean count; P10 and P90 are P50 minus/plus a softplus, so quantiles never cross.

Per step the encoder sees: the normalised count (0 where missing), an observed flag, the sensor's
profile at that step, and time of day / day of week as sine and cosine. The profile is the training
split's mean per (working day or weekend, time slot), smoothed over three slots: it is what lets the
model forecast a dropout-ridden window and what the correction is measured from.

Windows: ``intersection`` (15-minute steps) sends the last W=16 steps (4 hours), ``grid`` (5-minute
steps) the last W=6 steps (30 minutes, because simulated episodes are 2 hours long). A request may
carry None for a dropout; a sensor the request leaves out counts as missing for the mixing.

Validation metric ``val_mae``: the P50 MAE of each network and horizon divided by that network's mean
count, averaged over the six (network, horizon) pairs, so both networks weigh the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from scipy import stats
from torch import nn
from torch.utils.data import Dataset

from core.errors import InvalidInput
from domains import metrics
from domains.base import Batch, Domain, Evaluation, MetricRow, Predictor, SearchParam

HORIZONS = ("15min", "30min", "60min")
HORIZON_MINUTES = (15, 30, 60)
QUANTILE_NAMES = ("p10", "p50", "p90")
N_FEATURES = 7  # count, observed, profile, tod sin/cos, dow sin/cos


@dataclass(frozen=True)
class NetworkSpec:
    """A network the model serves: its report subset, step and input window."""

    subset: str
    step_minutes: int
    window: int

    @property
    def horizon_steps(self) -> tuple[int, ...]:
        return tuple(m // self.step_minutes for m in HORIZON_MINUTES)

    @property
    def slots(self) -> int:
        return 1440 // self.step_minutes


NETWORKS: dict[str, NetworkSpec] = {
    "intersection": NetworkSpec(subset="real_counts", step_minutes=15, window=16),
    "grid": NetworkSpec(subset="simulated_network", step_minutes=5, window=6),
}
W_MAX = max(s.window for s in NETWORKS.values())
# A detector counts vehicles per step: thousands at most. The network computes in float32, and
# counts near 1e25 turned forecasts into NaN, which no JSON answer can carry (a 500).
MAX_COUNT = 1e6
Count = Annotated[float, Field(ge=0, le=MAX_COUNT, allow_inf_nan=False)]


# ---- request / response contract ---------------------------------------------------------------------
class TrafficRequest(BaseModel):
    """One forecast request: the recent counts of some or all sensors of one network."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "network": "grid", "sensors": ["L00-10", "L10-00"],
            "history": [[31, 35, None, 40, 38, 42], [12, 10, 11, 15, 9, 14]],
            "last_timestamp": "2024-05-13T08:00:00",
        }]},
    )

    network: str = Field(
        description="network name: 'intersection' (real detectors, 15-minute steps, W=16) or "
                    "'grid' (simulated 8x8 grid, 5-minute steps, W=6)",
        examples=["intersection", "grid"], json_schema_extra={"enum": list(NETWORKS)},
    )
    sensors: list[str] = Field(
        min_length=1, description="sensor ids of that network (sensors left out count as missing)",
        examples=[["d1", "d2"]],
    )
    history: list[list[Count | None]] = Field(
        description="per sensor, in the order of `sensors`, the last W counts oldest first (W = 16 for "
                    f"'intersection', 6 for 'grid'), each from 0 to {MAX_COUNT:,.0f}; null marks a dropout",
        examples=[[[4, 6, 5, 9, 12, 15, 20, 26, 31, 30, 28, 33, 35, 36, 40, None]]],
    )
    last_timestamp: datetime = Field(
        description="start of the last step in `history` (local time; drives time-of-day features)",
        examples=["2024-05-13T08:00:00"],
    )

    @field_validator("network")
    @classmethod
    def _known(cls, network: str) -> str:
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network[:100]!r}; choose one of {sorted(NETWORKS)}")
        return network

    @field_validator("sensors")
    @classmethod
    def _unique(cls, sensors: list[str]) -> list[str]:
        seen: set[str] = set()
        for s in sensors:
            if s in seen:
                raise ValueError(f"sensor {s!r} is listed twice")
            seen.add(s)
        return sensors

    @field_validator("history")
    @classmethod
    def _lengths(cls, history: list[list[float | None]], info: ValidationInfo) -> list[list[float | None]]:
        # Checked here, not by the model: pydantic has the network and sensors already (fields
        # validate in order; a refused one is absent, and its own error is reported).
        if "sensors" in info.data and len(history) != len(info.data["sensors"]):
            raise ValueError(f"history has {len(history)} series for {len(info.data['sensors'])} sensors")
        if "network" in info.data:
            window = NETWORKS[info.data["network"]].window
            for i, row in enumerate(history):
                if len(row) != window:
                    raise ValueError(f"history[{i}] has {len(row)} steps; network {info.data['network']!r} "
                                     f"needs the last {window}")
        return history


class QuantileForecast(BaseModel):
    """A forecast count's quantiles."""

    model_config = ConfigDict(extra="forbid")

    p10: float = Field(description="10th percentile of the count", examples=[28.0])
    p50: float = Field(description="median forecast of the count", examples=[36.5])
    p90: float = Field(description="90th percentile of the count", examples=[46.0])


class SensorForecast(BaseModel):
    """One sensor's forecasts at every horizon."""

    model_config = ConfigDict(extra="forbid")

    sensor: str = Field(description="sensor id", examples=["d1"])
    horizons: dict[Literal["15min", "30min", "60min"], QuantileForecast] = Field(
        description="quantiles of the count in the step 15, 30 and 60 minutes after the last step of `history`",
        examples=[{"15min": {"p10": 28, "p50": 36.5, "p90": 46}}],
    )


class TrafficResponse(BaseModel):
    """The forecasts for the requested sensors, in request order."""

    model_config = ConfigDict(extra="forbid")

    network: str = Field(description="the network forecast", examples=["intersection"])
    version: str = Field(description="model version that answered", examples=["traffic-v3"])
    forecasts: list[SensorForecast] = Field(description="one entry per requested sensor")


# ---- features ----------------------------------------------------------------------------------------
def _profile_lookup(profile: np.ndarray, times: pd.DatetimeIndex | np.ndarray, step_minutes: int) -> np.ndarray:
    """Profile values at `times` (any shape): returns shape times.shape + (sensors,)."""
    t = pd.DatetimeIndex(np.asarray(times).ravel())
    slot = ((t.hour * 60 + t.minute) // step_minutes).to_numpy()
    weekend = (t.dayofweek >= 5).astype(int)
    values = profile[weekend, :, slot]  # advanced indices first: (n, sensors)
    return values.reshape(*np.shape(times), profile.shape[1])


def _time_features(times: np.ndarray) -> np.ndarray:
    t = pd.DatetimeIndex(np.asarray(times).ravel())
    tod = 2 * np.pi * (t.hour * 60 + t.minute).to_numpy() / 1440
    dow = 2 * np.pi * t.dayofweek.to_numpy() / 7
    feats = np.stack([np.sin(tod), np.cos(tod), np.sin(dow), np.cos(dow)], axis=-1)
    return feats.reshape(*np.shape(times), 4)


def encode(counts: np.ndarray, hist_times: np.ndarray, net_meta: dict[str, Any], spec: NetworkSpec
           ) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs for windows of one network (training, evaluation and serving share this).

    Args:
        counts: raw counts, shape (windows, sensors, W), NaN where missing.
        hist_times: step start times, shape (windows, W).
        net_meta: the network's entry in meta (sensor scales and profile).
        spec: the network.

    Returns:
        (x of shape (windows, sensors, W_MAX * N_FEATURES) left-padded with zeros,
         target profile of shape (windows, sensors, 3)), both in units of the sensor's mean count.
    """
    scale = np.asarray(net_meta["scale"], dtype=np.float32)
    profile = np.asarray(net_meta["profile"], dtype=np.float32) / scale[None, :, None]
    n, s, w = counts.shape
    observed = ~np.isnan(counts)
    x = np.zeros((n, s, W_MAX, N_FEATURES), dtype=np.float32)
    x[:, :, -w:, 0] = np.where(observed, counts, 0.0) / scale[None, :, None]
    x[:, :, -w:, 1] = observed
    x[:, :, -w:, 2] = _profile_lookup(profile, hist_times, spec.step_minutes).transpose(0, 2, 1)
    x[:, :, -w:, 3:] = _time_features(hist_times)[:, None, :, :]
    step = np.timedelta64(spec.step_minutes, "m")
    last = np.asarray(hist_times)[:, -1:]
    target_times = last + np.array(spec.horizon_steps)[None, :] * step
    target = _profile_lookup(profile, target_times, spec.step_minutes).transpose(0, 2, 1)
    return x.reshape(n, s, W_MAX * N_FEATURES), target.astype(np.float32)


@dataclass
class Windows:
    """Every forecast origin of one network's split: inputs, actuals and times."""

    counts: np.ndarray  # (windows, sensors, W) raw history
    hist_times: np.ndarray  # (windows, W) datetime64
    actual: np.ndarray  # (windows, sensors, 3) raw counts at the horizons, NaN where missing
    target_times: np.ndarray  # (windows, 3)


def to_matrix(frame: pd.DataFrame, sensors: Sequence[str]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per episode: (times (T,), counts (sensors, T)) from a long frame."""
    out = {}
    for episode, part in frame.groupby("episode", sort=True):
        wide = part.pivot_table(index="timestamp", columns="sensor", values="count", aggfunc="mean", dropna=False)
        wide = wide.reindex(columns=list(sensors))
        out[int(episode)] = (wide.index.to_numpy(), wide.to_numpy(dtype=np.float64).T)
    return out


def make_windows(frame: pd.DataFrame, sensors: Sequence[str], spec: NetworkSpec) -> Windows:
    """All origins whose W history steps and three horizons lie inside one episode."""
    w, steps = spec.window, np.array(spec.horizon_steps)
    parts: dict[str, list[np.ndarray]] = {"counts": [], "hist": [], "actual": [], "target": []}
    for times, counts in to_matrix(frame, sensors).values():
        if len(times) < w + steps[-1]:
            continue
        origins = np.arange(w - 1, len(times) - steps[-1])
        hist_idx = origins[:, None] + np.arange(-w + 1, 1)[None, :]
        tgt_idx = origins[:, None] + steps[None, :]
        parts["counts"].append(counts[:, hist_idx].transpose(1, 0, 2))
        parts["hist"].append(times[hist_idx])
        parts["actual"].append(counts[:, tgt_idx].transpose(1, 0, 2))
        parts["target"].append(times[tgt_idx])
    if not parts["counts"]:
        raise ValueError(f"no complete {spec.subset} window: episodes shorter than {w + steps[-1]} steps")
    return Windows(*(np.concatenate(parts[k]) for k in ("counts", "hist", "actual", "target")))


class TrafficWindows(Dataset[Batch]):
    """Windows of both networks; `TrafficDomain.collate` groups a batch's items by network."""

    def __init__(self, per_network: dict[str, Windows], meta: dict[str, Any]) -> None:
        self.arrays: list[dict[str, torch.Tensor]] = []
        self.items: list[tuple[int, int]] = []
        for name, win in per_network.items():
            net_meta = meta["networks"][name]
            x, target = encode(win.counts, win.hist_times, net_meta, NETWORKS[name])
            scale = np.asarray(net_meta["scale"], dtype=np.float32)
            y = win.actual / scale[None, :, None]
            self.arrays.append({
                "x": torch.from_numpy(x), "target_profile": torch.from_numpy(target),
                "y": torch.from_numpy(np.nan_to_num(y).astype(np.float32)), "y_mask": torch.from_numpy(~np.isnan(y)),
                # Loss weight per sensor: its volume relative to the network's mean, so that the
                # loss (in units of each sensor's mean) tracks absolute errors in counts.
                "weight": torch.from_numpy(scale / scale.mean()).expand(len(x), -1),
                "network": torch.full((len(x),), list(NETWORKS).index(name)),
            })
            self.items += [(len(self.arrays) - 1, i) for i in range(len(x))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Batch:
        a, i = self.items[index]
        return {k: v[i] for k, v in self.arrays[a].items()}


def group_batch(items: Sequence[Batch], networks: Sequence[str]) -> Batch:
    """One flat batch with keys "<network>/<field>"; a network absent from the batch gets empty tensors.

    Windows of different networks have different sensor counts, so they are stacked per network
    rather than padded to the largest (a 22-sensor window padded to 224 would cost ten times more).
    The first key, "windows", counts every item (the training loop reads a batch's size from it).
    An absent network's tensors have zero windows and one sensor, which broadcasts in the model.
    """
    batch: Batch = {"windows": torch.ones(len(items))}
    n = 1
    for k, name in enumerate(networks):
        mine = [item for item in items if int(item["network"]) == k]
        shapes = {"x": (n, W_MAX * N_FEATURES), "target_profile": (n, len(HORIZONS)),
                  "y": (n, len(HORIZONS)), "y_mask": (n, len(HORIZONS)), "weight": (n,)}
        for key, shape in shapes.items():
            dtype = torch.bool if key == "y_mask" else torch.float32
            batch[f"{name}/{key}"] = torch.stack([m[key] for m in mine]) if mine else torch.zeros((0, *shape),
                                                                                                 dtype=dtype)
    return batch


# ---- model -------------------------------------------------------------------------------------------
class MixBlock(nn.Module):
    """Residual block: a per-sensor MLP, then one hop over the learned adjacency."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm2 = nn.LayerNorm(hidden)
        self.message = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(self.mlp(self.norm1(h)))
        return h + self.drop(adjacency @ self.message(self.norm2(h)))


class TrafficNet(nn.Module):
    """Shared per-sensor encoder + learned-adjacency mixing + quantile head (see the module docstring).

    Everything but the per-sensor embeddings is shared by every sensor of every network.
    """

    def __init__(self, sizes: Sequence[int], hidden: int, node_dim: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(W_MAX * N_FEATURES + len(HORIZONS), hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.sensor_embedding = nn.ParameterList(nn.Parameter(torch.zeros(n, hidden)) for n in sizes)
        self.source = nn.ParameterList(nn.Parameter(torch.randn(n, node_dim) * 0.1) for n in sizes)
        self.target = nn.ParameterList(nn.Parameter(torch.randn(n, node_dim) * 0.1) for n in sizes)
        self.blocks = nn.ModuleList(MixBlock(hidden, dropout) for _ in range(layers))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, len(HORIZONS) * 3))

    def forecast(self, network: int, x: torch.Tensor, target_profile: torch.Tensor) -> torch.Tensor:
        """One network's quantiles in units of each sensor's mean count: (windows, sensors, horizons, 3)."""
        h = self.encoder(torch.cat([x, target_profile], dim=-1)) + self.sensor_embedding[network]
        adjacency = torch.softmax(F.relu(self.source[network] @ self.target[network].T), dim=-1)
        for block in self.blocks:
            h = block(h, adjacency)
        out = self.head(h).unflatten(-1, (len(HORIZONS), 3)).float()
        p50 = target_profile + out[..., 1]
        return torch.stack([p50 - F.softplus(out[..., 0]), p50, p50 + F.softplus(out[..., 2])], dim=-1)

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """`inputs` are (x, target_profile) for each network in meta order; one output per network."""
        return [self.forecast(k, inputs[2 * k], inputs[2 * k + 1]) for k in range(len(inputs) // 2)]


def _model_inputs(batch: Batch, networks: Sequence[str]) -> list[torch.Tensor]:
    return [batch[f"{n}/{key}"] for n in networks for key in ("x", "target_profile")]


# ---- baselines ---------------------------------------------------------------------------------------
def _slot_keys(times: pd.DatetimeIndex, step_minutes: int) -> tuple[np.ndarray, np.ndarray]:
    return times.dayofweek.to_numpy(), ((times.hour * 60 + times.minute) // step_minutes).to_numpy()


def historical_average(train: pd.DataFrame, sensors: Sequence[str], spec: NetworkSpec,
                       times: np.ndarray) -> np.ndarray:
    """Train mean at the same weekday and time slot, shape times.shape + (sensors,).

    Falls back to the same day type (working day / weekend) and slot, then the slot alone, then the
    sensor's mean, where the training split has no such weekday or slot (short simulated sets).
    """
    t = pd.DatetimeIndex(train["timestamp"])
    dow, slot = _slot_keys(t, spec.step_minutes)
    frame = pd.DataFrame({"sensor": train["sensor"].to_numpy(), "dow": dow, "weekend": dow >= 5, "slot": slot,
                          "count": train["count"].to_numpy()})
    flat = pd.DatetimeIndex(np.asarray(times).ravel())
    q_dow, q_slot = _slot_keys(flat, spec.step_minutes)
    out = np.full((len(flat), len(sensors)), np.nan)
    for keys, q in ((["dow", "slot"], [q_dow, q_slot]), (["weekend", "slot"], [q_dow >= 5, q_slot]),
                    (["slot"], [q_slot])):
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


# ---- predictor ---------------------------------------------------------------------------------------
class TrafficPredictor(Predictor):
    """A loaded traffic model version."""

    def __init__(self, model: TrafficNet, meta: dict[str, Any], version: str, device: str) -> None:
        super().__init__(version)
        self.model = model.to(device)
        self.meta = meta
        self.device = device

    def forecast(self, network: str, counts: np.ndarray, hist_times: np.ndarray) -> np.ndarray:
        """Raw-count quantiles, shape (windows, sensors, horizons, 3), for full-network windows."""
        net_id = list(self.meta["networks"]).index(network)
        net_meta = self.meta["networks"][network]
        x, target = encode(counts, hist_times, net_meta, NETWORKS[network])
        out = []
        with torch.no_grad():
            for lo in range(0, len(x), 256):
                q = self.model.forecast(net_id, torch.from_numpy(x[lo:lo + 256]).to(self.device),
                                        torch.from_numpy(target[lo:lo + 256]).to(self.device))
                out.append(q.cpu().numpy())
        scale = np.asarray(net_meta["scale"])[None, :, None, None]
        return np.maximum(np.concatenate(out) * scale, 0.0)  # counts are never negative

    def predict(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        return [self._predict_one(TrafficRequest.model_validate(item)) for item in items]

    def _predict_one(self, req: TrafficRequest) -> TrafficResponse:
        if req.network not in self.meta["networks"]:
            raise InvalidInput(f"unknown network {req.network!r}; choose one of {sorted(self.meta['networks'])}",
                               field="network")
        spec = NETWORKS[req.network]
        sensors: list[str] = self.meta["networks"][req.network]["sensors"]
        index = {s: i for i, s in enumerate(sensors)}
        counts = np.full((1, len(sensors), spec.window), np.nan)
        rows = []
        for i, (sensor, series) in enumerate(zip(req.sensors, req.history, strict=True)):  # lengths: the request model
            if sensor not in index:
                raise InvalidInput(f"unknown sensor {sensor!r} in network {req.network!r}", field=f"sensors[{i}]")
            counts[0, index[sensor]] = [np.nan if v is None else v for v in series]
            rows.append(index[sensor])
        last = np.datetime64(req.last_timestamp.replace(tzinfo=None), "ns")
        hist_times = last - np.arange(spec.window - 1, -1, -1) * np.timedelta64(spec.step_minutes, "m")
        q = self.forecast(req.network, counts, hist_times[None, :])[0]
        return TrafficResponse(network=req.network, version=self.version, forecasts=[
            SensorForecast(sensor=sensors[r], horizons={
                h: QuantileForecast(**{n: float(q[r, k, j]) for j, n in enumerate(QUANTILE_NAMES)})
                for k, h in enumerate(HORIZONS)
            }) for r in rows
        ])


# ---- the domain --------------------------------------------------------------------------------------
class TrafficDomain(Domain):
    """Traffic counts: P10/P50/P90 at 15/30/60 minutes for every sensor of a network."""

    full_data_flags = "--full-sim"  # the 10-day simulated set, a one-off step

    name = "traffic"
    metric = "val_mae"
    mode = "min"
    request_model = TrafficRequest
    response_model = TrafficResponse

    def prepare(self, data_dir: Path, *, source: Path | None = None, smoke: bool = False) -> dict[str, Any]:
        from training.data.traffic import prepare_traffic  # build-side code; serving never imports it

        return prepare_traffic(data_dir, source=source, smoke=smoke)

    def default_config(self, profile: Literal["smoke", "quick", "full"]) -> dict[str, Any]:
        common = {"weight_decay": 0.01, "warmup_frac": 0.05, "grad_clip": 1.0, "seed": 0, "node_dim": 16}
        if profile == "smoke":
            return {**common, "epochs": 2, "batch_size": 16, "lr": 2e-3, "patience": 2,
                    "hidden": 32, "layers": 1, "dropout": 0.0}
        if profile == "quick":
            return {**common, "epochs": 6, "batch_size": 32, "lr": 2e-3, "patience": 3,
                    "hidden": 64, "layers": 2, "dropout": 0.1}
        return {**common, "epochs": 12, "batch_size": 32, "lr": 2e-3, "patience": 4,
                "hidden": 96, "layers": 2, "dropout": 0.1}

    def _tables(self, data_dir: Path, split: str) -> dict[str, pd.DataFrame]:
        from domains.tables import load_table

        return {name: load_table(data_dir, self.name, f"{name}_{split}") for name in NETWORKS}

    def search_space(self) -> dict[str, SearchParam]:
        return {
            "lr": SearchParam("loguniform", 3e-4, 1e-2),
            "weight_decay": SearchParam("loguniform", 1e-4, 1e-1),
            "hidden": SearchParam("choice", values=(32, 64, 96, 128)),
            "layers": SearchParam("randint", 1, 3),
            "node_dim": SearchParam("choice", values=(8, 16, 32)),
            "dropout": SearchParam("uniform", 0.0, 0.3),
        }

    def fit_meta(self, data_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
        """Sensor ids, mean counts (the unit the model works in) and smoothed profiles, from train only."""
        from domains.tables import read_manifest

        networks = {}
        for name, train in self._tables(data_dir, "train").items():
            spec = NETWORKS[name]
            sensors = sorted(train["sensor"].unique())
            scale = train.groupby("sensor")["count"].mean().reindex(sensors).fillna(0.0).to_numpy() + 1.0
            t = pd.DatetimeIndex(train["timestamp"])
            dow, slot = _slot_keys(t, spec.step_minutes)
            frame = pd.DataFrame({"sensor": train["sensor"].to_numpy(), "weekend": (dow >= 5).astype(int),
                                  "slot": slot, "count": train["count"].to_numpy()})
            mean = frame.groupby(["weekend", "sensor", "slot"])["count"].mean()
            full = pd.MultiIndex.from_product([[0, 1], sensors, range(spec.slots)])
            prof = mean.reindex(full).to_numpy().reshape(2, len(sensors), spec.slots)
            # A day type absent from train takes the other; smooth over three slots (circular).
            for d in (0, 1):
                if np.isnan(prof[d]).all():
                    prof[d] = prof[1 - d]
            padded = np.concatenate([prof[..., -1:], prof, prof[..., :1]], axis=-1)
            windows = np.lib.stride_tricks.sliding_window_view(padded, 3, axis=-1)
            seen = (~np.isnan(windows)).sum(-1)
            prof = np.where(seen > 0, np.nansum(windows, axis=-1) / np.maximum(seen, 1), np.nan)
            prof = np.where(np.isnan(prof), scale[None, :, None] - 1.0, prof)  # slots never simulated
            networks[name] = {"sensors": sensors, "scale": scale.round(4).tolist(),
                              "profile": prof.round(3).tolist()}
        return {
            "networks": networks,
            "manifest_sha256": read_manifest(data_dir, self.name)["sha256"],
        }

    def datasets(self, data_dir: Path, config: dict[str, Any], meta: dict[str, Any]
                 ) -> tuple[Dataset[Batch], Dataset[Batch]]:
        out = []
        for split in ("train", "valid"):
            tables = self._tables(data_dir, split)
            out.append(TrafficWindows({
                name: make_windows(tables[name], meta["networks"][name]["sensors"], NETWORKS[name])
                for name in NETWORKS
            }, meta))
        return out[0], out[1]

    def build_model(self, config: dict[str, Any], meta: dict[str, Any]) -> nn.Module:
        return TrafficNet(sizes=[len(n["sensors"]) for n in meta["networks"].values()],
                          hidden=int(config["hidden"]), node_dim=int(config["node_dim"]),
                          layers=int(config["layers"]), dropout=float(config["dropout"]))

    def collate(self, items: list[Any]) -> Batch:
        return group_batch(items, list(NETWORKS))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Pinball loss over P10/P50/P90, weighted by sensor volume (so it tracks MAE in counts)."""
        tau = torch.tensor(metrics.QUANTILES)
        total, norm = torch.zeros(()), torch.zeros(())
        for name, q in zip(NETWORKS, model(*_model_inputs(batch, list(NETWORKS))), strict=True):
            diff = batch[f"{name}/y"][..., None] - q
            pin = torch.maximum(tau.to(q.device) * diff, (tau.to(q.device) - 1) * diff).mean(-1)
            mask = batch[f"{name}/y_mask"].float() * batch[f"{name}/weight"][..., None]
            total = total.to(q.device) + (pin * mask).sum()
            norm = norm.to(q.device) + mask.sum()
        return total / norm.clamp_min(1.0)

    def validate(self, model: nn.Module, loader: Iterable[Batch], meta: dict[str, Any]) -> dict[str, float]:
        names = list(NETWORKS)
        abs_err = torch.zeros(len(names), len(HORIZONS))
        inside = torch.zeros(len(names), len(HORIZONS))
        count = torch.zeros(len(names), len(HORIZONS))
        for batch in loader:
            for k, (name, q) in enumerate(zip(names, model(*_model_inputs(batch, names)), strict=True)):
                q = q.float()
                y, mask = batch[f"{name}/y"], batch[f"{name}/y_mask"].float()
                scale = torch.as_tensor(meta["networks"][name]["scale"], device=q.device)[:, None]
                abs_err[k] += ((q[..., 1] - y).abs() * scale * mask).sum((0, 1)).cpu()
                inside[k] += (((y >= q[..., 0]) & (y <= q[..., 2])).float() * mask).sum((0, 1)).cpu()
                count[k] += mask.sum((0, 1)).cpu()
        mae = abs_err / count.clamp_min(1)
        out: dict[str, float] = {}
        for k, name in enumerate(names):
            mean_count = float(np.mean(meta["networks"][name]["scale"]) - 1.0)
            for j, h in enumerate(HORIZONS):
                out[f"val_mae_{name}_{h}"] = float(mae[k, j])
                out[f"val_norm_mae_{name}_{h}"] = float(mae[k, j]) / mean_count
        out["val_mae"] = float(np.mean([v for k, v in out.items() if k.startswith("val_norm_mae_")]))
        out["val_coverage"] = float(inside.sum() / count.sum().clamp_min(1))
        return out

    def load_predictor(self, model_dir: Path, version: str, device: str = "cpu") -> Predictor:
        model, _, meta = self.load_model_files(Path(model_dir))
        if not isinstance(model, TrafficNet):
            raise TypeError(f"expected a TrafficNet, got {type(model).__name__}")
        return TrafficPredictor(model, meta, version, device)

    def evaluate(self, predictor: Predictor, data_dir: Path, figure: Path) -> Evaluation:
        """METR-LA-style rows per subset and horizon on the test split, against the baselines."""
        if not isinstance(predictor, TrafficPredictor):
            raise TypeError(f"expected a TrafficPredictor, got {type(predictor).__name__}")
        train, valid, test = (self._tables(data_dir, s) for s in ("train", "valid", "test"))
        rows: list[MetricRow] = []
        plots: dict[str, tuple[Windows, np.ndarray, list[str]]] = {}
        notes = []
        for name, spec in NETWORKS.items():
            sensors = predictor.meta["networks"][name]["sensors"]
            win = make_windows(test[name], sensors, spec)
            q = predictor.forecast(name, win.counts, win.hist_times)  # (windows, sensors, horizons, 3)
            actual = win.actual
            ha = historical_average(train[name], sensors, spec, win.target_times).transpose(0, 2, 1)
            history = pd.concat([train[name], valid[name], test[name]])
            # Real counts run for weeks: same time a week earlier. Simulated sets are two weeks at
            # most, split by day, so a week earlier is often not there: same time a day earlier.
            lag = pd.Timedelta(days=7 if name == "intersection" else 1)
            baselines = {"historical_average": ha, "last_value": last_value(win, ha),
                         "seasonal_naive": seasonal_naive(history, sensors, win, lag, ha)}
            floor = None
            if name == "intersection":
                floor = poisson_floor_mae(actual, to_matrix(test[name], sensors), win, sensors)
                notes.append(f"real_counts Poisson floor MAE {floor:.2f} (oracle knowing a 75-min smoothed "
                             "mean per step; horizon-independent)")
            for k, h in enumerate(HORIZONS):
                a = actual[:, :, k]
                point = {b: v[:, :, k] for b, v in baselines.items()}
                for metric, fn in (("mae", metrics.mae), ("rmse", metrics.rmse), ("mape", metrics.mape)):
                    base = {b: fn(a, v) for b, v in point.items()}
                    if metric == "mae" and floor is not None:
                        base["poisson_floor"] = floor
                    rows.append(MetricRow(spec.subset, metric, fn(a, q[:, :, k, 1]), base, horizon=h))
                rows.append(MetricRow(spec.subset, "pinball", metrics.pinball(a, q[:, :, k]), {}, horizon=h))
                rows.append(MetricRow(spec.subset, "coverage_p10_p90",
                                      metrics.coverage(a, q[:, :, k, 0], q[:, :, k, 2]), {}, horizon=h))
            plots[name] = (win, q, sensors)
        _draw(plots, figure)
        return Evaluation(rows=rows, figure=figure, notes=notes)


def _draw(plots: dict[str, tuple[Windows, np.ndarray, list[str]]], figure: Path) -> None:
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
