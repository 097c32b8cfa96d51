"""The one serve config: a base file inside the chart, a typed overlay per environment.

`helm/serve/base.yaml` is a Ray `ServeDeploySchema` document: one application whose ingress is
the gateway and whose other deployments are the four domain models. `helm/serve/<env>.yaml` is an
overlay (`ServeOverlay`) that changes only what differs in that environment: local runs on CPU
with small replica ranges, the cluster with GPUs and a remote registry. The same merge feeds
`cityserve serve up` here and the chart's RayService `serveConfigV2` on Kubernetes.

Application args are `PlatformArgs`; each domain deployment's `user_config` is `ModelConfig`.
Both forbid unknown keys, so a typo fails at load time, not as a silent default.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import ConfigError
from core.redact import has_password, redact
from domains import DOMAINS
from services.samples import SampleArgs

SERVE_DIR = Path(__file__).resolve().parent.parent / "helm" / "serve"
APP_NAME = "cityserve"
GATEWAY = "Gateway"
# The HTTP route each domain answers on (`POST /v1/<domain>/<verb>`).
VERBS = {"traffic": "forecast", "events": "classify", "sentiment": "analyze", "energy": "forecast"}


class DomainArgs(BaseModel):
    """How the gateway treats one domain's requests."""

    model_config = ConfigDict(extra="forbid")

    max_items: int = Field(64, ge=1, le=4096, description="Most items one request may carry (413 above).")
    timeout_s: float = Field(10.0, gt=0, le=600, description="A request still unanswered after this gets 504.")
    torch_threads: int = Field(1, ge=1, le=64, description="torch.set_num_threads in each model replica.")
    max_inflight_items: int = Field(
        1024, ge=1, description="Items one gateway replica lets wait on the domain at once; past it 503 with "
        "Retry-After. Size it to what the model answers well within timeout_s, or overload makes every "
        "request time out instead of a few being told to come back.")


class PlatformArgs(BaseModel):
    """The application builder's args (`services.gateway:build_app`)."""

    # Errors name the field, never its input: Ray shows a refused app's error in its dashboard and
    # logs, and the input may be a ledger URL with a password in it.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    registry_uri: str = Field(description="Model registry: a path or a pyarrow filesystem URI (s3://, gs://).")
    ledger_url: str = Field(description="Usage ledger and tenants: sqlite:///FILE, postgresql://... without a "
                            "password, or env:NAME for a URL in that environment variable (a Secret's, on "
                            "Kubernetes): the only way a password may come.")
    ledger_resource: str | None = Field(None, description="A Ray custom resource the ledger's owner (the admission "
                                        "actor) needs: the node where an SQLite ledger's volume is mounted.")
    tenants_file: str | None = Field(None, description="A YAML tenants file (a mounted Secret) the platform applies "
                                     "at start and whenever it changes; see `Store.sync_tenants`.")
    usage_spill_dir: str | None = Field(None, description="Where the admission actor keeps usage rows while the "
                                        "ledger is unreachable (default: a folder in its node's temp dir).")
    domains: dict[str, DomainArgs] = Field(description="The domains served, by name, with their limits.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Larger request bodies get 413.")
    unauthenticated_per_s: float = Field(20.0, gt=0, description="Requests with keys the platform refuses (401) "
                                         "one client address may send a second, on average, before its requests "
                                         "with keys not admitted lately get 429 without being looked up.")
    forwarded_for_hops: int = Field(0, ge=0, le=8, description="Proxies in front of the gateway that append their "
                                    "peer to X-Forwarded-For (an ingress controller: 1); the client address is the "
                                    "entry the outermost wrote. 0: the connection's peer.")
    samples: SampleArgs = Field(default_factory=SampleArgs, description="The sample log of tenants that opt in "
                                "(`cityserve tenants set-quota NAME --sample-rate`) and their feedback, kept under "
                                "the registry: retention and the gateway's queue.")
    api_docs: Literal["public", "off"] = Field(
        "public", description="public: the gateway serves /docs, /redoc and /openapi.json to anyone; off: none "
        "of them (they list every route and limit to whoever asks).")

    @field_validator("ledger_url")
    @classmethod
    def _no_password(cls, value: str) -> str:
        # The serve config is readable from Ray's dashboard API and state/serve-config.json.
        if has_password(value):
            raise ValueError(f"ledger_url {redact(value)!r} carries a password, which the serve config would show "
                             "to anyone who can read it: put the URL in an environment variable of the Ray "
                             "containers and set ledger_url to env:NAME")
        return value

    @field_validator("domains")
    @classmethod
    def _known(cls, value: dict[str, DomainArgs]) -> dict[str, DomainArgs]:
        unknown = sorted(set(value) - set(DOMAINS))
        if unknown or not value:
            raise ValueError(f"domains {unknown or '{}'}: choose one or more of {sorted(DOMAINS)}")
        return value


