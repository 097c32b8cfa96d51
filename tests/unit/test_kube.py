"""`cityserve cluster …` over real HTTP against kmock, an in-memory Kubernetes API: the official
client, kubeconfig loading and every request are real; the tests play the KubeRay operator by
writing the status it would write. No real cluster runs here (see the README's cluster section)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import json
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import pytest
import yaml
from click.testing import CliRunner, Result

from cityserve.cli import main
from cluster import kube as k8s
from tests.unit.conftest import events_registry

NS = "city"  # the kubeconfig context's namespace: the commands find it there
IMAGE = "ghcr.io/city/cityserve:1.0"
RS = "ray.io/v1/rayservices"
JOBS = "ray.io/v1/rayjobs"
Status = dict[str, Any]
Step = Callable[[dict[str, Any]], Status]  # the operator's next status, from the object it sees


# ---- the API server: kmock, corrected where the kubernetes client or our CLI rely on it --------
def _matches(obj: dict[str, Any], selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock 0.8's emulator with what a real API server does and kmock does not:

    - create answers 201 (the client only decodes a custom object from a 201);
    - the server sets metadata: namespace, uid, creationTimestamp, resourceVersion (on every
      write) and generation (1, then +1 whenever a write touches spec);
    - lists carry `apiVersion`/`kind` and honour `labelSelector` (kmock ignores it: `delete`
      would remove other releases' objects);
    - core discovery says groupVersion `v1` (kmock: `/v1`) and answers `/api/v1/` too.

    `operator`, when set, sees every request after it was answered (in the server's thread): the
    tests play KubeRay there, so the CLI sees the operator's work on its next read.
    """

    operator: Callable[[kmock.Request], None] | None = None
    _version: int = 0

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def stamp(self, obj: dict[str, Any], namespace: str | None) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_version(), generation=1,
                    creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        return obj

    def _stamp_patch(self, request: kmock.Request) -> None:
        if request.resource is None or request.name is None:
            return
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # kmock answers 404 itself
        meta: dict[str, Any] = {"resourceVersion": self._next_version()}
        data = request.data
        touches_spec = ("spec" in data if isinstance(data, dict)
                        else any(op.get("path", "").startswith("/spec") for op in data))
        if touches_spec and request.subresource is None:
            meta["generation"] = int(self.objects[key].raw["metadata"].get("generation", 1)) + 1
        if isinstance(data, dict):
            data.setdefault("metadata", {}).update(meta)
        else:
            data += [{"op": "add", "path": f"/metadata/{k}", "value": v} for k, v in meta.items()]

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            self.stamp(request.data, request.namespace)
        elif request.action == kmock.action.UPDATE and request.data:
            self._stamp_patch(request)
        response = await super()._handle(request)
        if request.action == kmock.action.CREATE and response.status == 200:
            response.set_status(201)
        if self.operator is not None:
            self.operator(request)
        return response

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        if request.resource.plural is None:  # `/api/v1/` (trailing slash) is discovery, not a list
            return await self._serve_version(request)
        listing: dict[str, Any] = await super()._serve_list(request)  # type: ignore[assignment]
        kind = self.resources[request.resource].kind  # known: kmock answered 404 otherwise
        group = request.resource.group
        return {"apiVersion": f"{group}/{request.resource.version}" if group else request.resource.version,
                "kind": f"{kind}List" if kind else "List",
                "metadata": {"resourceVersion": str(self._version)},
                "items": [i for i in listing["items"] if _matches(i, request.params.get("labelSelector"))]}

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        found: dict[str, Any] = await super()._serve_version(request)  # type: ignore[assignment]
        assert request.resource is not None
        if request.resource.group == "":
            found["groupVersion"] = request.resource.version
        return found


