"""What the two forecasters (traffic, energy) share: the P10/P50/P90 answer and its training loss.

Both answer a forecast as three quantiles of the value forecast (a vehicle count per step for
traffic, demand in the series' unit for energy), never crossing, and both train on the pinball
loss of those quantiles (`domains.metrics.pinball` is the same loss in numpy, for reports).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field

from domains.metrics import QUANTILES

QUANTILE_NAMES = ("p10", "p50", "p90")  # the JSON names of `QUANTILES`, in the same order


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
