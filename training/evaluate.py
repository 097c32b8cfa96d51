"""Evaluates a registered version on its domain's test split and writes `reports/DOMAIN.json` + PNG.

The JSON has the fixed shape of the project's `report` result schema, so scripts can read and check it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import RegistryError
from core.io import write_json_atomic
from domains.base import Domain, Evaluation
from training.registry import Version
from training.workspace import Workspace


def reproduce_command(domain: Domain, version: Version) -> str:
    """The command that rebuilds this report from a fresh checkout."""
    profile = version.record.get("profile", "quick")
    flags = domain.full_data_flags if profile == "full" else ""
    return (f"make venv && .venv/bin/cityserve data prepare {domain.name} {flags}".rstrip()
            + f" && .venv/bin/cityserve train {domain.name} --profile {profile} --promote"
            f" && .venv/bin/cityserve evaluate {domain.name}")


def build_report(domain: Domain, version: Version, evaluation: Evaluation) -> dict[str, Any]:
    data = version.record.get("data", {})
    return {
        "domain": version.domain,
        "version": version.version,
        "profile": "full" if version.record.get("profile") == "full" else "quick",
        "command": reproduce_command(domain, version),
        "data": {"manifest_sha256": data.get("manifest_sha256", ""), "sources": list(data.get("sources", []))},
        "metrics": [row.as_json() for row in evaluation.rows],
    }


def evaluate(domain: Domain, workspace: Workspace, ref: str = "production", out_dir: Path | None = None,
             sweep_ref: str | None = None) -> tuple[dict[str, Any], Evaluation]:
    """Scores version `ref` (id or alias) of a domain; writes the report and its figure.

    `sweep_ref` names a version registered by `cityserve tune`: it is scored the same way and
    reported under the report's `sweep` key, next to the model it would replace.

    Returns:
        The report written and the domain's evaluation of `ref` (rows, figure path, notes).
    """
    registry = workspace.registry
    version = registry.get(domain.name, ref)
    swept = registry.get(domain.name, sweep_ref) if sweep_ref else None
    if swept is not None and "sweep" not in swept.record.get("lineage", {}):
        raise RegistryError(f"{domain.name} {swept.version} was not registered by a sweep (`cityserve tune`)")
    out_dir = out_dir or workspace.settings.reports_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation = _score(domain, workspace, version, out_dir / f"{domain.name}.png")
    report = build_report(domain, version, evaluation)
    if swept is not None:
        swept_rows = _score(domain, workspace, swept, out_dir / f"{domain.name}_sweep.png").rows
        report["sweep"] = {"sweep_id": swept.record["lineage"]["sweep"], "version": swept.version,
                           "metrics": [row.as_json() for row in swept_rows]}
    write_json_atomic(out_dir / f"{domain.name}.json", report)
    return report, evaluation


def _score(domain: Domain, workspace: Workspace, version: Version, figure: Path) -> Evaluation:
    data_dir = Path(version.record.get("config", {}).get("data_dir", workspace.settings.data_dir))
    return domain.evaluate(workspace.registry.load_predictor(domain, version.version), data_dir, figure)
