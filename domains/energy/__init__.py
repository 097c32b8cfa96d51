"""Energy: day-ahead electricity demand, the next 48 half-hours as P10/P50/P90, per trained series.

`contract` holds the request/response items and the window sizes; `features` the forecast windows
and scaled inputs; `model` the networks; `baselines` the baselines, report metrics and figure;
`domain` `EnergyDomain` and `EnergyPredictor`; `temperature` the temperature-forecast error both
preparation and training draw; `data` the preparation of the packaged series, imported only when
data is prepared.
"""

from domains.energy.baselines import RegressionBaseline, residual_band, same_time_last_week, with_band
from domains.energy.contract import (
    HISTORY,
    HORIZON,
    MAX_DEMAND,
    REQUEST_EXAMPLES,
    EnergyRequest,
    EnergyResponse,
    ForecastStep,
)
from domains.energy.domain import EnergyDomain, EnergyPredictor
from domains.energy.features import (
    CALENDAR_DIM,
    RawWindows,
    WindowDataset,
    calendar_features,
    model_inputs,
    split_frames,
    windows_for_split,
)
from domains.energy.model import EnergyModel, pinball_loss

__all__ = [
    "CALENDAR_DIM",
    "HISTORY",
    "HORIZON",
    "MAX_DEMAND",
    "REQUEST_EXAMPLES",
    "EnergyDomain",
    "EnergyModel",
    "EnergyPredictor",
    "EnergyRequest",
    "EnergyResponse",
    "ForecastStep",
    "RawWindows",
    "RegressionBaseline",
    "WindowDataset",
    "calendar_features",
    "model_inputs",
    "pinball_loss",
    "residual_band",
    "same_time_last_week",
    "split_frames",
    "windows_for_split",
    "with_band",
]
