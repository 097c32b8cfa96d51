"""Sentiment: negative / neutral / positive with a score in [-1, 1], for any short text.

`contract` holds the labels, subsets and request/response items; `domain` the fine-tuned MiniLM
model (`SentimentDomain`, `SentimentPredictor`); `baselines` the VADER, linear-probe and majority
baselines and report rows; `embeddings` the cached frozen embeddings; `data` the preparation of
the VADER paper's rated texts, imported only when data is prepared.
"""

from domains.sentiment.baselines import linear_probe_labels, majority_labels, metric_rows, vader_labels
from domains.sentiment.contract import LABELS, MAX_TEXT_CHARS, SUBSETS, Label, SentimentRequest, SentimentResponse
from domains.sentiment.domain import SentimentDomain, SentimentPredictor
from domains.sentiment.embeddings import frozen_embeddings, split_embeddings

__all__ = [
    "LABELS",
    "MAX_TEXT_CHARS",
    "SUBSETS",
    "Label",
    "SentimentDomain",
    "SentimentPredictor",
    "SentimentRequest",
    "SentimentResponse",
    "frozen_embeddings",
    "linear_probe_labels",
    "majority_labels",
    "metric_rows",
    "split_embeddings",
    "vader_labels",
]
