"""Traffic: one multi-horizon, multi-sensor quantile forecaster serving two networks.

`TrafficNet` (`domains.traffic.model`) reads windows of counts (`domains.traffic.features`) of the
real intersection and the simulated grid (`domains.traffic.contract`), and forecasts P10/P50/P90
at 15, 30 and 60 minutes for every sensor of a network.

Validation metric ``val_mae``: the P50 MAE of each network and horizon divided by that network's mean
count, averaged over the six (network, horizon) pairs, so both networks weigh the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset

from core.errors import InvalidInput
from domains import metrics
from domains.base import META_FILE, Batch, Domain, Evaluation, MetricRow, Predictor, SearchParam, spread
from domains.calibration import read_calibration, save_calibration
from domains.drift import Feature
from domains.forecast import (
    QuantileForecast,
    forecast_score,
    interval_offsets,
    occlusion_explanation,
    pinball_terms,
    widened,
)
from domains.tables import load_table, read_manifest
from domains.traffic.baselines import (
    draw_forecasts,
    historical_average,
    last_value,
    poisson_floor_mae,
    seasonal_naive,
)
from domains.traffic.contract import (
    HORIZONS,
    NETWORKS,
    SensorForecast,
    TrafficRequest,
    TrafficResponse,
    TrafficTruth,
)
from domains.traffic.features import (
    TrafficWindows,
    Windows,
    encode,
    group_batch,
    make_windows,
    model_inputs,
    slot_keys,
    to_matrix,
    without_time,
)
from domains.traffic.model import TrafficNet

if TYPE_CHECKING:
    from domains.traffic.simulation import SimSize


# What `TrafficPredictor.explain` calls the latest counts: one step of the intersection, three of the grid.
RECENT_MINUTES = 15


class TrafficPredictor(Predictor):
    """A loaded traffic model version."""

    def __init__(self, model: TrafficNet, meta: dict[str, Any], version: str, device: str,
                 intervals: dict[str, dict[str, list[float]]] | None = None) -> None:
        super().__init__(version)
        self.model = model.to(device)
        self.meta = meta
        self.device = device
        # network -> horizon -> (lower, upper) widths of the P10-P90 interval, in units of a sensor's scale
        self.intervals = intervals or {}

    def forecast(self, network: str, counts: np.ndarray, hist_times: np.ndarray, *, calibrated: bool = True
                 ) -> np.ndarray:
        """Raw-count quantiles, shape (windows, sensors, horizons, 3), for full-network windows;
        `calibrated`: the P10-P90 interval widened (or narrowed) as fitted on the validation split
        (`TrafficDomain.calibrate`)."""
        quantiles = self.run(network, *encode(counts, hist_times, self.meta["networks"][network], NETWORKS[network]))
        return self.finish(network, quantiles, calibrated=calibrated)

    def finish(self, network: str, quantiles: np.ndarray, *, calibrated: bool = True) -> np.ndarray:
        """`run`'s quantiles as answered: the P10-P90 interval widened by the fitted widths
        (`calibrated`) and no count below zero."""
        widths = self.intervals.get(network) if calibrated else None
        if widths:
            scale = np.asarray(self.meta["networks"][network]["scale"])[None, :, None]
            lower, upper = np.array([widths[h] for h in HORIZONS]).T  # (horizons,) each
            quantiles = widened(quantiles, lower * scale, upper * scale)
        return np.maximum(quantiles, 0.0)  # counts are never negative

    def run(self, network: str, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Uncalibrated raw-count quantiles (windows, sensors, horizons, 3) of `encode`d windows."""
        net_id = list(self.meta["networks"]).index(network)
        out = []
        with torch.no_grad():
            for lo in range(0, len(x), 256):
                q = self.model.forecast(net_id, torch.from_numpy(x[lo:lo + 256]).to(self.device),
                                        torch.from_numpy(target[lo:lo + 256]).to(self.device))
                out.append(q.cpu().numpy())
        scale = np.asarray(self.meta["networks"][network]["scale"])[None, :, None]
        quantiles: np.ndarray = np.concatenate(out) * scale[..., None]
        return quantiles

    def predict(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        return [self._predict_one(TrafficRequest.model_validate(item)) for item in items]

    def window(self, req: TrafficRequest) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """A request as one full-network window: counts (1, sensors, W) with NaN for a sensor left
        out, the steps' times (1, W), and the rows of the requested sensors in request order."""
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
        return counts, hist_times[None, :], rows

    def _predict_one(self, req: TrafficRequest) -> TrafficResponse:
        counts, hist_times, rows = self.window(req)
        return self.response(req, rows, self.forecast(req.network, counts, hist_times)[0])

    def response(self, req: TrafficRequest, rows: list[int], q: np.ndarray) -> TrafficResponse:
        """The answer to `req` from its window's quantiles as answered (sensors, horizons, 3)."""
        sensors: list[str] = self.meta["networks"][req.network]["sensors"]
        return TrafficResponse(network=req.network, version=self.version, forecasts=[
            SensorForecast(sensor=sensors[r], horizons={
                h: QuantileForecast(**QuantileForecast.fields_of(q[r, k])) for k, h in enumerate(HORIZONS)
            }) for r in rows
        ])

    def explain(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        """Answers as `predict` does, each with a `ForecastExplanation` over the requested sensors'
        medians: the forecast made again with the counts of the last `RECENT_MINUTES` missing, with
        the earlier counts missing (as a detector dropout is), and without the time (`without_time`).
        The answer and the median the groups are measured against come from one forecast."""
        answers: list[BaseModel] = []
        for item in items:
            req = TrafficRequest.model_validate(item)
            counts, hist_times, rows = self.window(req)
            spec, net_meta = NETWORKS[req.network], self.meta["networks"][req.network]
            recent = RECENT_MINUTES // spec.step_minutes
            latest, earlier = counts.copy(), counts.copy()
            latest[..., -recent:] = np.nan
            earlier[..., :-recent] = np.nan
            x, target = encode(counts, hist_times, net_meta, spec)
            inputs = {
                f"counts, last {RECENT_MINUTES} min": encode(latest, hist_times, net_meta, spec),
                "counts, earlier in the window": encode(earlier, hist_times, net_meta, spec),
                "time of day and day of week (the sensors' daily profile)": without_time(x, target, net_meta),
            }
            q = self.run(req.network, x, target)
            answer = self.response(req, rows, self.finish(req.network, q)[0])
            answer.explanation = occlusion_explanation(
                q[0, rows, :, 1], {name: self.run(req.network, *occluded)[0, rows, :, 1]
                                   for name, occluded in inputs.items()})
            answers.append(answer)
        return answers


class TrafficDomain(Domain):
    """Traffic counts: P10/P50/P90 at 15/30/60 minutes for every sensor of a network."""

    full_data_flags = "--full-sim"  # the 10-day simulated set, a one-off step

    name = "traffic"
    metric = "val_mae"
    mode = "min"
    request_model = TrafficRequest
    response_model = TrafficResponse
    truth_model = TrafficTruth
    quality_metric, quality_mode = "mae", "min"

    def prepare(self, data_dir: Path, *, source: Path | None = None, smoke: bool = False,
                sim: SimSize | Literal["auto"] = "auto") -> dict[str, Any]:
        """As `Domain.prepare`; `sim` picks the simulated set (`domains.traffic.data.prepare`): "full"
        simulates the full set once (`--full-sim`), "auto" uses it when cached, else the quick one."""
        from domains.traffic.data import prepare  # build-side code (the simulator): serving never imports it

        return prepare(data_dir, source=source, smoke=smoke, sim=sim)

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
        networks = {}
        for name, train in self._tables(data_dir, "train").items():
            spec = NETWORKS[name]
            sensors = sorted(train["sensor"].unique())
            scale = train.groupby("sensor")["count"].mean().reindex(sensors).fillna(0.0).to_numpy() + 1.0
            t = pd.DatetimeIndex(train["timestamp"])
            dow, slot = slot_keys(t, spec.step_minutes)
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
        total, norm = torch.zeros(()), torch.zeros(())
        for name, q in zip(NETWORKS, model(*model_inputs(batch, list(NETWORKS))), strict=True):
            pin = pinball_terms(batch[f"{name}/y"], q).mean(-1)
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
            for k, (name, q) in enumerate(zip(names, model(*model_inputs(batch, names)), strict=True)):
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

    def features(self, item: dict[str, Any], answer: dict[str, Any]) -> dict[str, Feature]:
        """The network, the counts' level and missing share, and the 15-minute forecast's change
        from the last step (relative, +1 so an empty road is no division by zero)."""
        hist = np.array([[np.nan if v is None else v for v in row] for row in item["history"]], dtype=float)
        known = ~np.isnan(hist)
        p50 = float(np.mean([f["horizons"]["15min"]["p50"] for f in answer["forecasts"]]))
        last = hist[:, -1][known[:, -1]]
        return {"network": item["network"], "missing": float(1 - known.mean()),
                "level": float(hist[known].mean()) if known.any() else None,
                "change": (p50 + 1) / (float(last.mean()) + 1) - 1 if len(last) else None}

    def score(self, answers: Sequence[dict[str, Any]], truths: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Each count a truth gives against the answer's forecast of that sensor and horizon."""
        actual, quantiles = [], []
        for answer, truth in zip(answers, truths, strict=True):
            forecasts = {f["sensor"]: f["horizons"] for f in answer["forecasts"]}
            for sensor, counts in truth["counts"].items():
                for horizon, value in counts.items():
                    q = forecasts.get(sensor, {}).get(horizon)
                    if q is not None:
                        actual.append(value)
                        quantiles.append((q["p10"], q["p50"], q["p90"]))
        return forecast_score(np.asarray(actual, dtype=float), np.asarray(quantiles, dtype=float).reshape(-1, 3))

    def cases(self, model_dir: Path, data_dir: Path, split: str = "valid"
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Windows of both networks' days of `split`, as requests for every sensor."""
        meta = json.loads((Path(model_dir) / META_FILE).read_text())
        tables = self._tables(data_dir, split)
        windows = {name: make_windows(tables[name], meta["networks"][name]["sensors"], spec)
                   for name, spec in NETWORKS.items()}
        origins = [(name, i) for name, win in windows.items() for i in range(len(win.counts))]
        items, truths = [], []
        for position in spread(len(origins)):
            name, i = origins[position]
            win, sensors = windows[name], meta["networks"][name]["sensors"]
            items.append({"network": name, "sensors": sensors,
                          "history": [[None if np.isnan(v) else float(v) for v in row] for row in win.counts[i]],
                          "last_timestamp": pd.Timestamp(win.hist_times[i, -1]).isoformat()})
            truths.append({"counts": {s: {h: float(win.actual[i, j, k]) for k, h in enumerate(HORIZONS)
                                          if not np.isnan(win.actual[i, j, k])} for j, s in enumerate(sensors)}})
        return items, truths

    def calibrate(self, model_dir: Path, data_dir: Path) -> dict[str, Any]:
        """Split-conformal widths of the P10-P90 interval per network and horizon on the validation
        split, in units of a sensor's scale (`domains.forecast.interval_offsets`)."""
        predictor = self.load_predictor(model_dir, "")
        valid = self._tables(data_dir, "valid")
        intervals: dict[str, dict[str, list[float]]] = {}
        for name, spec in NETWORKS.items():
            net = predictor.meta["networks"][name]
            win = make_windows(valid[name], net["sensors"], spec)
            scale = np.asarray(net["scale"])[None, :]
            q = predictor.forecast(name, win.counts, win.hist_times, calibrated=False)
            intervals[name] = {h: list(interval_offsets(q[:, :, k] / scale[..., None], win.actual[:, :, k] / scale))
                               for k, h in enumerate(HORIZONS)}
        return save_calibration(model_dir, {"intervals": intervals,
                                            "unit": "a sensor's scale (its mean training count + 1)"})

    def load_predictor(self, model_dir: Path, version: str, device: str = "cpu",
                       backend: str = "auto") -> TrafficPredictor:
        model, _, meta = self.load_model_files(Path(model_dir))
        if not isinstance(model, TrafficNet):
            raise TypeError(f"expected a TrafficNet, got {type(model).__name__}")
        return TrafficPredictor(model, meta, version, device, read_calibration(model_dir).get("intervals"))

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
            raw_q = predictor.forecast(name, win.counts, win.hist_times, calibrated=False)
            notes.append(f"{spec.subset} P10-P90 coverage before calibration on valid: " + ", ".join(
                f"{h} {metrics.coverage(actual[:, :, k], raw_q[:, :, k, 0], raw_q[:, :, k, 2]):.2f}"
                for k, h in enumerate(HORIZONS)))
            plots[name] = (win, q, sensors)
        draw_forecasts(plots, figure)
        return Evaluation(rows=rows, figure=figure, notes=notes)
