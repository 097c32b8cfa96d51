"""Sentiment data: the VADER paper's human-rated texts, labelled with the paper's ±0.5 cut.

Source: the sdist (not the wheel) of `vaderSentiment==3.3.2` ships
`additional_resources/hutto_ICWSM_2014.tar.gz`, whose `*_GroundTruth.txt` files hold one text
per line as `id<TAB>mean rating<TAB>text`; each mean is over ≥ 20 raters on −4..+4
(Hutto & Gilbert, ICWSM 2014; MIT licence). Four subsets: tweets (4,200), nyt (5,190 New York
Times editorial sentences), amazon (3,708 review sentences), movies (10,605 review snippets).

Getting the sdist is the domain's one network step, a documented one-off:
`pip download --no-deps --no-binary :all: vaderSentiment==3.3.2` into `DATA_DIR/_cache/`,
checked against its published sha256. A user can hand the tarball over instead (`source=` a
`.tar.gz`), or bring their own texts (`source=` a CSV/Parquet with columns `text`, `rating`
(−4..4) and optionally `subset`).

Labels: rating > 0.5 positive, < −0.5 negative, otherwise neutral (the paper's cut); the
regression target `score` is rating / 4, in [−1, 1]. Splits are stratified by (subset, label),
seeded, 70/10/20 train/valid/test. Exact duplicate texts within a subset (71 in nyt, 11 in amazon,
2 in movies) are dropped, keeping the first, so no text sits in two splits.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import DataError
from core.io import sha256_file
from domains.sentiment.contract import LABELS, SUBSETS
from domains.tables import masked_in, read_user_file, validate_frame, write_splits

DOMAIN = "sentiment"
CUT = 0.5  # |mean rating| above this is polar (Hutto & Gilbert 2014, section 3)
RATING_MAX = 4.0
SPLIT_FRACTIONS = {"train": 0.7, "valid": 0.1, "test": 0.2}
SEED = 20140601

SDIST_REQUIREMENT = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
# PyPI's published sha256 of the sdist: a cached or user-given copy must be this very file.
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"
SUBSET_FILES = dict(zip(SUBSETS, (
    "tweets_GroundTruth.txt",
    "nytEditorialSnippets_GroundTruth.txt",
    "amazonReviewSnippets_GroundTruth.txt",
    "movieReviewSnippets_GroundTruth.txt",
), strict=True))
USER_SUBSET = "user"  # subset name of a user's rows that carry none
COLUMNS = ["text", "rating", "score", "label", "subset"]


def label_of(rating: np.ndarray | pd.Series) -> np.ndarray:
    """Class index (0 negative, 1 neutral, 2 positive) of mean ratings, by the ±0.5 cut."""
    r = np.asarray(rating, dtype=np.float64)
    return np.where(r > CUT, 2, np.where(r < -CUT, 0, 1)).astype(np.int64)


# ---- the packaged corpus ---------------------------------------------------------------------
def locate_sdist(data_dir: Path, given: Path | None = None) -> Path:
    """The vaderSentiment sdist: a user-given copy, the cached one, or a fresh `pip download`.

    Raises:
        DataError: the given or cached file is not the published sdist, or pip could not get it.
    """
    if given is not None:
        _check_sdist(Path(given))
        return Path(given)
    cache = Path(data_dir) / "_cache"
    cached = cache / SDIST_NAME
    if cached.is_file():
        _check_sdist(cached)
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               SDIST_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = Path(tmp) / SDIST_NAME
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DataError(
                str(cached),
                f"could not download the {SDIST_REQUIREMENT} sdist ({' '.join(tail)}); download it "
                f"elsewhere with `pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}` and "
                f"pass the .tar.gz as the source, or copy it to {cached}",
            )
        _check_sdist(got)
        shutil.move(got, cached)  # same filesystem: an atomic rename, never a half file in the cache
    return cached


def _check_sdist(path: Path) -> None:
    if not path.is_file():
        raise DataError(str(path), "no such file")
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise DataError(str(path), f"sha256 {digest} is not that of the {SDIST_REQUIREMENT} sdist ({SDIST_SHA256})")


def read_ground_truth(sdist: Path) -> pd.DataFrame:
    """Reads the four `*_GroundTruth.txt` files out of the sdist (nothing is unpacked to disk).

    Returns:
        One row per text: `text`, `rating` (mean −4..4), `subset`, in file order.
    """
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            member = next((m for m in outer.getmembers() if m.name.endswith(INNER_ARCHIVE)), None)
            if member is None:
                raise DataError(str(sdist), f"no {INNER_ARCHIVE} inside")
            inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
        frames = []
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            names = {Path(m.name).name: m for m in inner.getmembers()}
            for subset, fname in SUBSET_FILES.items():
                if fname not in names:
                    raise DataError(str(sdist), f"no {fname} in {INNER_ARCHIVE}")
                raw = inner.extractfile(names[fname]).read().decode("utf-8")  # type: ignore[union-attr]
                frames.append(_parse_ground_truth(raw, f"{sdist}:{fname}", subset))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(str(sdist), f"cannot be read as the vaderSentiment sdist: {exc}") from exc
    return pd.concat(frames, ignore_index=True)


def _parse_ground_truth(raw: str, where: str, subset: str) -> pd.DataFrame:
    # Lines end in CRLF; texts contain no tabs, so split on the first two only.
    rows = [line.split("\t", 2) for line in raw.splitlines() if line.strip()]
    for i, parts in enumerate(rows):
        if len(parts) != 3:
            raise DataError(where, f"expected id<TAB>rating<TAB>text, got {parts!r}", row=i)
    frame = pd.DataFrame({"text": [p[2] for p in rows], "rating": [p[1] for p in rows]})
    frame = _check_texts(frame, where)
    frame["subset"] = subset
    return frame


# ---- user files ------------------------------------------------------------------------------
def read_user_texts(path: Path) -> pd.DataFrame:
    """A user's CSV/Parquet with `text`, `rating` (−4..4) and an optional `subset` column."""
    frame = read_user_file(path)
    columns: dict[str, Any] = {"text": "str", "rating": "float"}
    if "subset" in frame.columns:
        columns["subset"] = "str"
    out = _check_texts(frame, str(path), columns)
    out["subset"] = out["subset"].astype(str) if "subset" in out.columns else USER_SUBSET
    return out


