"""The events data contract: the ten service classes, the priorities, the request/response items and
the served decision.

`Label` and `Priority` are the one source of truth for the class and priority names: `LABELS` and
`PRIORITIES` are read from them, in the order the model's heads use, and the corpus generator, the
served decision and the response model all take them from here.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from domains.text import TEXT_RULE, Confidence, Explanation, Uncertain, readable_text

Label = Literal[
    "noise", "illegal_parking", "street_condition", "sanitation", "water_sewer",
    "power_outage", "traffic_accident", "fire_hazard", "heat_hot_water", "fallen_tree",
]
Priority = Literal["normal", "high", "emergency"]  # ascending urgency
LABELS: tuple[str, ...] = get_args(Label)
PRIORITIES: tuple[str, ...] = get_args(Priority)
# The floor of a report's priority, whatever it says: a fire hazard is always an emergency; an
# accident, an outage, a fallen tree or a water main at least high.
BASE_PRIORITY: dict[str, str] = {
    "fire_hazard": "emergency",
    "traffic_accident": "high", "power_outage": "high", "fallen_tree": "high", "water_sewer": "high",
    "heat_hot_water": "normal", "street_condition": "normal", "sanitation": "normal",
    "illegal_parking": "normal", "noise": "normal",
}
# A report is a sentence or a short paragraph. The model reads its first `max_len` tokens (64 in
# the shipped profiles, about 250 characters of English); longer requests are refused rather than
# silently cut far below what the sender wrote.
MAX_TEXT_CHARS = 1000
TOP_K = 3


class EventRequest(BaseModel):
    """One city report to route."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": "Water main break on Fulton St, water gushing into the street"}]},
    )

    text: str = Field(
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        description=f"The report as written, up to {MAX_TEXT_CHARS} characters; the model reads its first "
        "64 tokens (about 250 characters). A report naming two problems is routed to the more urgent one. "
        f"It must be {TEXT_RULE}.",
        examples=["Water main break on Fulton St, water gushing into the street",
                  "car parked in front of my driveway at 22 Ocean Ave, can't get out"],
    )

    @field_validator("text")
    @classmethod
    def _readable(cls, value: str) -> str:
        return readable_text(value)


class ClassProbability(BaseModel):
    """One class and the model's probability for it."""

    model_config = ConfigDict(extra="forbid")

    label: Label = Field(description="A service class.", examples=["water_sewer"])
    probability: float = Field(ge=0.0, le=1.0, description="Probability of the class.", examples=[0.93])


class EventResponse(BaseModel):
    """Where a report goes and how fast."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"label": "water_sewer", "priority": "high", "confidence": 0.93, "uncertain": False,
                 "top3": [{"label": "water_sewer", "probability": 0.93},
                          {"label": "street_condition", "probability": 0.03},
                          {"label": "heat_hot_water", "probability": 0.02}]}
            ]
        },
    )

    label: Label = Field(description="The most probable class.", examples=["water_sewer"])
    priority: Priority = Field(
        description="emergency, high or normal: the priority head's call, never below the class's base "
        "priority (fire_hazard is always emergency; traffic_accident, power_outage, fallen_tree and "
        "water_sewer at least high).",
        examples=["high"],
    )
    confidence: Confidence
    uncertain: Uncertain
    top3: list[ClassProbability] = Field(
        min_length=TOP_K, max_length=TOP_K,
        description="The three most probable classes, most probable first (calibrated, as `confidence`).",
    )
    explanation: Explanation | None = Field(None, description="Only with `?explain=true`: the words that moved "
                                            "the answer most.")


# Base priority of each class as an index into PRIORITIES (the floor of the served priority).
_BASE_LEVEL = np.array([PRIORITIES.index(BASE_PRIORITY[lab]) for lab in LABELS])


def decide(label_probs: np.ndarray, priority_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The served decision: (class index, priority index) per row; the priority is the head's
    argmax raised to the predicted class's base priority."""
    label = label_probs.argmax(-1)
    return label, np.maximum(priority_probs.argmax(-1), _BASE_LEVEL[label])


def encode_targets(frame: Any) -> dict[str, np.ndarray]:
    """Class and priority indices of a prepared split (`LABELS`, `PRIORITIES` order)."""
    return {
        "label": frame["label"].map({lab: i for i, lab in enumerate(LABELS)}).to_numpy(np.int64),
        "priority": frame["priority"].map({p: i for i, p in enumerate(PRIORITIES)}).to_numpy(np.int64),
    }


class EventTruth(BaseModel):
    """What a report turned out to be, as the team that handled it found it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"label": "water_sewer",
                                                                               "priority": "high"}]})

    label: Label = Field(description="The service class it belonged to.", examples=["water_sewer"])
    priority: Priority | None = Field(None, description="How urgent it was, when known.", examples=["high"])
