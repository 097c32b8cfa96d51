"""The gateway: one FastAPI ingress on Serve in front of the four domain deployments.

A request goes: size check → API key → body parsed with the domain's request model → one call
to the admission actor (key, grant, quotas, a concurrency lease) → the domain deployment, within
the domain's timeout → one call to release the lease with the usage row. A tenant that opts in has
a share of its answered requests offered to the sample log (`services.samples`), off the request's
path; `POST /v1/{domain}/feedback` takes ground truth about an answer the same way (key, grant,
quota, usage row) and writes it beside the samples before it answers. `create_api(backend)`
builds the HTTP layer over a `Backend`; on Serve the backend is `ServeBackend` (handles and the
admission actor), in unit tests an in-process one — FastAPI's TestClient drives the same routes.

Request bodies (texts, series) are never logged; logs and responses carry the request id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from cluster.local import loopback_replica_grpc
from core.errors import CityServeError
from domains import get_domain, language
from domains.base import request_example
from services.admission import Decision
from services.coalesce import Coalescer
from services.config import GATEWAY, VERBS, ModelConfig, PlatformArgs
from services.errors import (
    BY_STATUS,
    ErrorBody,
    GatewayTimeout,
    NotFound,
    QuotaExceeded,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unprocessable,
    UnsupportedMediaType,
    field_path,
    register_exception_handlers,
    status_of,
)
from services.samples import REQUEST_ID_PATTERN, Sample, SampleLog, feedback_model, feedback_rows
from services.samples import write as write_log
from services.shield import AddressLimiter, Recent, client_address
from services.tenants import Expiring, Usage, split_key

loopback_replica_grpc()  # imported by the replica before Serve starts its gRPC server

logger = logging.getLogger("ray.serve")
REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
EXPLAIN_MAX_ITEMS = 8  # items an explained request may carry (each costs several model runs)
# A lease outlives the request's timeout by this much, so only a lost release ever expires one.
LEASE_MARGIN_S = 5.0
# Calls a domain's replicas get per model call: a lost replica's calls go to another one once.
MODEL_ATTEMPTS = 2
# The usage flush a stopping gateway replica waits for (Serve gives the whole replica 20 s).
FLUSH_AT_EXIT_S = 5.0
# A key refused as unknown, expired or revoked (401) is refused again by this replica, without asking
# the admission actor, for this long.
UNAUTHORIZED_CACHE_S = 1.0
# A tenant refused for quota or concurrency (429), or for a domain (403), is refused again by this
# replica without parsing its body or asking the admission actor, for this long at most and never
# past its Retry-After: a flood's clients retry in step, and each wave would otherwise cost the
# gateways and the actor as much as admitted work.
REFUSAL_CACHE_S = 0.1
# A refusal of an address over its limit of bad keys is held this long at most before it is sent,
# and a replica holds at most this many at once (well below its max_ongoing_requests: 512).
TARPIT_S, TARPIT_MAX = 1.0, 64
# How long a replica keeps its public answers (/readyz, /v1/models) before asking the deployments again.
PUBLIC_ANSWER_S = 1.0


class Backend(Protocol):
    """What the HTTP layer needs from the platform."""

    async def admit(self, key_id: str, key_digest: str, domain: str, items: int, lease_ttl: float) -> Decision: ...

    async def release(self, lease: str, usage: Usage | None) -> None: ...

    async def predict(self, domain: str, items: list[dict[str, Any]], explain: bool = False) -> dict[str, Any]:
        """`{"version", "items"}`, or `{"status", "error"}` when the model refuses the items; with
        `explain`, each answer carries its explanation; while a shadow canary runs, `shadow` may hold
        its `{"version", "items"}` for the same items (recorded, never returned)."""

    async def info(self, domain: str) -> dict[str, Any]: ...

    async def admission_ready(self) -> None:
        """Returns once the admission actor answers; raises if it cannot."""


class Metrics:
    """Counters and latency histograms through Ray's metrics system: every replica's values reach
    Prometheus through each node's metrics agent (no-ops outside a Ray worker)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Histogram

        # The version that answered, or refused or failed on the items (empty where no model did: the gateway's
        # and admission's refusals, a timeout): a canary's latency and errors beside production's.
        tags = ("tenant", "domain", "status", "version")
        self.requests = Counter("cityserve_requests_total", description="Gateway requests.", tag_keys=tags)
        self.items = Counter("cityserve_items_total", description="Items in answered requests.", tag_keys=tags)
        self.latency = Histogram("cityserve_request_latency_ms", description="Gateway latency.", tag_keys=tags,
                                 boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000])
        self.samples = Counter("cityserve_samples_total", description="Sampled requests: written to the sample "
                               "log, dropped (the queue was full) or lost (the write failed).", tag_keys=("outcome",))

    def sampled(self, outcome: str, count: int) -> None:
        self.samples.inc(count, tags={"outcome": outcome})

    def observe(self, tenant: str, domain: str, status: int, items: int, latency_ms: float, version: str) -> None:
        tags = {"tenant": tenant or "-", "domain": domain, "status": str(status), "version": version or "-"}
        self.requests.inc(1, tags=tags)
        if status == 200:
            self.items.inc(items, tags=tags)
        self.latency.observe(latency_ms, tags=tags)


