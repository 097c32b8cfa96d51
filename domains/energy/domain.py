"""Energy: a day-ahead electricity demand forecaster (the next 48 half-hours, P10/P50/P90).

One registry version serves every series it was trained on (packaged: ``victoria``, with
temperature, and ``england_wales``, without). Each series has a network of its own
(`domains.energy.model`), held side by side in one module so a version is one set of files; the
windows it reads are built in `domains.energy.features`. Validation reports `val_mape` on
day-ahead windows (midnight starts), the mean over series. Baselines: `domains.energy.baselines`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel
from torch import nn

from core.errors import InvalidInput
from domains import metrics
from domains.base import META_FILE, Batch, Domain, Evaluation, MetricRow, Predictor, SearchParam, spread
from domains.calibration import read_calibration, save_calibration
from domains.drift import Feature
from domains.energy.baselines import (
    REGRESSION_STRIDE,
    RegressionBaseline,
    draw_figure,
    forecast_metrics,
    residual_band,
    same_time_last_week,
    with_band,
)
from domains.energy.contract import HISTORY, HORIZON, EnergyRequest, EnergyResponse, EnergyTruth, ForecastStep
from domains.energy.features import (
    OCCLUDED,
    TEMPERATURE_GROUPS,
    RawWindows,
    WindowDataset,
    add_forecast_error,
    model_inputs,
    split_frames,
    windows_for_split,
)
from domains.energy.model import MODEL_INPUTS, EnergyModel, pinball_loss
from domains.forecast import forecast_score, interval_offsets, occlusion_explanation, widened
from domains.tables import load_table, read_manifest

EVAL_HORIZON = "day_ahead"


class EnergyPredictor(Predictor):
    """A loaded energy version: checks requests against the trained series and forecasts them."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], version: str, device: str = "cpu",
                 intervals: dict[str, list[float]] | None = None) -> None:
        super().__init__(version)
        self.model = model.to(device)
        self.meta = meta
        self.device = torch.device(device)
        # per series: (lower, upper) widths of the P10-P90 interval, in units of a window's mean demand
        self.intervals = intervals or {}

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

    def quantiles(self, raw: RawWindows, *, calibrated: bool = True) -> np.ndarray:
        """(N, HORIZON, 3) forecast quantiles in the series' units; `calibrated`: the P10-P90
        interval widened (or narrowed) as fitted on the validation split (`EnergyDomain.calibrate`)."""
        arrays = model_inputs(raw, self.meta)
        out = self.forecast(arrays)
        return self.widen(out, raw.series, arrays["scale"]) if calibrated else out

    def widen(self, quantiles: np.ndarray, series: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """`quantiles` (N, HORIZON, 3) of windows of `series` and `scale` with the P10-P90 interval
        widened (or narrowed) by each series' fitted widths; unchanged for an uncalibrated version."""
        if not self.intervals:
            return quantiles
        widths = np.array([self.intervals.get(n, [0.0, 0.0]) for n in self.meta["series_names"]])[series]
        return widened(quantiles, widths[:, :1] * scale[:, None], widths[:, 1:] * scale[:, None])

    def forecast(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """(N, HORIZON, 3) uncalibrated quantiles in the series' units from the model's inputs."""
        inputs = {k: torch.from_numpy(arrays[k]).to(self.device) for k in MODEL_INPUTS}
        with torch.no_grad():
            rel = self.model(**inputs).float().cpu().numpy()
        out: np.ndarray = arrays["scale"][:, None, None] * (1.0 + rel)
        return out

    def explain(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        """Answers as `predict` does, each with a `ForecastExplanation`: the forecast made again
        with each group of `OCCLUDED` inputs replaced by a neutral value (temperature groups only
        for series that read temperature), all items' variants in one model call per group. The
        answer and the median the groups are measured against come from one forecast."""
        requests = [EnergyRequest.model_validate(item) for item in items]
        if not requests:
            return []
        raw = self.raw_windows(requests)
        arrays = model_inputs(raw, self.meta)
        q = self.forecast(arrays)
        answers = self.responses(requests, self.widen(q, raw.series, arrays["scale"]))
        occluded = {name: self.forecast(occlude(dict(arrays)))[..., 1] for name, occlude in OCCLUDED.items()}
        for i, (answer, item) in enumerate(zip(answers, requests, strict=True)):
            temperature = self.meta["series"][item.series]["has_temperature"]
            groups = {name: m[i] for name, m in occluded.items() if temperature or name not in TEMPERATURE_GROUPS}
            answer.explanation = occlusion_explanation(q[i, :, 1], groups)  # type: ignore[attr-defined]
        return answers

    def predict(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        requests = [EnergyRequest.model_validate(item) for item in items]
        if not requests:
            return []
        return self.responses(requests, self.quantiles(self.raw_windows(requests)))

    def responses(self, requests: Sequence[EnergyRequest], q: np.ndarray) -> list[BaseModel]:
        """One `EnergyResponse` per request from its quantiles (N, HORIZON, 3) in the series' unit."""
        answers: list[BaseModel] = []
        for i, item in enumerate(requests):
            steps = [
                ForecastStep(timestamp=item.start + timedelta(minutes=30 * h), **ForecastStep.fields_of(q[i, h]))
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


class EnergyDomain(Domain):
    """Day-ahead demand, P10/P50/P90, one network per series in one version."""

    name = "energy"
    metric = "val_mape"
    mode: ClassVar[Literal["max", "min"]] = "min"
    request_model = EnergyRequest
    response_model = EnergyResponse
    truth_model = EnergyTruth
    # Series come in any unit: the error relative to demand is what compares across them.
    quality_metric, quality_mode = "mape", "min"

    def prepare(self, data_dir: Path, *, source: Path | None = None, smoke: bool = False) -> dict[str, Any]:
        from domains.energy.data import prepare  # build-side code: serving never imports it

        return prepare(data_dir, source=source, smoke=smoke)

    def default_config(self, profile: Literal["smoke", "quick", "full"]) -> dict[str, Any]:
        common = {"weight_decay": 1e-3, "warmup_frac": 0.05, "grad_clip": 1.0, "seed": 0, "forecast_noise": True,
                  "batch_size": 128, "context": 64, "dropout": 0.2}
        profiles: dict[str, dict[str, Any]] = {
            "smoke": {"epochs": 2, "lr": 1e-3, "patience": 2, "hidden": 32, "train_stride": 8},
            # quick: every other start, 8 epochs: short enough for `make run` on a 2-core laptop.
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

    def features(self, item: dict[str, Any], answer: dict[str, Any]) -> dict[str, Feature]:
        """The series, and unit-free shapes: the last day's swing and the forecast's change from
        it and width, each relative to the last day's mean demand."""
        last = np.asarray(item["demand"][-HORIZON:], dtype=float)
        q = np.array([[s["p10"], s["p50"], s["p90"]] for s in answer["steps"]], dtype=float)
        level = float(last.mean())
        return {"series": item["series"], "swing": float(np.ptp(last)) / level,
                "change": float(q[:, 1].mean()) / level - 1, "width": float((q[:, 2] - q[:, 0]).mean()) / level}

    def score(self, answers: Sequence[dict[str, Any]], truths: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Each known half-hour of a truth against the answer's step at the same position."""
        actual, quantiles = [], []
        for answer, truth in zip(answers, truths, strict=True):
            for step, value in zip(answer["steps"], truth["demand"], strict=False):
                actual.append(np.nan if value is None else value)
                quantiles.append((step["p10"], step["p50"], step["p90"]))
        return forecast_score(np.asarray(actual, dtype=float), np.asarray(quantiles, dtype=float).reshape(-1, 3))

    def cases(self, model_dir: Path, data_dir: Path, split: str = "valid"
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        meta = json.loads((Path(model_dir) / META_FILE).read_text())
        windows = windows_for_split(split_frames(data_dir), split, meta)
        names = meta["series_names"]
        requests = requests_from_windows(windows, names, {n: meta["series"][n]["has_temperature"] for n in names})
        rows = spread(len(requests))
        return ([requests[i].model_dump(mode="json", exclude_none=True) for i in rows],
                [{"demand": [None if math.isnan(v) else float(v) for v in windows.target[i]]} for i in rows])

    def calibrate(self, model_dir: Path, data_dir: Path) -> dict[str, Any]:
        """Split-conformal widths of each series' P10-P90 interval on the validation split, in units
        of a window's mean demand (`domains.forecast.interval_offsets`)."""
        predictor = self.load_predictor(model_dir, "")
        splits = split_frames(data_dir)
        intervals = {}
        for name in predictor.meta["series_names"]:
            valid = windows_for_split(splits, "valid", predictor.meta, series=name)
            scale = valid.demand.mean(axis=1)[:, None, None]
            quantiles = predictor.quantiles(valid, calibrated=False)
            intervals[name] = list(interval_offsets(quantiles / scale, valid.target / scale[..., 0]))
        return save_calibration(model_dir, {"intervals": intervals, "unit": "a window's mean demand"})

    def load_predictor(self, model_dir: Path, version: str, device: str = "cpu",
                       backend: str = "auto") -> EnergyPredictor:
        model, _, meta = self.load_model_files(model_dir)
        return EnergyPredictor(model, meta, version, device, read_calibration(model_dir).get("intervals"))

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
                raw_q = predictor.quantiles(test, calibrated=False)
                notes.append(f"{subset}: {len(test.series)} test days; MAPE {scores['model']['mape']:.2%} = "
                             f"{ratio:.2f}x same_time_last_week; P10-P90 coverage "
                             f"{scores['model']['coverage_p10_p90']:.2f} (before calibration on valid "
                             f"{metrics.coverage(test.target, raw_q[..., 0], raw_q[..., 2]):.2f})")
                if not oracle:
                    shown[name] = (test, model_q, same_time_last_week(test))
        draw_figure(shown, {n: meta["series"][n]["unit"] for n in names}, figure)
        return Evaluation(rows=rows, figure=figure, notes=notes)
