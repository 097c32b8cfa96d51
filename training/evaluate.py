"""Evaluates a registered version on its domain's test split and writes `reports/DOMAIN.json` + PNG.

The JSON follows `shared/schemas/report.schema.json`, so scripts can read and check it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cityserve.config import Settings
from domains import get_domain
from domains.base import Evaluation
from domains.errors import RegistryError
from training.registry import Registry, Version


def reproduce_command(version: Version) -> str:
    """The command that rebuilds this report from a fresh checkout."""
    domain, profile = version.domain, version.record.get("profile", "quick")
    flags = get_domain(domain).full_data_flags if profile == "full" else ""
    return (f"make venv && .venv/bin/cityserve data prepare {domain} {flags}".rstrip()
            + f" && .venv/bin/cityserve train {domain} --profile {profile} --promote"
            f" && .venv/bin/cityserve evaluate {domain}")


def build_report(version: Version, evaluation: Evaluation) -> dict[str, Any]:
    data = version.record.get("data", {})
    return {
        "domain": version.domain,
        "version": version.version,
        "profile": "full" if version.record.get("profile") == "full" else "quick",
        "command": reproduce_command(version),
        "data": {"manifest_sha256": data.get("manifest_sha256", ""), "sources": list(data.get("sources", []))},
        "metrics": [row.as_json() for row in evaluation.rows],
    }


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Writes JSON (no NaN/Infinity: they are not JSON) through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate(domain_name: str, settings: Settings, ref: str = "production", out_dir: Path | None = None,
             sweep_ref: str | None = None) -> tuple[dict[str, Any], Evaluation]:
    """Scores version `ref` (id or alias) of a domain; writes the report and its figure.

    `sweep_ref` names a version registered by `cityserve tune`: it is scored the same way and
    reported under the report's `sweep` key, next to the model it would replace.

    Returns:
        The report written and the domain's evaluation of `ref` (rows, figure path, notes).
    """
    registry = Registry(settings.registry_location())
    version = registry.get(domain_name, ref)
    swept = registry.get(domain_name, sweep_ref) if sweep_ref else None
    if swept is not None and "sweep" not in swept.record.get("lineage", {}):
        raise RegistryError(f"{domain_name} {swept.version} was not registered by a sweep (`cityserve tune`)")
    out_dir = out_dir or settings.reports_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation = _score(registry, version, settings, out_dir / f"{domain_name}.png")
    report = build_report(version, evaluation)
    if swept is not None:
        swept_rows = _score(registry, swept, settings, out_dir / f"{domain_name}_sweep.png").rows
        report["sweep"] = {"sweep_id": swept.record["lineage"]["sweep"], "version": swept.version,
                           "metrics": [row.as_json() for row in swept_rows]}
    write_json_atomic(out_dir / f"{domain_name}.json", report)
    return report, evaluation


def _score(registry: Registry, version: Version, settings: Settings, figure: Path) -> Evaluation:
    domain = get_domain(version.domain)
    data_dir = Path(version.record.get("config", {}).get("data_dir", settings.data_dir))
    return domain.evaluate(registry.load_predictor(domain, version.version), data_dir, figure)