def decision_error(decision: Decision) -> CityServeError:
    cls = BY_STATUS[decision.status]
    return cls(decision.message, field=decision.field, code=decision.code,
               retry_after=decision.retry_after if decision.status in (429, 503) else None)


def bearer_key(request: Request) -> tuple[str, str]:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", field="Authorization")
    parts = split_key(token.strip()) if scheme.lower() == "bearer" else None
    if parts is None:
        raise Unauthorized("malformed Authorization header: expected 'Bearer csk_...'", field="Authorization")
    return parts


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes without reading them all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes; the limit is {limit}", field="body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body over {limit} bytes", field="body")
        chunks.append(chunk)
    return b"".join(chunks)


def check_media_type(content_type: str) -> None:
    """Bodies are JSON: a body declared as anything else is refused, not parsed as JSON anyway.
    Without a Content-Type the body is read as JSON (RFC 9110 lets a recipient assume the type)."""
    media = content_type.partition(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"Content-Type {media[:100]!r}: send the body as application/json",
                                   field="Content-Type")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members, refusing a name given twice: parsers disagree on which one wins, so a
    proxy or log in front of us could read a different request than the model answers."""
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise ValueError(f"member {name[:100]!r} appears twice in one object")
        seen.add(name)
    return dict(pairs)


def parse_items(model: type[BaseModel], raw: bytes, max_items: int) -> tuple[list[BaseModel], bool]:
    """The request's items (one object, or a list of them) and whether it was a single object."""
    try:
        data = json.loads(raw, object_pairs_hook=_unique_keys)
    except RecursionError as exc:  # thousands of nested brackets: the parser's stack, not ours, gives out
        raise Unprocessable("body is not valid JSON: nested too deeply", field="body") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unprocessable(f"body is not valid JSON: {exc}", field="body") from exc
    single = isinstance(data, dict)
    items = [data] if single else data
    if not isinstance(items, list):
        raise Unprocessable(f"body must be an object or a list of objects, got {type(data).__name__}", field="body")
    if not items:
        raise Unprocessable("body is an empty list; send at least one item", field="body")
    if len(items) > max_items:
        raise TooLarge(f"{len(items)} items; this endpoint takes at most {max_items} per request", field="body")
    parsed = []
    for i, item in enumerate(items):
        try:
            parsed.append(model.model_validate(item))
        except ValidationError as exc:
            err = exc.errors()[0]
            path = field_path(tuple(err["loc"]))
            raise Unprocessable(f"{err['msg']}", field=path if single else f"[{i}].{path}".rstrip("."),
                                code=language.CODE if err["type"] == language.CODE else None) from exc
    return parsed, single


def _serve_request_id() -> str:
    try:
        return str(serve.context._get_serve_request_context().request_id)
    except Exception:  # outside a Serve replica (unit tests)
        return ""


