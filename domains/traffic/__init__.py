"""Traffic: P10/P50/P90 counts at 15, 30 and 60 minutes for every sensor of two networks.

`contract` holds the networks, horizons and request/response items; `features` the windows and
model inputs; `model` the network (`TrafficNet`); `baselines` the baselines and figure; `domain`
`TrafficDomain` and `TrafficPredictor`; `data` (real counts) and `simulation` (the uxsim grid) the
data preparation, imported only when data is prepared.
"""

from domains.traffic.baselines import historical_average, last_value, poisson_floor_mae, seasonal_naive
from domains.traffic.contract import (
    HORIZONS,
    MAX_COUNT,
    NETWORKS,
    W_MAX,
    NetworkSpec,
    SensorForecast,
    TrafficRequest,
    TrafficResponse,
)
from domains.traffic.domain import TrafficDomain, TrafficPredictor
from domains.traffic.features import N_FEATURES, Windows, encode, group_batch, make_windows, to_matrix
from domains.traffic.model import TrafficNet

__all__ = [
    "HORIZONS",
    "MAX_COUNT",
    "NETWORKS",
    "N_FEATURES",
    "W_MAX",
    "NetworkSpec",
    "SensorForecast",
    "TrafficDomain",
    "TrafficNet",
    "TrafficPredictor",
    "TrafficRequest",
    "TrafficResponse",
    "Windows",
    "encode",
    "group_batch",
    "historical_average",
    "last_value",
    "make_windows",
    "poisson_floor_mae",
    "seasonal_naive",
    "to_matrix",
]
