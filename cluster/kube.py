"""Kubernetes operations behind `cityserve cluster`: the chart's objects applied through the official
`kubernetes` client, the RayService read and patched, RayJobs made from its cluster spec.

Every call goes through one small REST layer (`Kube.request`) on the client's `ApiClient`, which
brings the kubeconfig's auth, TLS and proxies; it turns each failure into one clear `KubeError`
line. The typed APIs are not used: they round-trip objects through models (dropping what the
models do not know) and KubeRay's kinds come back as plain dicts anyway, so one path serves all.

No KubeRay, services or training internals are imported here: the RayService is read as the
chart's contract describes it (`helm/`), and the CLI glue lives in `cityserve/cluster_cli.py`.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shlex
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import urllib3
import yaml

from core.errors import CityServeError, ConfigError
from core.settings import LEDGER_ENV

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

RELEASE = "cityserve"
INSTANCE_LABEL = "app.kubernetes.io/instance"
RAY_API = "ray.io/v1"
DEFAULT_SERVE_PORT = 8000  # Ray Serve's and KubeRay's
CHART_DIR = Path(__file__).resolve().parents[1] / "helm"
POLL_S = 2.0  # between two reads while waiting for the operator (tests shorten it)
REQUEST_TIMEOUT_S = 30.0
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
OPERATOR_HINT = ("the KubeRay operator is not installed: helm repo add kuberay https://ray-project.github.io/kuberay-helm/"
                 " && helm install kuberay-operator kuberay/kuberay-operator")
JOB_DONE = {"Complete", "Failed", "ValidationFailed"}  # KubeRay's terminal jobDeploymentStatus values
RAY_JOB_DONE = {"SUCCEEDED", "FAILED", "STOPPED"}  # Ray's terminal jobStatus values
JOB_DEADLINE_S = 86400  # the chart's jobs.activeDeadlineSeconds
# What the chart gives serving pods only (helm/templates/_helpers.tpl): the tenants' keys, the SQLite
# ledger volume and the PostgreSQL ledger URL with its password. A training job runs user code and
# needs none of them, so the RayJob's copy of the serving cluster leaves them out.
SERVING_ONLY_VOLUMES = frozenset({"tenants", "ledger"})
SERVING_ONLY_ENV = frozenset({LEDGER_ENV})
T = TypeVar("T")


class KubeError(CityServeError):
    """A Kubernetes operation failed; `status` is the API server's HTTP status when it answered."""

    code = "kubernetes"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class KubeTimeout(KubeError):
    """The API server, or the operator acting on our change, did not finish in time."""

    code = "timeout"


@dataclass(frozen=True)
class Kind:
    """Where the API server keeps one kind of object (every kind the chart renders is namespaced)."""

    api_version: str
    plural: str

    def path(self, namespace: str, name: str | None = None) -> str:
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        return f"{root}/namespaces/{namespace}/{self.plural}" + (f"/{name}" if name else "")


