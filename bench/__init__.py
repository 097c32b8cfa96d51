"""Benchmarks. Each writes `bench/results/NAME.json` in the shape its result schema fixes (scripts read them)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from core.io import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """`git rev-parse HEAD` of the code that ran: a result file's `commit`."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent, check=True)
    return out.stdout.strip()


def save_row(name: str, row: dict[str, Any]) -> Path:
    """Replaces the row of `row["domain"]` in results/NAME (others kept: domains are measured one
    at a time), stamping the commit and the load average it was measured under; returns the file."""
    path = RESULTS / name
    row = {**row, "commit": git_commit(), "load_average": round(os.getloadavg()[0], 2)}
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = sorted([r for r in rows if r["domain"] != row["domain"]] + [row], key=lambda r: str(r["domain"]))
    write_json_atomic(path, {"rows": rows})
    return path