@dataclass
class Cluster:
    """The emulated API server (in its own thread and event loop) and a kubeconfig pointing at it."""

    server: ApiServer
    url: str
    kubeconfig: Path

    def cli(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(main, ["cluster", *args, "--kubeconfig", str(self.kubeconfig)], input=input)

    def kube(self) -> k8s.Kube:
        return k8s.Kube.connect(str(self.kubeconfig))

    def seed(self, resource: str, obj: dict[str, Any]) -> None:
        """Stores an object as if created earlier (the server thread is idle between CLI calls)."""
        self.server.objects[resource, NS, obj["metadata"]["name"]] = self.server.stamp(copy.deepcopy(obj), NS)

    def get(self, resource: str, name: str) -> dict[str, Any]:
        return self.server.objects[resource, NS, name].raw

    def exists(self, resource: str, name: str) -> bool:
        key = (kmock.resource(resource), NS, name)
        return key in self.server.objects and not self.server.objects[key].deleted

    def writes(self, resource: str) -> list[str]:
        """The methods of every request that could change objects of `resource`."""
        return [str(r.method.value) for r in list(self.server)
                if r.resource == resource and r.method != kmock.method.GET]

    def play(self, resource: str, after: kmock.method, steps: list[Status | Step]) -> None:
        """The operator: after an `after` request on `resource`, each later read of that object
        (fetched or listed) merges the next step into its status; a callable step sees the object."""
        armed: list[str] = []

        def operator(request: kmock.Request) -> None:
            if request.resource != resource:
                return
            if request.method == after:
                armed.append(request.name or request.data["metadata"]["name"])
            elif request.method == kmock.method.GET and armed and request.name in (None, armed[-1]) and steps:
                obj = self.server.objects[resource, NS, armed[-1]]
                step = steps.pop(0)
                obj.patch({"status": step(obj.raw) if callable(step) else step})

        self.server.operator = operator


def _kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "kmock", "user": "tester", "namespace": NS}}],
    }))
    return path


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setattr(k8s, "POLL_S", 0.01)
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[tuple[ApiServer, str, asyncio.Event]] = concurrent.futures.Future()

    async def serve() -> None:
        async with ApiServer() as server, kmock.Server(server) as http:
            for kind, where in k8s.KINDS.items():
                server.resources[f"{where.api_version}/{where.plural}"] = kmock.ResourceInfo(kind=kind, namespaced=True)
            stop = asyncio.Event()
            started.set_result((server, str(http.url).rstrip("/"), stop))
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    server, url, stop = started.result(timeout=10)
    yield Cluster(server, url, _kubeconfig(tmp_path / "kubeconfig", url))
    loop.call_soon_threadsafe(stop.set)
    thread.join(timeout=10)
    loop.close()