# The kinds `deploy` applies and `delete` removes, in apply order. A kind the chart starts to
# render must be added here: `deploy` refuses unknown kinds before it changes anything.
KINDS: dict[str, Kind] = {
    "ServiceAccount": Kind("v1", "serviceaccounts"),
    "Role": Kind("rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": Kind("rbac.authorization.k8s.io/v1", "rolebindings"),
    "ConfigMap": Kind("v1", "configmaps"),
    "Secret": Kind("v1", "secrets"),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims"),
    "Service": Kind("v1", "services"),
    "Ingress": Kind("networking.k8s.io/v1", "ingresses"),
    "NetworkPolicy": Kind("networking.k8s.io/v1", "networkpolicies"),
    "PodDisruptionBudget": Kind("policy/v1", "poddisruptionbudgets"),
    "ServiceMonitor": Kind("monitoring.coreos.com/v1", "servicemonitors"),
    "PodMonitor": Kind("monitoring.coreos.com/v1", "podmonitors"),
    "RayService": Kind(RAY_API, "rayservices"),
    "RayJob": Kind(RAY_API, "rayjobs"),
    "CronJob": Kind("batch/v1", "cronjobs"),  # after the RayService its jobs copy
}


def kind_of(obj: dict[str, Any]) -> Kind:
    """The table entry for a manifest, refusing kinds (or API versions) this CLI does not apply."""
    kind = KINDS.get(obj.get("kind", ""))
    if kind is None or kind.api_version != obj.get("apiVersion"):
        raise KubeError(f"the chart renders {obj.get('apiVersion')} {obj.get('kind')} "
                        f"{obj.get('metadata', {}).get('name')!r}, which `cityserve cluster` does not apply; "
                        f"known: {', '.join(KINDS)} (add it to KINDS in cluster/kube.py)")
    return kind


# ---- the API server ------------------------------------------------------------------------------
class Kube:
    """One namespace of one cluster, reached through the official client's `ApiClient`."""

    def __init__(self, api: ApiClient, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    @property
    def host(self) -> str:
        host: str = self.api.configuration.host
        return host

    @classmethod
    def connect(cls, kubeconfig: str | None = None, context: str | None = None,
                namespace: str | None = None) -> Kube:
        """Kubeconfig first (`kubeconfig`, else $KUBECONFIG, else ~/.kube/config), then the pod's
        service account. The namespace defaults to the context's, else "default"."""
        from kubernetes import client, config
        from kubernetes.config.kube_config import KubeConfigLoader, KubeConfigMerger

        cfg = client.Configuration()
        explicit = kubeconfig or os.environ.get("KUBECONFIG")
        path = explicit or "~/.kube/config"
        if kubeconfig and not Path(kubeconfig).expanduser().is_file():
            raise KubeError(f"no kubeconfig at {kubeconfig}")
        merged = KubeConfigMerger(path)  # reads each file of a KUBECONFIG list, skipping absent ones
        if merged.config is not None:
            try:
                loader = KubeConfigLoader(config_dict=merged.config, active_context=context, config_base_path=None,
                                          config_persister=merged.save_changes)
                loader.load_and_set(cfg)
            except config.ConfigException as exc:
                raise KubeError(f"kubeconfig {path}: {exc}") from None
            found_ns = (loader.current_context.get("context") or {}).get("namespace")
        elif explicit or context:
            raise KubeError(f"no kubeconfig found at {path}")
        else:  # no kubeconfig at all: perhaps we run in a pod
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                raise KubeError("no Kubernetes configuration: no kubeconfig (--kubeconfig, $KUBECONFIG or "
                                "~/.kube/config) and not running in a pod") from None
            sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            found_ns = sa_ns.read_text().strip() if sa_ns.is_file() else None
        return cls(client.ApiClient(cfg), namespace or found_ns or "default")

    def request(self, method: str, path: str, body: Any = None, *, query: Sequence[tuple[str, str]] = (),
                content_type: str = "application/json", timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        """One API call; the decoded JSON answer. Every failure is a one-line `KubeError`."""
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            req = self.api.param_serialize(method, path, query_params=list(query) or None, header_params=headers,
                                           body=body, auth_settings=["BearerToken"])
            resp = self.api.call_api(*req, _request_timeout=timeout_s)
            data = resp.read()
        except urllib3.exceptions.MaxRetryError as exc:  # urllib3 retried, then gave up: say why
            raise self._unreachable(exc.reason or exc, timeout_s) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._unreachable(exc, timeout_s) from None
        except ApiException as exc:  # status 0: the client's own wrapper of TLS errors
            raise KubeError(f"TLS with the Kubernetes API server at {self.host} failed: {exc.reason}") from None
        if resp.status >= 400:
            raise self._refused(method, path, resp.status, data)
        return json.loads(data) if data else None

    def _unreachable(self, exc: BaseException, timeout_s: float) -> KubeError:
        # Most specific first: urllib3 makes NewConnectionError a ConnectTimeoutError.
        if isinstance(exc, urllib3.exceptions.NameResolutionError):
            why = "its host name does not resolve (DNS); check the kubeconfig's server and your network/VPN"
        elif isinstance(exc, urllib3.exceptions.NewConnectionError):
            why = "connection refused; is the cluster running and the kubeconfig's server right?"
        elif isinstance(exc, urllib3.exceptions.TimeoutError):
            return KubeTimeout(f"the Kubernetes API server at {self.host} did not answer within {timeout_s:g} s")
        else:
            why = f"{type(exc).__name__}: {exc}"
        return KubeError(f"cannot reach the Kubernetes API server at {self.host}: {why}")

    def _refused(self, method: str, path: str, status: int, data: bytes) -> KubeError:
        try:
            message = json.loads(data).get("message") or ""
        except (ValueError, AttributeError):
            message = data.decode(errors="replace")[:200]
        verb, resource, namespace = describe_call(method, path)
        if status == 401:
            return KubeError(f"the Kubernetes API server at {self.host} refused the kubeconfig's credentials "
                             f"(401 Unauthorized): log in again", status=status)
        if status == 403:
            where = f" in namespace {namespace!r}" if namespace else ""
            return KubeError(f"forbidden by RBAC: you may not {verb} {resource}{where}; ask a cluster admin for a "
                             f"Role that allows it (server: {message})", status=status)
        return KubeError(f"{verb} {resource} failed: {status} {message}".rstrip(), status=status)

    # ---- objects -------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> dict[str, Any]:
        try:
            found: dict[str, Any] = self.request("GET", KINDS[kind].path(self.namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                raise KubeError(f"no {kind} {name!r} in namespace {self.namespace!r}", status=404) from None
            raise
        return found

    def labelled(self, kind: str, release: str) -> list[dict[str, Any]]:
        """The release's objects of one kind; none where the kind is not served (its CRD is absent)."""
        try:
            found = self.request("GET", KINDS[kind].path(self.namespace), query=[("labelSelector",
                                                                                 f"{INSTANCE_LABEL}={release}")])
        except KubeError as exc:
            if exc.status == 404:
                return []
            raise
        items: list[dict[str, Any]] = found.get("items", [])
        return items

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = self.request("POST", kind_of(obj).path(self.namespace), obj)
        return created

    def json_patch(self, kind: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
        patched: dict[str, Any] = self.request("PATCH", KINDS[kind].path(self.namespace, name), ops,
                                               content_type=JSON_PATCH)
        return patched

    def delete(self, kind: str, name: str) -> None:
        self.request("DELETE", KINDS[kind].path(self.namespace, name), {"propagationPolicy": "Background"})

    def apply(self, obj: dict[str, Any]) -> str:
        """Creates the object, or merge-patches it where it exists; says which ("created"/"configured").

        A merge patch (not a replace) keeps what the cluster set itself (a PVC's volumeName, a
        Service's clusterIP); KubeRay's lists (worker groups) are replaced whole, as they should be.
        """
        try:
            self.create(obj)
            return "created"
        except KubeError as exc:
            if exc.status != 409:
                raise
        self.request("PATCH", kind_of(obj).path(self.namespace, obj["metadata"]["name"]), obj,
                     content_type=MERGE_PATCH)
        return "configured"

    def api_versions(self) -> list[str]:
        """The optional APIs of KINDS this cluster serves ("group/version" and "group/version/Kind"),
        for `helm template --api-versions`: templates gated on `.Capabilities` (the PodMonitor)
        then render as `helm install` would render them here."""
        served = []
        for api_version in sorted({k.api_version for k in KINDS.values()} - {"v1"}):
            try:
                found = self.request("GET", f"/apis/{api_version}")
            except KubeError as exc:
                if exc.status == 404:
                    continue
                raise
            served += [api_version, *(f"{api_version}/{r['kind']}" for r in found.get("resources", [])
                                      if "/" not in r.get("name", "/"))]  # not subresources (x/status)
        return served

    def require_kuberay(self) -> None:
        """Refuses clearly when the KubeRay CRDs are not served."""
        try:
            served = self.request("GET", f"/apis/{RAY_API}")
        except KubeError as exc:
            if exc.status == 404:
                raise KubeError(OPERATOR_HINT) from None
            raise
        if not {"rayservices", "rayjobs"} <= {r.get("name") for r in served.get("resources", [])}:
            raise KubeError(OPERATOR_HINT)

    def rayservice(self, release: str) -> dict[str, Any]:
        """The release's RayService, found by its instance label (its name is the release's unless
        the chart's fullnameOverride says otherwise), or why there is none."""
        found = self.labelled("RayService", release)
        if len(found) == 1:
            return found[0]
        if found:
            raise KubeError(f"{len(found)} RayServices carry {INSTANCE_LABEL}={release} in namespace "
                            f"{self.namespace!r}: {', '.join(rs['metadata']['name'] for rs in found)}")
        self.require_kuberay()
        raise KubeError(f"no RayService {release!r} in namespace {self.namespace!r}: run `cityserve cluster deploy` "
                        "first", status=404)

    def gateway_models(self, service: str, port: int) -> dict[str, Any]:
        """`GET /v1/models` of the gateway, through the API server's service proxy."""
        path = f"/api/v1/namespaces/{self.namespace}/services/{service}:{port}/proxy/v1/models"
        models: dict[str, Any] = self.request("GET", path)
        return models


def describe_call(method: str, path: str) -> tuple[str, str, str | None]:
    """(RBAC verb, resource, namespace) of an API path, for messages: `get rayservices.ray.io`."""
    parts = path.split("?")[0].strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1] if len(parts) > 1 else "", parts[3:])
    namespace = None
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if not rest:  # discovery (/apis/ray.io/v1) or the namespace itself
        return "get", path, namespace
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "") + (f".{group}" if group else "")
    verb = {"GET": "get" if len(rest) > 1 else "list", "POST": "create", "PATCH": "patch", "PUT": "update",
            "DELETE": "delete"}.get(method, method.lower())
    return verb, resource, namespace


# ---- the chart -----------------------------------------------------------------------------------
def find_helm() -> str:
    """helm from the project's venv (`.venv/bin/helm`, beside this Python), else from PATH."""
    beside = Path(sys.executable).parent / "helm"
    if beside.is_file():
        return str(beside)
    found = shutil.which("helm")
    if found is None:
        raise KubeError(f"helm is not installed: the Makefile installs it into {beside} (`make test`), "
                        "or see https://helm.sh/docs/intro/install/")
    return found


def render_chart(chart: Path, release: str, namespace: str, values: Sequence[Path] = (), sets: Sequence[str] = (),
                 api_versions: Sequence[str] = ()) -> tuple[list[dict[str, Any]], list[str]]:
    """`helm template`: the objects to apply, and the names of the Helm hooks left out (a hook,
    such as a `helm test` pod, belongs to a Helm lifecycle event, not to the release)."""
    if not (chart / "Chart.yaml").is_file():
        raise KubeError(f"no Helm chart at {chart} (no Chart.yaml); give --chart")
    cmd = [find_helm(), "template", release, str(chart), "--namespace", namespace]
    cmd += [arg for v in values for arg in ("--values", str(v))] + [arg for s in sets for arg in ("--set", s)]
    cmd += [arg for a in api_versions for arg in ("--api-versions", a)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KubeError(f"helm template failed: {done.stderr.strip() or done.stdout.strip()}")
    objects, hooks = [], []
    for doc in yaml.safe_load_all(done.stdout):
        if not doc:
            continue
        if "helm.sh/hook" in (doc.get("metadata", {}).get("annotations") or {}):
            hooks.append(f"{doc['kind']}/{doc['metadata']['name']}")
        else:
            objects.append(doc)
    return objects, hooks


def deploy(kube: Kube, objects: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Applies every object in order; (kind, name, created|configured) for each. Unknown kinds
    and a missing operator are refused before anything changes."""
    kinds = [kind_of(obj) for obj in objects]
    if any(k.api_version == RAY_API for k in kinds):
        kube.require_kuberay()
    return [(obj["kind"], obj["metadata"]["name"], kube.apply(obj)) for obj in objects]


# ---- reading a RayService ------------------------------------------------------------------------
def is_ready(rs: dict[str, Any]) -> bool:
    """Serving: `serviceStatus: Running` (deprecated, KubeRay < 1.3) or the `Ready` condition."""
    status = rs.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
    return ready or status.get("serviceStatus") == "Running"


def observed(rs: dict[str, Any]) -> bool:
    """The operator has seen the RayService's latest spec."""
    return int((rs.get("status") or {}).get("observedGeneration", 0)) >= int(rs["metadata"].get("generation", 0))


def cluster_name(rs: dict[str, Any], role: str) -> str:
    """The Ray cluster behind `role` ("active" or "pending"); "" when there is none."""
    name: str = ((rs.get("status") or {}).get(f"{role}ServiceStatus") or {}).get("rayClusterName", "")
    return name


def worker_groups(rs: dict[str, Any]) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = rs["spec"]["rayClusterConfig"].get("workerGroupSpecs", [])
    return groups


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    """KubeRay runs Ray in a pod's first container; others are sidecars."""
    container: dict[str, Any] = group["template"]["spec"]["containers"][0]
    return container


def summary(rs: dict[str, Any]) -> dict[str, Any]:
    """What `cluster status` shows: readiness, conditions, the active/pending clusters, the groups."""
    status = rs.get("status") or {}
    clusters = {}
    for role in ("active", "pending"):
        service = status.get(f"{role}ServiceStatus") or {}
        if not service.get("rayClusterName"):
            continue
        ray = service.get("rayClusterStatus") or {}
        clusters[role] = {
            "rayClusterName": service["rayClusterName"], "state": ray.get("state", ""),
            "workers": {k: ray.get(f"{k}WorkerReplicas") for k in ("ready", "available", "desired", "min", "max")},
            "applications": {
                app: {"status": a.get("status", ""), "message": a.get("message", ""),
                      "deployments": {d: {"status": s.get("status", ""), "message": s.get("message", "")}
                                      for d, s in (a.get("serveDeploymentStatuses") or {}).items()}}
                for app, a in (service.get("applicationStatuses") or {}).items()},
        }
    return {
        "name": rs["metadata"]["name"], "namespace": rs["metadata"].get("namespace"),
        "ready": is_ready(rs), "serviceStatus": status.get("serviceStatus", ""),
        "generation": rs["metadata"].get("generation"), "observedGeneration": status.get("observedGeneration"),
        "numServeEndpoints": status.get("numServeEndpoints", 0),
        "conditions": [{k: c.get(k, "") for k in ("type", "status", "reason", "message")}
                       for c in status.get("conditions", [])],
        "clusters": clusters,
        "workerGroups": [{"group": g.get("groupName"), "replicas": g.get("replicas"),
                          "minReplicas": g.get("minReplicas"), "maxReplicas": g.get("maxReplicas"),
                          "image": ray_container(g).get("image")} for g in worker_groups(rs)],
    }


def progress(rs: dict[str, Any]) -> str:
    """One line on where a rollout stands, printed each time it changes."""
    active, pending = cluster_name(rs, "active"), cluster_name(rs, "pending")
    state = ((rs.get("status") or {}).get("pendingServiceStatus") or {}).get("rayClusterStatus", {}).get("state")
    return (f"active cluster {active or '-'}, pending {pending or '-'}{f' ({state})' if state else ''}, "
            f"{'serving' if is_ready(rs) else 'not ready'}")


def gateway(rs: dict[str, Any]) -> tuple[str, int]:
    """The Service in front of the Serve proxies, and its port: the chart's `serveService` where it
    sets them, else KubeRay's default name and the serve config's HTTP port."""
    service = rs["spec"].get("serveService") or {}
    name = (service.get("metadata") or {}).get("name") or f"{rs['metadata']['name']}-serve-svc"
    ports = (service.get("spec") or {}).get("ports") or []
    port = next((p["port"] for p in ports if p.get("name") == "serve"), ports[0]["port"] if ports else None)
    if port is None:
        config = yaml.safe_load(rs["spec"].get("serveConfigV2") or "{}") or {}
        port = (config.get("http_options") or {}).get("port", DEFAULT_SERVE_PORT)
    return name, int(port)


def registry_uri(rs: dict[str, Any]) -> str:
    """The model registry the served application reads (its `registry_uri` arg), if this machine
    can open it too: an object-store URI, or a path that exists here (e.g. inside a pod)."""
    try:
        config = yaml.safe_load(rs["spec"]["serveConfigV2"])
        uri: str = config["applications"][0]["args"]["registry_uri"]
    except (KeyError, IndexError, TypeError, yaml.YAMLError) as exc:
        raise KubeError(f"RayService {rs['metadata']['name']!r} names no registry in spec.serveConfigV2 "
                        f"(applications[0].args.registry_uri: {type(exc).__name__}); give --registry") from None
    if "://" not in uri and not Path(uri).is_dir():
        raise KubeError(f"the RayService's registry {uri} is a path inside its pods, not here: give --registry "
                        "with a URI this machine can open (s3://…, gs://…)")
    return uri


def served_version(models: dict[str, Any], domain: str) -> str | None:
    """The version the gateway serves for `domain` (None while it has no model loaded)."""
    for info in models.get("domains", []):
        if info.get("domain") == domain and info.get("ready"):
            version: str | None = info.get("version")
            return version
    return None


# ---- changing a RayService -----------------------------------------------------------------------
def scale_ops(rs: dict[str, Any], group: str, replicas: int | None, min_replicas: int | None,
              max_replicas: int | None) -> tuple[list[dict[str, Any]], dict[str, tuple[Any, Any]]]:
    """A JSON patch setting one worker group's replica bounds (the CRD has no scale subresource),
    and {field: (before, after)}. Bad numbers are refused with the rule they break."""
    groups = worker_groups(rs)
    names = [g.get("groupName") for g in groups]
    if group not in names:
        raise ConfigError(f"no worker group {group!r} in RayService {rs['metadata']['name']!r}; "
                          f"groups: {', '.join(map(str, names)) or 'none'}", field="group")
    asked = {"replicas": replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas}
    if all(v is None for v in asked.values()):
        raise ConfigError("nothing to change: give --replicas, --min and/or --max", field="replicas")
    for field, value in asked.items():
        if value is not None and value < 0:
            raise ConfigError(f"{field} must be 0 or more, not {value}", field=field)
    index = names.index(group)
    current = groups[index]
    low = min_replicas if min_replicas is not None else int(current.get("minReplicas", 0))
    high = max_replicas if max_replicas is not None else int(current.get("maxReplicas", 2**31 - 1))
    if low > high:
        raise ConfigError(f"minReplicas {low} is above maxReplicas {high}", field="minReplicas")
    if replicas is not None and not low <= replicas <= high:
        raise ConfigError(f"replicas {replicas} is outside [{low}, {high}] (minReplicas..maxReplicas)",
                          field="replicas")
    # Untouched replicas follow new bounds: KubeRay would clamp them anyway, this says so.
    wanted = {"minReplicas": low, "maxReplicas": high,
              "replicas": replicas if replicas is not None else min(max(int(current.get("replicas", low)), low), high)}
    base = f"/spec/rayClusterConfig/workerGroupSpecs/{index}"
    ops: list[dict[str, Any]] = [{"op": "test", "path": f"{base}/groupName", "value": group}]
    changes = {}
    for field, value in wanted.items():
        if current.get(field) != value:
            ops.append({"op": "add", "path": f"{base}/{field}", "value": value})
            changes[field] = (current.get(field), value)
    return (ops if changes else []), changes


def image_ops(rs: dict[str, Any], image: str) -> list[dict[str, Any]]:
    """A JSON patch moving every Ray container (head and worker groups) to `image`; empty when all
    run it already. Each change first tests the old image, so a concurrent edit fails the patch."""
    if ((rs["spec"].get("upgradeStrategy") or {}).get("type")) == "None":
        raise ConfigError(f"RayService {rs['metadata']['name']!r} has upgradeStrategy None: KubeRay would not roll a "
                          "new cluster; deploy with another strategy (the chart's upgradeStrategy.type)",
                          field="image")
    config = rs["spec"]["rayClusterConfig"]
    groups = [("headGroupSpec", config["headGroupSpec"])]
    groups += [(f"workerGroupSpecs/{i}", g) for i, g in enumerate(worker_groups(rs))]
    ops: list[dict[str, Any]] = []
    for path, group in groups:
        old = ray_container(group).get("image")
        if old != image:
            at = f"/spec/rayClusterConfig/{path}/template/spec/containers/0/image"
            ops += [{"op": "test", "path": at, "value": old}, {"op": "replace", "path": at, "value": image}]
    return ops


def settled(rs: dict[str, Any]) -> bool:
    """The operator saw the latest spec, no new cluster is being built, and the service serves."""
    return observed(rs) and not cluster_name(rs, "pending") and is_ready(rs)


def upgraded(old_active: str) -> Callable[[dict[str, Any]], bool]:
    """Done once settled with a new cluster in place of `old_active`."""
    def done(rs: dict[str, Any]) -> bool:
        return settled(rs) and cluster_name(rs, "active") not in ("", old_active)
    return done


# ---- RayJobs -------------------------------------------------------------------------------------
def rayjob(rs: dict[str, Any], release: str, command: Sequence[str], ttl_s: int,
           prepare: bool = False, deadline_s: int = JOB_DEADLINE_S) -> dict[str, Any]:
    """A RayJob running `cityserve COMMAND...` (after `cityserve data prepare DOMAIN` with `prepare`)
    on a cluster built from the RayService's own `rayClusterConfig` (same image, groups, env,
    volumes: the chart stays the one cluster spec), less what only serving needs: the tenants and
    ledger volumes, the ledger URL and GCS fault tolerance (the serving cluster's Redis and its
    password). KubeRay fails the job after `deadline_s`. COMMAND starts with the verb and the domain."""
    verb, domain = command[0], command[1]
    entrypoint = shlex.join(["cityserve", *command])
    if prepare:  # Ray runs the entrypoint in a shell
        entrypoint = f"{shlex.join(['cityserve', 'data', 'prepare', domain])} && {entrypoint}"
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    cluster = copy.deepcopy(rs["spec"]["rayClusterConfig"])
    cluster.pop("gcsFaultToleranceOptions", None)
    # The job's pods are not serving ones: the chart's PodDisruptionBudget and NetworkPolicies select
    # component=serving, and its jobs' NetworkPolicy the verbs.
    for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
        labels = (group["template"].get("metadata") or {}).get("labels") or {}
        if "app.kubernetes.io/component" in labels:
            labels["app.kubernetes.io/component"] = verb
        pod = group["template"].get("spec") or {}
        _drop_named(pod, "volumes", SERVING_ONLY_VOLUMES)
        for container in pod.get("containers", []):
            _drop_named(container, "volumeMounts", SERVING_ONLY_VOLUMES)
            _drop_named(container, "env", SERVING_ONLY_ENV)
    return {
        "apiVersion": RAY_API, "kind": "RayJob",
        "metadata": {"name": f"{release}-{verb}-{domain}-{suffix}",
                     "labels": {INSTANCE_LABEL: release, "app.kubernetes.io/component": verb,
                                "app.kubernetes.io/managed-by": "cityserve"}},
        "spec": {"entrypoint": entrypoint, "rayClusterSpec": cluster,
                 # The operator submits to the head itself: the chart's NetworkPolicy admits it, not a submitter pod.
                 "submissionMode": "HTTPMode",
                 "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": ttl_s,
                 "activeDeadlineSeconds": deadline_s},
    }


def _drop_named(obj: dict[str, Any], key: str, names: frozenset[str]) -> None:
    """Removes the items of the list `obj[key]` whose `name` is in `names` (a missing list stays missing)."""
    if key in obj:
        obj[key] = [item for item in obj[key] if item.get("name") not in names]


def job_phase(job: dict[str, Any]) -> str:
    """`deployment status / Ray job status`, e.g. `Running / RUNNING`."""
    status = job.get("status") or {}
    return f"{status.get('jobDeploymentStatus') or 'New'} / {status.get('jobStatus') or '-'}"


def job_finished(job: dict[str, Any]) -> bool:
    status = job.get("status") or {}
    return status.get("jobDeploymentStatus") in JOB_DONE or status.get("jobStatus") in RAY_JOB_DONE


def job_succeeded(job: dict[str, Any]) -> bool:
    return (job.get("status") or {}).get("jobStatus") == "SUCCEEDED"


# ---- waiting -------------------------------------------------------------------------------------
def wait_for(read: Callable[[], T], done: Callable[[T], bool], describe: Callable[[T], str], *, timeout_s: float,
             what: str, on_change: Callable[[str], None] = lambda line: None) -> T:
    """Reads every POLL_S until `done`; `on_change` hears each new description. Returns the last
    read; raises `KubeTimeout` (with the last description) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        value = read()
        line = describe(value)
        if line != last:
            on_change(line)
            last = line
        if done(value):
            return value
        if time.monotonic() >= deadline:
            raise KubeTimeout(f"timed out after {timeout_s:g} s waiting for {what}; last seen: {line}")
        time.sleep(POLL_S)
