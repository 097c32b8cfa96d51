"""One Serve deployment class for every domain: the registry stage's model behind `@serve.batch`.

The serve config binds this class once per domain (deployment name = domain name), so the four
endpoints share one implementation of batching, reloading and health, and each domain's model
code stays in `domains/`. Requests arrive from the gateway as lists of already-validated item
dicts; one batch gathers the items of many requests into a single `Predictor.predict` call.

While the registry runs a canary of the domain (`Registry.start_canary`), each replica holds the
candidate beside production and draws, per request, whether it is in the canary's share: such a
request is answered by the candidate or, for a shadow canary, by production with the candidate's
answers beside them for the gateway to record (`canary_groups`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

from ray import serve

from cluster.local import loopback_replica_grpc
from core.errors import CityServeError, ConfigError, InvalidInput, RegistryError
from domains import get_domain
from domains.base import Predictor
from services.config import ModelConfig
from services.errors import Internal
from training.registry import PRODUCTION, Registry

loopback_replica_grpc()  # imported by the replica before Serve starts its gRPC server

logger = logging.getLogger("ray.serve")


class ModelNotReady(CityServeError):
    """The replica has no model loaded (yet): the gateway answers 503 with Retry-After."""

    code = "model_not_ready"


def predict_groups(predictor: Predictor, groups: Sequence[Sequence[Any]], *, explain: bool = False
                   ) -> list[dict[str, Any]]:
    """Answers several requests' items in one `predict` (or, with `explain`, `explain`) call: per
    request `{"version", "items"}`, or `{"status", "error", "version"}` for a request the model refuses.

    A request whose items the model refuses (an unknown sensor, say) must fail alone, not take the
    other requests of its batch with it: on any error each request is retried on its own, so
    `InvalidInput` is that request's 422 and anything else (a model bug one input trips) its
    error alone.
    """
    run = predictor.explain if explain else predictor.predict

    def answer(items: Sequence[Any]) -> dict[str, Any]:
        # without None fields: an `explanation` is there only when asked for
        answers = [a.model_dump(mode="json", exclude_none=True) for a in run(items)]
        return {"version": predictor.version, "items": answers}

    if len(groups) == 1:
        try:
            return [answer(groups[0])]
        except InvalidInput as exc:
            return [refusal(exc, 422, predictor.version)]
        except Exception as exc:  # a model bug these items trip: this request's 500 (in the log)
            logger.exception("%s failed on a request's items", predictor.version)
            return [refusal(Internal(f"the model failed on these items ({type(exc).__name__})"), 500,
                            predictor.version)]
    try:
        everything = answer([item for group in groups for item in group])
    except Exception:
        return [predict_groups(predictor, [group], explain=explain)[0] for group in groups]
    out, start = [], 0
    for group in groups:
        out.append({"version": predictor.version, "items": everything["items"][start:start + len(group)]})
        start += len(group)
    return out


def canary_groups(production: Predictor, candidate: Predictor, groups: Sequence[Sequence[Any]],
                  picked: Sequence[bool], shadow: bool) -> list[dict[str, Any]]:
    """Answers requests while a canary runs (`predict_groups` for each model): a `picked` request
    is answered by the candidate; with `shadow`, every request by production, and a picked one
    carries the candidate's answer as `shadow` too (never when either refused its items)."""
    if shadow:
        out = predict_groups(production, groups)
        chosen = [i for i, p in enumerate(picked) if p and "items" in out[i]]
        copies = predict_groups(candidate, [groups[i] for i in chosen]) if chosen else []
        for i, copy in zip(chosen, copies, strict=True):
            if "items" in copy:
                out[i]["shadow"] = copy
        return out
    answers: dict[int, dict[str, Any]] = {}
    for model, wanted in ((candidate, True), (production, False)):
        members = [i for i, p in enumerate(picked) if p == wanted]
        if members:
            answers.update(zip(members, predict_groups(model, [groups[i] for i in members]), strict=True))
    return [answers[i] for i in range(len(groups))]


