"""What the two forecasters (traffic, energy) share: the P10/P50/P90 answer and its training loss.

Both answer a forecast as three quantiles of the value forecast (a vehicle count per step for
traffic, demand in the series' unit for energy), never crossing, and both train on the pinball
loss of those quantiles (`domains.metrics.pinball` is the same loss in numpy, for reports).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from domains.metrics import QUANTILES, coverage, mae, mape

QUANTILE_NAMES = ("p10", "p50", "p90")  # the JSON names of `QUANTILES`, in the same order
# Each side of the P10-P90 interval should miss one outcome in ten.
MISS = QUANTILES[0]


class QuantileForecast(BaseModel):
    """A forecast value's P10, median and P90 (P10 ≤ P50 ≤ P90), in the unit of the value."""

    model_config = ConfigDict(extra="forbid")

    p10: float = Field(description="10th percentile of the forecast value: one outcome in ten is expected "
                       "below it", examples=[28.0])
    p50: float = Field(description="median forecast of the value", examples=[36.5])
    p90: float = Field(description="90th percentile of the forecast value: one outcome in ten is expected "
                       "above it", examples=[46.0])

    @classmethod
    def fields_of(cls, quantiles: Iterable[float]) -> dict[str, float]:
        """{"p10": ..., "p50": ..., "p90": ...} from three values in `QUANTILES` order."""
        return {name: float(q) for name, q in zip(QUANTILE_NAMES, quantiles, strict=True)}


def pinball_terms(target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Pinball loss of (..., 3) quantile predictions against (...) targets, per element and
    quantile (shape of `quantiles`); the caller masks, weights and averages."""
    taus = torch.tensor(QUANTILES, device=quantiles.device, dtype=torch.float32)
    diff = target.float()[..., None] - quantiles.float()
    return torch.maximum(taus * diff, (taus - 1) * diff)


def interval_offsets(q: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Split-conformal widths for the P10-P90 interval (conformalized quantile regression, one side
    at a time): how far to lower P10 and raise P90 so that, on the calibration set `y` (NaN: no
    value) with quantiles `q` (..., 3) in the same units, each side misses `MISS` of the values.
    A negative width narrows an interval that was too wide."""
    seen = ~np.isnan(y)
    below, above = (q[..., 0] - y)[seen], (y - q[..., 2])[seen]
    if not below.size:
        return 0.0, 0.0
    # the ⌈(1 - MISS)(n + 1)⌉-th smallest of n residuals: the finite-sample guarantee's rank
    rank = min(math.ceil((1 - MISS) * (below.size + 1)), below.size)
    return float(np.sort(below)[rank - 1]), float(np.sort(above)[rank - 1])


def widened(q: np.ndarray, lower: np.ndarray | float, upper: np.ndarray | float) -> np.ndarray:
    """Quantiles (..., 3) with P10 lowered by `lower` and P90 raised by `upper` (broadcast over the
    leading axes), never crossing the median."""
    out = q.copy()
    out[..., 0] = np.minimum(q[..., 0] - lower, q[..., 1])
    out[..., 2] = np.maximum(q[..., 2] + upper, q[..., 1])
    return out


OCCLUSION = "input-group occlusion on the served model"


class InputWeight(BaseModel):
    """One group of a forecast's inputs and how much it moved the forecast."""

    input: str = Field(description="The inputs taken away together.", examples=["demand, last 24 hours"])
    weight: float = Field(
        description="Mean absolute change of the median (P50) over the forecast when the forecast is made "
        "again without these inputs (each replaced by a neutral value: counts by 'missing', a series "
        "by its own mean, time by a day's or week's average), in the forecast's unit.", examples=[0.31])


class ForecastExplanation(BaseModel):
    """Why a forecast came out as it did: the groups of inputs that moved it most (only with
    `?explain=true`)."""

    method: str = Field(description="How the weights were measured.", examples=[OCCLUSION])
    inputs: list[InputWeight] = Field(description="Every group of inputs, the largest weight first.")
    forward_passes: int = Field(description="Forecasts the model made for this explanation: the forecast as "
                                "sent and one per group.", examples=[7])


def occlusion_explanation(median: np.ndarray, occluded: dict[str, np.ndarray]) -> ForecastExplanation:
    """The explanation of one forecast from its median (any shape) and, per group of inputs, the
    median forecast without that group (same shape)."""
    weights = {name: float(np.mean(np.abs(median - other))) for name, other in occluded.items()}
    return ForecastExplanation(
        method=OCCLUSION, forward_passes=1 + len(occluded),
        inputs=[InputWeight(input=name, weight=round(w, 4))
                for name, w in sorted(weights.items(), key=lambda pair: -pair[1])])


def forecast_score(actual: np.ndarray, quantiles: np.ndarray) -> dict[str, float]:
    """The P50's MAE and MAPE and the P10-P90 coverage of forecasts against what happened:
    `actual` (N,) with NaN where nothing is known, `quantiles` (N, 3)."""
    known = ~np.isnan(actual)
    a, q = actual[known], quantiles[known]
    if not len(a):
        return {}
    return {"mae": mae(a, q[:, 1]), "mape": mape(a, q[:, 1]), "coverage_p10_p90": coverage(a, q[:, 0], q[:, 2]),
            "values": len(a)}
