"""`chart_policy`: the Helm chart against checkov's Kubernetes policies (Pod Security Standards
"restricted" and the rest), over every values file of `helm/ci/`.

checkov reads built-in kinds only: it passes over a RayService or RayJob without looking inside. So
beside what the chart renders, every pod template in it (the RayService's head and worker groups,
each RayJob's cluster and, in K8sJobMode, its submitter) is written out as a Pod, next to the
chart's NetworkPolicies, and checkov reads those too. A failed check fails `chart_policy` unless
`SKIPS` lists it, with the reason.

checkov lives in a virtual environment of its own (its pinned dependencies clash with the project's):
`make .venv/checkov/bin/checkov`. `tests/unit/test_chart_policy.py` runs this same code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.reliability import Check, command
from cluster.kube import render_chart
from core.settings import LEDGER_ENV, Settings

NAME = "chart_policy"
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm"
RELEASE, NAMESPACE = "cityserve", "city"
# A cluster that serves the PodMonitor kind, so every template the values switch on renders.
API_VERSIONS = ("monitoring.coreos.com/v1/PodMonitor",)
CHECKOV_TIMEOUT_S = 600

Doc = dict[str, Any]


def find_checkov() -> Path:
    """checkov from its own venv beside the project's (`.venv/checkov`, made by the Makefile)."""
    path = Path(sys.executable).parent.parent / "checkov" / "bin" / "checkov"
    if not path.is_file():
        raise FileNotFoundError(f"checkov is not installed at {path}: `make {path.relative_to(REPO)}` installs it")
    return path


def values_files() -> list[Path]:
    return sorted((CHART / "ci").glob("*.yaml"))


def _is_pod(doc: Doc, rendered: Sequence[Doc]) -> bool:
    return bool(doc["kind"] == "Pod")


def _runs_the_image(doc: Doc, rendered: Sequence[Doc]) -> bool:
    """A Ray pod, or the retrain schedule's CronJob (the same image and user)."""
    return _is_pod(doc, rendered) or _is_retrain_schedule(doc, rendered)


def _is_retrain_schedule(doc: Doc, rendered: Sequence[Doc]) -> bool:
    return bool(doc["kind"] == "CronJob" and doc["metadata"]["labels"].get("app.kubernetes.io/component")
                == "retrain-schedule")


def _serving_with_ledger_env(doc: Doc, rendered: Sequence[Doc]) -> bool:
    return _is_pod(doc, rendered) and any(e["name"] == LEDGER_ENV and "valueFrom" in e
                                          for c in doc["spec"]["containers"] for e in c.get("env", []))


def _policies_off(doc: Doc, rendered: Sequence[Doc]) -> bool:
    return _is_pod(doc, rendered) and not any(d["kind"] == "NetworkPolicy" for d in rendered)


@dataclass(frozen=True)
class Skip:
    """A checkov check this chart does not meet, on purpose; `where(manifest, everything rendered
    with the same values)` narrows it to some manifests."""

    check: str
    why: str
    where: Callable[[Doc, Sequence[Doc]], bool] = _is_pod


SKIPS = (
    Skip("CKV_K8S_8", "liveness probe: KubeRay gives every Ray container Ray's own liveness probe (GCS and "
                      "raylet health, Serve's proxy on serving pods); one of ours would replace it"),
    Skip("CKV_K8S_9", "readiness probe: as CKV_K8S_8, KubeRay adds Ray's readiness probe"),
    Skip("CKV_K8S_15", "pull policy Always: `image.pullPolicy` is a value (all-on-values sets Always); the default "
                       "IfNotPresent spares each pod the autoscaler adds a pull of a multi-GB image whose release tag "
                       "(or digest) never moves"),
    Skip("CKV_K8S_43", "image by digest: the digest exists only after the build, so the default names a release tag; "
                       "pin one with `image.tag: 0.1.0@sha256:...`", _runs_the_image),
    Skip("CKV_K8S_40", "uid 10000 or more: Ray's image runs as `ray`, uid 1000, which owns its home and files; the "
                       "restricted Pod Security Standard asks only for a non-root user", _runs_the_image),
    Skip("CKV_K8S_38", "a service account token mounted: the retrain schedule's pod only, which submits a RayJob "
                       "through the API server (its Role: read the RayService, create RayJobs)", _is_retrain_schedule),
    Skip("CKV_K8S_35", "a Secret as an env var: the platform reads the PostgreSQL ledger URL (password included) "
                       "from `env:CITYSERVE_LEDGER_URL`, services.config's one way for a password; serving pods "
                       "only, jobs get no ledger", _serving_with_ledger_env),
    Skip("CKV2_K8S_6", "a pod without a NetworkPolicy: only where the values switch `networkPolicy.enabled` off "
                       "(sqlite-values, for clusters whose network plugin enforces none); the default renders them",
         _policies_off),
)


