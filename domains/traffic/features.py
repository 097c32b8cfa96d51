"""Traffic features: windows of counts per network and what the model reads from them.

Per step the encoder sees: the normalised count (0 where missing), an observed flag, the sensor's
profile at that step, and time of day / day of week as sine and cosine. The profile is the training
split's mean per (working day or weekend, time slot), smoothed over three slots: it is what lets the
model forecast a dropout-ridden window and what the correction is measured from. Counts and
profiles are in units of the sensor's mean count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from domains.base import Batch
from domains.traffic.contract import HORIZONS, NETWORKS, W_MAX, NetworkSpec

N_FEATURES = 7  # count, observed, profile, tod sin/cos, dow sin/cos


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


def without_time(x: np.ndarray, target: np.ndarray, net_meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """`encode`'s output with what the clock tells the model taken away: each sensor's profile
    (history steps and targets) replaced by its mean over the week's slots, and time of day and day of
    week by their average (0). Padding steps stay zero."""
    profile = np.asarray(net_meta["profile"], dtype=np.float32) / np.asarray(net_meta["scale"])[None, :, None]
    flat = profile.mean(axis=(0, 2))  # (sensors,)
    steps = x.reshape(*x.shape[:2], W_MAX, N_FEATURES).copy()
    window = steps[..., 1:].any(axis=-1)  # steps that are not padding (a time feature is never all zero)
    steps[..., 2] = np.where(window, flat[None, :, None], 0.0)
    steps[..., 3:] = 0.0
    return steps.reshape(x.shape), np.broadcast_to(flat[None, :, None], target.shape).astype(np.float32)


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


def model_inputs(batch: Batch, networks: Sequence[str]) -> list[torch.Tensor]:
    """The model's inputs from a grouped batch: (x, target_profile) for each network in order."""
    return [batch[f"{n}/{key}"] for n in networks for key in ("x", "target_profile")]


def slot_keys(times: pd.DatetimeIndex, step_minutes: int) -> tuple[np.ndarray, np.ndarray]:
    """(weekday, time-of-day slot) of each time."""
    return times.dayofweek.to_numpy(), ((times.hour * 60 + times.minute) // step_minutes).to_numpy()
