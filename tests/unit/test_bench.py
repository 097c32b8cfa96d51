"""Benchmark results files: one row per domain, replaced when that domain is measured again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench


def test_a_new_row_replaces_only_its_domains_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    bench.save_row("x.json", {"domain": "traffic", "ratio": 1.0})
    bench.save_row("x.json", {"domain": "energy", "ratio": 0.5})
    path = bench.save_row("x.json", {"domain": "traffic", "ratio": 2.0})
    rows = json.loads(path.read_text())["rows"]
    assert [(r["domain"], r["ratio"]) for r in rows] == [("energy", 0.5), ("traffic", 2.0)]
    assert all(isinstance(r["load_average"], float) for r in rows)
