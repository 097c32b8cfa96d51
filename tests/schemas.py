"""The shared result schemas, which CI and developer machines lay beside the project (`SCHEMAS`).
machines and in CI. Where the folder is missing a schema check is skipped, saying so; under
`CI=true` it fails instead, so CI can never pass a check it did not make."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"


def schema(name: str) -> dict[str, Any]:
    """NAME.schema.json; skips the test (fails it under CI=true) when the file is missing."""
    path = SCHEMAS / f"{name}.schema.json"
    if not path.is_file():
        message = f"no result schema {path}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}: CI must check result files against their schema")
        pytest.skip(message)
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def validate(name: str, document: dict[str, Any]) -> None:
    """Raises `jsonschema.ValidationError` when `document` breaks NAME.schema.json."""
    jsonschema.validate(document, schema(name))


def validate_report(report: dict[str, Any]) -> None:
    validate("report", report)