class ModelConfig(BaseModel):
    """A domain deployment's `user_config`: changed at run time through `reconfigure()`."""

    model_config = ConfigDict(extra="forbid")

    stage: str = Field("production", description="The registry alias served; never a version number.")
    generation: int = Field(0, ge=0, description="Bumped by promote/rollback so replicas reload the stage.")
    max_batch_size: int = Field(32, ge=1, le=1024, description="@serve.batch size: requests per model batch.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="How long a batch waits to fill.")
    poll_s: float = Field(10.0, ge=0, le=3600, description="How often a replica re-reads the registry's stages and "
                          "reloads when the stage moved (how a promotion reaches a Kubernetes cluster without "
                          "editing its RayService); 0: only on a new generation.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the replica runs its model: auto = the GPU Ray assigned the replica "
        "(`ray_actor_options.num_gpus`), else the CPU; cpu or cuda force one (cuda without a GPU fails the load).")
    backend: Literal["auto", "torch", "student-int8", "onnx-int8", "onnx-fp32"] = Field(
        "auto", description="What computes the answers: auto = PyTorch (bf16) on a GPU, on the CPU the version's "
        "fastest ONNX artifact (its int8 student, else its int8 model, else its fp32 model, else PyTorch fp32); "
        "torch forces PyTorch; an artifact's name forces that artifact (text domains; the registry makes them).")


class ServeOverlay(BaseModel):
    """What one environment changes in the base file. Dicts merge key by key into the base."""

    model_config = ConfigDict(extra="forbid")

    http_options: dict[str, Any] = Field(default_factory=dict, description="Merged into http_options.")
    proxy_location: str | None = Field(None, description="Replaces proxy_location.")
    args: dict[str, Any] = Field(default_factory=dict, description="Merged into the application's args.")
    deployments: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per deployment name, merged into that deployment's options.")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overlay(base: dict[str, Any], overlay: ServeOverlay) -> dict[str, Any]:
    config = copy.deepcopy(base)
    config["http_options"] = deep_merge(config.get("http_options", {}), overlay.http_options)
    if overlay.proxy_location is not None:
        config["proxy_location"] = overlay.proxy_location
    (app,) = config["applications"]
    app["args"] = deep_merge(app.get("args", {}), overlay.args)
    names = [d["name"] for d in app["deployments"]]
    unknown = sorted(set(overlay.deployments) - set(names))
    if unknown:
        raise ConfigError(f"overlay names deployments {unknown} that the base lacks ({names})", field="deployments")
    app["deployments"] = [deep_merge(d, overlay.deployments.get(d["name"], {})) for d in app["deployments"]]
    return config


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {redact(str(exc))}") from exc  # a YAML error quotes the line at fault
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top")
    return data


def environments() -> list[str]:
    return sorted(p.stem for p in SERVE_DIR.glob("*.yaml") if p.stem != "base")


def load_overlay(environment: str) -> ServeOverlay:
    path = SERVE_DIR / f"{environment}.yaml"
    if not path.exists():
        raise ConfigError(f"no serve overlay {environment!r}; have {environments()}", field="environment")
    try:
        return ServeOverlay.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {redact(str(exc))}") from exc


def build_config(environment: str, *extra: ServeOverlay, domains: Sequence[str] | None = None) -> dict[str, Any]:
    """base.yaml + the environment's overlay + `extra` overlays (run-time values), validated;
    `domains` keeps only those (a run may serve fewer than the base has)."""
    config = _read_yaml(SERVE_DIR / "base.yaml")
    for overlay in (load_overlay(environment), *extra):
        config = apply_overlay(config, overlay)
    (app,) = config["applications"]
    if domains:
        app["args"]["domains"] = {d: v for d, v in app["args"]["domains"].items() if d in domains}
    served = set(app["args"]["domains"])
    app["deployments"] = [d for d in app["deployments"] if d["name"] == GATEWAY or d["name"] in served]
    validate_config(config)
    return config


def validate_config(config: dict[str, Any]) -> PlatformArgs:
    """Parses a whole config with Ray's schema, the app's args and each model's user_config."""
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config)
        (app,) = config["applications"]
        args = PlatformArgs.model_validate(app["args"])
        names = {d["name"] for d in app["deployments"]}
        for dep in app["deployments"]:
            if dep["name"] != GATEWAY:
                ModelConfig.model_validate(dep.get("user_config") or {})
    except (ValidationError, ValueError, KeyError) as exc:
        raise ConfigError(f"serve config refused: {redact(str(exc))}") from exc  # Ray's schema quotes its input
    missing = sorted(set(args.domains) - names)
    if missing:
        raise ConfigError(f"domains {missing} have no deployment in the serve config", field="deployments")
    return args


def model_configs(config: dict[str, Any]) -> dict[str, ModelConfig]:
    (app,) = config["applications"]
    return {d["name"]: ModelConfig.model_validate(d.get("user_config") or {})
            for d in app["deployments"] if d["name"] != GATEWAY}