# ---- what checkov reads ----------------------------------------------------------------------------
def pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """(group, pod template) of each Ray group inside a RayService or RayJob, and of a RayJob's submitter;
    none for other kinds."""
    spec = {"RayService": lambda s: s["rayClusterConfig"], "RayJob": lambda s: s["rayClusterSpec"]}.get(doc["kind"])
    if spec is None:
        return
    cluster = spec(doc["spec"])
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]
    if "submitterPodTemplate" in doc["spec"]:  # a RayJob in K8sJobMode
        yield "submitter", doc["spec"]["submitterPodTemplate"]


def placed(doc: Doc, namespace: str) -> Doc:
    """The object as `helm install -n NAMESPACE` creates it: in that namespace (the chart leaves
    `metadata.namespace` to Helm, and checkov takes a missing one for `default`)."""
    return {**doc, "metadata": {**doc["metadata"], "namespace": namespace}}


def pod_manifests(docs: Sequence[Doc], namespace: str = NAMESPACE) -> list[Doc]:
    """Each pod template the chart renders as a Pod named `<owner>-<group>`, then its NetworkPolicies."""
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {**template.get("metadata", {}), "name": f"{doc['metadata']['name']}-{group}",
                          "namespace": namespace},
             "spec": template["spec"]}
            for doc in docs for group, template in pod_templates(doc)]
    return pods + [placed(d, namespace) for d in docs if d["kind"] == "NetworkPolicy"]


# ---- running checkov -------------------------------------------------------------------------------
@dataclass
class Finding:
    """One failed checkov check on one manifest."""

    values: str
    check: str
    resource: str
    name: str
    skipped_because: str = ""

    def __str__(self) -> str:
        return f"{self.values}: {self.check} ({self.name}) on {self.resource}"


@dataclass
class PolicyResult:
    files: list[str]
    pod_templates: int
    passed: int
    failed: list[Finding] = field(default_factory=list)
    skipped: list[Finding] = field(default_factory=list)


def chart_policy(values: Sequence[Path] = (), sets: Sequence[str] = (), *,
                 checkov: Path | None = None) -> PolicyResult:
    """Renders the chart with each values file (every one of `helm/ci/` when none are given; `sets`
    apply to each), writes what it renders and its pods as Pods, runs checkov over them and sorts each
    failed check into failed or skipped (`SKIPS`). One checkov run per values file: its graph checks
    (a pod's NetworkPolicy) would otherwise match one file's pods with another file's policies."""
    checkov = checkov or find_checkov()
    values = list(values) or values_files()
    result = PolicyResult([p.name for p in values], 0, 0)
    for path in values:
        docs, _ = render_chart(CHART, RELEASE, NAMESPACE, [path], sets, API_VERSIONS)
        written = {"chart.yaml": [placed(d, NAMESPACE) for d in docs], "pods.yaml": pod_manifests(docs)}
        rendered = [doc for docs_ in written.values() for doc in docs_]
        result.pod_templates += sum(_is_pod(p, rendered) for p in written["pods.yaml"])
        with tempfile.TemporaryDirectory(prefix="cityserve-chart-policy-") as tmp:
            for file, manifests in written.items():
                (Path(tmp) / file).write_text(yaml.safe_dump_all(manifests, sort_keys=False))
            report = _run_checkov(checkov, Path(tmp))
        result.passed += int(report["summary"]["passed"])
        by_resource = {(f"/{file}", f"{d['kind']}.{NAMESPACE}.{d['metadata']['name']}"): d
                       for file, manifests in written.items() for d in manifests}
        for failed in report["results"].get("failed_checks", []):
            finding = Finding(path.stem, failed["check_id"], failed["resource"], failed["check_name"])
            doc = by_resource[(failed["file_path"], failed["resource"])]
            skip = next((s for s in SKIPS if s.check == finding.check and s.where(doc, rendered)), None)
            if skip is None:
                result.failed.append(finding)
            else:
                finding.skipped_because = skip.why
                result.skipped.append(finding)
    return result


def _run_checkov(checkov: Path, root: Path) -> Doc:
    # --skip-download: checkov would otherwise fetch guidelines from its vendor's API at each run.
    cmd = [str(checkov), "--directory", str(root), "--framework", "kubernetes", "--output", "json", "--quiet",
           "--compact", "--skip-download"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=CHECKOV_TIMEOUT_S, check=False)
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"checkov gave no JSON report (exit {done.returncode}): {done.stderr.strip()[-2000:]}") \
            from None
    if isinstance(report, list):  # one report per framework; only kubernetes is asked for
        (report,) = report
    if report.get("summary", {}).get("parsing_errors"):
        raise RuntimeError(f"checkov could not parse what the chart rendered: {report['summary']}")
    return dict(report)


def check_chart_policy(settings: Settings, short: bool = False) -> Check:
    """The reliability check: no failed checkov check over every `helm/ci/` values file. `settings`
    and `short` are the suite's signature: the chart needs neither, and the full check takes seconds."""
    result = chart_policy()
    figures = {"files_rendered": len(result.files), "pod_templates_checked": result.pod_templates,
               "checks_passed": result.passed, "checks_failed": len(result.failed),
               "checks_skipped": len(result.skipped), "skips": sorted({f.check for f in result.skipped})}
    return Check(NAME, not result.failed, figures, command(NAME), [str(f) for f in result.failed])
