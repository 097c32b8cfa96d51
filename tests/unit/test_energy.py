"""Energy domain: data preparation, features, baselines, request checks and a smoke train+predict.
(What every domain promises is in `test_domain_contract.py`.)"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from core.errors import DataError, InvalidInput
from domains import get_domain
from domains.energy import (
    CALENDAR_DIM,
    HISTORY,
    HORIZON,
    EnergyPredictor,
    EnergyRequest,
    EnergyResponse,
    ForecastStep,
    RawWindows,
    WindowDataset,
    calendar_features,
    model_inputs,
    pinball_loss,
    residual_band,
    same_time_last_week,
    split_frames,
    windows_for_split,
    with_band,
)
from domains.energy.data import packaged_frame
from domains.forecast import QuantileForecast
from domains.metrics import pinball
from domains.tables import load_table, read_manifest
from tests.unit.conftest import SmokeRun

DOMAIN = "energy"  # the `run` and `data_dir` fixtures' domain

META = {
    "series_names": ["england_wales", "victoria"],
    "series": {
        "england_wales": {"unit": "MW", "has_temperature": False, "temp_mean": 0.0, "temp_std": 1.0},
        "victoria": {"unit": "GW", "has_temperature": True, "temp_mean": 16.0, "temp_std": 5.0},
    },
}


@pytest.fixture(scope="module")
def predictor(run: SmokeRun) -> EnergyPredictor:
    loaded = run.predictor
    assert isinstance(loaded, EnergyPredictor)
    return loaded


def _user_csv(path: Path, days: int = 21, **columns: Any) -> Path:
    stamps = pd.date_range("2023-03-06", periods=days * 48, freq="30min")
    frame = pd.DataFrame({"timestamp": stamps, "demand": 100 + 10 * np.sin(np.arange(len(stamps)) / 7.6)})
    for name, values in columns.items():
        frame[name] = values
    frame.to_csv(path, index=False)
    return path


def _request(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "series": "victoria", "start": "2014-01-20T00:00:00", "demand": [4.0] * HISTORY,
        "temperature": [20.0] * HISTORY, "temperature_forecast": [22.0] * HORIZON,
    }
    return {**base, **changes}


# ---- preparation ---------------------------------------------------------------------------------
def test_packaged_series_and_forecast_column(data_dir: Path) -> None:
    manifest = read_manifest(data_dir, "energy")
    assert manifest["series"]["victoria"]["has_temperature"] is True
    assert manifest["series"]["england_wales"]["has_temperature"] is False
    assert manifest["series"]["victoria"]["time_range"][0] == "2014-01-01 00:00:00"
    assert manifest["series"]["england_wales"]["time_range"][0] == "2000-06-05 00:00:00"
    frames = pd.concat([load_table(data_dir, "energy", s) for s in ("train", "valid", "test")])
    vic = frames[frames["series"] == "victoria"]
    error = (vic["temperature_forecast"] - vic["temperature"]).to_numpy()
    assert 1.2 < error.std() < 2.8  # σ = 2 °C, with few independent draws in 21 days at ρ = 0.9
    assert np.corrcoef(error[:-1], error[1:])[0, 1] > 0.8  # errors persist from one half-hour to the next
    assert frames.loc[frames["series"] == "england_wales", "temperature_forecast"].isna().all()
    # Seeded: preparing again gives the same forecast and the same checksum.
    again = packaged_frame(smoke=True)
    np.testing.assert_allclose(
        again.loc[again["series"] == "victoria", "temperature_forecast"].to_numpy(),
        vic.sort_values("timestamp")["temperature_forecast"].to_numpy(),
    )


def test_splits_are_time_ordered_whole_days(data_dir: Path) -> None:
    splits = split_frames(data_dir)
    for name in ("victoria", "england_wales"):
        train, valid, test = (splits[s][splits[s]["series"] == name] for s in ("train", "valid", "test"))
        assert train["timestamp"].max() < valid["timestamp"].min()
        assert valid["timestamp"].max() < test["timestamp"].min()
        # 21 smoke days: a sixth (rounded) = 4 days each for valid and test.
        assert len(valid) == len(test) == 4 * 48
        assert test["timestamp"].min().time() == datetime.min.time()


def test_windows_never_see_their_targets(data_dir: Path) -> None:
    splits = split_frames(data_dir)
    meta = get_domain("energy").fit_meta(data_dir, {})
    for split in ("train", "valid", "test"):
        raw = windows_for_split(splits, split, meta, stride=None if split != "train" else 5)
        for k, name in enumerate(meta["series_names"]):
            part = splits[split][splits[split]["series"] == name]
            starts = raw.start[raw.series == k]
            assert len(starts) > 0
            # Every target lies inside the split; the forecast starts after the last input.
            assert starts.min() >= part["timestamp"].min().to_datetime64()
            last_target = starts.max() + np.timedelta64(30 * (HORIZON - 1), "m")
            assert last_target <= part["timestamp"].max().to_datetime64()
        # The window's last history value is the demand half an hour before its start.
        frame = pd.concat([splits[s] for s in ("train", "valid", "test")])
        frame = frame[frame["series"] == meta["series_names"][int(raw.series[0])]].set_index("timestamp")
        before = pd.Timestamp(raw.start[0]) - timedelta(minutes=30)
        assert raw.demand[0, -1] == frame.loc[before, "demand"]
        assert raw.target[0, 0] == frame.loc[pd.Timestamp(raw.start[0]), "demand"]


def test_scored_windows_start_at_midnight(data_dir: Path) -> None:
    splits = split_frames(data_dir)
    raw = windows_for_split(splits, "test", get_domain("energy").fit_meta(data_dir, {}))
    assert len(raw.start) == 2 * 4  # 4 test days per series
    assert all(pd.Timestamp(s).time() == datetime.min.time() for s in raw.start)


def test_training_statistics_come_from_train_only(data_dir: Path) -> None:
    meta = get_domain("energy").fit_meta(data_dir, {})
    train = load_table(data_dir, "energy", "train")
    temps = train.loc[train["series"] == "victoria", "temperature"]
    assert meta["series"]["victoria"]["temp_mean"] == pytest.approx(temps.mean())
    assert meta["series"]["england_wales"]["has_temperature"] is False


# ---- bad user files ------------------------------------------------------------------------------
def test_user_file_without_temperature_is_prepared(tmp_path: Path) -> None:
    path = _user_csv(tmp_path / "mine.csv")
    manifest = get_domain("energy").prepare(tmp_path / "data", source=path)
    assert manifest["sources"] == [str(path)]
    assert manifest["series"]["custom"]["has_temperature"] is False
    train = load_table(tmp_path / "data", "energy", "train")
    # 2023-03-06 is a Monday: work days default to Monday-Friday.
    assert train["workday"].iloc[:48 * 5].all() and not train["workday"].iloc[48 * 5 : 48 * 7].any()


@pytest.mark.parametrize(
    ("mutate", "column", "row", "words"),
    [
        (lambda f: f.drop(columns="demand"), "demand", None, "missing column"),
        (lambda f: f.assign(demand=f["demand"].astype(object).where(f.index != 7, "lots")), "demand", 7,
         "not float"),
        (lambda f: f.assign(demand=f["demand"].where(f.index != 9)), "demand", 9, "missing"),
        (lambda f: f.assign(temperature=np.where(f.index == 11, np.nan, 20.0)), "temperature", 11, "missing"),
        (lambda f: f.assign(timestamp=f["timestamp"].where(f.index != 5, f["timestamp"].iloc[3])), "timestamp", 5,
         "strictly increase"),
        (lambda f: f.drop(index=20).reset_index(drop=True), "timestamp", 20, "without gaps"),
        (lambda f: f.assign(demand=np.where(f.index == 13, -1.0, f["demand"])), "demand", 13, "> 0"),
        (lambda f: f.iloc[: 48 * 10], "series", 48 * 10 - 1, "at least"),
        (lambda f: f.iloc[:0], None, None, "no rows"),
    ],
)
def test_bad_user_file_is_refused_and_nothing_is_written(
    tmp_path: Path, mutate: Any, column: str | None, row: int | None, words: str
) -> None:
    good = pd.read_csv(_user_csv(tmp_path / "good.csv"), parse_dates=["timestamp"])
    path = tmp_path / "bad.csv"
    mutate(good).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        get_domain("energy").prepare(tmp_path / "data", source=path)
    assert str(path) in err.value.message and words in err.value.message
    assert err.value.column == column and err.value.row == row
    assert not (tmp_path / "data" / "energy").exists()


# ---- features and baselines ----------------------------------------------------------------------
def test_calendar_features_by_hand() -> None:
    # 2014-01-01 was a Wednesday (weekday 2) and a public holiday.
    feats = calendar_features(np.array([np.datetime64("2014-01-01T00:00")]), np.zeros((1, HORIZON), bool))
    assert feats.shape == (1, HORIZON, CALENDAR_DIM)
    np.testing.assert_allclose(feats[0, 0, :2], [0.0, 1.0], atol=1e-6)  # midnight
    np.testing.assert_allclose(feats[0, 12, :2], [1.0, 0.0], atol=1e-6)  # 06:00 is a quarter turn
    assert feats[0, 0, 2 + 2] == 1 and feats[0, 0, 2:9].sum() == 1
    assert feats[0, :, 9].sum() == 0


def _raw(demand: np.ndarray, series: int = 1) -> RawWindows:
    n = len(demand)
    return RawWindows(
        series=np.full(n, series), demand=demand, temperature=np.full((n, HISTORY), 21.0),
        temperature_future=np.full((n, HORIZON), 26.0), start=np.array(["2014-01-06T00:00"] * n, "datetime64[m]"),
        workday=np.ones((n, HORIZON), bool), target=np.full((n, HORIZON), 5.0),
    )


def test_model_inputs_scale_lags_and_temperature_by_hand() -> None:
    demand = np.arange(1, HISTORY + 1, dtype=float)[None]  # 1..336, mean 168.5
    x = model_inputs(_raw(demand), META)
    assert x["scale"][0] == pytest.approx(168.5)
    # Step 0: yesterday's same time is value 289 (index 288), last week's is value 1 (index 0).
    assert x["lags"][0, 0].tolist() == pytest.approx([289 / 168.5 - 1, 1 / 168.5 - 1])
    assert x["target"][0, 0] == pytest.approx(5 / 168.5 - 1)
    assert x["temp_history"][0, 0] == pytest.approx((21 - 16) / 5)
    assert x["temp_forecast"][0, 0] == pytest.approx((26 - 16) / 5)
    # A series without temperature gets zeros, whatever was passed.
    assert not model_inputs(_raw(demand, series=0), META)["temp_forecast"].any()


def test_same_time_last_week_and_its_band_by_hand() -> None:
    demand = np.arange(1, HISTORY + 1, dtype=float)[None]
    point = same_time_last_week(_raw(demand))
    assert point.shape == (1, HORIZON) and point[0, 0] == 1 and point[0, -1] == 48
    actual = np.array([[1.1, 0.9, 1.0, 1.2, 0.8]])
    lo, hi = residual_band(actual, np.ones_like(actual))
    assert (lo, hi) == pytest.approx((-0.16, 0.16))  # np.quantile's linear interpolation of ±0.2, ±0.1
    q = with_band(np.array([[10.0]]), (lo, hi))
    assert q[0, 0].tolist() == pytest.approx([8.4, 10.0, 11.6])


def test_pinball_loss_matches_the_shared_metric() -> None:
    target = torch.tensor([[1.0, 2.0]])
    quantiles = torch.tensor([[[0.5, 1.5, 2.0], [1.0, 2.5, 3.0]]])
    assert float(pinball_loss(target, quantiles)) == pytest.approx(pinball(target.numpy(), quantiles.numpy()))


def test_training_adds_fresh_forecast_error_to_temperature_only(data_dir: Path) -> None:
    domain = get_domain("energy")
    config = domain.default_config("smoke")
    meta = domain.fit_meta(data_dir, config)
    train, valid = domain.datasets(data_dir, config, meta)
    assert isinstance(train, WindowDataset) and isinstance(valid, WindowDataset)
    series = train.tensors["series"].numpy()
    vic = [train[int(i)] for i in np.flatnonzero(series == 1)[:64]]
    ew = [train[int(i)] for i in np.flatnonzero(series == 0)[:8]]
    first, second = domain.collate(vic)["temp_forecast"], domain.collate(vic)["temp_forecast"]
    error = (first - second).numpy() * meta["series"]["victoria"]["temp_std"] / math.sqrt(2)  # °C, one draw
    assert 1.5 < error.std() < 2.5  # a new σ = 2 °C draw each batch
    assert not domain.collate(ew)["temp_forecast"].any()  # no temperature, no error
    fixed = [valid[i] for i in range(len(valid))]
    assert torch.equal(domain.collate(fixed)["temp_forecast"], domain.collate(fixed)["temp_forecast"])


def test_model_shapes_and_quantile_order(data_dir: Path) -> None:
    domain = get_domain("energy")
    config = domain.default_config("smoke")
    meta = domain.fit_meta(data_dir, config)
    model = domain.build_model(config, meta)
    train, _ = domain.datasets(data_dir, config, meta)
    assert isinstance(train, WindowDataset)
    batch = domain.collate([train[i] for i in range(0, len(train), max(1, len(train) // 16))])
    out = model(**{k: batch[k] for k in ("series", "history", "temp_history", "temp_forecast", "calendar", "lags")})
    assert out.shape == (len(batch["series"]), HORIZON, 3)
    assert (out[..., 0] <= out[..., 1]).all() and (out[..., 1] <= out[..., 2]).all()
    domain.loss(model, batch).backward()
    # Both series' networks take part in every step (DDP needs every parameter used).
    assert all(p.grad is not None for p in model.parameters())


# ---- request contract ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"series": "tasmania"}, "series"),
        ({"temperature": None}, "temperature"),
        ({"series": "england_wales"}, "temperature"),  # this series has no temperature input
    ],
)
def test_request_errors_name_the_field(predictor: EnergyPredictor, changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        predictor.predict([EnergyRequest(**_request(**changes))])
    assert err.value.field == field


@pytest.mark.parametrize(
    ("changes", "quoted"),
    [
        ({"start": "2014-01-20T00:10:00"}, "2014-01-20T00:10:00"),
        ({"demand": [4.0] * 335 + [-1.0]}, "-1.0"),
        ({"temperature_forecast": [20.0] * 47 + [float("nan")]}, "nan"),
        ({"horizon": 96}, "horizon"),
        # Lengths and ranges need no trained model: refused before one is called.
        ({"demand": [4.0] * (HISTORY - 1)}, "demand"),
        ({"temperature_forecast": [20.0] * 24}, "temperature_forecast"),
        ({"workday": [True] * 47}, "workday"),
        ({"demand": [4.0] * 335 + [1e300]}, "1e+300"),  # past MAX_DEMAND: float32 overflows to inf
    ],
)
def test_malformed_requests_fail_validation(changes: dict[str, Any], quoted: str) -> None:
    with pytest.raises(ValidationError) as err:
        EnergyRequest(**_request(**changes))
    assert quoted in str(err.value)


def test_a_step_is_a_timestamped_quantile_forecast() -> None:
    assert issubclass(ForecastStep, QuantileForecast)
    assert set(ForecastStep.model_fields) == {"timestamp", "p10", "p50", "p90"}
    with pytest.raises(ValidationError, match="p90"):
        ForecastStep.model_validate({"timestamp": "2014-12-01T00:00:00", "p10": 1.0, "p50": 2.0})


def test_openapi_examples_are_servable(predictor: EnergyPredictor) -> None:
    examples = EnergyRequest.model_json_schema()["examples"]
    assert {e["series"] for e in examples} == {"victoria", "england_wales"}
    answers = predictor.predict([EnergyRequest(**e) for e in examples])
    for example, answer in zip(examples, answers, strict=True):
        assert isinstance(answer, EnergyResponse) and answer.version == predictor.version == "smoke-v1"
        assert len(answer.steps) == HORIZON
        start = datetime.fromisoformat(example["start"])
        assert [s.timestamp for s in answer.steps] == [start + timedelta(minutes=30 * h) for h in range(HORIZON)]
        assert all(s.p10 <= s.p50 <= s.p90 for s in answer.steps)
        # Forecasts are in the series' units: near the level of the history, not of the other series.
        assert 0.5 < answer.steps[0].p50 / np.mean(example["demand"]) < 2.0
    assert answers[0].unit == "GW" and answers[1].unit == "MW"  # type: ignore[attr-defined]


def test_workday_override_changes_the_forecast(predictor: EnergyPredictor) -> None:
    usual = predictor.predict([EnergyRequest(**_request())])[0]
    holiday = predictor.predict([EnergyRequest(**_request(workday=[False] * HORIZON))])[0]
    assert usual != holiday


def test_an_explanation_weighs_each_group_of_inputs_by_what_taking_it_away_changes(
        predictor: EnergyPredictor) -> None:
    """A flat input has nothing to take away (weight 0); a shaped one moves the forecast. Series
    without temperature are not told about temperature."""
    shaped = [4.0 + math.sin(2 * math.pi * i / 48) for i in range(HISTORY)]
    flat_yesterday = shaped[:-48] + [4.0] * 48
    items = [EnergyRequest(**_request(demand=shaped)), EnergyRequest(**_request(demand=flat_yesterday)),
             EnergyRequest(**_request(series="england_wales", demand=shaped, temperature=None,
                                      temperature_forecast=None))]
    explained = predictor.explain(items)
    assert [a.steps for a in explained] == [a.steps for a in predictor.predict(items)]  # type: ignore[attr-defined]
    weights = [{w.input: w.weight for w in a.explanation.inputs} for a in explained]  # type: ignore[attr-defined]
    assert len(weights[0]) == 7 and explained[0].explanation.forward_passes == 8  # type: ignore[attr-defined]
    assert list(weights[0].values()) == sorted(weights[0].values(), reverse=True)
    assert weights[0]["demand, last 24 hours"] > 0 and weights[1]["demand, last 24 hours"] == pytest.approx(0, abs=1e-4)
    # the request's temperatures are constant: taking them away changes nothing
    assert weights[0]["temperature, past week"] == pytest.approx(0, abs=1e-4)
    assert weights[0]["time of day"] > 0
    assert not any("temperature" in name for name in weights[2]) and len(weights[2]) == 5


# ---- smoke train and evaluation ------------------------------------------------------------------
def test_smoke_training_saves_its_config_and_series(run: SmokeRun) -> None:
    assert run.history and all("val_mape" in h for h in run.history)
    config = json.loads((run.model_dir / "config.json").read_text())
    meta = json.loads((run.model_dir / "meta.json").read_text())
    assert config["hidden"] == get_domain("energy").default_config("smoke")["hidden"]
    assert meta["series_names"] == ["england_wales", "victoria"]
    assert (run.model_dir / "model.pt").is_file()


def test_evaluation_rows_cover_each_series_and_the_oracle_temperature(run: SmokeRun) -> None:
    evaluation = run.evaluation
    subsets = {r.subset for r in evaluation.rows}
    assert subsets == {"victoria_2014", "victoria_2014_oracle_temp", "england_wales_2000"}
    for subset in subsets:
        rows = [r for r in evaluation.rows if r.subset == subset]
        assert sorted(r.name for r in rows) == ["coverage_p10_p90", "mae", "mape", "pinball"]
        assert all(r.horizon == "day_ahead" for r in rows)
        assert all(set(r.baselines) == {"same_time_last_week", "regression"} for r in rows)
        assert all(math.isfinite(r.model) for r in rows)
    # The oracle subset sees better temperatures but the same naive baseline.
    by = {(r.subset, r.name): r for r in evaluation.rows}
    assert (by["victoria_2014", "mape"].baselines["same_time_last_week"]
            == by["victoria_2014_oracle_temp", "mape"].baselines["same_time_last_week"])
