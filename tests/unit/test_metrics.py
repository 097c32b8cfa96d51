"""Shared metrics, and the forecasters' shared quantile answer and loss, against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from domains import metrics
from domains.forecast import QUANTILE_NAMES, QuantileForecast, pinball_terms


def test_mae_rmse_skip_missing_actuals() -> None:
    y = [1.0, 2.0, np.nan, 4.0]
    p = [2.0, 2.0, 100.0, 1.0]
    assert metrics.mae(y, p) == pytest.approx((1 + 0 + 3) / 3)
    assert metrics.rmse(y, p) == pytest.approx(math.sqrt((1 + 0 + 9) / 3))


def test_mape_is_a_fraction_over_nonzero_actuals() -> None:
    assert metrics.mape([0.0, 2.0, 4.0], [5.0, 1.0, 5.0]) == pytest.approx((0.5 + 0.25) / 2)


def test_pinball_by_hand() -> None:
    # actual 10; P10=8 (under by 2: 0.1*2=0.2), P50=12 (over by 2: 0.5*2=1.0), P90=10 (0)
    assert metrics.pinball([10.0], [[8.0, 12.0, 10.0]]) == pytest.approx((0.2 + 1.0 + 0.0) / 3)


def test_pinball_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="quantile predictions"):
        metrics.pinball([1.0, 2.0], [[1.0, 2.0, 3.0]])


def test_coverage_counts_inclusive_bounds() -> None:
    assert metrics.coverage([1, 2, 3, 4], [1, 0, 4, 0], [1, 1, 5, 5]) == pytest.approx(0.5)


def test_classification_metrics_by_hand() -> None:
    y = ["a", "a", "b", "c"]
    p = ["a", "b", "b", "b"]
    f1 = metrics.f1_per_class(y, p, ["a", "b", "c"])
    assert f1["a"] == pytest.approx(2 / 3)  # tp1 fp0 fn1
    assert f1["b"] == pytest.approx(0.5)  # tp1 fp2 fn0
    assert f1["c"] == 0.0
    assert metrics.macro_f1(y, p, ["a", "b", "c"]) == pytest.approx((2 / 3 + 0.5) / 3)
    assert metrics.accuracy(y, p) == pytest.approx(0.5)


def test_the_training_pinball_terms_average_to_the_report_metric() -> None:
    actual = torch.tensor([[10.0, 4.0]])
    q = torch.tensor([[[8.0, 12.0, 10.0], [1.0, 4.0, 9.0]]])
    terms = pinball_terms(actual, q)
    assert terms.shape == q.shape
    assert terms[0, 0].tolist() == pytest.approx([0.2, 1.0, 0.0])  # the hand values of test_pinball_by_hand
    assert float(terms.mean()) == pytest.approx(metrics.pinball(actual.numpy(), q.numpy()))


def test_a_quantile_forecast_is_named_in_quantile_order() -> None:
    assert len(QUANTILE_NAMES) == len(metrics.QUANTILES)
    forecast = QuantileForecast(**QuantileForecast.fields_of(np.array([1.0, 2.0, 3.5])))
    assert forecast.model_dump() == {"p10": 1.0, "p50": 2.0, "p90": 3.5}
    with pytest.raises(ValidationError, match="p50"):
        QuantileForecast.model_validate({"p10": 1.0, "p90": 2.0})
    with pytest.raises(ValueError):
        QuantileForecast.fields_of([1.0, 2.0])  # three values, no fewer
