"""The Helm chart: lint, render, validate what it renders, and check it keeps the contract with the code.

`helm` comes from `make` (`.venv/bin/helm`); the Kubernetes schemas from the `kubernetes-validate`
package (strict, Kubernetes 1.32); the KubeRay CRD schemas (`KUBERAY`, laid beside the project). Each values
file (the defaults and every `helm/ci/*.yaml`) is rendered once per module.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cityserve.cli import main as cli
from cluster.kube import KubeError, find_helm, rayjob
from cluster.placement import default_cpus_per_worker
from core.settings import Settings
from domains import DOMAINS
from services.config import (
    GATEWAY,
    SERVE_DIR,
    ServeOverlay,
    apply_overlay,
    deep_merge,
    load_overlay,
    model_configs,
    validate_config,
)
from services.tenants import read_tenants_file

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm"
KUBERAY = REPO.parent / "shared" / "kuberay"
K8S_VERSION = "1.32"
PODMONITOR_API = "monitoring.coreos.com/v1/PodMonitor"
RULES_API = "monitoring.coreos.com/v1/PrometheusRule"
VALUES = ["default", *sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))]
RAY_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
TENANTS_DIR, LEDGER_DIR = "/etc/cityserve/tenants", "/var/lib/cityserve/ledger"

Doc = dict[str, Any]


# ---- helm ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def helm() -> str:
    try:
        return find_helm()  # the CLI's own lookup: the venv's helm, else PATH's
    except KubeError as exc:
        pytest.fail(f"{exc} (`make test` and `make unit` install it)")


def values_args(name: str) -> list[str]:
    return [] if name == "default" else ["-f", str(CHART / "ci" / f"{name}.yaml")]


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def template(helm: str, *args: str) -> list[Doc]:
    proc = run_helm(helm, "template", "cityserve", str(CHART), "--namespace", "city", *args)
    if proc.returncode != 0:
        pytest.fail(f"helm template {' '.join(args)} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def refused(helm: str, *args: str) -> str:
    """helm template's error for values it must refuse."""
    proc = run_helm(helm, "template", "cityserve", str(CHART), *args)
    assert proc.returncode != 0, f"helm template {' '.join(args)} rendered what it should refuse"
    return proc.stderr


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[Doc]]:
    """Every values file rendered once, in a cluster that serves the Prometheus Operator's kinds."""
    return {name: template(helm, *values_args(name), "--api-versions", PODMONITOR_API, "--api-versions", RULES_API)
            for name in VALUES}


def values_of(name: str) -> dict[str, Any]:
    """The chart's values for a values file (Helm merges maps the way deep_merge does)."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    if name == "default":
        return defaults
    return deep_merge(defaults, yaml.safe_load((CHART / "ci" / f"{name}.yaml").read_text()))


def one(docs: list[Doc], kind: str) -> Doc:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def kinds(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def cluster_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(owner, Ray cluster spec) of the RayService and of every RayJob."""
    yield "RayService", one(docs, "RayService")["spec"]["rayClusterConfig"]
    for job in kinds(docs, "RayJob"):
        yield job["metadata"]["name"], job["spec"]["rayClusterSpec"]


def pods(spec: Doc) -> Iterator[tuple[str, Doc]]:
    """(group name, pod template) of a Ray cluster spec, the head first."""
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group["template"]


def serve_config(docs: list[Doc]) -> Doc:
    config: Doc = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])
    return config


# ---- lint and schemas ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALUES)
def test_lint_strict(helm: str, name: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), *values_args(name))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("name", VALUES)
def test_builtin_kinds_match_kubernetes_schemas(rendered: dict[str, list[Doc]], name: str) -> None:
    builtin = [d for d in rendered[name] if d["apiVersion"] not in ("ray.io/v1", "monitoring.coreos.com/v1")]
    assert builtin
    for doc in builtin:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.absolute_path)}")


def _strict(node: Any) -> None:
    """KubeRay's schemas accept unknown fields; a typo must not pass, so object nodes are closed."""
    if isinstance(node, dict):
        if node.get("type") == "object" and isinstance(node.get("properties"), dict) \
                and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


