"""Evaluates a registered version on its domain's test split and writes `reports/DOMAIN.json` + PNG.

The reports folder is a local path or a URI (`s3://bucket/reports`). The JSON has the fixed shape
of the project's `report` result schema, so scripts can read and check it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.errors import RegistryError
from core.storage import Location
from domains.base import Domain, Evaluation
from training.registry import Version, code_revision
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
        "commit": code_revision(),
        "data": {"manifest_sha256": data.get("manifest_sha256", ""), "sources": list(data.get("sources", []))},
        "backend": evaluation.backend,
        "metrics": [row.as_json() for row in evaluation.rows],
        **({"calibration": evaluation.calibration} if evaluation.calibration else {}),
        **({"explained": evaluation.explained} if evaluation.explained else {}),
    }


def evaluate(domain: Domain, workspace: Workspace, ref: str = "production",
             out_dir: str | os.PathLike[str] | None = None, sweep_ref: str | None = None
             ) -> tuple[dict[str, Any], Evaluation]:
    """Scores version `ref` (id or alias) of a domain; writes the report and its figure to `out_dir`
    (a local folder or a URI; default: the settings' `reports_dir`).

    `sweep_ref` names a version registered by `cityserve tune`: it is scored the same way and
    reported under the report's `sweep` key, next to the model it would replace.

    Returns:
        The report written and the domain's evaluation of `ref` (rows, notes, and the figure's path
        when the report folder is local; None when it went to an object store).
    """
    registry = workspace.registry
    version = registry.get(domain.name, ref)
    swept = registry.get(domain.name, sweep_ref) if sweep_ref else None
    if swept is not None and "sweep" not in swept.record.get("lineage", {}):
        raise RegistryError(f"{domain.name} {swept.version} was not registered by a sweep (`cityserve tune`)")
    out = Location.of(out_dir if out_dir is not None else workspace.settings.reports_dir)
    if out.local:
        Path(out.path).mkdir(parents=True, exist_ok=True)
    evaluation = _score(domain, workspace, version, out.join(f"{domain.name}.png"))
    report = build_report(domain, version, evaluation)
    if swept is not None:
        swept_rows = _score(domain, workspace, swept, out.join(f"{domain.name}_sweep.png")).rows
        report["sweep"] = {"sweep_id": swept.record["lineage"]["sweep"], "version": swept.version,
                           "metrics": [row.as_json() for row in swept_rows]}
    out.join(f"{domain.name}.json").write_json(report)
    return report, evaluation


def _score(domain: Domain, workspace: Workspace, version: Version, figure: Location) -> Evaluation:
    predictor = workspace.registry.load_predictor(domain, version.version)
    with _drawing(figure) as path:
        evaluation = domain.evaluate(predictor, workspace.data_dir_of(version), path)
    evaluation.backend = predictor.backend
    if not figure.local:  # the local file it drew is gone; the figure is at `figure` in the store
        evaluation.figure = None
    return evaluation


@contextlib.contextmanager
def _drawing(figure: Location) -> Iterator[Path]:
    """A local path for the domain to draw on: `figure` itself when local, else a temporary file
    uploaded to `figure` when the block ends (if the domain drew one)."""
    if figure.local:
        yield Path(figure.path)
        return
    with tempfile.TemporaryDirectory(prefix="cityserve-") as tmp:
        path = Path(tmp) / figure.name
        yield path
        if path.exists():
            figure.upload_file(path)
