"""The prepared-data layout (`domains.tables`): bad user files are refused naming file, column and
first bad row; splits and manifests are written atomically and checksummed deterministically."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from core.errors import DataError
from domains.tables import Kind, load_table, read_manifest, read_user_file, validate_frame, write_splits

COLUMNS: dict[str, Kind] = {"timestamp": "datetime", "value": "float", "sensor": "str"}


def frame(**changes: list[object]) -> pd.DataFrame:
    base: dict[str, list[object]] = {
        "timestamp": ["2024-01-01 00:00", "2024-01-01 00:15", "2024-01-01 00:30"],
        "value": [1.0, 2.0, 3.0],
        "sensor": ["a", "a", "a"],
    }
    return pd.DataFrame({**base, **changes})


def test_good_frame_is_coerced() -> None:
    out = validate_frame(frame(), "f.csv", COLUMNS, time_column="timestamp")
    assert str(out["timestamp"].dtype).startswith("datetime64")
    assert out["value"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("changes", "column", "row", "words"),
    [
        ({"value": [1.0, "abc", 3.0]}, "value", 1, "not float"),
        ({"value": [1.0, 2.0, float("nan")]}, "value", 2, "missing"),
        ({"value": [1.0, float("inf"), 2.0]}, "value", 1, "non-finite"),
        ({"timestamp": ["2024-01-01 00:00", "2024-01-01 00:30", "2024-01-01 00:15"]}, "timestamp", 2, "increase"),
        ({"timestamp": ["2024-01-01 00:00", "not a time", "2024-01-01 00:15"]}, "timestamp", 1, "not datetime"),
    ],
)
def test_bad_values_name_column_and_row(changes: dict[str, list[object]], column: str, row: int,
                                        words: str) -> None:
    with pytest.raises(DataError, match=words) as info:
        validate_frame(frame(**changes), "f.csv", COLUMNS, time_column="timestamp")
    assert (info.value.path, info.value.column, info.value.row) == ("f.csv", column, row)
    assert f"column '{column}', row {row}" in info.value.message


def test_missing_column_and_empty_frame() -> None:
    with pytest.raises(DataError, match="missing column") as info:
        validate_frame(frame().drop(columns="sensor"), "f.csv", COLUMNS)
    assert info.value.column == "sensor"
    with pytest.raises(DataError, match="no rows"):
        validate_frame(frame().iloc[:0], "f.csv", COLUMNS)


def test_timestamps_checked_per_group() -> None:
    two = pd.DataFrame({"timestamp": ["2024-01-01 00:00", "2024-01-01 00:15"] * 2, "value": [1.0] * 4,
                        "sensor": ["a", "a", "b", "b"]})
    assert len(validate_frame(two, "f", COLUMNS, time_column="timestamp", group_by="sensor")) == 4


def test_read_user_file_refuses_unknown_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_user_file(tmp_path / "absent.csv")
    (tmp_path / "x.txt").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"\.csv or \.parquet"):
        read_user_file(tmp_path / "x.txt")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="cannot be read"):
        read_user_file(tmp_path / "empty.csv")


def test_write_splits_manifest_and_checksum_are_deterministic(tmp_path: Path) -> None:
    splits = {"train": frame(), "test": frame()}
    first = write_splits(tmp_path, "demo", splits, sources=["unit"])
    second = write_splits(tmp_path, "demo", splits, sources=["unit"])
    assert first["sha256"] == second["sha256"]
    assert read_manifest(tmp_path, "demo")["files"]["train"]["rows"] == 3
    assert load_table(tmp_path, "demo", "test").shape == (3, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folders left


def test_failed_write_leaves_previous_data_intact(tmp_path: Path) -> None:
    write_splits(tmp_path, "demo", {"train": frame()}, sources=["unit"])
    before = read_manifest(tmp_path, "demo")["sha256"]

    bad = pd.DataFrame({"x": [object()]})  # pyarrow cannot convert a bare object
    with pytest.raises(Exception):  # noqa: B017 - whatever pyarrow raises, nothing partial may remain
        write_splits(tmp_path, "demo", {"train": frame(), "test": bad}, sources=["unit"])
    assert read_manifest(tmp_path, "demo")["sha256"] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
