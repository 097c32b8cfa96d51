"""The shared result schemas (`../shared/schemas/`), which sit beside the project on developer
machines and in CI. Elsewhere the schema check is left out and the rest of each test still runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"


def validate(name: str, document: dict[str, Any]) -> None:
    """Raises `jsonschema.ValidationError` when `document` breaks NAME.schema.json."""
    path = SCHEMAS / f"{name}.schema.json"
    if path.is_file():
        jsonschema.validate(document, json.loads(path.read_text()))


def validate_report(report: dict[str, Any]) -> None:
    validate("report", report)
