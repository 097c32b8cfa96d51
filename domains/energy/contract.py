"""The energy data contract: what a day-ahead forecast request carries and what it answers.

A request names a trained series, where the forecast starts and the last week of half-hourly
demand (and, for series with temperature, the same week's temperature and a forecast of the next
day's); the answer is 48 half-hours of `domains.forecast.QuantileForecast` of demand.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from domains.forecast import ForecastExplanation, QuantileForecast

STEPS_PER_DAY = 48  # half-hours
DAY = STEPS_PER_DAY
WEEK = 7 * DAY
HISTORY = WEEK  # W = 336 half-hours, so the same time last week is always in the window
HORIZON = 48  # the next day, half-hourly


def _example_week(base: float, swing: float) -> list[float]:
    """A plausible week of half-hourly demand for the OpenAPI examples (a daily double hump)."""
    return [
        round(base + swing * (math.sin(2 * math.pi * (i % 48 - 14) / 48) + 0.3 * math.sin(4 * math.pi * i / 48)), 3)
        for i in range(HISTORY)
    ]


# Typed as JSON (Any) for pydantic's json_schema_extra; a unit test sends each one through a predictor.
REQUEST_EXAMPLES: list[Any] = [
    {
        "series": "victoria",
        "start": "2014-12-01T00:00:00",
        "demand": _example_week(4.5, 0.8),
        "temperature": [round(18 + 5 * math.sin(2 * math.pi * (i % 48 - 18) / 48), 1) for i in range(HISTORY)],
        "temperature_forecast": [round(20 + 6 * math.sin(2 * math.pi * (i - 18) / 48), 1) for i in range(HORIZON)],
    },
    {"series": "england_wales", "start": "2000-08-21T00:00:00", "demand": _example_week(29000, 5000)},
]

# Demand in any unit from watts up stays far below this. The network computes in float32, where
# absurdly large demand overflows into infinite forecasts, which no JSON answer can carry.
MAX_DEMAND = 1e15
Demand = Annotated[float, Field(gt=0, le=MAX_DEMAND, allow_inf_nan=False)]
Celsius = Annotated[float, Field(ge=-60, le=60, allow_inf_nan=False)]


class EnergyRequest(BaseModel):
    """One day-ahead forecast request: a series, where the forecast starts, and its recent past."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": REQUEST_EXAMPLES})

    series: str = Field(description="Which trained series to forecast (`victoria`, `england_wales`).",
                         examples=["victoria"])
    start: datetime = Field(
        description="Wall-clock time of the first forecast half-hour, on the hour or half hour "
                    "(local time of the series; a time zone, if given, is dropped).",
        examples=["2014-12-01T00:00:00"],
    )
    demand: list[Demand] = Field(
        min_length=HISTORY, max_length=HISTORY,
        description=f"The last {HISTORY} half-hours of demand (one week), oldest first, the last one "
                    "ending where the forecast starts; in the series' unit (victoria GW, england_wales MW).",
        examples=[_example_week(4.5, 0.8)],
    )
    temperature: Annotated[list[Celsius], Field(min_length=HISTORY, max_length=HISTORY)] | None = Field(
        default=None,
        description=f"Series with temperature only: the same {HISTORY} half-hours' observed temperature, °C.",
    )
    temperature_forecast: Annotated[list[Celsius], Field(min_length=HORIZON, max_length=HORIZON)] | None = Field(
        default=None,
        description=f"Series with temperature only: a forecast of the next {HORIZON} half-hours' temperature, °C.",
    )
    workday: Annotated[list[bool], Field(min_length=HORIZON, max_length=HORIZON)] | None = Field(
        default=None,
        description=f"Optional: whether each of the {HORIZON} forecast half-hours falls on a work day "
                    "(false on public holidays). Default: Monday to Friday.",
    )

    @field_validator("start")
    @classmethod
    def _on_half_hour(cls, value: datetime) -> datetime:
        if value.minute % 30 or value.second or value.microsecond:
            raise ValueError(f"start must be on the hour or half hour, got {value.isoformat()!r}")
        return value.replace(tzinfo=None)


class ForecastStep(QuantileForecast):
    """One forecast half-hour: its start and the quantiles of its demand, in the series' unit."""

    timestamp: datetime = Field(description="Start of the half-hour.", examples=["2014-12-01T00:00:00"])


class EnergyResponse(BaseModel):
    """A day-ahead forecast: 48 half-hours of P10/P50/P90 in the series' unit."""

    model_config = ConfigDict(extra="forbid")

    series: str = Field(description="The series forecast.", examples=["victoria"])
    unit: str = Field(description="Unit of demand (empty for a user's own series).", examples=["GW"])
    version: str = Field(description="Registry version that answered.", examples=["energy-20261127-1"])
    steps: list[ForecastStep] = Field(description=f"The {HORIZON} forecast half-hours, in order.")
    explanation: ForecastExplanation | None = Field(
        None, description="Only with `?explain=true`: the inputs that moved the forecast most (weights in "
        "the series' unit).")


class EnergyTruth(BaseModel):
    """The demand that happened in the forecast's half-hours."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"demand": [4.61, 4.52, None]}]})

    demand: list[Demand | None] = Field(
        min_length=1, max_length=HORIZON, description=f"The demand of the first half-hours of the forecast, in "
        f"order from its `start` (up to {HORIZON}), in the series' unit; null where not known.")