def replica_device(wanted: str) -> str:
    """The torch device a replica loads its model on: `auto` is CUDA when Ray assigned this replica
    GPUs (it then sets CUDA_VISIBLE_DEVICES to them, so they start at cuda:0), else the CPU."""
    import ray
    import torch

    if wanted == "cpu":
        return "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda': no CUDA device is visible to this replica; give the deployment "
                          "ray_actor_options.num_gpus, or set device to auto or cpu", field="device")
    assigned = ray.is_initialized() and bool(ray.get_gpu_ids())
    return "cuda" if wanted == "cuda" or (assigned and torch.cuda.is_available()) else "cpu"


def refusal(exc: CityServeError, status: int, version: str = "") -> dict[str, Any]:
    """An error as a value: cheaper than an exception across Ray, and keeps its status and field;
    with the `version` that refused or failed, when a model did (a canary's errors beside production's)."""
    return {"status": status, "error": exc.as_json(), **({"version": version} if version else {})}


@serve.deployment
class ModelServer:
    """Serves one domain's `stage` model; `reconfigure` swaps versions without a restart.

    Args:
        domain: the domain's name.
        registry_uri: where versions and stages live.
        torch_threads: the model's intra-op threads (torch's, and an ONNX artifact's). Ray sets
            OMP_NUM_THREADS to the replica's whole CPUs (1 for a fractional replica), whatever the
            model should use: the serve config says it.
    """

    def __init__(self, domain: str, registry_uri: str, torch_threads: int = 1) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        self.domain = get_domain(domain)
        self.registry = Registry(registry_uri)
        self.predictor: Predictor | None = None
        self.candidate: Predictor | None = None  # a running canary's version, and the canary
        self.canary: dict[str, Any] | None = None
        self.config = ModelConfig()
        self.loaded_at = 0.0
        self.registry_generation = -1
        self.loading = asyncio.Lock()
        self.watcher: asyncio.Task[None] | None = None
        self._batch_sizes = _batch_histogram(domain)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Applies a new user_config: batch settings at once; a new generation reloads the stage."""
        config = ModelConfig.model_validate(user_config)
        batcher: Any = self.predict_batch  # @serve.batch adds these setters at run time
        batcher.set_max_batch_size(config.max_batch_size)
        batcher.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        same_model = (config.stage, config.device, config.backend) == (
            self.config.stage, self.config.device, self.config.backend)
        reload = self.predictor is None or not same_model or config.generation != self.config.generation
        self.config = config
        if reload:
            await self._load(f"generation {config.generation}", keep_same=same_model)
        if self.watcher is None and config.poll_s > 0:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _load(self, why: str, *, keep_same: bool = False) -> None:
        """Loads the stage in a thread while the old model keeps answering, then swaps them in one
        assignment. A version that fails to load leaves the old one serving (a replica with none
        yet fails to start, which Serve reports). With `keep_same`, a stage still naming the loaded
        version keeps it (a canary started or ended moves the stages, not production)."""
        async with self.loading:
            try:
                generation = await asyncio.to_thread(self.registry.generation, self.domain.name)
                current = self.predictor
                if keep_same and current is not None and current.version == await asyncio.to_thread(
                        lambda: self.registry.get(self.domain.name, self.config.stage).version):
                    predictor = current
                else:
                    predictor = await asyncio.to_thread(self._load_version, self.config.stage)
            except (RegistryError, ConfigError, OSError, RuntimeError, ValueError) as exc:
                if self.predictor is None:
                    raise
                logger.error("%s: %s did not load (%s); still serving %s", self.domain.name, why, exc,
                             self.predictor.version)
                return
            candidate, canary = await self._load_canary()
            # One statement, no await inside: a batch sees the old pair or the new one, never a mix.
            self.predictor, self.candidate, self.canary = predictor, candidate, canary
            self.registry_generation, self.loaded_at = generation, time.time()
            logger.info("%s: serving %s with %s (%s)%s", self.domain.name, predictor.version, predictor.backend, why,
                        f"; canary {canary}" if canary else "")

    def _load_version(self, ref: str) -> Predictor:
        return self.registry.load_predictor(self.domain, ref, replica_device(self.config.device), self.config.backend)

    async def _load_canary(self) -> tuple[Predictor | None, dict[str, Any] | None]:
        """The running canary's version and settings (of the production stage only), or Nones; a
        candidate that fails to load leaves production answering everything (logged)."""
        if self.config.stage != PRODUCTION:
            return None, None
        try:
            canary = await asyncio.to_thread(self.registry.canary, self.domain.name)
            if canary is None:
                return None, None
            if self.candidate is not None and self.candidate.version == canary["version"]:
                return self.candidate, canary  # a new weight: the loaded candidate serves on
            return await asyncio.to_thread(self._load_version, canary["version"]), canary
        except (RegistryError, ConfigError, OSError, RuntimeError, ValueError) as exc:
            logger.error("%s: the canary did not load (%s); production answers every request", self.domain.name, exc)
            return None, None

    async def _watch(self) -> None:
        """Reloads when the registry's stages moved (a promote or rollback from anywhere)."""
        while self.config.poll_s > 0:
            await asyncio.sleep(self.config.poll_s)
            try:
                generation = await asyncio.to_thread(self.registry.generation, self.domain.name)
            except (RegistryError, OSError) as exc:  # the store is away for a moment: keep serving
                logger.warning("%s: registry not readable (%s)", self.domain.name, exc)
                continue
            if generation != self.registry_generation:
                await self._load(f"registry generation {generation}", keep_same=True)
        self.watcher = None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_batch(self, groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        predictor, candidate, canary = self.predictor, self.candidate, self.canary
        if predictor is None:
            return [refusal(ModelNotReady(f"{self.domain.name} has no model loaded yet"), 503)] * len(groups)
        model = self.domain.request_model
        self._batch_sizes.observe(sum(len(g) for g in groups))
        items = [[model.model_validate(item) for item in group] for group in groups]
        # In a thread: the event loop keeps taking requests (the next batch fills meanwhile) and
        # health checks while torch works, and torch releases the GIL.
        if candidate is None or canary is None:
            return await asyncio.to_thread(predict_groups, predictor, items)
        picked = [random.random() * 100 < canary["weight"] for _ in items]
        return await asyncio.to_thread(canary_groups, predictor, candidate, items, picked, bool(canary["shadow"]))

    async def predict_many(self, groups: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Several requests' items (a gateway coalesces them into one call); per request
        `{"version", "items"}`, or `{"status", "error"}` if refused. Calls from every gateway
        replica meet in `predict_batch`'s batches."""
        return list(await asyncio.gather(*(self.predict_batch(group) for group in groups)))

    async def explain(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """One request's items answered with their explanations (`Predictor.explain`): outside the
        batches, whose other requests should not wait for it."""
        predictor = self.predictor
        if predictor is None:
            return refusal(ModelNotReady(f"{self.domain.name} has no model loaded yet"), 503)
        parsed = [self.domain.request_model.model_validate(item) for item in items]
        return (await asyncio.to_thread(predict_groups, predictor, [parsed], explain=True))[0]

    async def info(self) -> dict[str, Any]:
        return {"domain": self.domain.name, "version": self.predictor.version if self.predictor else None,
                "backend": self.predictor.backend if self.predictor else None, "canary": self.canary,
                "stage": self.config.stage, "generation": self.config.generation, "loaded_at": self.loaded_at}

    def check_health(self) -> None:
        if self.predictor is None:
            raise ModelNotReady(f"{self.domain.name} has no model loaded")


def _batch_histogram(domain: str) -> Any:
    from ray.util.metrics import Histogram

    histogram = Histogram("cityserve_batch_items", description="Items per model batch.",
                          boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("domain",))
    histogram.set_default_tags({"domain": domain})
    return histogram
