"""The chart against checkov's Kubernetes policies, pod templates included (`bench.reliability.chart_policy`,
which the reliability suite runs as `chart_policy`).

checkov comes from `make` (`.venv/checkov/bin/checkov`, a venv of its own). Where it is missing the tests
skip, saying so; under `CI=true` they fail instead, so CI can never pass a check it did not make.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from bench.reliability.chart_policy import CHART, SKIPS, PolicyResult, chart_policy, find_checkov


@pytest.fixture(scope="module")
def checkov() -> Path:
    try:
        return find_checkov()
    except FileNotFoundError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{exc}: CI must run the chart's policy check")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def every_ci_file(checkov: Path) -> PolicyResult:
    return chart_policy(checkov=checkov)


def test_no_failed_check_over_every_ci_values_file(every_ci_file: PolicyResult) -> None:
    result = every_ci_file
    assert result.files == sorted(p.name for p in (CHART / "ci").glob("*.yaml"))
    # The RayService's and RayJobs' groups of the four files: checkov read inside the custom resources.
    assert result.pod_templates == 22
    assert result.passed > 0
    assert not result.failed, "\n".join(map(str, result.failed))


def test_every_skip_is_used_and_says_why(every_ci_file: PolicyResult) -> None:
    """A skip that matches nothing any more is a stale excuse: remove it."""
    used = {f.check for f in every_ci_file.skipped}
    assert used == {s.check for s in SKIPS}
    assert all(len(s.why) > 40 for s in SKIPS)
    # The env-var Secret is excused on serving pods only: jobs carry no ledger URL at all.
    assert all("train" not in f.resource and "tune" not in f.resource
               for f in every_ci_file.skipped if f.check == "CKV_K8S_35")


def test_k8s_job_mode_submitters_pass_too(checkov: Path) -> None:
    """K8sJobMode adds a submitter pod to each RayJob (three in all-on-values): checkov reads it too."""
    result = chart_policy([CHART / "ci" / "all-on-values.yaml"], ["jobs.submissionMode=K8sJobMode"], checkov=checkov)
    assert result.pod_templates == 14 + 3
    assert not result.failed, "\n".join(map(str, result.failed))


def test_a_weakened_pod_fails(checkov: Path) -> None:
    """The check can fail: a writable root filesystem and privilege escalation are caught in the pods
    extracted from the RayService, which checkov would not read on its own."""
    result = chart_policy([CHART / "ci" / "sqlite-values.yaml"], ["securityContext.readOnlyRootFilesystem=false",
                                                                  "securityContext.allowPrivilegeEscalation=true"],
                          checkov=checkov)
    failed = {(f.check, f.resource) for f in result.failed}
    assert failed == {(check, f"Pod.city.cityserve-{group}") for check in ("CKV_K8S_20", "CKV_K8S_22")
                      for group in ("head", "cpu")}


def test_the_image_is_pinned_by_digest_and_runs_as_non_root() -> None:
    """The Dockerfile's base is named by digest (a build argument, so the build stops without one) and
    its user is the chart's runAsUser, numerically (the kubelet checks runAsNonRoot only on a number)."""
    lines = [line.strip() for line in (CHART.parent / "Dockerfile").read_text().splitlines()]
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms and all(re.fullmatch(r"FROM \S+:\$\{RAY_TAG\}@(\$\{RAY_DIGEST\}|sha256:[0-9a-f]{64})", f)
                         for f in froms), froms
    assert "ARG RAY_DIGEST" in lines
    (user,) = [line for line in lines if line.startswith("USER ")]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert user == f"USER {values['runAsUser']}:{values['runAsGroup']}"
