"""A missing schema folder is a skip a developer sees, and a failure in CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import schemas


@pytest.mark.parametrize(("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)])
def test_a_missing_schema_fails_under_ci_and_skips_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            ci: str, outcome: type[BaseException]) -> None:
    monkeypatch.setattr(schemas, "SCHEMAS", tmp_path)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no result schema"):
        schemas.validate("report", {})


def test_the_report_schema_is_read() -> None:
    assert "metrics" in schemas.schema("report")["properties"]
