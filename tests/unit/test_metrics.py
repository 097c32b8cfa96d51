"""Shared metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from domains import metrics


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