def _check_texts(frame: pd.DataFrame, where: str, columns: dict[str, Any] | None = None) -> pd.DataFrame:
    """Types, NaNs, blank texts and ratings outside −4..4 refused with file, column and row."""
    out = validate_frame(frame, where, columns or {"text": "str", "rating": "float"})
    blank = out["text"].str.strip() == ""
    if blank.any():
        raise DataError(where, "empty text", column="text", row=int(np.flatnonzero(blank.to_numpy())[0]))
    outside = out["rating"].abs() > RATING_MAX
    if outside.any():
        row = int(np.flatnonzero(outside.to_numpy())[0])
        raise DataError(where, f"rating {out['rating'].iloc[row]!r} is outside -4..4", column="rating", row=row)
    out["text"] = out["text"].astype(str)
    return out


# ---- the smoke set ---------------------------------------------------------------------------
_SMOKE_WORDS = {
    3.0: ["wonderful", "excellent", "delightful"],
    0.0: ["scheduled", "beige", "located downtown"],
    -3.0: ["terrible", "awful", "broken"],
}
_SMOKE_FRAMES = ["It was {}.", "What a {} day", "Reviewers called it {}"]


def smoke_texts() -> pd.DataFrame:
    """A tiny made-up corpus (27 texts per subset, no download) for tests and `--smoke-test`."""
    rows = [
        {"text": f"{frame.format(word)} ({subset} #{k})", "rating": rating, "subset": subset}
        for subset in SUBSET_FILES
        for rating, words in _SMOKE_WORDS.items()
        for k, (frame, word) in enumerate((f, w) for f in _SMOKE_FRAMES for w in words)
    ]
    return pd.DataFrame(rows)


# ---- preparation -----------------------------------------------------------------------------
def split_stratified(frame: pd.DataFrame, seed: int = SEED) -> dict[str, pd.DataFrame]:
    """Seeded train/valid/test split within each (subset, label) group, 70/10/20.

    Each group is shuffled and cut at rounded fractions, so every subset keeps its class mix in
    every split; a group too small for a valid/test share gives it to train.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLIT_FRACTIONS}
    for _, group in frame.groupby(["subset", "label"], sort=True):
        idx = rng.permutation(len(group))
        n_test = round(len(group) * SPLIT_FRACTIONS["test"])
        n_valid = round(len(group) * SPLIT_FRACTIONS["valid"])
        parts["test"].append(group.iloc[idx[:n_test]])
        parts["valid"].append(group.iloc[idx[n_test : n_test + n_valid]])
        parts["train"].append(group.iloc[idx[n_test + n_valid :]])
    # Back to corpus order inside each split: reproducible files, no hidden ordering signal.
    return {name: pd.concat(p).sort_index().reset_index(drop=True)[COLUMNS] for name, p in parts.items()}


def prepare(data_dir: Path, *, source: Path | None = None, smoke: bool = False, mask: bool = True
            ) -> dict[str, Any]:
    """Writes `DATA_DIR/sentiment/{train,valid,test}.parquet` and the manifest.

    Args:
        data_dir: the data root.
        source: the vaderSentiment sdist (`.tar.gz`) to use instead of the cache or a download,
            or a user's CSV/Parquet with columns `text`, `rating` and optionally `subset`.
        smoke: the tiny made-up set of `smoke_texts` (no download).
        mask: mask personal data in a user's texts (`core.pii`) before they are written.

    Returns:
        The manifest written.
    """
    masking: dict[str, Any] = {}  # the manifest's `masked`, for a user's texts only
    if smoke:
        frame, sources = smoke_texts(), ["smoke: made-up texts (domains/sentiment/data.py)"]
    elif source is not None and not str(source).endswith((".tar.gz", ".tgz")):
        frame, sources = read_user_texts(Path(source)), [str(source)]
        masking = {"masked": masked_in([frame]) if mask else None}
    else:
        sdist = locate_sdist(data_dir, Path(source) if source is not None else None)
        frame = read_ground_truth(sdist)
        sources = [f"{SDIST_REQUIREMENT} sdist ({SDIST_NAME}, sha256 {SDIST_SHA256}): {INNER_ARCHIVE}"]
    before = len(frame)
    frame = frame.drop_duplicates(["subset", "text"], keep="first").copy()
    frame["score"] = (frame["rating"] / RATING_MAX).astype(np.float32)
    frame["label"] = label_of(frame["rating"])
    splits = split_stratified(frame)
    counts = {
        subset: {LABELS[k]: int(n) for k, n in group["label"].value_counts().sort_index().items()}
        for subset, group in frame.groupby("subset")
    }
    return write_splits(
        data_dir, DOMAIN, splits, sources=sources,
        extra={
            "labels": list(LABELS), "cut": CUT, "split_seed": SEED, "split_fractions": SPLIT_FRACTIONS,
            "duplicates_dropped": before - len(frame), "class_counts": counts,
            **masking,
        },
    )
