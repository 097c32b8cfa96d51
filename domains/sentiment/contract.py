"""The sentiment data contract: the three classes, the packaged corpus's subsets, and the
request/response items.

`Label` is the one source of truth for the class names; `LABELS` is read from it in the order of
the model's head (0 negative, 1 neutral, 2 positive), which data preparation uses for its labels.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from domains.text import TEXT_RULE, Confidence, Explanation, Uncertain, readable_text

Label = Literal["negative", "neutral", "positive"]
LABELS: tuple[str, ...] = get_args(Label)
# The packaged corpus's subsets, in report order; a user's own data may bring others.
SUBSETS: tuple[str, ...] = ("tweets", "nyt", "amazon", "movies")
# Requests are single sentences or posts; the model reads the first `max_len` tokens (64 in the
# shipped profiles, about 250 characters of English) and a request may carry at most this many.
MAX_TEXT_CHARS = 2000


class SentimentRequest(BaseModel):
    """One text to score."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "The new bus line is great!"}]})

    text: str = Field(
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        description=f"The text, up to {MAX_TEXT_CHARS} characters; the model reads its first 64 tokens "
        "(about 250 characters), so score long documents sentence by sentence. "
        f"It must be {TEXT_RULE}.",
        examples=["The new bus line is great!", "Garbage pickup was skipped again on Elm St."],
    )

    @field_validator("text")
    @classmethod
    def _readable(cls, value: str) -> str:
        return readable_text(value)


class SentimentResponse(BaseModel):
    """The sentiment of one text."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"label": "positive", "score": 0.61, "confidence": 0.91, "uncertain": False,
                 "probabilities": {"negative": 0.02, "neutral": 0.07, "positive": 0.91}}
            ]
        },
    )

    label: Label = Field(description="The most probable class.", examples=["positive"])
    score: float = Field(
        ge=-1.0, le=1.0,
        description="Predicted mean human rating on the VADER scale (−4..4) divided by 4: −1 very "
        "negative, 0 neutral, 1 very positive. Regressed separately from `label`.",
        examples=[0.61],
    )
    confidence: Confidence
    uncertain: Uncertain
    probabilities: dict[Label, float] = Field(
        description="Probability of each class (they sum to 1; calibrated, as `confidence`).",
        examples=[{"negative": 0.02, "neutral": 0.07, "positive": 0.91}],
    )
    explanation: Explanation | None = Field(None, description="Only with `?explain=true`: the words that moved "
                                            "the answer most.")


class SentimentTruth(BaseModel):
    """The sentiment a person reading the text gave it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"label": "negative"}]})

    label: Label = Field(description="The text's sentiment.", examples=["negative"])