@cache
def crd_validator(kind: str) -> jsonschema.Draft4Validator:
    """The CRD's v1 schema, strict; loading takes seconds, so once per session."""
    text = (KUBERAY / f"ray.io_{kind.lower()}s.yaml").read_text()
    crd = yaml.load(text, Loader=yaml.CSafeLoader)  # the pure-Python loader takes ~3x longer
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _strict(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.mark.parametrize("name", VALUES)
def test_ray_kinds_match_kuberay_crds(rendered: dict[str, list[Doc]], name: str) -> None:
    if not KUBERAY.is_dir():
        pytest.skip(f"no KubeRay CRD schemas at {KUBERAY} (they sit beside the project on dev machines and in CI)")
    ray_docs = [d for d in rendered[name] if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in ray_docs} >= {"RayService"}
    for doc in ray_docs:
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{doc['kind']} {list(e.absolute_path)}: {e.message}" for e in errors[:10])


# ---- the one serve config --------------------------------------------------------------------------
def chart_args(values: dict[str, Any]) -> dict[str, Any]:
    """The args the chart owns, as agreed with services.config.PlatformArgs."""
    args: dict[str, Any] = {"tenants_file": f"{TENANTS_DIR}/tenants.yaml"}
    if values["ledger"]["backend"] == "sqlite":
        args |= {"ledger_url": f"sqlite:///{LEDGER_DIR}/ledger.db", "ledger_resource": values["ledger"]["resource"]}
    else:
        args["ledger_url"] = "env:CITYSERVE_LEDGER_URL"
    if values["registry"]["uri"]:
        args["registry_uri"] = values["registry"]["uri"]
    return args


@pytest.mark.parametrize("name", VALUES)
def test_serve_config_v2_is_base_plus_cluster_overlay_plus_values(rendered: dict[str, list[Doc]],
                                                                  name: str) -> None:
    """serveConfigV2 equals services.config's own merge (all-on sets min_replicas 0: falsy values merge too)."""
    values = values_of(name)
    expected = yaml.safe_load((SERVE_DIR / "base.yaml").read_text())
    for overlay in (load_overlay("cluster"), ServeOverlay.model_validate(values["serve"]),
                    ServeOverlay(args=chart_args(values))):
        expected = apply_overlay(expected, overlay)
    config = serve_config(rendered[name])
    assert config == expected
    args = validate_config(config)  # Ray's ServeDeploySchema, PlatformArgs, each ModelConfig
    assert set(args.domains) == set(DOMAINS)
    assert args.api_docs == "off"  # serve/cluster.yaml's, read by Helm's YAML parser as text, not false
    # What serves is the registry's stage: the chart never names a model version.
    assert {c.stage for c in model_configs(config).values()} == {"production"}


def test_unknown_deployment_in_values_is_refused(helm: str) -> None:
    err = refused(helm, "--set-json", 'serve.deployments={"water": {"num_replicas": 1}}')
    assert '"water"' in err and "lacks" in err and "Gateway" in err


# ---- what each pod gets ----------------------------------------------------------------------------
def env_of(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def mounts_of(pod: Doc) -> dict[str, str]:
    (container,) = pod["spec"]["containers"]
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("name", VALUES)
def test_every_ray_container_gets_serve_env_settings_and_ledger_url(rendered: dict[str, list[Doc]],
                                                                  name: str) -> None:
    docs, values = rendered[name], values_of(name)
    settings = one(docs, "ConfigMap")
    secrets = {d["metadata"]["name"]: d for d in kinds(docs, "Secret")}
    for owner, spec in cluster_specs(docs):
        for group, pod in pods(spec):
            (container,) = pod["spec"]["containers"]
            env = env_of(container)
            assert {k: env.get(k) for k in RAY_ENV} == RAY_ENV, (owner, group)
            assert container["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]
            if owner != "RayService":  # a training job gets no ledger credentials
                assert "CITYSERVE_LEDGER_URL" not in env, (owner, group)
            elif values["ledger"]["backend"] == "postgres":
                ref = env["CITYSERVE_LEDGER_URL"]["secretKeyRef"]
                pg = values["ledger"]["postgres"]
                if pg["existingSecret"]:
                    assert ref == {"name": pg["existingSecret"], "key": pg["existingSecretKey"]}
                else:
                    assert secrets[ref["name"]]["stringData"][ref["key"]].startswith("postgresql://")
            else:
                assert "CITYSERVE_LEDGER_URL" not in env
    # The settings are real Settings fields (a typo would be silently ignored by pydantic-settings).
    fields = {f"CITYSERVE_{f.upper()}" for f in Settings.model_fields}
    assert set(settings["data"]) <= fields
    assert settings["data"]["CITYSERVE_REGISTRY_URI"] == serve_config(docs)["applications"][0]["args"]["registry_uri"]


@pytest.mark.parametrize("name", VALUES)
def test_tenants_and_ledger_are_mounted_where_the_args_say(rendered: dict[str, list[Doc]], name: str,
                                                           tmp_path: Path) -> None:
    docs, values = rendered[name], values_of(name)
    args = serve_config(docs)["applications"][0]["args"]
    tenants_secret = values["tenants"]["existingSecret"] if not values["tenants"]["create"] else None
    for owner, spec in cluster_specs(docs):
        serving = owner == "RayService"
        for group, pod in pods(spec):
            mounts, volumes = mounts_of(pod), {v["name"]: v for v in pod["spec"]["volumes"]}
            # The tenants file, read-only, in every serving container; jobs have no use for it.
            assert (TENANTS_DIR in mounts) == serving, (owner, group)
            if serving:
                secret = volumes[mounts[TENANTS_DIR]]["secret"]
                assert secret["items"] == [{"key": "tenants.yaml", "path": "tenants.yaml"}]
                if tenants_secret:
                    assert secret["secretName"] == tenants_secret
                else:
                    (created,) = [d for d in kinds(docs, "Secret") if d["metadata"]["name"] == secret["secretName"]]
                    tenants_file = tmp_path / "tenants.yaml"
                    tenants_file.write_text(created["stringData"]["tenants.yaml"])
                    entries = read_tenants_file(tenants_file)  # what the platform reads at start
                    listed = [e.model_dump(mode="json", exclude_defaults=True) for e in entries]
                    assert listed == values["tenants"]["list"]
            # The SQLite ledger: in the serving head only, beside the resource its writer needs.
            sqlite_here = serving and group == "head" and values["ledger"]["backend"] == "sqlite"
            assert (LEDGER_DIR in mounts) == sqlite_here, (owner, group)
    head_params = one(docs, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    if values["ledger"]["backend"] == "sqlite":
        assert args["ledger_resource"] == values["ledger"]["resource"]
        # KubeRay's format, '"{\"cityserve_ledger\": 1}"': a JSON object inside a quoted string.
        assert head_params["resources"] == json.dumps(json.dumps({values["ledger"]["resource"]: 1}))
        assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    else:
        assert "ledger_resource" not in args and "resources" not in head_params
        assert not kinds(docs, "PersistentVolumeClaim")


@pytest.mark.parametrize("name", VALUES)
def test_gpu_groups_ask_for_gpus_on_gpu_nodes(rendered: dict[str, list[Doc]], name: str) -> None:
    values = values_of(name)
    spec = one(rendered[name], "RayService")["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {n for n, g in values["workerGroups"].items() if g["enabled"]}
    for group_name, group in groups.items():
        want = values["workerGroups"][group_name]
        assert (group["minReplicas"], group["maxReplicas"]) == (want["minReplicas"], want["maxReplicas"])
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpus == want.get("gpus", 0)
        if gpus:
            assert group["template"]["spec"]["nodeSelector"] == want["nodeSelector"]
            assert group["template"]["spec"]["tolerations"] == want["tolerations"]
            tag = values["image"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
            assert container["image"] == f"{values['image']['repository']}:{values['image']['gpuTag'] or tag + '-gpu'}"
    assert spec["enableInTreeAutoscaling"] is values["autoscaler"]["enabled"]
    assert spec.get("authOptions") == ({"mode": "token", **({"secretName": values["auth"]["secretName"]}
                                                            if values["auth"]["secretName"] else {})}
                                       if values["auth"]["enabled"] else None)


# ---- Pod Security Standards "restricted" (checkov's view: tests/unit/test_chart_policy.py) ----------
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@pytest.mark.parametrize("name", VALUES)
def test_every_pod_meets_the_restricted_standard(rendered: dict[str, list[Doc]], name: str) -> None:
    """Non-root, RuntimeDefault seccomp, no privilege escalation, no capabilities, a read-only root with
    size-limited emptyDirs where Ray writes, and no API token in any Ray container."""
    for owner, spec in cluster_specs(rendered[name]):
        for group, pod in pods(spec):
            where = (owner, group)
            pod_sc = pod["spec"]["securityContext"]
            assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, where
            assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert pod["spec"]["automountServiceAccountToken"] is False, where
            (container,) = pod["spec"]["containers"]
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            scratch = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]
                       if "emptyDir" in volumes[m["name"]]}
            assert set(scratch) == {"/tmp/ray", "/tmp", "/home/ray/.cache"}, where
            assert all(v["emptyDir"]["sizeLimit"] for v in scratch.values()), where
            assert TOKEN_DIR not in mounts_of(pod), where


@pytest.mark.parametrize("name", VALUES)
def test_only_the_autoscaler_gets_the_api_token(rendered: dict[str, list[Doc]], name: str) -> None:
    """KubeRay binds the autoscaler's Role to the head's service account: its token is mounted in the
    autoscaler container of an autoscaling head and nowhere else; that container is restricted too."""
    values = values_of(name)
    for owner, spec in cluster_specs(rendered[name]):
        token_volumes = {g: [v for v in pod["spec"]["volumes"] if v["name"] == "autoscaler-token"]
                         for g, pod in pods(spec)}
        if not spec["enableInTreeAutoscaling"]:
            assert "autoscalerOptions" not in spec and not any(token_volumes.values()), owner
            continue
        assert [g for g, v in token_volumes.items() if v] == ["head"], owner
        sources = token_volumes["head"][0]["projected"]["sources"]
        assert sources[0]["serviceAccountToken"]["path"] == "token"
        options = spec["autoscalerOptions"]
        assert {"name": "autoscaler-token", "mountPath": TOKEN_DIR, "readOnly": True} in options["volumeMounts"]
        assert options["securityContext"] == values["securityContext"]
        assert options["upscalingMode"] == values["autoscaler"]["options"]["upscalingMode"]  # the values' options stay


def test_the_retrain_schedule_submits_retrain_jobs_and_may_do_nothing_else(rendered: dict[str, list[Doc]]) -> None:
    """Per domain a CronJob whose restricted pod runs `cityserve cluster retrain` (its arguments
    parsed by the real CLI, `cityserve retrain`'s included) under an account that may read the
    RayService and create RayJobs only; the job's Ray pods fall under the jobs' NetworkPolicy."""
    docs = rendered["all-on-values"]
    values = values_of("all-on-values")["jobs"]["retrain"]
    crons = kinds(docs, "CronJob")
    assert [c["metadata"]["name"] for c in crons] == [f"city-retrain-{d}" for d in values["domains"]]
    (role,) = kinds(docs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayservices"], "verbs": ["get", "list"]},
                             {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]
    (binding,) = kinds(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"] == binding["subjects"][0]["name"]
    rs = one(docs, "RayService")
    jobs = next(p for p in kinds(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("-jobs"))
    for cron, domain in zip(crons, values["domains"], strict=True):
        assert cron["spec"]["schedule"] == values["schedule"] and cron["spec"]["concurrencyPolicy"] == "Forbid"
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]
        assert pod["spec"]["serviceAccountName"] == binding["subjects"][0]["name"]
        (container,) = pod["spec"]["containers"]
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        words = [*container["command"], *container["args"]]
        submit = parse_cli(words)
        assert (submit["release"], submit["namespace"], submit["domain"]) == ("cityserve", "city", domain)
        assert submit["follow"] is False
        retrain = parse_cli(["cityserve", "retrain", domain, *submit["args"]])
        assert retrain["min_holdout"] == 50 and retrain["weight"] == 5.0 and retrain["use_gpu"] is True
        job = rayjob(rs, "cityserve", ["retrain", domain, *submit["args"]], ttl_s=60)
        for _, ray_pod in pods(job["spec"]["rayClusterSpec"]):
            assert selects(jobs["spec"]["podSelector"], ray_pod["metadata"]["labels"])


def test_k8s_job_mode_submitters_are_restricted_and_reach_only_their_jobs(helm: str) -> None:
    """In K8sJobMode each RayJob gets the chart's submitter pod: restricted like the Ray pods, no API
    token, labelled as its job so the jobs' NetworkPolicy (not the serving one) covers it."""
    docs = template(helm, *values_args("all-on-values"), "--set", "jobs.submissionMode=K8sJobMode")
    jobs = kinds(docs, "RayJob")
    assert jobs
    policies = {p["metadata"]["name"].rsplit("-", 1)[1]: p["spec"] for p in kinds(docs, "NetworkPolicy")}
    for job in jobs:
        if KUBERAY.is_dir():
            errors = list(crd_validator("RayJob").iter_errors(job))
            assert not errors, [e.message for e in errors[:5]]
        pod = job["spec"]["submitterPodTemplate"]
        assert pod["spec"]["restartPolicy"] == "Never" and pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["spec"]["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "command" not in container  # KubeRay fills in `ray job submit`
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == job["metadata"]["labels"]["app.kubernetes.io/component"]
        assert selects(policies["jobs"]["podSelector"], labels)
        assert not selects(policies["serving"]["podSelector"], labels)
    # HTTPMode (the default) has no submitter pod at all.
    assert all("submitterPodTemplate" not in j["spec"] for j in kinds(template(helm, *values_args("all-on-values")),
                                                                       "RayJob"))


# ---- what is exposed -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALUES)
def test_only_the_serve_port_is_exposed(rendered: dict[str, list[Doc]], name: str) -> None:
    docs, values = rendered[name], values_of(name)
    service = one(docs, "RayService")["spec"]["serveService"]
    port = serve_config(docs)["http_options"]["port"]
    # No Service of our own (the dashboard and Jobs API stay inside); KubeRay's serve Service carries traffic.
    assert not kinds(docs, "Service")
    assert [p["port"] for p in service["spec"]["ports"]] == [port]
    for ingress in kinds(docs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"number": port}}
    if not values["networkPolicy"]["enabled"]:
        assert not kinds(docs, "NetworkPolicy")
        return
    policies = {p["metadata"]["name"].rsplit("-", 1)[1]: p["spec"] for p in kinds(docs, "NetworkPolicy")}
    assert set(policies) == {"serving", "jobs", "heads"} | ({"scheduler"} if values["jobs"]["retrain"]["enabled"]
                                                            else set())
    assert not policies.get("scheduler", {}).get("ingress")  # the retrain schedule's pods take no traffic
    scraped = {"metrics"} if values["monitoring"]["podMonitor"]["enabled"] else set()
    for owner, spec in cluster_specs(docs):
        kind = "serving" if owner == "RayService" else "jobs"
        policy = policies[kind]
        for _, pod in pods(spec):
            labels = pod["metadata"]["labels"]
            # Each Ray pod is in exactly one of the two policies: serving and jobs are selected apart.
            assert [k for k in ("serving", "jobs") if selects(policies[k]["podSelector"], labels)] == [kind]
        from_outside = set()
        for rule in policy["ingress"]:
            if rule["from"] == [{"podSelector": policy["podSelector"]}]:
                assert "ports" not in rule  # pods of the same kind talk freely
                continue
            from_outside |= {p["port"] for p in rule["ports"]}
        # serve (serving pods only), the operator's dashboard port, Prometheus
        assert from_outside == ({port} if kind == "serving" else set()) | {8265, *scraped}, owner
    operator = next(r for r in policies["serving"]["ingress"] if "kuberay-operator" in json.dumps(r["from"]))
    assert {p["port"] for p in operator["ports"]} == {port, 8265}  # it probes the head's proxy too


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A LabelSelector's verdict on a pod's labels (matchLabels, and matchExpressions' In)."""
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def egress_ports(policy: Doc) -> set[int]:
    """The ports a policy lets its pods reach outside their own kind."""
    return {p["port"] for rule in policy.get("egress", []) if "podSelector" not in json.dumps(rule.get("to", []))
            for p in rule["ports"]}


@pytest.mark.parametrize("name", VALUES)
def test_egress_is_limited_to_what_each_pod_needs(rendered: dict[str, list[Doc]], name: str) -> None:
    """DNS and the object store for all; PostgreSQL and Redis for serving pods, where the values use them;
    the API server for heads (the autoscaler). A job never reaches the ledger's database."""
    values = values_of(name)
    policies = {p["metadata"]["name"].rsplit("-", 1)[1]: p["spec"] for p in kinds(rendered[name], "NetworkPolicy")}
    if not values["networkPolicy"]["enabled"]:
        return
    assert all("Egress" in p["policyTypes"] for p in policies.values())
    postgres = {5432} if values["ledger"]["backend"] == "postgres" else set()
    redis = {6379} if values["gcsFaultTolerance"]["enabled"] else set()
    assert egress_ports(policies["serving"]) == {53, 443, *postgres, *redis}
    assert egress_ports(policies["jobs"]) == {53, 443}
    assert policies["heads"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert egress_ports(policies["heads"]) == {443, 6443}
    if "scheduler" in policies:  # the retrain schedule: DNS and the API server
        assert egress_ports(policies["scheduler"]) == {53, 443, 6443}
    # Pods of the same kind reach each other on any port; serving never admits job pods.
    (own,) = [r for r in policies["serving"]["egress"] if "to" in r and "podSelector" in r["to"][0]]
    assert own["to"] == [{"podSelector": policies["serving"]["podSelector"]}] and "ports" not in own


def test_pod_monitor_only_where_the_cluster_has_the_crd(helm: str, rendered: dict[str, list[Doc]]) -> None:
    with_crd = rendered["all-on-values"]
    monitor = one(with_crd, "PodMonitor")
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    without = template(helm, *values_args("all-on-values"))
    assert not kinds(without, "PodMonitor")
    assert {str(p["port"]) for np in kinds(without, "NetworkPolicy") for r in np["spec"].get("ingress", [])
            for p in r.get("ports", [])} == {"8080", "8265"}  # and Prometheus is not let in
    assert not kinds(rendered["default"], "PodMonitor")  # the CRD alone is not enough: the value is off


def test_alert_rules_parse_and_name_metrics_the_platform_exports(helm: str, rendered: dict[str, list[Doc]]) -> None:
    import promql_parser

    rules = one(rendered["all-on-values"], "PrometheusRule")
    assert rules["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    alerts = {r["alert"]: r for group in rules["spec"]["groups"] for r in group["rules"]}
    assert set(alerts) == {"CityServeInputDrift", "CityServeAccuracyDrop", "CityServeForecastErrorUp",
                           "CityServeServerErrors", "CityServeThrottled", "CityServeReplicasSaturated"}
    assert alerts["CityServeInputDrift"]["expr"].endswith("> 0.2")  # the values file's threshold
    sources = "".join(p.read_text() for p in (REPO / "services").glob("*.py"))
    for name, rule in alerts.items():
        promql_parser.parse(rule["expr"])  # raises on what Prometheus would refuse
        assert re.fullmatch(r"\d+[smh]", rule["for"]) and rule["annotations"]["summary"], name
        for metric in set(re.findall(r"\bray_cityserve_\w+", rule["expr"])):  # Ray prefixes its metrics ray_
            assert f'"{metric.removeprefix("ray_")}"' in sources, f"{name}: nothing exports {metric}"
    assert not kinds(template(helm, *values_args("all-on-values"), "--api-versions", PODMONITOR_API),
                     "PrometheusRule")  # without the CRD, nothing
    assert not kinds(rendered["default"], "PrometheusRule")  # the CRD alone is not enough: the value is off


def test_pdb_holds_the_serving_workers(rendered: dict[str, list[Doc]]) -> None:
    pdb = one(rendered["default"], "PodDisruptionBudget")
    labels = pdb["spec"]["selector"]["matchLabels"]
    assert labels.pop("ray.io/node-type") == "worker"  # KubeRay's label; the head is not held
    for group in one(rendered["default"], "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert labels.items() <= group["template"]["metadata"]["labels"].items()


# ---- jobs ------------------------------------------------------------------------------------------
def parse_cli(words: list[str]) -> dict[str, Any]:
    """Parses a `cityserve ...` command line with the real CLI (types, choices) without running it;
    the command's parameters, as it would get them."""
    assert words[0] == "cityserve"
    group: click.Group = cli
    args = words[1:]
    while True:
        ctx = group.make_context(group.name or "cityserve", list(args))
        name, command, rest = group.resolve_command(ctx, ctx.protected_args + ctx.args)
        assert command is not None, name
        if isinstance(command, click.Group):
            group, args = command, rest
            continue
        return dict(command.make_context(name or "", rest, parent=ctx).params)


def test_rayjobs_run_the_cli_in_a_cluster_of_their_own(rendered: dict[str, list[Doc]]) -> None:
    docs, values = rendered["all-on-values"], values_of("all-on-values")
    jobs = {j["metadata"]["name"]: j for j in kinds(docs, "RayJob")}
    assert sorted(jobs) == ["city-train-sentiment", "city-train-traffic", "city-tune-energy"]
    service = one(docs, "RayService")["spec"]["rayClusterConfig"]
    for name, job in jobs.items():
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] == values["jobs"]["ttlSecondsAfterFinished"]
        for command in spec["entrypoint"].split("&&"):
            parse_cli(shlex.split(command))
        kind, domain = name.split("-")[1:]
        assert shlex.split(spec["entrypoint"].split("&&")[-1])[:5] == [
            "cityserve", kind, domain, "--profile", values["jobs"][kind]["profile"]]
        # The same cluster spec as the service's, less the serving parts, plus the job's overrides.
        cluster = spec["rayClusterSpec"]
        assert "gcsFaultToleranceOptions" not in cluster and "gcsFaultToleranceOptions" in service
        assert cluster["authOptions"] == service["authOptions"]
        assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == \
            service["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        assert spec["activeDeadlineSeconds"] == values["jobs"]["activeDeadlineSeconds"]
    train_groups = {g["groupName"]: g for g in jobs["city-train-traffic"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(train_groups) == {"cpu", "gpu"}  # `spot` switched off for this job only
    assert (train_groups["gpu"]["minReplicas"], train_groups["gpu"]["maxReplicas"]) == (2, 2)
    assert "--use-gpu" in jobs["city-train-traffic"]["spec"]["entrypoint"]


def test_job_entrypoints_quote_every_value(helm: str) -> None:
    """Ray runs the entrypoint in a shell: a value with quotes, `$(...)` or `;` stays one argument."""
    nasty = ["--json", "it's; touch /tmp/x", "$(id)", "`id`", "a b"]
    docs = template(helm, "--set", "sharedVolume.existingClaim=shared", "--set", "jobs.tune.enabled=true",
                    "--set-json", f"jobs.tune.extraArgs={json.dumps(nasty)}", "--set", "jobs.tune.numSamples=4")
    (job,) = kinds(docs, "RayJob")
    prepare, run = job["spec"]["entrypoint"].split(" && ")
    assert shlex.split(prepare) == ["cityserve", "data", "prepare", "traffic"]
    assert shlex.split(run) == ["cityserve", "tune", "traffic", "--profile", "quick", "--num-samples", "4", *nasty]


# ---- devices: every GPU asked for exists where it can be scheduled -----------------------------------
def cpu_quantity(value: Any) -> float:
    """A Kubernetes CPU quantity ("8", "500m", 2) in CPUs."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class Pods:
    """One worker group as Ray sees it: each pod's CPUs and GPUs, and the most pods it can have."""

    group: str
    cpus: float
    gpus: float
    most: int

    def holds(self, cpus: float, gpus: float) -> int:
        """How many replicas or workers asking for `cpus` and `gpus` one pod holds."""
        by_cpu = int(self.cpus // cpus) if cpus else 10**6
        by_gpu = int(self.gpus // gpus) if gpus else 10**6
        return min(by_cpu, by_gpu)


def worker_pods(spec: Doc) -> list[Pods]:
    """What the worker groups of a rendered Ray cluster spec offer Ray. KubeRay advertises a pod's
    `cpu` and `nvidia.com/gpu` limits unless its rayStartParams say otherwise; the autoscaler grows a
    group up to maxReplicas, and without it the group keeps `replicas` pods."""
    out = []
    for group in spec["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container.get("resources", {}).get("limits", {})
        params = group.get("rayStartParams", {})
        most = group["maxReplicas"] if spec["enableInTreeAutoscaling"] else group["replicas"]
        out.append(Pods(group["groupName"], cpu_quantity(params.get("num-cpus", limits.get("cpu", 0))),
                        float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))), int(most)))
    return out


def gpu_problems(pods: list[Pods], what: str, cpus: float, gpus: float, count: int) -> list[str]:
    """Why `count` replicas or workers of `cpus` CPUs and `gpus` GPUs each cannot all run at once in
    the GPU pods of `pods` (none when they can). Ray asks whole GPUs above one; a replica or worker
    runs inside one pod."""
    if gpus > 1 and gpus != int(gpus):
        return [f"{what}: {gpus} GPUs, neither a fraction of one nor whole GPUs (Ray refuses it)"]
    room = sum(p.holds(cpus, gpus) * p.most for p in pods if p.gpus)
    if not any(p.holds(cpus, gpus) for p in pods if p.gpus):
        return [f"{what}: no GPU pod holds {cpus} CPUs and {gpus} GPUs; GPU pods (CPUs, GPUs): "
                f"{[(p.cpus, p.gpus) for p in pods if p.gpus]}"]
    if room < count:
        return [f"{what}: {count} at {cpus} CPUs and {gpus} GPUs each, but the GPU pods hold {room} at most"]
    return []


def deployment_replicas(deployment: Doc) -> int:
    """The most replicas a deployment of the serve config can have."""
    autoscaling: Doc = deployment.get("autoscaling_config") or {}
    return int(autoscaling.get("max_replicas") or deployment.get("num_replicas") or 1)


@pytest.mark.parametrize("name", VALUES)
def test_gpu_pods_advertise_the_gpus_they_hold(rendered: dict[str, list[Doc]], name: str) -> None:
    """A `num-gpus` start parameter other than the pod's `nvidia.com/gpu` limit would have Ray place
    work on GPUs the pod does not have (or leave the ones it has unused); GPU pods, the jobs' too,
    run the CUDA image."""
    values = values_of(name)
    tag = values["image"]["tag"] or yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    cuda_image = f"{values['image']['repository']}:{values['image']['gpuTag'] or tag + '-gpu'}"
    for owner, spec in cluster_specs(rendered[name]):
        head = spec["headGroupSpec"]
        (head_container,) = head["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {}), owner
        assert float(head["rayStartParams"].get("num-gpus", 0)) == 0, owner
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            limit = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
            advertised = group["rayStartParams"].get("num-gpus")
            assert advertised is None or float(advertised) == limit, (owner, group["groupName"])
            assert (container["image"] == cuda_image) == bool(limit), (owner, group["groupName"], container["image"])


@pytest.mark.parametrize("name", VALUES)
def test_serve_deployments_on_gpus_fit_the_gpu_group(rendered: dict[str, list[Doc]], name: str) -> None:
    """Every deployment holding GPUs (the text models in serve/cluster.yaml) fits a GPU pod, all of
    them at their most replicas fit the GPU group at its largest, and they run their model on the
    GPU they hold (`device` auto or cuda); no deployment forces CUDA without holding a GPU."""
    config = serve_config(rendered[name])
    pods = worker_pods(one(rendered[name], "RayService")["spec"]["rayClusterConfig"])
    devices = {d: c.device for d, c in model_configs(config).items()}
    on_gpus, need = [], 0
    for deployment in config["applications"][0]["deployments"]:
        name_ = deployment["name"]
        actor = deployment.get("ray_actor_options") or {}
        cpus, gpus = float(actor.get("num_cpus", 1)), float(actor.get("num_gpus", 0))
        device = devices.get(name_, "cpu" if name_ == GATEWAY else "auto")
        if not gpus:
            assert device != "cuda", f"{name_} forces CUDA but holds no GPU: its replicas fail to load"
            continue
        on_gpus.append(name_)
        assert device in ("auto", "cuda"), f"{name_} holds {gpus} GPU but runs its model on the {device}"
        problems = gpu_problems(pods, f"serve deployment {name_}", cpus, gpus, 1)
        assert not problems, problems
        # Each deployment packed into GPU pods of its own: if that fits, sharing pods fits too.
        per_pod = max(p.holds(cpus, gpus) for p in pods if p.gpus)
        need += -(-deployment_replicas(deployment) // per_pod)
    room = sum(p.most for p in pods if p.gpus)
    assert need <= room, f"{on_gpus} at their max_replicas need {need} GPU pods; the GPU groups grow to {room}"
    if name == "default":
        assert on_gpus == ["events", "sentiment"]  # serve/cluster.yaml: the text models on fractional GPUs


def job_gpu_problems(spec: Doc, params: dict[str, Any], what: str) -> list[str]:
    """Why a `cityserve train|tune` job's GPU workers cannot run in its Ray cluster (none if they can)."""
    pods = worker_pods(spec)
    if params.get("use_gpu"):
        cpus = params.get("cpus_per_worker")
        if cpus is None:  # `cityserve train`'s default, from the pods there are when the job starts
            head = spec["headGroupSpec"]
            (container,) = head["template"]["spec"]["containers"]
            at_start = [(cpu_quantity(head["rayStartParams"].get("num-cpus", container["resources"]["limits"]["cpu"])),
                         0.0)]
            at_start += [(p.cpus, p.gpus) for p, g in zip(pods, spec["workerGroupSpecs"], strict=True)
                         for _ in range(g["replicas"])]
            cpus = default_cpus_per_worker(at_start, params["num_workers"], use_gpu=True)
        return gpu_problems(pods, f"{what} --use-gpu", float(cpus), 1.0, params["num_workers"])
    if params.get("gpus_per_trial"):
        return gpu_problems(pods, f"{what} --gpus-per-trial", params["cpus_per_trial"], params["gpus_per_trial"], 1)
    return []


@pytest.mark.parametrize("name", VALUES)
def test_chart_rayjobs_get_the_gpus_they_ask_for(rendered: dict[str, list[Doc]], name: str) -> None:
    values = values_of(name)
    for job in kinds(rendered[name], "RayJob"):
        kind = job["metadata"]["name"].split("-")[-2]
        params = parse_cli(shlex.split(job["spec"]["entrypoint"].split("&&")[-1]))
        if kind == "train":
            assert params["use_gpu"] is values["jobs"]["train"]["useGpu"]
        else:
            assert params["gpus_per_trial"] == (values["jobs"]["tune"]["gpusPerTrial"] or 0.0)
        problems = job_gpu_problems(job["spec"]["rayClusterSpec"], params, job["metadata"]["name"])
        assert not problems, problems


GPU_JOBS = [["train", "events", "--use-gpu", "--cpus-per-worker", "4"],
            ["train", "sentiment", "--use-gpu", "--num-workers", "2", "--cpus-per-worker", "2"],
            ["tune", "events", "--gpus-per-trial", "0.25", "--cpus-per-trial", "2", "--max-concurrent", "4"],
            ["retrain", "events", "--use-gpu", "--cpus-per-worker", "4", "--holdout", "0.3"]]


@pytest.mark.parametrize("name", VALUES)
def test_cluster_train_and_tune_jobs_get_the_gpus_they_ask_for(rendered: dict[str, list[Doc]], name: str) -> None:
    """`cityserve cluster train|tune` copies the RayService's cluster into its RayJob (cluster/kube.py):
    where that cluster has GPU pods, `--use-gpu` and `--gpus-per-trial` find them; where it has none
    (sqlite-values switches the group off) the check says so, as `cityserve cluster` would not."""
    rs = one(rendered[name], "RayService")
    has_gpus = any(p.gpus for p in worker_pods(rs["spec"]["rayClusterConfig"]))
    for command in GPU_JOBS:
        job = rayjob(rs, "cityserve", command, ttl_s=60)
        params = parse_cli(shlex.split(job["spec"]["entrypoint"]))
        problems = job_gpu_problems(job["spec"]["rayClusterSpec"], params, " ".join(command[:2]))
        assert (not problems) if has_gpus else problems, problems


def test_cluster_train_on_a_gpu_without_cpus_per_worker_fits(rendered: dict[str, list[Doc]]) -> None:
    """`cityserve train --use-gpu`'s default CPUs per worker come from the GPU pods, not from a share
    of every pod's CPUs (which no GPU pod holds: the job would wait forever)."""
    rs = one(rendered["default"], "RayService")
    job = rayjob(rs, "cityserve", ["train", "events", "--use-gpu"], ttl_s=60)
    params = parse_cli(shlex.split(job["spec"]["entrypoint"]))
    assert not job_gpu_problems(job["spec"]["rayClusterSpec"], params, "train events")


def test_every_value_is_documented() -> None:
    """Each key of values.yaml has a `# --` comment, itself or an ancestor (a block given as an example)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the keys enclosing this line
    comment: list[str] = []
    undocumented = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text.startswith("#"):
            comment.append(text)
            continue
        indent = len(line) - len(line.lstrip())
        is_key = text and not text.startswith("-") and ":" in text and not text.startswith("{")
        if is_key:
            while stack and stack[-1][0] >= indent:
                stack.pop()
            documented = any(c.startswith("# --") for c in comment) or any(d for _, d in stack)
            value = text.split(":", 1)[1].strip()
            nxt = next((n for n in lines[number:] if n.strip() and not n.strip().startswith("#")), "")
            is_leaf = bool(value) or len(nxt) - len(nxt.lstrip()) <= indent
            if is_leaf and not documented:
                undocumented.append(f"values.yaml:{number}: {text}")
            stack.append((indent, documented))
        comment = []
    assert not undocumented, "\n".join(undocumented)


def test_schema_knows_the_domains() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["definitions"]["domain"]["enum"]) == set(DOMAINS)


# ---- refused values --------------------------------------------------------------------------------
def tenants(**change: Any) -> str:
    """`tenants.list=[...]` with one well-formed tenant, changed as asked."""
    tenant = {"name": "a", "grants": ["traffic"], "requests_per_minute": 60, "items_per_minute": 600,
              "max_concurrent": 2, "keys": [{"id": "0123456789ab", "sha256": "0" * 64}], **change}
    return f"tenants.list=[{json.dumps(tenant)}]"


GPU_TRAIN = ("--set", "sharedVolume.existingClaim=shared", "--set", "jobs.train.enabled=true",
             "--set", "jobs.train.useGpu=true")


@pytest.mark.parametrize("args, match", [
    # values.schema.json
    (["--set-json", 'workerGroups.cpu.minReplicas="2"'], "minReplicas"),  # a string for a number
    (["--set", "workerGroups.cpu.minReplicas=-1"], "minReplicas"),
    (["--set", "workerGroups.gpu.gpus=-1"], "gpus"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
    (["--set", "serve.deployment.Gateway.num_replicas=2"], "deployment"),  # a typo of `deployments`
    (["--set", "serve.args.ledger_url=sqlite:///x.db"], "invalid propertyName 'ledger_url'"),  # the chart's
    (["--set", "ledger.backend=mysql"], "backend"),
    (["--set", "scratch.tmp=lots"], "tmp"),  # an emptyDir size limit that is no quantity
    (["--set-json", 'networkPolicy.egress.dns={"to": [], "ports": [0]}'], "ports"),
    (["--set", "securityContext.capabilities.add[0]=NET_ADMIN", "--set", "securityContext.typo=true"], "typo"),
    (["--set", "registry.uri=registry"], "uri"),  # neither a URI nor an absolute path
    (["--set", "upgradeStrategy.type=NewClusterWithIncrementalUpgrade"], "clusterUpgradeOptions"),
    (["--set", "tenants.create=false"], "existingSecret"),
    (["--set-json", tenants(grants=["water"])], "grants"),
    (["--set-json", tenants(keys=["sk-123"])], "keys"),
    (["--set-json", tenants(keys=["csk_0123456789ab_secret"])], "keys"),  # a whole key, not its digest
    (["--set-json", tenants(keys=[{"id": "0123456789ab", "sha256": "0" * 64, "expires": "2027-06-30"}])],
     "expires"),
    (["--set-json", tenants(max_concurrent=0)], "max_concurrent"),
    # the templates (what JSON Schema cannot compare)
    (["--set", "workerGroups.cpu.minReplicas=5", "--set", "workerGroups.cpu.maxReplicas=2"],
     "workerGroups.cpu.minReplicas (5) is above maxReplicas (2)"),
    (["--set", "jobs.train.enabled=true", "--set", "sharedVolume.existingClaim=shared",
      "--set-json", 'jobs.train.cluster={"workerGroups": {"gpu": {"minReplicas": 5}}}'],
     "jobs.train.cluster: workerGroups.gpu.minReplicas (5) is above maxReplicas (4)"),
    (["--set", "ledger.backend=sqlite"], "upgradeStrategy.type None"),
    (["--set", "registry.uri=/data/registry"], "sharedVolume"),
    (["--set", "jobs.tune.enabled=true"], "sharedVolume.existingClaim"),
    # devices: GPUs nothing can hold (the templates' checkDevices)
    (["--set", "workerGroups.gpu.enabled=false"],
     "serve deployment events (ray_actor_options.num_gpus) asks for 0.25 GPU(s), but no enabled worker group"),
    ([*GPU_TRAIN], "jobs.train.useGpu needs jobs.train.cpusPerWorker"),
    ([*GPU_TRAIN, "--set", "jobs.train.cpusPerWorker=4",
      "--set-json", 'jobs.train.cluster={"workerGroups": {"gpu": {"gpus": 0}}}'],
     "jobs.train.useGpu (one GPU per worker) asks for 1 GPU(s)"),
    (["--set", "sharedVolume.existingClaim=shared", "--set", "jobs.tune.enabled=true",
      "--set-json", "jobs.tune.gpusPerTrial=2"], "jobs.tune.gpusPerTrial asks for 2 GPU(s)"),
])
def test_bad_values_are_refused(helm: str, args: list[str], match: str) -> None:
    assert match in refused(helm, *args)
