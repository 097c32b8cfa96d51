"""Files written whole or not at all: a reader (or a crash) never sees half of one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed onto `path` when the block ends, removed
    if it raises. The rename is atomic on one filesystem, hence "beside"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; what we write is read by other processes and users
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: Path, payload: Any, *, default: Any = None) -> None:
    """Writes JSON (no NaN/Infinity: they are not JSON) with a final newline, atomically.

    Args:
        path: the file.
        payload: anything `json.dumps` takes.
        default: as json's `default` (e.g. `str` for paths and datetimes).
    """
    text = json.dumps(payload, indent=2, allow_nan=False, default=default) + "\n"
    write_bytes_atomic(path, text.encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
