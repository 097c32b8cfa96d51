"""Events: route a city report to one of ten service classes, with a priority and the top 3 classes.

`contract` holds the labels, priorities, request/response items and the served decision;
`domain` the fine-tuned MiniLM model (`EventsDomain`, `EventsPredictor`); `baselines` the TF-IDF
baseline and report rows; `corpus` (with its packaged `corpus_phrases.json`) the generated corpus
and data preparation, imported only when data is prepared.
"""

from domains.events.baselines import TfidfBaseline, metric_rows
from domains.events.contract import (
    BASE_PRIORITY,
    LABELS,
    MAX_TEXT_CHARS,
    PRIORITIES,
    TOP_K,
    ClassProbability,
    EventRequest,
    EventResponse,
    Label,
    Priority,
    decide,
    encode_targets,
)
from domains.events.domain import EventsDomain, EventsPredictor, balancing_weights

__all__ = [
    "BASE_PRIORITY",
    "LABELS",
    "MAX_TEXT_CHARS",
    "PRIORITIES",
    "TOP_K",
    "ClassProbability",
    "EventRequest",
    "EventResponse",
    "EventsDomain",
    "EventsPredictor",
    "Label",
    "Priority",
    "TfidfBaseline",
    "balancing_weights",
    "decide",
    "encode_targets",
    "metric_rows",
]
