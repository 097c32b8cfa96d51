"""The traffic data contract: the two networks served, the horizons, and the request/response items.

Windows: ``intersection`` (15-minute steps) sends the last W=16 steps (4 hours), ``grid`` (5-minute
steps) the last W=6 steps (30 minutes, because simulated episodes are 2 hours long). A request may
carry None for a dropout; a sensor the request leaves out counts as missing for the mixing. A
forecast is a `domains.forecast.QuantileForecast` of the count per sensor and horizon.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from domains.forecast import ForecastExplanation, QuantileForecast

HORIZONS = ("15min", "30min", "60min")
HORIZON_MINUTES = (15, 30, 60)


@dataclass(frozen=True)
class NetworkSpec:
    """A network the model serves: its report subset, step and input window."""

    subset: str
    step_minutes: int
    window: int

    @property
    def horizon_steps(self) -> tuple[int, ...]:
        return tuple(m // self.step_minutes for m in HORIZON_MINUTES)

    @property
    def slots(self) -> int:
        return 1440 // self.step_minutes


NETWORKS: dict[str, NetworkSpec] = {
    "intersection": NetworkSpec(subset="real_counts", step_minutes=15, window=16),
    "grid": NetworkSpec(subset="simulated_network", step_minutes=5, window=6),
}
W_MAX = max(s.window for s in NETWORKS.values())
# A detector counts vehicles per step: thousands at most. The network computes in float32, where
# absurdly large counts overflow into NaN forecasts, which no JSON answer can carry.
MAX_COUNT = 1e6
Count = Annotated[float, Field(ge=0, le=MAX_COUNT, allow_inf_nan=False)]


class TrafficRequest(BaseModel):
    """One forecast request: the recent counts of some or all sensors of one network."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "network": "grid", "sensors": ["L00-10", "L10-00"],
            "history": [[31, 35, None, 40, 38, 42], [12, 10, 11, 15, 9, 14]],
            "last_timestamp": "2024-05-13T08:00:00",
        }]},
    )

    network: str = Field(
        description="network name: 'intersection' (real detectors, 15-minute steps, W=16) or "
                    "'grid' (simulated 8x8 grid, 5-minute steps, W=6)",
        examples=["intersection", "grid"], json_schema_extra={"enum": list(NETWORKS)},
    )
    sensors: list[str] = Field(
        min_length=1, description="sensor ids of that network (sensors left out count as missing)",
        examples=[["d1", "d2"]],
    )
    history: list[list[Count | None]] = Field(
        description="per sensor, in the order of `sensors`, the last W counts oldest first (W = 16 for "
                    f"'intersection', 6 for 'grid'), each from 0 to {MAX_COUNT:,.0f}; null marks a dropout",
        examples=[[[4, 6, 5, 9, 12, 15, 20, 26, 31, 30, 28, 33, 35, 36, 40, None]]],
    )
    last_timestamp: datetime = Field(
        description="start of the last step in `history` (local time; drives time-of-day features)",
        examples=["2024-05-13T08:00:00"],
    )

    @field_validator("network")
    @classmethod
    def _known(cls, network: str) -> str:
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network[:100]!r}; choose one of {sorted(NETWORKS)}")
        return network

    @field_validator("sensors")
    @classmethod
    def _unique(cls, sensors: list[str]) -> list[str]:
        seen: set[str] = set()
        for s in sensors:
            if s in seen:
                raise ValueError(f"sensor {s!r} is listed twice")
            seen.add(s)
        return sensors

    @field_validator("history")
    @classmethod
    def _lengths(cls, history: list[list[float | None]], info: ValidationInfo) -> list[list[float | None]]:
        # Checked here, not by the model: pydantic has the network and sensors already (fields
        # validate in order; a refused one is absent, and its own error is reported).
        if "sensors" in info.data and len(history) != len(info.data["sensors"]):
            raise ValueError(f"history has {len(history)} series for {len(info.data['sensors'])} sensors")
        if "network" in info.data:
            window = NETWORKS[info.data["network"]].window
            for i, row in enumerate(history):
                if len(row) != window:
                    raise ValueError(f"history[{i}] has {len(row)} steps; network {info.data['network']!r} "
                                     f"needs the last {window}")
        return history


class SensorForecast(BaseModel):
    """One sensor's forecasts at every horizon."""

    model_config = ConfigDict(extra="forbid")

    sensor: str = Field(description="sensor id", examples=["d1"])
    horizons: dict[Literal["15min", "30min", "60min"], QuantileForecast] = Field(
        description="quantiles of the count in the step 15, 30 and 60 minutes after the last step of `history`",
        examples=[{"15min": {"p10": 28, "p50": 36.5, "p90": 46}}],
    )


class TrafficResponse(BaseModel):
    """The forecasts for the requested sensors, in request order."""

    model_config = ConfigDict(extra="forbid")

    network: str = Field(description="the network forecast", examples=["intersection"])
    version: str = Field(description="model version that answered", examples=["traffic-v3"])
    forecasts: list[SensorForecast] = Field(description="one entry per requested sensor")
    explanation: ForecastExplanation | None = Field(
        None, description="Only with `?explain=true`: the inputs that moved the requested sensors' forecasts "
        "most (weights in vehicles per step, averaged over the sensors and horizons).")


class TrafficTruth(BaseModel):
    """The counts the sensors measured at the forecast's horizons."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"counts": {
        "L00-10": {"15min": 37, "30min": 41}}}]})

    counts: dict[str, dict[Literal["15min", "30min", "60min"], Count]] = Field(
        min_length=1, description="Per sensor of the forecast, the count of each horizon known so far.")
