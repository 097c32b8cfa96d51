"""Usage rows the ledger could not take, kept on local disk until it can.

While the ledger's database is away, every write the admission actor tries fails; the rows of each
failed write go to one file here (written whole and synced: a crash leaves the file or nothing),
so memory holds no more than one flush interval of rows and an actor that restarts finds them.
`replay` writes them to the ledger, oldest first, once it is back; the ledger keeps a row once per
lease, so a file replayed twice (a crash between the write and the unlink) still counts each once.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from core.io import replacing
from services.tenants.records import Usage
from services.tenants.store import Store


class UsageSpill:
    """A folder of spilled usage rows, one JSON-lines file per failed ledger write."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def files(self) -> list[Path]:
        """The spilled files, oldest first (their names start with the time they were written)."""
        return sorted(self.folder.glob("*.jsonl")) if self.folder.is_dir() else []

    def write(self, rows: Sequence[Usage]) -> Path:
        """Keeps `rows` in a new file, synced to disk before it is renamed into place."""
        path = self.folder / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row.row()) + "\n" for row in rows)
            fh.flush()
            os.fsync(fh.fileno())
        directory = os.open(self.folder, os.O_RDONLY)
        try:  # the rename itself reaches the disk
            os.fsync(directory)
        finally:
            os.close(directory)
        return path

    def replay(self, store: Store) -> int:
        """Writes every spilled row to `store` and removes its file; stops at the first failure
        (the rows stay on disk). Returns how many rows were written."""
        written = 0
        for path in self.files():
            rows = [Usage(*json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines() if line]
            store.record(rows)
            path.unlink(missing_ok=True)
            written += len(rows)
        return written

    def rows(self) -> int:
        """How many rows wait on disk."""
        return sum(len(path.read_text(encoding="utf-8").splitlines()) for path in self.files())
