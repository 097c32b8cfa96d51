"""Traffic domain: data preparation, features, baselines, request checks and a smoke train+predict.
(What every domain promises is in `test_domain_contract.py`.)"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from core.errors import DataError, InvalidInput
from domains import get_domain
from domains.forecast import QUANTILE_NAMES, QuantileForecast
from domains.tables import load_table, read_manifest
from domains.traffic import (
    HORIZONS,
    N_FEATURES,
    NETWORKS,
    W_MAX,
    TrafficDomain,
    TrafficPredictor,
    TrafficRequest,
    TrafficResponse,
    Windows,
    encode,
    group_batch,
    historical_average,
    last_value,
    make_windows,
    poisson_floor_mae,
    seasonal_naive,
    to_matrix,
)
from domains.traffic import data as traffic_data
from domains.traffic.data import load_real_counts
from domains.traffic.simulation import sim_sensor_ids
from tests.unit.conftest import SmokeRun

DOMAIN = "traffic"  # the `run` and `data_dir` fixtures' domain


def _long(counts: np.ndarray, start: str, step_minutes: int, sensors: list[str], episode: int = 0) -> pd.DataFrame:
    """A long frame (sensor-major) from counts of shape (sensors, T)."""
    times = pd.date_range(start, periods=counts.shape[1], freq=f"{step_minutes}min")
    return pd.DataFrame({
        "network": "x", "episode": episode, "sensor": np.repeat(sensors, counts.shape[1]),
        "timestamp": np.tile(times, len(sensors)), "count": counts.ravel().astype(float),
    })


# ---- preparation ---------------------------------------------------------------------------------
def test_splits_are_time_ordered_per_network(data_dir: Path) -> None:
    manifest = read_manifest(data_dir, "traffic")
    for name in NETWORKS:
        train, valid, test = (load_table(data_dir, "traffic", f"{name}_{s}") for s in ("train", "valid", "test"))
        assert train["timestamp"].max() < valid["timestamp"].min()
        assert valid["timestamp"].max() < test["timestamp"].min()
    assert manifest["networks"]["grid"]["subset"] == "simulated_network"
    assert manifest["simulation"]["size"] == "smoke"


def test_the_simulated_demand_follows_the_real_training_days_only(data_dir: Path) -> None:
    train_days = sorted({str(t.date()) for t in load_table(data_dir, "traffic", "intersection_train")["timestamp"]})
    test_days = {str(t.date()) for t in load_table(data_dir, "traffic", "intersection_test")["timestamp"]}
    profile_days = read_manifest(data_dir, "traffic")["simulation"]["demand_profile_days"]
    assert profile_days == train_days and not test_days & set(profile_days)


def test_simulated_network_has_224_links_at_5_minute_steps(data_dir: Path) -> None:
    grid = load_table(data_dir, "traffic", "grid_train")
    assert sorted(grid["sensor"].unique()) == sorted(sim_sensor_ids())
    assert len(sim_sensor_ids()) == 224
    one = grid[(grid["episode"] == grid["episode"].min()) & (grid["sensor"] == sim_sensor_ids()[0])]
    assert set(one["timestamp"].diff().dropna()) == {pd.Timedelta(minutes=5)}
    assert len(one) == 21  # 2-hour episode minus the 15-minute warm-up
    assert grid["count"].isna().any()  # dropouts are simulated


def test_real_counts_are_a_complete_15_minute_grid() -> None:
    real, source = load_real_counts()
    assert real["sensor"].nunique() == 22
    per_sensor = real.groupby("sensor")["timestamp"].agg(["min", "max", "count"])
    assert (per_sensor["count"] == per_sensor["count"].iloc[0]).all()
    assert "traffic-anomaly" in source


# ---- bad data ------------------------------------------------------------------------------------
def _write(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "counts.csv"
    frame.to_csv(path, index=False)
    return path


GOOD = pd.DataFrame({
    "timestamp": pd.date_range("2024-01-01", periods=4, freq="15min").astype(str).tolist() * 2,
    "sensor": ["a"] * 4 + ["b"] * 4,
    "count": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
})


@pytest.mark.parametrize(("mutate", "column", "row", "words"), [
    (lambda f: f.drop(columns=["count"]), "count", None, "missing column"),
    (lambda f: f.assign(count=["x"] + [1.0] * 7), "count", 0, "is not float"),
    (lambda f: f.assign(timestamp=[*f["timestamp"][:2], "not a time", *f["timestamp"][3:]]), "timestamp", 2,
     "is not datetime"),
    (lambda f: f.assign(sensor=[*f["sensor"][:5], None, *f["sensor"][6:]]), "sensor", 5, "missing"),
    (lambda f: f.assign(timestamp=[*f["timestamp"][:3], f["timestamp"][1], *f["timestamp"][4:]]), "timestamp", 3,
     "strictly increase"),
    (lambda f: f.assign(timestamp=[*f["timestamp"][:6], "2024-01-01 00:37:00", *f["timestamp"][7:]]),
     "timestamp", 6, "15-minute grid"),
    (lambda f: f.assign(count=[1.0, 2.0, -3.0, *f["count"][3:]]), "count", 2, "negative"),
])
def test_bad_files_are_refused_naming_column_and_row(tmp_path: Path, mutate: Any, column: str, row: int | None,
                                                     words: str) -> None:
    path = _write(tmp_path, mutate(GOOD.copy()))
    with pytest.raises(DataError) as err:
        load_real_counts(path)
    assert err.value.column == column
    assert err.value.row == row
    assert str(path) in err.value.message and words in err.value.message


def test_an_empty_file_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("timestamp,sensor,count\n")
    with pytest.raises(DataError, match="no rows"):
        get_domain("traffic").prepare(tmp_path / "data", source=path, smoke=True)
    assert not (tmp_path / "data" / "traffic").exists()


def test_prepare_passes_the_simulated_set_size_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def record(data_dir: Path, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {}

    monkeypatch.setattr(traffic_data, "prepare", record)
    TrafficDomain().prepare(tmp_path, sim="full")  # `cityserve data prepare traffic --full-sim`
    TrafficDomain().prepare(tmp_path, smoke=True)
    assert calls == [{"source": None, "smoke": False, "sim": "full"}, {"source": None, "smoke": True, "sim": "auto"}]


def test_empty_counts_are_dropouts_and_missing_steps_are_filled(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD.assign(count=[1.0, None, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]))
    real, _ = load_real_counts(path)
    assert len(real) == 2 * 96  # whole days for every sensor
    a = real[real["sensor"] == "a"].set_index("timestamp")["count"]
    assert a.iloc[0] == 1.0 and np.isnan(a.iloc[1]) and a.iloc[3] == 4.0 and a.iloc[4:].isna().all()


# ---- features and windows ------------------------------------------------------------------------
def _meta_for(sensors: list[str], step_minutes: int, scale: float = 2.0, level: float = 10.0) -> dict[str, Any]:
    slots = 1440 // step_minutes
    return {"sensors": sensors, "scale": [scale] * len(sensors),
            "profile": np.full((2, len(sensors), slots), level).tolist()}


def test_encode_normalises_flags_dropouts_and_left_pads() -> None:
    spec = NETWORKS["grid"]
    counts = np.array([[[2.0, 4.0, np.nan, 6.0, 8.0, 10.0]]])
    times = pd.date_range("2024-01-01 08:00", periods=6, freq="5min").to_numpy()[None, :]
    x, target = encode(counts, times, _meta_for(["s"], 5), spec)
    assert x.shape == (1, 1, W_MAX * N_FEATURES) and target.shape == (1, 1, 3)
    steps = x.reshape(W_MAX, N_FEATURES)
    assert np.all(steps[: W_MAX - 6] == 0)  # left padding
    np.testing.assert_allclose(steps[-6:, 0], [1, 2, 0, 3, 4, 5])  # count / scale, 0 where missing
    np.testing.assert_allclose(steps[-6:, 1], [1, 1, 0, 1, 1, 1])  # observed flag
    np.testing.assert_allclose(steps[-6:, 2], 5.0)  # profile / scale
    np.testing.assert_allclose(target, 5.0)
    np.testing.assert_allclose(steps[-1, 3:5], [math.sin(2 * math.pi * 505 / 1440), math.cos(2 * math.pi * 505 / 1440)],
                               atol=1e-6)


def test_windows_take_targets_strictly_after_the_history() -> None:
    spec = NETWORKS["intersection"]
    counts = np.arange(40, dtype=float)[None, :].repeat(2, axis=0)
    counts[1] += 100
    win = make_windows(_long(counts, "2024-01-01", 15, ["a", "b"]), ["a", "b"], spec)
    assert len(win.counts) == 40 - spec.window - 4 + 1
    np.testing.assert_array_equal(win.counts[0, 0], np.arange(16))
    np.testing.assert_array_equal(win.actual[0, 0], [16, 17, 19])  # 1, 2 and 4 steps ahead
    np.testing.assert_array_equal(win.actual[0, 1], [116, 117, 119])
    assert (win.target_times[:, 0] > win.hist_times[:, -1]).all()


def test_windows_never_span_two_episodes() -> None:
    spec = NETWORKS["grid"]
    counts = np.ones((1, 21))
    frame = pd.concat([_long(counts, "2024-01-01 00:15", 5, ["a"], episode=0),
                       _long(counts * 2, "2024-01-01 02:15", 5, ["a"], episode=1)])
    win = make_windows(frame, ["a"], spec)
    assert len(win.counts) == 2 * (21 - spec.window - 12 + 1)
    assert set(np.unique(win.counts[:, 0, 0])) == {1.0, 2.0}
    assert all(len(set(row)) == 1 for row in np.concatenate([win.counts[:, 0], win.actual[:, 0]], axis=1))


def test_group_batch_keeps_networks_apart_and_counts_every_window() -> None:
    item = {"x": torch.zeros(22, W_MAX * N_FEATURES), "target_profile": torch.zeros(22, 3), "y": torch.zeros(22, 3),
            "y_mask": torch.ones(22, 3, dtype=torch.bool), "weight": torch.ones(22), "network": torch.tensor(0)}
    batch = group_batch([item, item], list(NETWORKS))
    assert len(batch["windows"]) == 2
    assert batch["intersection/x"].shape == (2, 22, W_MAX * N_FEATURES)
    assert batch["grid/x"].shape[0] == 0


# ---- baselines -----------------------------------------------------------------------------------
def test_historical_average_pools_working_days_per_slot() -> None:
    spec = NETWORKS["intersection"]
    # A Monday and a Wednesday of train data (2 and 4 at 00:00) and a Saturday (10 at 00:00).
    train = pd.concat([_long(np.array([[2.0, 7.0]]), "2024-01-01", 15, ["a"]),
                       _long(np.array([[4.0, 9.0]]), "2024-01-03", 15, ["a"]),
                       _long(np.array([[10.0, 20.0]]), "2024-01-06", 15, ["a"])])
    # Any working day gets the working days' mean at that slot, whichever weekday it is.
    for day in ("2024-01-15", "2024-01-16"):  # a Monday, a Tuesday (no Tuesday in train)
        times = np.array([[np.datetime64(f"{day}T00:00"), np.datetime64(f"{day}T00:15")]])
        np.testing.assert_allclose(historical_average(train, ["a"], spec, times)[..., 0], [[3.0, 8.0]])
    sunday = np.array([[np.datetime64("2024-01-14T00:15")]])
    np.testing.assert_allclose(historical_average(train, ["a"], spec, sunday)[..., 0], [[20.0]])
    # A slot no training day has falls back to the sensor's mean.
    noon = np.array([[np.datetime64("2024-01-15T12:00")]])
    np.testing.assert_allclose(historical_average(train, ["a"], spec, noon)[..., 0], [[52 / 6]])


def test_last_value_skips_trailing_dropouts_and_seasonal_naive_looks_back_one_lag() -> None:
    spec = NETWORKS["intersection"]
    counts = np.arange(30, dtype=float)[None, :]
    frame = _long(counts, "2024-01-01", 15, ["a"])
    win = make_windows(frame, ["a"], spec)
    win.counts[0, 0, -2:] = np.nan
    fallback = np.full(win.actual.shape, -1.0)
    assert list(last_value(win, fallback)[0, 0]) == [13.0, 13.0, 13.0]
    lagged = seasonal_naive(frame, ["a"], win, pd.Timedelta(hours=1), fallback)
    np.testing.assert_array_equal(lagged[0, 0], [12.0, 13.0, 15.0])  # targets 16, 17, 19 minus 4 steps
    early = seasonal_naive(frame, ["a"], win, pd.Timedelta(days=7), fallback)
    assert (early == -1.0).all()  # nothing a week earlier: the fallback


def test_poisson_floor_matches_the_closed_form() -> None:
    # X ~ Poisson(1): median 1, E|X - 1| = 2 P(X = 0) = 2/e.
    spec = NETWORKS["intersection"]
    frame = _long(np.ones((1, 30)), "2024-01-01", 15, ["a"])
    win = make_windows(frame, ["a"], spec)
    floor = poisson_floor_mae(win.actual, to_matrix(frame, ["a"]), win, ["a"])
    assert floor == pytest.approx(2 / math.e, rel=1e-6)


# ---- request contract ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def predictor(run: SmokeRun) -> TrafficPredictor:
    loaded = run.predictor
    assert isinstance(loaded, TrafficPredictor)
    return loaded


def _request(**overrides: Any) -> dict[str, Any]:
    body = {"network": "intersection", "sensors": ["d1", "d2"], "history": [[5.0] * 16, [3.0] * 15 + [None]],
            "last_timestamp": "2024-05-13T08:00:00"}
    return {**body, **overrides}


@pytest.mark.parametrize(("overrides", "field"), [
    ({"sensors": ["d1", "nope"]}, "sensors[1]"),
])
def test_unservable_requests_name_the_field(predictor: TrafficPredictor, overrides: dict[str, Any],
                                            field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        predictor.predict([TrafficRequest(**_request(**overrides))])
    assert err.value.field == field


@pytest.mark.parametrize(("overrides", "quoted"), [
    ({"sensors": ["d1", "d1"]}, "'d1'"),
    ({"history": [[5.0] * 15 + [-2.0], [3.0] * 16]}, "-2.0"),
    ({"history": [[5.0] * 15 + [2e6], [3.0] * 16]}, "2000000.0"),  # past MAX_COUNT: float32 overflows
    ({"extra": 1}, "extra"),
    # What needs no trained model is refused before one is called, lengths included.
    ({"network": "metr-la"}, "metr-la"),
    ({"history": [[5.0] * 16, [3.0] * 12]}, r"history\[1\] has 12 steps"),
    ({"history": [[5.0] * 16]}, "1 series for 2 sensors"),
])
def test_malformed_requests_are_rejected_quoting_the_value(overrides: dict[str, Any], quoted: str) -> None:
    with pytest.raises(ValidationError, match=quoted):
        TrafficRequest(**_request(**overrides))


# ---- training, serving, evaluation ---------------------------------------------------------------
def test_smoke_training_serves_ordered_non_negative_quantiles(predictor: TrafficPredictor) -> None:
    [response] = predictor.predict([TrafficRequest(**_request())])
    assert isinstance(response, TrafficResponse)
    assert [f.sensor for f in response.forecasts] == ["d1", "d2"]
    for forecast in response.forecasts:
        assert set(forecast.horizons) == set(HORIZONS)
        for q in forecast.horizons.values():
            assert isinstance(q, QuantileForecast) and tuple(q.model_dump()) == QUANTILE_NAMES
            assert 0 <= q.p10 <= q.p50 <= q.p90
    grid = sim_sensor_ids()[:3]
    [sim] = predictor.predict([TrafficRequest(network="grid", sensors=grid, history=[[20.0] * 6] * 3,
                                              last_timestamp="2024-01-03T17:00:00")])
    assert isinstance(sim, TrafficResponse) and len(sim.forecasts) == 3


def test_an_explanation_weighs_recent_counts_earlier_counts_and_the_clock(predictor: TrafficPredictor) -> None:
    request = TrafficRequest(**_request(history=[[5.0] * 12 + [40.0] * 4, [3.0] * 15 + [None]]))
    [explained] = predictor.explain([request])
    assert isinstance(explained, TrafficResponse) and explained.explanation is not None
    assert explained.forecasts == predictor.predict([request])[0].forecasts  # type: ignore[attr-defined]
    weights = {w.input: w.weight for w in explained.explanation.inputs}
    assert list(weights) == sorted(weights, key=lambda name: -weights[name]) and len(weights) == 3
    assert weights["counts, last 15 min"] > 0 and explained.explanation.forward_passes == 4
    # counts that are all missing already: taking them away changes nothing, the clock still does
    [blind] = predictor.explain([TrafficRequest(**_request(history=[[None] * 16, [None] * 16]))])
    blind_weights = {w.input: w.weight for w in blind.explanation.inputs}  # type: ignore[attr-defined]
    assert blind_weights["counts, last 15 min"] == blind_weights["counts, earlier in the window"] == 0
    assert blind_weights["time of day and day of week (the sensors' daily profile)"] > 0


def test_loss_ignores_missing_targets() -> None:
    domain = get_domain("traffic")
    meta = {"networks": {n: {"sensors": ["a", "b"], "scale": [1.0, 1.0]} for n in NETWORKS}}
    model = domain.build_model({**domain.default_config("smoke"), "pretrained": False}, meta)
    item = {"x": torch.zeros(2, W_MAX * N_FEATURES), "target_profile": torch.zeros(2, 3), "y": torch.zeros(2, 3),
            "y_mask": torch.zeros(2, 3, dtype=torch.bool), "weight": torch.ones(2), "network": torch.tensor(0)}
    assert float(domain.loss(model, group_batch([item], list(NETWORKS))).detach()) == 0.0
    item["y_mask"] = torch.ones(2, 3, dtype=torch.bool)
    item["y"] = torch.full((2, 3), 1e3)
    assert float(domain.loss(model, group_batch([item], list(NETWORKS))).detach()) > 100


def test_evaluation_rows_cover_both_networks_and_every_horizon(run: SmokeRun) -> None:
    evaluation = run.evaluation
    rows = {(r.subset, r.horizon, r.name): r for r in evaluation.rows}
    assert len(rows) == len(evaluation.rows) == 2 * 3 * 5
    assert set(rows["real_counts", "15min", "mae"].baselines) == {
        "historical_average", "last_value", "seasonal_naive", "poisson_floor"}
    assert set(rows["simulated_network", "60min", "mae"].baselines) == {
        "historical_average", "last_value", "seasonal_naive"}
    assert 0.0 <= rows["simulated_network", "30min", "coverage_p10_p90"].model <= 1.0


def test_validation_metric_is_reported(data_dir: Path) -> None:
    domain = get_domain("traffic")
    config = domain.default_config("smoke")
    meta = domain.fit_meta(data_dir, config)
    _, valid = domain.datasets(data_dir, config, meta)
    model = domain.build_model({**config, "pretrained": False}, meta).eval()
    loader = torch.utils.data.DataLoader(valid, batch_size=64, collate_fn=domain.collate)
    with torch.no_grad():
        out = domain.validate(model, loader, meta)
    assert out[domain.metric] > 0
    assert {f"val_mae_{n}_{h}" for n in NETWORKS for h in HORIZONS} <= set(out)
    # The metric is the mean of the per-network, per-horizon MAEs over each network's mean count.
    norm = [out[f"val_mae_{n}_{h}"] / (np.mean(meta["networks"][n]["scale"]) - 1) for n in NETWORKS for h in HORIZONS]
    assert out["val_mae"] == pytest.approx(float(np.mean(norm)))


def test_windows_dataclass_is_what_make_windows_returns(data_dir: Path) -> None:
    test = load_table(data_dir, "traffic", "grid_test")
    win = make_windows(test, sim_sensor_ids(), NETWORKS["grid"])
    assert isinstance(win, Windows)
    assert win.counts.shape[1:] == (224, 6) and win.actual.shape[1:] == (224, 3)
