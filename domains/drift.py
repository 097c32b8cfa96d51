"""A version's reference, and how far live traffic has moved from it.

At registration each version answers its validation split as it will serve (`Domain.reference`):
the distribution of each of the domain's features of a request and its answer
(`Domain.features`: the class answered, the confidence, a text's length, a forecast's level...)
and the quality of those answers against the split's truth (`Domain.score`, the same function
that scores live feedback). Both are saved beside the weights as `REFERENCE_FILE`, and summed up
in the version's record as `reference` (its `profile` is the training profile: smoke, quick, full).

Live, the same features of the sampled requests are binned the same way and compared with the
population-stability index, PSI = Σ (live − reference) · ln(live / reference) over the bins:
under 0.1 the usual reading is "no shift", 0.1–0.25 "some", over 0.25 "a shift worth acting on".
A numeric feature is cut at the reference's deciles (10 bins of equal reference share); a
categorical one has a bin per category seen in the reference and one for everything else.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_FILE = "reference.json"
BINS = 10
# A bin no reference (or live) value fell in counts as this share: PSI's logarithm needs both > 0.
FLOOR = 1e-4
OTHER = "(other)"  # the bin of categories the reference never saw
# Drift readings (the usual PSI bands) and the least live items a reading is made from: fewer
# give a PSI that is mostly noise.
SOME_SHIFT, SHIFT = 0.1, 0.25
MIN_ITEMS = 50

Feature = float | str | None


def fit(rows: Sequence[dict[str, Feature]]) -> dict[str, dict[str, Any]]:
    """Per feature, its bins and the reference's share in each (`None` values are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({k for row in rows for k in row}):
        values = [row[name] for row in rows if row.get(name) is not None]
        if not values:
            continue
        if isinstance(values[0], str):
            counts = Counter(str(v) for v in values)
            out[name] = {"kind": "categorical", "shares": {k: n / len(values) for k, n in sorted(counts.items())}}
        else:
            numbers = np.asarray(values, dtype=float)
            edges = np.unique(np.quantile(numbers, np.linspace(0, 1, BINS + 1)[1:-1]))
            out[name] = {"kind": "numeric", "edges": edges.tolist(), "shares": _numeric_shares(edges, numbers)}
    return out


def _numeric_shares(edges: np.ndarray, numbers: np.ndarray) -> list[float]:
    counts = np.bincount(np.searchsorted(edges, numbers, side="right"), minlength=len(edges) + 1)
    return (counts / max(len(numbers), 1)).tolist()


def shares(feature: dict[str, Any], values: Sequence[Feature]) -> list[tuple[float, float]]:
    """(reference, live) share of each of the feature's bins, for live `values`."""
    present = [v for v in values if v is not None]
    if feature["kind"] == "categorical":
        ref: dict[str, float] = feature["shares"]
        counts = Counter(str(v) if str(v) in ref else OTHER for v in present)
        total = max(len(present), 1)
        return [(ref.get(k, 0.0), counts.get(k, 0) / total) for k in [*ref, OTHER]]
    live = _numeric_shares(np.asarray(feature["edges"], dtype=float), np.asarray(present, dtype=float))
    return list(zip(feature["shares"], live, strict=True))


def psi(pairs: Sequence[tuple[float, float]]) -> float:
    """The population-stability index of (reference, live) shares."""
    return float(sum((b - a) * math.log(b / a) for a, b in ((max(a, FLOOR), max(b, FLOOR)) for a, b in pairs)))


def drift(reference: dict[str, Any], rows: Sequence[dict[str, Feature]]) -> dict[str, float]:
    """Each referenced feature's PSI between the reference and live `rows` (features of live items)."""
    return {name: psi(shares(feature, [row.get(name) for row in rows]))
            for name, feature in reference["features"].items()}


def reading(value: float | None) -> str:
    """The usual words for a PSI."""
    if value is None:
        return "too few items"
    return "shift" if value > SHIFT else "some shift" if value > SOME_SHIFT else "stable"


def save_reference(model_dir: Path, reference: dict[str, Any]) -> dict[str, Any]:
    """Writes `reference` as the model directory's `REFERENCE_FILE`; returns the record's entry: the
    items it was made from and the reference quality (the bins stay in the file)."""
    (Path(model_dir) / REFERENCE_FILE).write_text(json.dumps(reference))
    return {"items": reference["items"], "quality": reference["quality"]}


def read_reference(model_dir: Path) -> dict[str, Any] | None:
    """A model directory's reference, or None for a version registered before references existed."""
    path = Path(model_dir) / REFERENCE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
