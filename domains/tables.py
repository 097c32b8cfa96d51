"""Data preparation shared by every domain: user-file validation, atomic Parquet splits, manifests.

A domain's prepared data lives in `DATA_DIR/<domain>/`: one Parquet file per split and a
`manifest.json` naming sources, rows, time ranges and checksums. The directory is written
beside its final place and renamed into it, so a crash never leaves a half-prepared domain.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core import pii
from core.errors import DataError
from core.io import sha256_file

MANIFEST = "manifest.json"
Kind = Literal["float", "int", "str", "datetime", "bool"]


def read_user_file(path: Path) -> pd.DataFrame:
    """Reads a user's CSV or Parquet file; refuses unreadable or empty ones by name."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "no such file")
    try:
        if path.suffix.lower() in {".parquet", ".pq"}:
            frame = pq.read_table(path).to_pandas()
        elif path.suffix.lower() == ".csv":
            frame = pd.read_csv(path)
        else:
            raise DataError(str(path), "expected a .csv or .parquet file")
    except DataError:
        raise
    except (pa.ArrowInvalid, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(str(path), f"cannot be read: {exc}") from exc
    if frame.empty:
        raise DataError(str(path), "the file has no rows")
    return frame


def validate_frame(
    frame: pd.DataFrame,
    path: str,
    columns: Mapping[str, Kind],
    *,
    nullable: Sequence[str] = (),
    time_column: str | None = None,
    group_by: str | None = None,
) -> pd.DataFrame:
    """Checks a frame against a column contract and returns it with columns coerced to their kinds.

    Refuses, naming file, column and first bad row: an empty frame, a missing column, a value of
    the wrong type, a NaN/empty value in a column not listed in `nullable`, and timestamps that do
    not strictly increase (within each `group_by` group where given).
    """
    if frame.empty:
        raise DataError(path, "the file has no rows")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; expected {list(columns)}", column=missing[0])
    out = frame.loc[:, list(columns)].reset_index(drop=True).copy()
    for col, kind in columns.items():
        raw = out[col]
        if kind == "str":
            coerced = raw.astype("string")
            bad_type = raw.notna() & ~raw.map(lambda v: isinstance(v, str))
        elif kind == "datetime":
            coerced = pd.to_datetime(raw, errors="coerce")
            bad_type = raw.notna() & coerced.isna()
        elif kind == "bool":
            mapped = raw.map(lambda v: v if isinstance(v, bool | np.bool_) else _BOOL_WORDS.get(str(v).lower()))
            bad_type = raw.notna() & mapped.isna()
            coerced = mapped
        else:
            coerced = pd.to_numeric(raw, errors="coerce")
            bad_type = raw.notna() & coerced.isna()
            if kind == "int" and not bad_type.any():
                bad_type = coerced.notna() & (coerced != np.round(coerced))
        if bad_type.any():
            row = int(np.flatnonzero(bad_type.to_numpy())[0])
            raise DataError(path, f"value {raw.iloc[row]!r} is not {kind}", column=col, row=row)
        nulls = coerced.isna()
        if kind == "float":
            nulls |= ~np.isfinite(coerced.fillna(0).to_numpy(dtype=float))
        if col not in nullable and nulls.any():
            row = int(np.flatnonzero(nulls.to_numpy())[0])
            raise DataError(path, "missing or non-finite value where one is required", column=col, row=row)
        out[col] = coerced.astype("Int64") if kind == "int" and col in nullable else coerced
        if kind == "int" and col not in nullable:
            out[col] = coerced.astype("int64")
    if time_column is not None:
        keys = out[group_by] if group_by else pd.Series(0, index=out.index)
        times = out[time_column]
        for _, idx in keys.groupby(keys, sort=False).groups.items():
            t = times.loc[idx]
            step_ok = t.diff().iloc[1:] > pd.Timedelta(0)
            if not step_ok.all():
                row = int(step_ok.index[~step_ok.to_numpy()][0])
                raise DataError(
                    path, f"timestamps must strictly increase (got {t.loc[row]} after an equal or later one)",
                    column=time_column, row=row,
                )
    return out


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def _time_range(frame: pd.DataFrame) -> list[str] | None:
    for col in ("timestamp", "time"):
        if col in frame.columns and len(frame):
            return [str(frame[col].min()), str(frame[col].max())]
    return None


def masked_in(frames: Iterable[pd.DataFrame]) -> dict[str, int]:
    """Masks personal data in the `text` column of each frame, in place (`core.pii`: a user's own
    texts are masked before anything is written); returns the spans masked per type."""
    total: Counter[str] = Counter()
    for frame in frames:
        frame["text"], counts = pii.mask_all(frame["text"].tolist())
        total.update(counts)
    return dict(total)


def write_splits(
    data_dir: Path,
    domain: str,
    splits: Mapping[str, pd.DataFrame],
    *,
    sources: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    extra_files: Mapping[str, pd.DataFrame] | None = None,
) -> dict[str, Any]:
    """Writes each split (and any extra tables) as Parquet plus `manifest.json`, atomically.

    Returns the manifest. Its `sha256` covers every file's checksum, so two preparations of the
    same data give the same value: it is what a registry version records as its data lineage.
    """
    final = Path(data_dir) / domain
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{domain}-", dir=final.parent))
    try:
        files: dict[str, Any] = {}
        tables = {**{f"split:{k}": v for k, v in splits.items()}, **(extra_files or {})}
        for key, frame in tables.items():
            name = key.removeprefix("split:")
            fname = f"{name}.parquet"
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp / fname)
            files[name] = {
                "path": fname,
                "rows": len(frame),
                "sha256": sha256_file(tmp / fname),
                "time_range": _time_range(frame),
                "split": key.startswith("split:"),
            }
        digest = hashlib.sha256(
            json.dumps({k: v["sha256"] for k, v in sorted(files.items())}, sort_keys=True).encode()
        ).hexdigest()
        manifest = {
            "domain": domain,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "sources": list(sources),
            "files": files,
            "sha256": digest,
            **dict(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        old = final.with_name(f".{domain}-old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def with_rows(base_dir: Path, data_dir: Path, domain: str, rows: pd.DataFrame, *, source: str,
              extra: Mapping[str, Any]) -> dict[str, Any]:
    """Writes under `data_dir` a copy of the data prepared under `base_dir` with `rows` added to its
    training split (valid, test and extra tables unchanged); the manifest keeps the base's
    entries, adds `source` to its sources and `extra` to its keys. Returns it."""
    manifest = read_manifest(base_dir, domain)
    tables = {name: load_table(base_dir, domain, name) for name in manifest["files"]}
    splits = {name: frame for name, frame in tables.items() if manifest["files"][name]["split"]}
    splits["train"] = pd.concat([splits["train"], rows[list(splits["train"].columns)]], ignore_index=True)
    kept = {k: v for k, v in manifest.items() if k not in ("domain", "created", "sources", "files", "sha256")}
    return write_splits(data_dir, domain, splits, sources=[*manifest["sources"], source], extra={**kept, **extra},
                        extra_files={name: frame for name, frame in tables.items() if name not in splits})


def read_manifest(data_dir: Path, domain: str) -> dict[str, Any]:
    path = Path(data_dir) / domain / MANIFEST
    if not path.is_file():
        raise DataError(str(path), f"no prepared data; run `cityserve data prepare {domain}` first")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def load_table(data_dir: Path, domain: str, name: str) -> pd.DataFrame:
    """Loads one prepared split or extra table (pyarrow directly: faster than Ray Data for this size)."""
    manifest = read_manifest(data_dir, domain)
    if name not in manifest["files"]:
        raise DataError(str(Path(data_dir) / domain), f"no table {name!r}; have {sorted(manifest['files'])}")
    return pq.read_table(Path(data_dir) / domain / manifest["files"][name]["path"]).to_pandas()
