"""The day-ahead temperature forecast's error, shared by data preparation and training.

A prepared split's `temperature_forecast` is the actual temperature plus this error, seeded; with
`forecast_noise`, training adds a fresh draw of it to the actual temperature every batch. The
error is Gaussian with σ = `TEMP_FORECAST_SIGMA`, correlated from one half-hour to the next (AR(1),
ρ = `TEMP_FORECAST_RHO`) because a real forecast's error persists for hours rather than averaging
out within a day.
"""

from __future__ import annotations

import numpy as np

TEMP_FORECAST_SIGMA = 2.0  # °C, a realistic day-ahead forecast error
TEMP_FORECAST_RHO = 0.9  # half-hour to half-hour correlation of that error


def ar1_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian noise with std `TEMP_FORECAST_SIGMA` along the last axis, AR(1)-correlated (stationary)."""
    z = rng.standard_normal(shape)
    out = np.empty(shape)
    out[..., 0] = z[..., 0]
    innovation = np.sqrt(1.0 - TEMP_FORECAST_RHO**2)  # keeps the marginal std at 1
    for i in range(1, shape[-1]):
        out[..., i] = TEMP_FORECAST_RHO * out[..., i - 1] + innovation * z[..., i]
    result: np.ndarray = TEMP_FORECAST_SIGMA * out
    return result
