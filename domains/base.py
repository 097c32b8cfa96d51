"""What a domain is, once: the contract that training, evaluation and serving all import.

A domain bundles its data contract (pydantic request/response items), its model architecture,
its preprocessing, its metrics and its baselines. Training (`training/loop.py`) drives any domain
through `Domain`; serving and batch scoring use the `Predictor` that `Domain.load_predictor`
returns from a registry version. Nothing outside `domains/` re-declares a model or re-implements
preprocessing.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset, default_collate

from domains.drift import Feature

if TYPE_CHECKING:
    import pandas as pd

Batch = dict[str, torch.Tensor]

# Files that every model directory (a Train checkpoint, a registry version) holds.
WEIGHTS_FILE = "model.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
# A version's reference (`Domain.reference`) is made from at most this many validation cases (enough for deciles that
# hold still), answered in batches of this many.
REFERENCE_CASES, REFERENCE_BATCH = 1000, 64


@dataclass(frozen=True)
class MetricRow:
    """One row of an evaluation report: an item of the report's `metrics` list."""

    subset: str
    name: str
    model: float
    baselines: dict[str, float]
    horizon: str | None = None
    label: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SearchParam:
    """One axis of a hyperparameter search space, declared next to the model it tunes.

    `kind` is loguniform/uniform/randint (bounds `low`..`high`, inclusive for randint) or choice
    (`values`). Kept free of Ray types so a space can be validated and tested without Ray.
    """

    kind: Literal["loguniform", "uniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] = ()


@dataclass
class Evaluation:
    """What `Domain.evaluate` returns: report rows, the PNG it drew, and a table for the CLI."""

    rows: list[MetricRow]
    figure: Path | None = None
    notes: list[str] = field(default_factory=list)
    backend: str = ""  # the predictor's (`Predictor.backend`): what was scored is what serves
    # How far the answers' confidence can be trusted, per subset (the report's `calibration`)
    calibration: dict[str, Any] = field(default_factory=dict)
    # Answers with their explanations, one per class (the report's `explained`)
    explained: list[dict[str, Any]] = field(default_factory=list)


def spread(n: int) -> list[int]:
    """At most `REFERENCE_CASES` positions of `n`, evenly spread (all of them when there are fewer)."""
    if n <= REFERENCE_CASES:
        return list(range(n))
    return sorted({round(i * (n - 1) / (REFERENCE_CASES - 1)) for i in range(REFERENCE_CASES)})


def request_example(model: type[BaseModel]) -> dict[str, Any]:
    """The first example a request model documents (OpenAPI, the printed curls, tests)."""
    extra = model.model_config.get("json_schema_extra")
    examples = extra.get("examples") if isinstance(extra, dict) else None
    if not isinstance(examples, list) or not examples or not isinstance(examples[0], dict):
        raise TypeError(f"{model.__name__} documents no example request")
    return dict(examples[0])


class Predictor(ABC):
    """A loaded model version, ready to answer requests (used by serving, batch scoring, evaluation)."""

    backend = "torch-fp32"  # what computes the answers (evaluation reports and /v1/models name it)

    def __init__(self, version: str) -> None:
        self.version = version

    @abstractmethod
    def predict(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        """Answers a batch of request items, in order, one response item each.

        Raises:
            core.errors.InvalidInput: an item is well-formed JSON but not servable
                (an unknown sensor, a series of the wrong length); names the field.
        """

    @abstractmethod
    def explain(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        """Answers as `predict` does, each with what moved it most (`?explain=true`)."""


class Domain(ABC):
    """One of the city's model domains. Subclasses are stateless; all state lives in files."""

    name: ClassVar[str]
    # The validation metric reported each epoch, what early stopping, checkpoint ranking and
    # Tune optimise; `mode` says which direction is better.
    metric: ClassVar[str]
    mode: ClassVar[Literal["max", "min"]]
    # Pydantic models of one request item and one response item (the data contract).
    request_model: ClassVar[type[BaseModel]]
    response_model: ClassVar[type[BaseModel]]
    # What actually happened, as a tenant reports it about one answered item (`POST .../feedback`).
    truth_model: ClassVar[type[BaseModel]]
    # The request item's fields that carry free text: masked (`core.pii`) before a sample is stored.
    text_fields: ClassVar[tuple[str, ...]] = ()
    # The one figure of `score` that stands for the domain's live quality (alerts, `cityserve
    # monitor`), and whether higher is better.
    quality_metric: ClassVar[str]
    quality_mode: ClassVar[Literal["max", "min"]]
    # Flags of `cityserve data prepare` that the full profile's data needs (traffic: --full-sim).
    full_data_flags: ClassVar[str] = ""
    # The serving backends a config may name (`domains.onnx_text.choose_backend`): a domain without
    # optimised artifacts serves its PyTorch model.
    backends: ClassVar[tuple[str, ...]] = ("auto", "torch")

    # ---- data (build side) -------------------------------------------------------------------
    @abstractmethod
    def prepare(self, data_dir: Path, *, source: Path | None = None, smoke: bool = False) -> dict[str, Any]:
        """Prepares the domain's Parquet splits under `data_dir / self.name` with a manifest.

        Args:
            data_dir: the data root.
            source: a user's own CSV/Parquet with the documented columns, instead of the packaged data.
            smoke: a tiny set for tests and `--smoke-test`.

        Returns:
            The manifest written (`domains.tables.write_splits`).
        """

    # ---- training ----------------------------------------------------------------------------
    @abstractmethod
    def default_config(self, profile: Literal["smoke", "quick", "full"]) -> dict[str, Any]:
        """Hyperparameters for a profile: the common keys of `training.loop.COMMON_DEFAULTS`
        (epochs, batch_size, lr, ...) plus the domain's own (hidden size, max length, ...)."""

    @abstractmethod
    def fit_meta(self, data_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
        """Learns what preprocessing needs from the training split only (scalers, label maps,
        sensor ids): JSON-serialisable, saved beside the weights as `meta.json`."""

    @abstractmethod
    def datasets(
        self, data_dir: Path, config: dict[str, Any], meta: dict[str, Any]
    ) -> tuple[Dataset[Batch], Dataset[Batch]]:
        """The train and validation datasets; items are dicts of tensors (default collate)."""

    @abstractmethod
    def build_model(self, config: dict[str, Any], meta: dict[str, Any]) -> nn.Module:
        """The architecture, freshly initialised (pretrained encoders loaded from their package)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of a batch (already on the model's device)."""

    @abstractmethod
    def validate(self, model: nn.Module, loader: Iterable[Batch], meta: dict[str, Any]) -> dict[str, float]:
        """Validation metrics; must include `self.metric`. Runs under `torch.no_grad()`; the
        loader's batches are already on the model's device."""

    def collate(self, items: list[Any]) -> Batch:
        """Builds a batch from dataset items; text domains pad to the batch's longest text."""
        batch: Batch = default_collate(items)
        return batch

    def save_extras(self, model_dir: Path, meta: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Writes files beyond weights/config/meta that a predictor needs (a tokenizer, say)."""

    @abstractmethod
    def search_space(self) -> dict[str, SearchParam]:
        """The hyperparameters `cityserve tune` sweeps by default, with their ranges."""

    # ---- serving and evaluation --------------------------------------------------------------
    def optimize(self, model_dir: Path, data_dir: Path) -> dict[str, Any] | None:
        """Makes a version's optimised inference artifacts in its `model_dir` and measures them on
        the test split under `data_dir` (the registry record's `inference` entry); None: the
        domain serves its PyTorch model as it is."""
        return None

    # ---- monitoring --------------------------------------------------------------------------
    def masked(self, item: dict[str, Any]) -> dict[str, Any]:
        """`item` with the personal data in its free-text fields masked (`core.pii`), as it is stored."""
        from core import pii

        return {k: pii.mask(v) if k in self.text_fields and isinstance(v, str) else v for k, v in item.items()}

    @abstractmethod
    def features(self, item: dict[str, Any], answer: dict[str, Any]) -> dict[str, Feature]:
        """What drift is measured on, of one request item and its answer (both as JSON): numbers
        and categories, the same at registration and live (`domains.drift`)."""

    @abstractmethod
    def score(self, answers: Sequence[dict[str, Any]], truths: Sequence[dict[str, Any]]) -> dict[str, float]:
        """The quality of answers (JSON) against what happened (`truth_model` JSON), pair by pair:
        at registration on the validation split, live on feedback. Includes `quality_metric`
        unless nothing could be scored (a forecast's truth without a known value): then empty."""

    @abstractmethod
    def cases(self, model_dir: Path, data_dir: Path, split: str = "valid"
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Request items of a split ("valid" or "test"; at most `REFERENCE_CASES`, spread over it)
        for the version in `model_dir` (a forecaster's sensors or series), and their truths, as a
        tenant would send them and report them back."""

    def answers(self, predictor: Predictor, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """`predictor`'s answers (JSON) to request items (JSON), in batches of `REFERENCE_BATCH`."""
        out = []
        for start in range(0, len(items), REFERENCE_BATCH):
            batch = [self.request_model.model_validate(i) for i in items[start:start + REFERENCE_BATCH]]
            out += [a.model_dump(mode="json", exclude_none=True) for a in predictor.predict(batch)]
        return out

    def feedback_rows(self, train: pd.DataFrame, items: Sequence[dict[str, Any]], truths: Sequence[dict[str, Any]]
                      ) -> pd.DataFrame | None:
        """Rows to add to the training split `train` (`cityserve retrain`), made of the masked items
        tenants sent and what really happened; None where feedback cannot join the training data
        (a forecaster learns from continuous series, not from single windows), so it only judges
        the retrained model."""
        return None

    def reference(self, model_dir: Path, data_dir: Path) -> dict[str, Any]:
        """The version's reference (`domains.drift`): its validation cases answered as the
        version serves (calibrated, on its default backend), their features' bins and the quality
        `score` gives them; saved in `model_dir`, returned for the record."""
        from domains.drift import fit, save_reference

        items, truths = self.cases(model_dir, data_dir)
        answers = self.answers(self.load_predictor(model_dir, ""), items)
        # Features of the items as the sample log keeps them, masked: a text's length is measured
        # the same way live and here.
        rows = [self.features(self.masked(i), a) for i, a in zip(items, answers, strict=True)]
        return save_reference(model_dir, {"items": len(items), "features": fit(rows),
                                        "quality": self.score(answers, truths)})

    def calibrate(self, model_dir: Path, data_dir: Path) -> dict[str, Any] | None:
        """Fits, on the validation split under `data_dir`, how the version in `model_dir` turns its
        outputs into the confidence it answers with (a classifier's temperature, a forecaster's
        interval widths), saves it in `model_dir` (`domains.calibration.CALIBRATION_FILE`, which
        `load_predictor` applies) and returns it for the registry record; None: nothing to fit.
        Runs after `optimize`, so each optimised artifact is fitted as it serves."""
        return None

    @abstractmethod
    def load_predictor(self, model_dir: Path, version: str, device: str = "cpu", backend: str = "auto") -> Predictor:
        """Loads a model directory (weights, config, meta, extras) for inference on `device` with
        one of the domain's `backends`."""

    @abstractmethod
    def evaluate(self, predictor: Predictor, data_dir: Path, figure: Path) -> Evaluation:
        """Scores the model and the domain's baselines on the held-out test split, draws `figure`."""

    # ---- shared helpers ----------------------------------------------------------------------
    def load_model_files(self, model_dir: Path) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
        """Rebuilds the model from a model directory: (module in eval mode, config, meta)."""
        config = json.loads((model_dir / CONFIG_FILE).read_text())
        meta = json.loads((model_dir / META_FILE).read_text())
        model = self.build_model({**config, "pretrained": False}, meta)
        state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        return model, config, meta