def said(result: Result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


# ---- a RayService as the chart renders it, with the status KubeRay writes ----------------------
SERVING = {k8s.INSTANCE_LABEL: "cityserve", "app.kubernetes.io/component": "serving"}


def _group(name: str, gpus: int = 0) -> dict[str, Any]:
    limits = {"cpu": "4", "memory": "16Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    return {"groupName": name, "replicas": 1, "minReplicas": 0, "maxReplicas": 4, "rayStartParams": {},
            "template": {"metadata": {"labels": SERVING}, "spec": {"containers": [
                {"name": "ray-worker", "image": IMAGE, "env": [{"name": "CITYSERVE_REGISTRY_URI", "value": "s3://m"}],
                 "resources": {"limits": limits}},
                {"name": "log-shipper", "image": "fluent/fluent-bit:3.1"}]}}}


def rayservice(registry_uri: str = "s3://cityserve-models/registry") -> dict[str, Any]:
    serve_config = {"applications": [{"name": "cityserve", "import_path": "services.gateway:build_app",
                                      "args": {"registry_uri": registry_uri}}]}
    return {
        "apiVersion": "ray.io/v1", "kind": "RayService",
        "metadata": {"name": "cityserve", "labels": {k8s.INSTANCE_LABEL: "cityserve"}},
        "spec": {"serveConfigV2": yaml.safe_dump(serve_config),
                 "rayClusterConfig": {
                     "rayVersion": "2.60.0",
                     "headGroupSpec": {"rayStartParams": {}, "template": {"metadata": {"labels": SERVING}, "spec": {
                         "containers": [{"name": "ray-head", "image": IMAGE}]}}},
                     "workerGroupSpecs": [_group("cpu"), _group("gpu", gpus=1)]}},
        "status": {
            "serviceStatus": "Running", "observedGeneration": 1, "numServeEndpoints": 3,
            "conditions": [{"type": "Ready", "status": "True", "reason": "NonZeroServeEndpoints", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "activeServiceStatus": {
                "rayClusterName": "cityserve-raycluster-old",
                "rayClusterStatus": {"state": "ready", "readyWorkerReplicas": 2, "desiredWorkerReplicas": 2},
                "applicationStatuses": {"cityserve": {"status": "RUNNING", "serveDeploymentStatuses": {
                    "Gateway": {"status": "HEALTHY"}, "events": {"status": "UPDATING", "message": "loading v2"}}}}},
        },
    }


def configmap(name: str, release: str = "cityserve", **data: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {k8s.INSTANCE_LABEL: release}}, "data": data}


# ---- the emulator itself --------------------------------------------------------------------------
def test_the_emulator_answers_as_the_typed_client_expects(cluster: Cluster) -> None:
    from kubernetes import client, config

    api = config.new_client_from_config(str(cluster.kubeconfig))
    core = client.CoreV1Api(api)
    for name, release in (("a", "cityserve"), ("b", "other")):
        meta = client.V1ObjectMeta(name=name, labels={k8s.INSTANCE_LABEL: release})
        made = core.create_namespaced_config_map(NS, client.V1ConfigMap(metadata=meta))
        assert made.metadata and made.metadata.namespace == NS and made.metadata.uid and made.metadata.resource_version
    listed = core.list_namespaced_config_map(NS, label_selector=f"{k8s.INSTANCE_LABEL}=cityserve")
    assert listed.kind == "ConfigMapList" and [c.metadata.name for c in listed.items if c.metadata] == ["a"]
    made_rs: Any = client.CustomObjectsApi(api).create_namespaced_custom_object("ray.io", "v1", NS, "rayservices",
                                                                                rayservice())
    assert made_rs["metadata"]["generation"] == 1  # None unless the answer is a 201
    assert core.get_api_resources().group_version == "v1"


# ---- deploy ---------------------------------------------------------------------------------------
def test_deploy_creates_then_updates_each_object(cluster: Cluster) -> None:
    kube = cluster.kube()
    manifests = [configmap("cityserve-config", mode="a"), rayservice()]
    del manifests[1]["status"]
    assert k8s.deploy(kube, copy.deepcopy(manifests)) == [
        ("ConfigMap", "cityserve-config", "created"), ("RayService", "cityserve", "created")]
    manifests[0]["data"]["mode"] = "b"
    manifests[1]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 9
    assert [action for *_, action in k8s.deploy(kube, manifests)] == ["configured", "configured"]
    assert cluster.get("v1/configmaps", "cityserve-config")["data"] == {"mode": "b"}
    rs = cluster.get(RS, "cityserve")
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 9
    assert rs["metadata"]["generation"] == 2


def test_deploy_refuses_unknown_kinds_before_changing_anything(cluster: Cluster) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stray"}}
    with pytest.raises(k8s.KubeError, match=r"v1 Pod 'stray'.*does not apply.*add it to KINDS"):
        k8s.deploy(cluster.kube(), [configmap("first"), pod])
    assert not cluster.exists("v1/configmaps", "first")


def test_deploy_without_kuberay_says_how_to_install_it(cluster: Cluster) -> None:
    for plural in ("rayservices", "rayjobs"):
        del cluster.server.resources[f"ray.io/v1/{plural}"]
    with pytest.raises(k8s.KubeError) as failed:
        k8s.deploy(cluster.kube(), [configmap("first"), rayservice()])
    assert failed.value.message == k8s.OPERATOR_HINT
    assert not cluster.exists("v1/configmaps", "first")  # checked before anything is applied
    out = cluster.cli("status")
    assert out.exit_code == 2 and "KubeRay operator is not installed: helm repo add kuberay" in said(out)


@pytest.mark.parametrize(("values", "gateway"), [("", ("cityserve-serve", 8000)),
                                                 ("ci/all-on-values.yaml", ("city-serve", 8080))])
def test_deploy_the_real_chart_twice(cluster: Cluster, values: str, gateway: tuple[str, int]) -> None:
    chart = k8s.CHART_DIR
    if not (chart / "Chart.yaml").is_file():
        pytest.fail(f"no Helm chart at {chart}: the chart is part of this repository")
    try:
        k8s.find_helm()
    except k8s.KubeError as exc:
        pytest.fail(f"{exc.message} (`make test` installs helm into .venv/bin)")
    flags = ["-f", str(chart / values)] if values else []
    expected, _ = k8s.render_chart(chart, "cityserve", NS, [chart / values] if values else [],
                                   api_versions=cluster.kube().api_versions())
    # What the cluster serves reaches the chart's .Capabilities: its PodMonitor renders (all-on values).
    assert ("PodMonitor" in {o["kind"] for o in expected}) == bool(values)
    first = cluster.cli("deploy", *flags, "--json")
    assert first.exit_code == 0, first.output
    applied = [r for r in json.loads(first.output) if r["action"] != "skipped (helm hook)"]
    assert [(r["kind"], r["name"], r["action"]) for r in applied] == [
        (o["kind"], o["metadata"]["name"], "created") for o in expected]
    again = cluster.cli("deploy", *flags, "--json")
    assert again.exit_code == 0, again.output
    assert {r["action"] for r in json.loads(again.output)} <= {"configured", "skipped (helm hook)"}
    # The chart's contract with the other commands.
    assert all(o["metadata"]["labels"][k8s.INSTANCE_LABEL] == "cityserve" for o in expected)
    rs = cluster.kube().rayservice("cityserve")
    assert {"cpu", "gpu"} <= {g["groupName"] for g in k8s.worker_groups(rs)}
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["registry_uri"]
    assert k8s.gateway(rs) == gateway


def test_deploy_wait_follows_the_operator_until_the_service_serves(cluster: Cluster) -> None:
    cluster.play(RS, kmock.method.POST, [
        {"pendingServiceStatus": {"rayClusterName": "cityserve-raycluster-a", "rayClusterStatus": {"state": ""}}},
        lambda rs: {**rayservice()["status"], "observedGeneration": rs["metadata"]["generation"],
                    "pendingServiceStatus": None, "activeServiceStatus": {"rayClusterName": "cityserve-raycluster-a"}},
    ])
    out = cluster.cli("deploy", "--wait", "--timeout", "10")
    assert out.exit_code == 0, out.output
    assert "pending cityserve-raycluster-a, not ready" in said(out)
    assert said(out).endswith("RayService cityserve serves")


# ---- connection ------------------------------------------------------------------------------------
def test_kubeconfig_from_the_environment_with_context_and_namespace(cluster: Cluster) -> None:
    cluster.seed(RS, rayservice())
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["contexts"].append({"name": "other", "context": {"cluster": "kmock", "user": "tester",
                                                            "namespace": "elsewhere"}})
    cluster.kubeconfig.write_text(yaml.safe_dump(config))

    def status(*args: str) -> Result:
        return CliRunner().invoke(main, ["cluster", "status", "--json", *args],
                                  env={"KUBECONFIG": str(cluster.kubeconfig)})

    assert json.loads(status().output)["namespace"] == NS  # the current context's namespace
    assert "no RayService 'cityserve' in namespace 'elsewhere'" in said(status("--context", "other"))
    assert json.loads(status("--context", "other", "-n", NS).output)["name"] == "cityserve"
    assert "Expected object with name nope" in said(status("--context", "nope"))


# ---- errors every command shares ------------------------------------------------------------------
def test_rbac_refusal_names_verb_resource_and_namespace(cluster: Cluster) -> None:
    cluster.server[f"get /apis/ray.io/v1/namespaces/{NS}/rayservices"] << kmock.KubernetesError(
        status=403, reason="Forbidden", message='rayservices.ray.io is forbidden: User "tester" cannot list')
    out = cluster.cli("status")
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "forbidden by RBAC: you may not list rayservices.ray.io in namespace 'city'" in said(out)


def test_unreachable_api_server_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = CliRunner().invoke(main, ["cluster", "status", "--kubeconfig", str(_kubeconfig(tmp_path / "kc", url))])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert f"cannot reach the Kubernetes API server at {url}: connection refused" in said(out)


def test_missing_rayservice_says_to_deploy_first(cluster: Cluster) -> None:
    out = cluster.cli("status")
    assert out.exit_code == 2
    assert "no RayService 'cityserve' in namespace 'city': run `cityserve cluster deploy` first" in said(out)


# ---- status / scale -------------------------------------------------------------------------------
def test_status_shows_service_clusters_apps_and_groups(cluster: Cluster) -> None:
    cluster.seed(RS, rayservice())
    out = cluster.cli("status")
    assert out.exit_code == 0, out.output
    text = said(out)
    for expected in ("RayService city/cityserve: serving", "Ready", "NonZeroServeEndpoints",
                     "cityserve-raycluster-old", "Gateway", "HEALTHY", "loading v2", "gpu", IMAGE):
        assert expected in text
    assert {r.headers.get("Authorization") for r in cluster.server} == {"Bearer test-token"}  # the kubeconfig's user
    info = json.loads(cluster.cli("status", "--json").output)
    assert info["ready"] and info["clusters"]["active"]["applications"]["cityserve"]["deployments"]["events"] == {
        "status": "UPDATING", "message": "loading v2"}
    assert [(g["group"], g["replicas"], g["maxReplicas"]) for g in info["workerGroups"]] == [("cpu", 1, 4),
                                                                                             ("gpu", 1, 4)]


def test_scale_patches_only_the_named_group(cluster: Cluster) -> None:
    cluster.seed(RS, rayservice())
    out = cluster.cli("scale", "gpu", "--replicas", "3", "--max", "6")
    assert out.exit_code == 0, out.output
    cpu, gpu = k8s.worker_groups(cluster.get(RS, "cityserve"))
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (3, 0, 6)
    assert (cpu["replicas"], cpu["minReplicas"], cpu["maxReplicas"]) == (1, 0, 4)
    assert cluster.writes(RS) == ["PATCH"]


@pytest.mark.parametrize(("args", "message"), [
    (["gpu", "--min", "3", "--max", "2"], "minReplicas 3 is above maxReplicas 2"),
    (["gpu", "--replicas", "9"], "replicas 9 is outside [0, 4]"),
    (["cpu", "--replicas", "-1"], "replicas must be 0 or more, not -1"),
    (["tpu", "--replicas", "1"], "no worker group 'tpu' in RayService 'cityserve'; groups: cpu, gpu"),
    (["cpu"], "nothing to change"),
])
def test_scale_refuses_bad_numbers_and_unknown_groups(cluster: Cluster, args: list[str], message: str) -> None:
    cluster.seed(RS, rayservice())
    out = cluster.cli("scale", *args)
    assert out.exit_code == 2 and message in said(out), out.output
    assert cluster.writes(RS) == []


# ---- upgrade --------------------------------------------------------------------------------------
def test_upgrade_image_waits_for_the_new_cluster_to_take_over(cluster: Cluster) -> None:
    cluster.seed(RS, rayservice())
    new = "ghcr.io/city/cityserve:1.1"
    cluster.play(RS, kmock.method.PATCH, [
        # The operator may acknowledge the new spec before it starts the new cluster: not done yet.
        lambda rs: {"observedGeneration": rs["metadata"]["generation"]},
        {"pendingServiceStatus": {"rayClusterName": "cityserve-raycluster-new", "rayClusterStatus": {"state": ""}},
         "conditions": [{"type": "UpgradeInProgress", "status": "True", "reason": "BothActivePendingClustersExist"}]},
        {"pendingServiceStatus": None, "activeServiceStatus": {"rayClusterName": "cityserve-raycluster-new"}},
    ])
    out = cluster.cli("upgrade", "--image", new, "--timeout", "10")
    assert out.exit_code == 0, out.output
    assert "pending cityserve-raycluster-new" in said(out) and f"{new} serves" in said(out)
    config = cluster.get(RS, "cityserve")["spec"]["rayClusterConfig"]
    pods = [config["headGroupSpec"], *config["workerGroupSpecs"]]
    assert [p["template"]["spec"]["containers"][0]["image"] for p in pods] == [new] * 3
    assert [c["image"] for c in config["workerGroupSpecs"][0]["template"]["spec"]["containers"][1:]] == [
        "fluent/fluent-bit:3.1"]  # sidecars keep theirs


def test_upgrade_image_times_out_clearly_when_the_operator_never_acts(cluster: Cluster) -> None:
    cluster.seed(RS, rayservice())
    out = cluster.cli("upgrade", "--image", "ghcr.io/city/cityserve:1.1", "--timeout", "0.2")
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert ("timed out after 0.2 s waiting for a new Ray cluster running ghcr.io/city/cityserve:1.1 to take over; "
            "last seen: active cluster cityserve-raycluster-old, pending -") in said(out)


def test_upgrade_image_is_refused_where_kuberay_would_not_roll(cluster: Cluster) -> None:
    cluster.seed(RS, {**rayservice(), "spec": {**rayservice()["spec"], "upgradeStrategy": {"type": "None"}}})
    out = cluster.cli("upgrade", "--image", "ghcr.io/city/cityserve:1.1")
    assert out.exit_code == 2 and "has upgradeStrategy None: KubeRay would not roll a new cluster" in said(out)
    assert cluster.writes(RS) == []


def test_upgrade_model_moves_the_stage_and_never_edits_the_rayservice(cluster: Cluster, tmp_path: Path) -> None:
    registry = events_registry(tmp_path, 2)
    cluster.seed(RS, rayservice(registry_uri=registry.uri))
    served, replicas_poll = ["v1"], [True]

    def gateway(request: kmock.Request) -> dict[str, Any]:
        """Replicas serve what the stage names (they poll it), one read late."""
        served.append(registry.stages("events")["production"] if replicas_poll[0] else served[-1])
        return {"domains": [{"domain": "events", "version": served[-2], "ready": True},
                            {"domain": "energy", "version": None, "ready": False}]}

    cluster.server[f"get /api/v1/namespaces/{NS}/services/cityserve-serve-svc:8000/proxy/v1/models"] << gateway
    out = cluster.cli("upgrade", "--model", "events", "v2", "--timeout", "10")
    assert out.exit_code == 0, out.output
    assert registry.get("events", "production").version == "v2"
    assert "the gateway serves events v1" in said(out) and "events v2 serves" in said(out)
    assert cluster.writes(RS) == []

    replicas_poll[0] = False  # replicas that never pick the stage up: a timeout that says how to go back
    stuck = cluster.cli("upgrade", "--model", "events", "v1", "--timeout", "0.2")
    assert stuck.exit_code == 2 and registry.get("events", "production").version == "v1"
    assert ("The registry's production is v1; `cityserve cluster upgrade --model events v2` moves it back"
            in said(stuck))

    cluster.server.objects[kmock.resource(RS), NS, "cityserve"].patch(  # a registry on the pods' shared volume
        {"spec": {"serveConfigV2": yaml.safe_dump({"applications": [{"args": {"registry_uri": "/mnt/reg"}}]})}})
    far = cluster.cli("upgrade", "--model", "events", "v1")
    assert far.exit_code == 2 and "registry /mnt/reg is a path inside its pods, not here: give --registry" in said(far)
    assert cluster.writes(RS) == []


# ---- train / tune ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("verb", "args", "entrypoint", "final", "exit_code"), [
    ("train", ["--profile", "full"], "cityserve train events --profile full",
     {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, 0),
    ("tune", ["--num-samples", "4", "--prepare-data"],
     "cityserve data prepare events && cityserve tune events --num-samples 4",
     {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "trial 3 diverged"}, 2),
])
def test_train_and_tune_run_a_rayjob_on_the_services_cluster_spec(
        cluster: Cluster, verb: str, args: list[str], entrypoint: str, final: Status, exit_code: int) -> None:
    cluster.seed(RS, rayservice())
    cluster.play(JOBS, kmock.method.POST, [{"jobDeploymentStatus": "Initializing"},
                                           {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, final])
    out = cluster.cli(verb, "events", *args, "--timeout", "10")
    assert out.exit_code == exit_code, out.output
    [job] = [obj.raw for (res, _, _), obj in cluster.server.objects.items() if res == JOBS]
    assert job["metadata"]["name"].startswith(f"cityserve-{verb}-events-")
    assert job["metadata"]["labels"][k8s.INSTANCE_LABEL] == "cityserve"
    # The RayService's cluster spec, but its pods are labelled as the job's, not as serving ones.
    expected = json.loads(json.dumps(cluster.get(RS, "cityserve")["spec"]["rayClusterConfig"]).replace(
        '"app.kubernetes.io/component": "serving"', f'"app.kubernetes.io/component": "{verb}"'))
    assert job["spec"]["rayClusterSpec"] == expected
    assert job["spec"]["entrypoint"] == entrypoint
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] == 600
    assert job["spec"]["activeDeadlineSeconds"] == k8s.JOB_DEADLINE_S  # a hung job does not hold its nodes forever
    assert "Running / RUNNING" in said(out)
    if exit_code:
        assert "ended Failed / FAILED: trial 3 diverged" in said(out)
    else:
        assert "succeeded" in said(out)


def test_train_jobs_get_no_tenants_ledger_or_serving_redis(cluster: Cluster) -> None:
    """A training job runs user code on a copy of the serving cluster: the tenants' keys, the ledger's
    volume and URL (a password) and the serving GCS's Redis stay with serving; `--deadline` bounds it."""
    rs = rayservice()
    config = rs["spec"]["rayClusterConfig"]
    config["gcsFaultToleranceOptions"] = {"redisAddress": "redis:6379",
                                          "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "r", "key": "p"}}}}
    ledger_env = {"name": "CITYSERVE_LEDGER_URL", "valueFrom": {"secretKeyRef": {"name": "ledger", "key": "url"}}}
    for group in [config["headGroupSpec"], *config["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        pod["volumes"] = [{"name": "tenants", "secret": {"secretName": "t"}},
                          {"name": "ledger", "persistentVolumeClaim": {"claimName": "l"}},
                          {"name": "shared", "persistentVolumeClaim": {"claimName": "s"}}]
        ray = pod["containers"][0]
        ray["env"] = [*ray.get("env", []), ledger_env]
        ray["volumeMounts"] = [{"name": n, "mountPath": f"/{n}"} for n in ("tenants", "ledger", "shared")]
    cluster.seed(RS, rs)
    out = cluster.cli("train", "events", "--deadline", "3600", "--no-follow")
    assert out.exit_code == 0, out.output
    [job] = [obj.raw for (res, _, _), obj in cluster.server.objects.items() if res == JOBS]
    spec = job["spec"]["rayClusterSpec"]
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert "gcsFaultToleranceOptions" not in spec
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert [v["name"] for v in pod["volumes"]] == ["shared"]  # the shared volume stays: the data is there
        ray = pod["containers"][0]
        assert [m["name"] for m in ray["volumeMounts"]] == ["shared"]
        assert "CITYSERVE_LEDGER_URL" not in {e["name"] for e in ray["env"]}
        assert {e["name"] for e in ray["env"]} >= {"CITYSERVE_REGISTRY_URI"} or group is spec["headGroupSpec"]
    # The RayService itself is untouched.
    assert cluster.get(RS, "cityserve")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    refused = cluster.cli("train", "events", "--deadline", "0", "--no-follow")
    assert refused.exit_code == 2 and "--deadline" in said(refused)


def test_train_refuses_options_that_cityserve_train_does_not_take(cluster: Cluster) -> None:
    cluster.seed(RS, rayservice())
    out = cluster.cli("train", "events", "--profile", "huge")
    assert out.exit_code == 2 and "'huge' is not one of 'quick', 'full'" in said(out)
    assert cluster.writes(JOBS) == []
    submitted = cluster.cli("train", "events", "--no-follow")
    assert submitted.exit_code == 0 and "submitted RayJob cityserve-train-events-" in said(submitted)


# ---- delete ---------------------------------------------------------------------------------------
def test_delete_confirms_then_removes_only_the_release(cluster: Cluster) -> None:
    cluster.seed(RS, rayservice())
    cluster.seed("v1/configmaps", configmap("cityserve-config"))
    cluster.seed("v1/configmaps", configmap("neighbour-config", release="neighbour"))
    declined = cluster.cli("delete", input="n\n")
    assert declined.exit_code == 1 and "Aborted" in declined.output
    assert cluster.exists(RS, "cityserve") and cluster.writes(RS) == []
    out = cluster.cli("delete", "--yes")
    assert out.exit_code == 0, out.output
    assert not cluster.exists(RS, "cityserve") and not cluster.exists("v1/configmaps", "cityserve-config")
    assert cluster.exists("v1/configmaps", "neighbour-config")