def request_id(request: Request) -> str:
    """Serve's request id (its HTTP server takes a client's X-Request-Id, else makes one), else the
    header, else a new one: one id per request, the same in the route and the error handlers."""
    rid: str = getattr(request.state, "request_id", "")
    if not rid:
        rid = _serve_request_id() or request.headers.get("x-request-id", "")
        rid = rid if REQUEST_ID.match(rid) else uuid.uuid4().hex
        request.state.request_id = rid
    return rid


def request_id_header(request: Request) -> dict[str, str]:
    """X-Request-Id for a response, unless it is Serve's id: Serve's HTTP server adds that one to
    every response itself, and a second header would repeat it."""
    rid = request_id(request)
    return {} if rid == _serve_request_id() else {"X-Request-Id": rid}


def create_api(args: PlatformArgs, backend: Backend, replica: str = "") -> FastAPI:
    """The gateway's HTTP routes over `backend`; `replica` names this replica in X-Gateway-Replica."""
    openapi_url = "/openapi.json" if args.api_docs == "public" else None  # None: no /docs or /redoc either
    api = FastAPI(title="CityServe", version="1", openapi_url=openapi_url, description=(
        "The city's model endpoints. Authenticate with `Authorization: Bearer <key>` "
        "(`cityserve tenants create`). Each POST takes one item (an object) or a list of items; a list "
        "answers with a list in the same order. Errors are `{code, message, field}`; 429 and 503 carry "
        "`Retry-After`."))
    register_exception_handlers(api, request_id_header)
    metrics = Metrics()
    samples = api.state.samples = SampleLog(args.registry_uri, args.samples, metrics.sampled)
    body_models = {"predict": {d: get_domain(d).request_model for d in args.domains},
                   "feedback": {d: feedback_model(d) for d in args.domains}}
    language.identifier()  # the text validators' language model, loaded now rather than on a first request
    inflight = dict.fromkeys(args.domains, 0)  # items waiting on each domain from this replica
    refused: Expiring[tuple[str, ...], Decision] = Expiring()  # (key id, digest[, domain]) -> its refusal
    limiter = AddressLimiter(args.unauthenticated_per_s)
    errors: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody, "description": cls.__name__}
              for status, cls in BY_STATUS.items() if status not in (404,)}

    held = [0]  # requests this replica holds in the tarpit now

    async def tarpit(wait: float) -> None:
        """Holds a refusal of a flooding address before answering it (up to TARPIT_S): each of a
        flood's clients then waits out its refusal instead of sending the next at once, and the
        flood costs the replica a sleeping coroutine instead of a request a millisecond. At most
        TARPIT_MAX are held, so a flood cannot fill the replica's slots; beyond, refusals go at once."""
        if held[0] >= TARPIT_MAX:
            return
        held[0] += 1
        try:
            await asyncio.sleep(min(wait, TARPIT_S))
        finally:
            held[0] -= 1

    def remember(decision: Decision, key: tuple[str, str], domain: str, address: str) -> None:
        """What this replica keeps of an admission decision, to refuse the same again cheaply."""
        now = time.monotonic()
        if decision.status == 401:
            limiter.refused(address, now)
            refused.put(key, decision, now + UNAUTHORIZED_CACHE_S)
        elif decision.status == 429:  # a tenant's quota: whichever domain it calls
            refused.put(key, decision, now + min(decision.retry_after, REFUSAL_CACHE_S))
        elif decision.status == 403:
            refused.put((*key, domain), decision, now + REFUSAL_CACHE_S)
        elif decision.status == 200:
            limiter.admitted(key, now)

    async def handle(domain: str, route: str, request: Request) -> JSONResponse:
        """`route` is predict (the domain's verb) or feedback."""
        started = time.monotonic()
        rid = request_id(request)
        limits = args.domains[domain]
        tenant, status, items, version = "", 500, 0, ""
        decision: Decision | None = None
        try:
            # The key before the body: a caller without a good key costs no read, parse or validation,
            # and one refused a moment ago (or from an address sending bad keys) not even a lookup.
            key = bearer_key(request)
            now = time.monotonic()
            address = client_address(request, args.forwarded_for_hops)
            wait = limiter.wait(address, key, now)
            if wait > 0:
                await tarpit(wait)
                raise QuotaExceeded("too many requests with unknown API keys from this address; retry later",
                                    code="too_many_unauthenticated", field="Authorization", retry_after=wait)
            refusal = refused.get(key, now) or refused.get((*key, domain), now)
            if refusal is not None:
                if refusal.status == 401:  # a bad key repeated costs its address as a new one does
                    limiter.refused(address, now)
                tenant = refusal.tenant
                raise decision_error(refusal)
            raw = await read_body(request, args.max_body_bytes)
            problem: CityServeError | None = None
            try:
                check_media_type(request.headers.get("content-type", ""))
                parsed, single = parse_items(body_models[route][domain], raw, limits.max_items)
                items = len(parsed)
                explain = route == "predict" and explain_flag(request.query_params.get("explain"), items)
            except CityServeError as exc:  # told only to a caller whose key is good
                problem = exc
            try:
                decision = await backend.admit(*key, domain, 0 if problem else items,
                                               limits.timeout_s + LEASE_MARGIN_S)
            except CityServeError:
                raise
            except Exception as exc:  # the admission actor is restarting: nobody can be admitted
                raise Unavailable("admission service unavailable; retry shortly", retry_after=2) from exc
            tenant = decision.tenant
            remember(decision, key, domain, address)
            if decision.status != 200:
                raise decision_error(decision)
            if problem is not None:
                raise problem
            if decision.delay:  # admitted ahead of the tenant's pace: its turn comes within a second
                await asyncio.sleep(decision.delay)
            if route == "feedback":
                await store_feedback(domain, tenant, parsed, limits.timeout_s)
                status = 200
                return JSONResponse({"stored": items}, headers=request_id_header(request))
            if inflight[domain] + items > limits.max_inflight_items:
                raise Unavailable(f"{domain} is overloaded; retry shortly", retry_after=1, code="overloaded")
            inflight[domain] += items
            dumped = [p.model_dump(mode="json") for p in parsed]
            try:
                answer = await predict(backend, domain, dumped, limits.timeout_s, explain)
            finally:
                inflight[domain] -= items
            version = answer.get("version", "")  # a refusal's too, where a model refused
            if "error" in answer:
                raise model_error(answer)
            status = 200
            if random.random() < decision.sample_rate:
                took = (time.monotonic() - started) * 1000
                samples.offer(Sample(domain, rid, decision.admitted_at, tenant, version, took, dumped, answer["items"]))
                if "shadow" in answer:  # a shadow canary's answers to the same items: recorded beside them
                    shadow = answer["shadow"]
                    samples.offer(Sample(domain, rid, decision.admitted_at, tenant, shadow["version"], took, dumped,
                                         shadow["items"], shadow=True))
            body = answer["items"][0] if single else answer["items"]
            return JSONResponse(body, headers={**request_id_header(request), "X-Model-Version": version,
                                               "X-Gateway-Replica": replica})
        except CityServeError as exc:
            status = status_of(exc)
            raise
        finally:
            latency = (time.monotonic() - started) * 1000
            if decision is not None and decision.lease:
                usage = Usage(rid, decision.admitted_at, tenant, domain, items, status, latency, version,
                              decision.lease, route)
                try:
                    await backend.release(decision.lease, usage)
                except Exception:  # the admission actor restarting: its lease expires by itself
                    logger.exception("usage row not recorded: %s", usage)
            metrics.observe(tenant, domain, status, items, latency, version)
            # DEBUG: Serve's access log already has every request's id, route, status and latency;
            # the ledger has its tenant. A second line per request costs throughput.
            logger.debug("request %s tenant=%s domain=%s items=%d status=%d %.1f ms", rid, tenant or "-", domain,
                         items, status, latency)

    async def store_feedback(domain: str, tenant: str, parsed: list[BaseModel], timeout_s: float) -> None:
        rows = feedback_rows(domain, tenant, time.time(), parsed)
        try:
            await asyncio.wait_for(asyncio.to_thread(write_log, args.registry_uri, "feedback", rows), timeout_s)
        except TimeoutError as exc:
            raise GatewayTimeout(f"feedback not stored within {timeout_s:g} s; send it again", field="timeout_s") \
                from exc
        except OSError as exc:  # the registry's filesystem is away
            logger.exception("feedback not stored")
            raise Unavailable("feedback store unreachable; retry shortly", retry_after=2) from exc

    def route_for(domain: str, route: str) -> Callable[[Request], Awaitable[JSONResponse]]:
        # A closure, not a `domain=name` default argument: FastAPI would publish that argument as a
        # query parameter, and `?_name=` would pick the domain (a 500 for an unknown one).
        async def endpoint(request: Request) -> JSONResponse:
            return await handle(domain, route, request)

        return endpoint

    for name in args.domains:
        dom = get_domain(name)
        limit = args.domains[name].max_items
        api.add_api_route(
            f"/v1/{name}/{VERBS[name]}", route_for(name, "predict"), methods=["POST"], name=f"{name}_{VERBS[name]}",
            summary=f"{name}: {VERBS[name]} (one item, or a list of up to {limit})",
            description=(dom.request_model.__doc__ or "").strip(),
            response_model=dom.response_model | list[dom.response_model],  # type: ignore[name-defined]
            responses=errors, openapi_extra={**_request_body(dom.request_model, limit),
                                             **_EXPLAIN_PARAMETER})
        feedback = body_models["feedback"][name]
        api.add_api_route(
            f"/v1/{name}/feedback", route_for(name, "feedback"), methods=["POST"], name=f"{name}_feedback",
            summary=f"{name}: ground truth about answers (one item, or a list of up to {limit})",
            description=(feedback.__doc__ or "").strip() + " Metered and limited like a prediction; stored "
            "beside the sampled requests (docs/learning-loop.md), whether or not the request was sampled.",
            response_model=FeedbackStored, responses=errors, openapi_extra=_request_body(feedback, limit))

    # The public answers fan out to every model deployment (and the actor): each replica computes
    # them at most once a second, however many callers ask.
    async def infos() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_info(backend, d) for d in args.domains)))

    recent_infos = Recent(infos, PUBLIC_ANSWER_S)

    @api.get("/v1/models", summary="The model version each domain serves")
    async def models() -> dict[str, Any]:
        return {"domains": await recent_infos()}

    @api.get("/healthz", summary="Liveness: the gateway answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def admission_problem() -> str | None:
        # A replica's admission actor starts beside it; until it answers, every request would
        # wait for it, so the replica is not ready before then.
        try:
            await asyncio.wait_for(backend.admission_ready(), timeout=5)
        except Exception as exc:  # starting or restarting: reported, never raised
            # The class only in the log: a public answer names no internals.
            logger.info("admission service not ready: %s", type(exc).__name__)
            return "admission service not answering yet"
        return None

    async def readiness() -> tuple[int, dict[str, Any]]:
        # The models and the admission actor are asked at once: the slower bounds the answer.
        domains, admission = await asyncio.gather(recent_infos(), admission_problem())
        waiting = [i["domain"] for i in domains if not i["ready"]]
        problems = ([f"no model loaded yet for {waiting}"] if waiting else []) + ([admission] if admission else [])
        if problems:
            return 503, {"code": "not_ready", "message": "; ".join(problems), "field": None}
        return 200, {"status": "ready", "domains": domains}

    recent_readiness = Recent(readiness, PUBLIC_ANSWER_S)

    @api.get("/readyz", summary="Readiness: every domain has a model loaded and the admission service answers",
             responses={503: {"model": ErrorBody}})
    async def readyz() -> JSONResponse:
        status, body = await recent_readiness()
        return JSONResponse(body, status_code=status, headers={"Retry-After": "5"} if status == 503 else None)

    @api.api_route("/v1/{domain}/{verb}", methods=["POST"], include_in_schema=False)
    async def unknown(domain: str, verb: str) -> None:
        served = [f"/v1/{d}/{v}" for d in args.domains for v in (VERBS[d], "feedback")]
        raise NotFound(f"no route POST /v1/{domain}/{verb}; served: {served}", field="path")

    _add_request_schemas(api, [m for models in body_models.values() for m in models.values()])
    return api


class FeedbackStored(BaseModel):
    """Feedback written to the registry's filesystem."""

    stored: int = Field(description="Feedback items stored.", examples=[1])


def explain_flag(value: str | None, items: int) -> bool:
    """The `explain` query parameter: absent, true or false (1/0, any case); true for at most
    `EXPLAIN_MAX_ITEMS` items, each costing several model runs (one per word of a text, one per group
    of a forecast's inputs)."""
    if value is None or value.lower() in ("false", "0"):
        return False
    if value.lower() not in ("true", "1"):
        raise Unprocessable(f"explain must be true or false, got {value[:20]!r}", field="explain")
    if items > EXPLAIN_MAX_ITEMS:
        raise TooLarge(f"{items} items to explain; explain=true takes at most {EXPLAIN_MAX_ITEMS} per request",
                       field="explain")
    return True


async def predict(backend: Backend, domain: str, items: list[dict[str, Any]], timeout_s: float,
                  explain: bool = False) -> dict[str, Any]:
    """The domain's answer, or its refusal as a value (`model_error` makes it the error to raise)."""
    try:
        answer: dict[str, Any] = await asyncio.wait_for(backend.predict(domain, items, explain), timeout_s)
    except TimeoutError as exc:
        raise GatewayTimeout(f"{domain} did not answer within {timeout_s:g} s", field="timeout_s") from exc
    return answer


def model_error(answer: dict[str, Any]) -> CityServeError:
    error = answer["error"]
    return BY_STATUS[answer["status"]](error["message"], field=error.get("field"), code=error["code"],
                                       retry_after=2 if answer["status"] == 503 else None)


async def _info(backend: Backend, domain: str) -> dict[str, Any]:
    try:
        info = await asyncio.wait_for(backend.info(domain), timeout=5)
        return {**info, "ready": info.get("version") is not None}
    except Exception as exc:  # not started, restarting or failing: reported, never raised
        logger.info("%s not ready: %s", domain, type(exc).__name__)  # the class only here: answers are public
        return {"domain": domain, "version": None, "ready": False, "error": "not answering"}


_EXPLAIN_PARAMETER = {"parameters": [{
    "name": "explain", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
    "description": "true: each answer carries `explanation`, what moved it most: the words of a text (each "
                   "costs about one model run per word), the groups of a forecast's inputs (one run per "
                   f"group, 3 to 7); at most {EXPLAIN_MAX_ITEMS} items per request.",
}]}


def _request_body(model: type[BaseModel], limit: int) -> dict[str, Any]:
    """OpenAPI for a body we parse ourselves (auth comes before validation): one item or a list."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    example = request_example(model)
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"oneOf": [ref, {"type": "array", "items": ref, "minItems": 1, "maxItems": limit}]},
        "examples": {"one item": {"value": example}, "a batch": {"value": [example, example]}},
    }}}}


def _add_request_schemas(api: FastAPI, models: list[type[BaseModel]]) -> None:
    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description,
                                 routes=api.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


class ServeBackend:
    """The backend on Serve: the domain deployments' handles and the cluster's admission actor,
    each reached through a `Coalescer`: concurrent requests share one remote call."""

    def __init__(self, handles: dict[str, Any], args: PlatformArgs) -> None:
        from services.admission import admission_actor
        from services.monitor import monitor_actor

        self.handles = handles
        admission = admission_actor(args.ledger_url, args.tenants_file, args.ledger_resource, args.usage_spill_dir)
        self.admission = admission
        self.monitor = monitor_actor(args.registry_uri, list(args.domains), args.samples)
        self.admits: Coalescer[tuple[Any, ...], Decision] = Coalescer(admission.admit_many.remote)
        self.releases: Coalescer[tuple[str, Usage | None], None] = Coalescer(admission.release_many.remote)
        # A model call carries at most about a model batch of items (bigger calls only queue
        # longer); 4 in flight keep 2 replicas busy, and let autoscaling see demand (its
        # target counts these calls: helm/serve/base.yaml).
        self.models = {name: Coalescer(self._caller(name, "predict_many"), max_size=64, max_inflight=4, weight=len)
                       for name in handles}

    def _caller(self, domain: str, method: str) -> Any:
        """`method` of the domain's deployment, called with one argument and retried once on a lost replica."""
        async def call(payload: Any) -> Any:
            from ray.exceptions import RayActorError
            from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

            # A replica that dies (killed, its node lost) fails the calls it holds; predictions have
            # no side effects, so they go once more to whichever replica the router picks now.
            attempt = 1
            while True:
                try:
                    return await getattr(self.handles[domain], method).remote(payload)
                except (BackPressureError, DeploymentUnavailableError) as exc:
                    raise Unavailable(f"{domain} is at capacity; retry shortly", retry_after=1) from exc
                except RayActorError as exc:
                    if attempt == MODEL_ATTEMPTS:
                        raise Unavailable(f"{domain} replica lost; retry shortly", retry_after=1) from exc
                    logger.warning("%s replica lost (%s); calling another", domain, type(exc).__name__)
                    attempt += 1

        return call

    async def admit(self, key_id: str, key_digest: str, domain: str, items: int, lease_ttl: float) -> Decision:
        return await self.admits.submit((key_id, key_digest, domain, items, lease_ttl))

    async def release(self, lease: str, usage: Usage | None) -> None:
        await self.releases.submit((lease, usage))

    async def predict(self, domain: str, items: list[dict[str, Any]], explain: bool = False) -> dict[str, Any]:
        if explain:  # costly and rare: one call of its own, not one of the coalesced batches
            answer: dict[str, Any] = await self._caller(domain, "explain")(items)
            return answer
        return await self.models[domain].submit(items)

    async def info(self, domain: str) -> dict[str, Any]:
        info: dict[str, Any] = await self.handles[domain].info.remote()
        return info

    async def admission_ready(self) -> None:
        await self.admission.stats.remote()


@serve.deployment
@serve.ingress()
class Gateway:
    """The ingress deployment (its options come from the serve config)."""

    def __init__(self, args: dict[str, Any], handles: dict[str, Any]) -> None:
        self.args = PlatformArgs.model_validate(args)
        self.backend = ServeBackend(handles, self.args)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.api: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        self.api = create_api(self.args, self.backend, self.replica)
        return self.api

    async def __del__(self) -> None:
        """Serve calls this once the replica's requests are done: their usage rows are in the
        admission actor, which writes them within 0.2 s; write them now, so a platform stopped
        right after (SIGTERM, `serve down`) has every row of every request it answered."""
        try:
            # Bounded: a ledger that hangs must not hold the replica past Serve's shutdown budget,
            # after which Serve stops the others without draining them.
            await asyncio.wait_for(self.backend.admission.flush.remote(), FLUSH_AT_EXIT_S)
        except Exception:  # the actor or its ledger is away: its own 0.2 s flushes are what is left
            logger.exception("usage flush at shutdown failed")
        if self.api is not None:  # the samples it holds (bounded like the flush: Serve's budget is shared)
            try:
                await asyncio.wait_for(self.api.state.samples.close(), FLUSH_AT_EXIT_S)
            except Exception:
                logger.exception("samples not written at shutdown")


def build_app(args: dict[str, Any]) -> Any:
    """The application builder the serve config names (`services.gateway:build_app`)."""
    from services.model import ModelServer

    platform = PlatformArgs.model_validate(args)
    handles = {
        name: ModelServer.options(name=name, user_config=ModelConfig().model_dump()).bind(  # type: ignore[attr-defined]
            name, platform.registry_uri, limits.torch_threads)
        for name, limits in platform.domains.items()
    }
    return Gateway.options(name=GATEWAY).bind(platform.model_dump(), handles)  # type: ignore[attr-defined]
