"""The gateway's HTTP layer through FastAPI's TestClient, with the model calls injected and the
real admission arithmetic over a SQLite store (Serve's `_local_testing_mode` breaks on
`@serve.batch`, so the Serve wiring is covered by the integration tests)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from core.errors import InvalidInput
from domains import DOMAINS, get_domain
from domains.base import request_example
from services import gateway
from services.admission import Decision, Gatekeeper
from services.config import VERBS, PlatformArgs
from services.gateway import create_api
from services.model import predict_groups
from services.tenants import Store, Tenant, Usage

Answer = Callable[[str, list[dict[str, Any]]], Awaitable[dict[str, Any]]]


class LocalBackend:
    """The admission arithmetic in-process; `answer` stands in for the domain deployments."""

    def __init__(self, store: Store, answer: Answer) -> None:
        self.keeper = Gatekeeper(store, refresh_s=0.0)
        self.answer = answer
        self.released: list[Usage | None] = []
        self.clock = time.monotonic  # the admission actor's; a test may stop it
        self.asked = 0
        self.admission_down = False
        self.explained = False  # whether the last predict asked for explanations

    async def admit(self, key_id: str, key_digest: str, domain: str, items: int, lease_ttl: float) -> Decision:
        self.asked += 1
        return self.keeper.admit(key_id, key_digest, domain, items, lease_ttl, self.clock(), time.time())

    async def release(self, lease: str, usage: Usage | None) -> None:
        self.keeper.release(lease, usage)
        self.released.append(usage)

    async def predict(self, domain: str, items: list[dict[str, Any]], explain: bool = False) -> dict[str, Any]:
        self.explained = explain
        return await self.answer(domain, items)

    async def info(self, domain: str) -> dict[str, Any]:
        return {"domain": domain, "version": None if domain == "traffic" else "v7"}

    async def admission_ready(self) -> None:
        if self.admission_down:
            raise ConnectionError("admission actor starting")


async def echo(domain: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Answers each item with its position, so order and batching are visible."""
    if domain == "traffic" and items[0].get("sensors", [""])[0] == "nowhere":
        return {"status": 422, "error": InvalidInput("unknown sensor 'nowhere'", field="sensors[0]").as_json(),
                "version": "v7"}
    if domain == "energy":
        await asyncio.sleep(5)  # slower than the 0.2 s timeout below
    return {"version": "v7", "items": [{"n": i} for i in range(len(items))]}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[TestClient, LocalBackend, dict[str, str]]:
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    keys = {
        "hotline": store.create_tenant(Tenant("hotline", ["events", "traffic", "energy"], 5, 40, 4), 1),
        "press": store.create_tenant(Tenant("press", ["sentiment"], 100, 1000, 4), 1),
        "gone": store.create_tenant(Tenant("gone", ["events"], 100, 1000, 4), 1),
    }
    store.revoke("gone")
    args = PlatformArgs(registry_uri="unused", ledger_url="unused", max_body_bytes=4096,
                        domains={d: {"max_items": 8, "timeout_s": 0.2} for d in DOMAINS})
    backend = LocalBackend(store, echo)
    return TestClient(create_api(args, backend)), backend, keys


def post(client: TestClient, path: str, body: Any, key: str | None = None, **headers: str) -> Any:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return client.post(path, json=body, headers=headers)


def test_auth_matrix(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, backend, keys = setup
    event = request_example(get_domain("events").request_model)
    assert post(client, "/v1/events/classify", event).json()["code"] == "unauthorized"
    assert post(client, "/v1/events/classify", event, None, Authorization="Basic abc").status_code == 401
    forged = keys["hotline"][:-4] + "AAAA"
    assert post(client, "/v1/events/classify", event, forged).json()["message"] == "invalid API key"
    assert post(client, "/v1/events/classify", event, keys["gone"]).json()["message"] == "API key revoked"
    refused = post(client, "/v1/events/classify", event, keys["press"])
    assert refused.status_code == 403 and refused.json() == {
        "code": "forbidden", "message": "tenant 'press' is not granted the events domain", "field": "domain"}
    # An unauthenticated caller learns nothing about the body, even a broken one.
    assert post(client, "/v1/events/classify", {"nope": 1}).status_code == 401
    ok = post(client, "/v1/events/classify", event, keys["hotline"], **{"X-Request-Id": "abc-123"})
    assert ok.status_code == 200 and ok.json() == {"n": 0}
    assert ok.headers["X-Request-Id"] == "abc-123" and ok.headers["X-Model-Version"] == "v7"
    assert [u.status for u in backend.released if u] == [200]  # refused requests hold no lease


def test_items_one_or_a_batch_with_fields_named(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, backend, _ = setup
    key = backend.keeper.store.create_tenant(Tenant("desk", ["events"], 100, 1000, 4), 1)  # room for refusals
    batch = post(client, "/v1/events/classify", [{"text": "a"}, {"text": "b"}, {"text": "c"}], key)
    assert batch.status_code == 200 and batch.json() == [{"n": 0}, {"n": 1}, {"n": 2}]
    bad = post(client, "/v1/events/classify", [{"text": "a"}, {"text": ""}], key)
    assert bad.status_code == 422 and bad.json()["field"] == "[1].text"
    single = post(client, "/v1/events/classify", {"text": "a", "extra": 1}, key)
    assert single.status_code == 422 and single.json()["field"] == "extra"
    assert post(client, "/v1/events/classify", [], key).json()["field"] == "body"
    assert post(client, "/v1/events/classify", "text", key).status_code == 422
    garbled = client.post("/v1/events/classify", content=b"{not json", headers={"Authorization": f"Bearer {key}"})
    assert garbled.status_code == 422 and garbled.json()["code"] == "invalid_input"
    too_many = post(client, "/v1/events/classify", [{"text": "a"}] * 9, key)
    assert too_many.status_code == 413 and "at most 8" in too_many.json()["message"]
    huge = post(client, "/v1/events/classify", {"text": "x" * 5000}, key)
    assert huge.status_code == 413 and huge.json()["code"] == "too_large"


def test_model_refusals_timeouts_and_quotas(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, backend, keys = setup
    key = keys["hotline"]
    traffic = request_example(get_domain("traffic").request_model)
    refused = post(client, "/v1/traffic/forecast", {**traffic, "sensors": ["nowhere", *traffic["sensors"][1:]]}, key)
    assert refused.status_code == 422 and refused.json()["field"] == "sensors[0]"
    energy = request_example(get_domain("energy").request_model)
    slow = post(client, "/v1/energy/forecast", energy, key)
    assert slow.status_code == 504 and slow.json()["code"] == "timeout"
    statuses = [post(client, "/v1/events/classify", {"text": "a"}, key).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # 5 requests a minute: 2 went to traffic and energy
    over = post(client, "/v1/events/classify", {"text": "a"}, key)
    assert over.json()["code"] == "quota_exceeded" and 55 <= int(over.headers["Retry-After"]) <= 60
    metered = [(u.domain, u.status, u.model_version) for u in backend.released if u]
    # The model's refusal names the version that refused; a timeout has none.
    assert metered == [("traffic", 422, "v7"), ("energy", 504, ""), *[("events", 200, "v7")] * 3]


def test_a_request_ahead_of_its_tenants_pace_waits_its_turn(
        setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, backend, _ = setup
    key = backend.keeper.store.create_tenant(Tenant("meters", ["events"], 60, 1000, 20), 1)  # one a second
    backend.clock = lambda: 100.0  # every request asks at the same instant, however slow this machine

    def timed() -> tuple[int, float]:
        started = time.monotonic()
        status = post(client, "/v1/events/classify", {"text": "a"}, key).status_code
        return status, time.monotonic() - started

    burst = [timed() for _ in range(10)]
    assert [status for status, _ in burst] == [200] * 10  # 10 at once after a quiet spell
    status, took = timed()  # the 11th is a second ahead of the pace: held for its turn, then answered
    assert status == 200 and took >= 1.0
    over = post(client, "/v1/events/classify", {"text": "a"}, key)  # two seconds ahead: refused
    assert over.status_code == 429 and over.json()["code"] == "quota_exceeded" and over.headers["Retry-After"] == "1"


def test_a_tenant_just_refused_is_refused_again_without_asking(
        setup: tuple[TestClient, LocalBackend, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    client, backend, keys = setup
    monkeypatch.setattr(gateway, "REFUSAL_CACHE_S", 5.0)  # not 0.1 s: this machine may be slow
    key = backend.keeper.store.create_tenant(Tenant("meters", ["events"], 1, 1000, 4), 1)  # one a minute
    assert post(client, "/v1/events/classify", {"text": "a"}, key).status_code == 200
    refused = post(client, "/v1/events/classify", {"text": "a"}, key)
    assert refused.status_code == 429 and backend.asked == 2
    again = post(client, "/v1/events/classify", {"broken": 1}, key)  # not parsed, not asked
    assert again.status_code == 429 and again.json() == refused.json() and backend.asked == 2
    assert again.headers["Retry-After"] == refused.headers["Retry-After"]
    forged = post(client, "/v1/events/classify", {"text": "a"}, key[:-4] + "AAAA")  # another secret: asked
    assert forged.status_code == 401 and backend.asked == 3
    assert post(client, "/v1/events/classify", {"text": "a"}, keys["hotline"]).status_code == 200  # others asked
    assert [u.status for u in backend.released if u] == [200, 200]  # refusals hold no lease, no usage row
    monkeypatch.setattr(gateway, "REFUSAL_CACHE_S", 0.2)
    other = backend.keeper.store.create_tenant(Tenant("meters2", ["events"], 1, 1000, 4), 1)
    statuses = [post(client, "/v1/events/classify", {"text": "a"}, other).status_code for _ in range(2)]
    asked = backend.asked
    time.sleep(0.3)  # its cached refusal has run out: the admission actor is asked again
    assert statuses == [200, 429] and post(client, "/v1/events/classify", {"text": "a"}, other).status_code == 429
    assert backend.asked == asked + 1


def test_unknown_routes_and_methods_answer_json(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, _, keys = setup
    missing = post(client, "/v1/water/classify", {}, keys["hotline"])
    assert missing.status_code == 404 and "/v1/events/classify" in missing.json()["message"]
    assert client.get("/nowhere").json()["code"] == "not_found"
    wrong = client.get("/v1/events/classify")
    assert wrong.status_code == 405 and wrong.json()["code"] == "method_not_allowed"


def test_health_readiness_and_models(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, backend, _ = setup
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "traffic" in ready.json()["message"] and ready.headers["Retry-After"]
    assert "admission" not in ready.json()["message"]
    backend.admission_down = True
    assert client.get("/readyz").json() == ready.json()  # each replica asks at most once a second
    time.sleep(gateway.PUBLIC_ANSWER_S)
    assert "admission service not answering yet" in client.get("/readyz").json()["message"]
    models = {m["domain"]: m for m in client.get("/v1/models").json()["domains"]}
    assert models["events"]["version"] == "v7" and not models["traffic"]["ready"]


def test_openapi_documents_every_route_with_an_example(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, _, _ = setup
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [r for v in node.values() for r in refs(v)]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    for name in DOMAINS:
        op = spec["paths"][f"/v1/{name}/{VERBS[name]}"]["post"]
        body = op["requestBody"]["content"]["application/json"]
        assert body["examples"]["one item"]["value"] == request_example(get_domain(name).request_model)
        assert {"401", "403", "413", "422", "429", "503", "504"} <= set(op["responses"])
    for ref in refs(spec):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert client.get("/docs").status_code == 200


class Doubler:
    """A stand-in predictor: refuses items whose value is negative; fails (a bug) on 13."""

    version = "v1"

    def predict(self, items: list[Any]) -> list[Any]:
        from pydantic import BaseModel

        class Out(BaseModel):
            y: int

        if any(i < 0 for i in items):
            raise InvalidInput("negative", field="x")
        if 13 in items:
            raise ZeroDivisionError("unlucky")
        return [Out(y=2 * i) for i in items]


def test_a_refused_request_fails_alone_in_its_batch() -> None:
    answers = predict_groups(Doubler(), [[1, 2], [-1], [3]])  # type: ignore[arg-type]
    assert answers[0] == {"version": "v1", "items": [{"y": 2}, {"y": 4}]}
    assert answers[1]["status"] == 422 and answers[1]["error"]["field"] == "x" and answers[1]["version"] == "v1"
    assert answers[2] == {"version": "v1", "items": [{"y": 6}]}


def test_a_request_that_trips_a_model_bug_fails_alone_in_its_batch() -> None:
    answers = predict_groups(Doubler(), [[1], [13, 2], [3]])  # type: ignore[arg-type]
    assert answers[1] == {"status": 500, "version": "v1", "error": {
        "code": "internal", "message": "the model failed on these items (ZeroDivisionError)"}}
    assert [answers[0]["items"], answers[2]["items"]] == [[{"y": 2}], [{"y": 6}]]


def test_hostile_bodies_get_a_documented_4xx(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    """What the reliability check `nasty_inputs` found (`bench/reliability/hostile.py`)."""
    client, backend, _ = setup
    key = backend.keeper.store.create_tenant(Tenant("desk", ["events"], 100, 1000, 4), 1)  # room for refusals
    auth = {"Authorization": f"Bearer {key}"}
    event = json.dumps(request_example(get_domain("events").request_model)).encode()

    def send(content: bytes, **headers: str) -> Any:
        return client.post("/v1/events/classify", content=content, headers={**auth, **headers})

    # The route alone says the domain: a `_name=` default argument was once a query parameter (a 500).
    assert client.post("/v1/events/classify?_name=nowhere", content=event, headers=auth).status_code == 200
    assert "_name" not in json.dumps(client.get("/openapi.json").json())
    deep = send(b"[" * 2000 + b"]" * 2000)  # the parser's RecursionError was a 500
    assert deep.status_code == 422 and deep.json()["field"] == "body"
    twice = send(b'{"text": "a", "text": "b"}')  # parsers disagree on which one wins
    assert twice.status_code == 422 and "twice" in twice.json()["message"]
    plain = send(event, **{"Content-Type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["field"] == "Content-Type"
    assert send(event).status_code == 200  # no Content-Type: read as JSON
    # Control characters were accepted; an unpaired surrogate (the tokenizer cannot encode one) never was.
    for text in (b"pothole\\u0000", b"\\u001b[2J", b"pothole \\ud800 on Main St"):
        refused = send(b'{"text": "' + text + b'"}')
        assert refused.status_code == 422 and refused.json()["field"] == "text", text
    assert send('{"text": "\u202ebidi \u200f marks are text"}'.encode()).status_code == 200
    forged = send(event, Authorization=f"Bearer {key[:-4]}AAAA")
    assert forged.status_code == 401 and forged.json()["field"] == "Authorization"


def test_readiness_names_no_exception_class(setup: tuple[TestClient, LocalBackend, dict[str, str]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """/readyz and /v1/models answer anyone: they say what is not ready, not which exception said so."""
    client, backend, _ = setup
    backend.admission_down = True

    async def lost(domain: str) -> dict[str, Any]:
        raise ConnectionResetError(f"{domain} replica at 10.0.0.7 gone")

    monkeypatch.setattr(backend, "info", lost)
    answers = [client.get("/readyz").text, client.get("/v1/models").text]
    for text in answers:
        assert "Error" not in text and "10.0.0.7" not in text, text
    assert "admission service not answering yet" in answers[0]
    assert {m["error"] for m in json.loads(answers[1])["domains"]} == {"not answering"}


def test_api_docs_can_be_switched_off(tmp_path: Path) -> None:
    args = PlatformArgs(registry_uri="unused", ledger_url="unused", api_docs="off", domains={"events": {}})
    client = TestClient(create_api(args, LocalBackend(Store(f"sqlite:///{tmp_path / 'ledger.db'}"), echo)))
    for path in ("/docs", "/redoc", "/openapi.json"):
        answer = client.get(path)
        assert answer.status_code == 404 and answer.json()["code"] == "not_found", path
    assert client.get("/healthz").status_code == 200


def test_an_error_carries_the_request_id_the_ledger_has(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    """A client's X-Request-Id that is not 1-64 of [A-Za-z0-9._-] is replaced, in errors too."""
    client, backend, _ = setup
    key = backend.keeper.store.create_tenant(Tenant("meters", ["traffic"], 100, 1000, 4), 1)
    traffic = request_example(get_domain("traffic").request_model)
    unknown_sensor = {**traffic, "sensors": ["nowhere", *traffic["sensors"][1:]]}  # the model's refusal: metered
    for sent in ("abc-123", "not an id; <script>"):
        refused = post(client, "/v1/traffic/forecast", unknown_sensor, key, **{"X-Request-Id": sent})
        assert refused.status_code == 422
        usage = backend.released[-1]
        assert usage is not None and refused.headers.get_list("X-Request-Id") == [usage.request_id]
        assert (usage.request_id == sent) == (sent == "abc-123")
    assert post(client, "/v1/events/classify", {"text": "a"}).headers["X-Request-Id"]  # before the key is read


def test_a_response_under_serve_carries_one_request_id(setup: tuple[TestClient, LocalBackend, dict[str, str]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's HTTP server (its RequestIdMiddleware, in the proxy or a direct-ingress replica) adds its
    request id to every response: the gateway adds it no second time (tests/integration/test_serve.py
    checks a real app)."""
    from ray.serve._private.http_util import RequestIdMiddleware

    client, backend, _ = setup
    key = backend.keeper.store.create_tenant(Tenant("meters", ["events"], 100, 1000, 4), 1)
    monkeypatch.setattr(gateway, "_serve_request_id", lambda: "abc-123")  # the replica's request context
    served = TestClient(RequestIdMiddleware(client.app))
    for body in ({"text": "a"}, {"text": ""}):
        answer = post(served, "/v1/events/classify", body, key, **{"X-Request-Id": "abc-123"})
        assert answer.headers.get_list("X-Request-Id") == ["abc-123"], answer.status_code
    assert backend.released[-1] is not None and backend.released[-1].request_id == "abc-123"


# ---- callers without a good key cost little (issue: unauthenticated work) -------------------------
def test_the_key_is_checked_before_the_body_is_read(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, backend, _ = setup
    huge = {"text": "x" * 5000}  # over this gateway's 4096-byte limit: reading it would be a 413
    assert post(client, "/v1/events/classify", huge).status_code == 401
    made_up = "csk_0123456789ab_" + "x" * 43
    assert post(client, "/v1/events/classify", {"text": "a"}, made_up).status_code == 401  # looked up once
    assert post(client, "/v1/events/classify", huge, made_up).status_code == 401  # then refused unread
    assert backend.asked == 1


def test_a_refused_key_is_refused_again_without_asking(setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, backend, keys = setup
    made_up, wrong_secret = "csk_0123456789ab_" + "x" * 43, keys["press"][:-4] + "AAAA"
    for key in (made_up, wrong_secret):  # the same path for an unknown id and a wrong secret
        answers = [post(client, "/v1/events/classify", {"text": "a"}, key) for _ in range(3)]
        assert {a.status_code for a in answers} == {401} and len({a.text for a in answers}) == 1
    assert backend.asked == 2


def test_an_address_sending_bad_keys_is_turned_away_but_its_tenants_are_not(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    good = store.create_tenant(Tenant("hotline", ["events"], 600, 6000, 4), 1)
    backend = LocalBackend(store, echo)
    args = PlatformArgs(registry_uri="unused", ledger_url="unused", unauthenticated_per_s=2.0, domains={"events": {}})
    client = TestClient(create_api(args, backend))
    assert post(client, "/v1/events/classify", {"text": "a"}, good).status_code == 200
    made_up = [f"csk_{i:012x}_" + "x" * 43 for i in range(6)]
    statuses = [post(client, "/v1/events/classify", {"text": "a"}, key).status_code for key in made_up]
    # a burst of 2 × 2 a second, then refused (after the tarpit's wait, the next may pass: 2 a second)
    assert statuses[:5] == [401] * 4 + [429]
    started = time.monotonic()
    refused = post(client, "/v1/events/classify", {"text": "a"}, "csk_00000000ffff_" + "x" * 43)
    assert refused.json()["code"] == "too_many_unauthenticated" and int(refused.headers["Retry-After"]) >= 1
    assert time.monotonic() - started >= 0.2  # held before it is answered: a flood's client waits it out
    assert backend.asked <= 6  # the refused ones never reached the admission actor
    assert post(client, "/v1/events/classify", {"text": "a"}, good).status_code == 200  # admitted lately: let in


def test_a_bad_key_repeated_spends_its_address_limit_too(tmp_path: Path) -> None:
    backend = LocalBackend(Store(f"sqlite:///{tmp_path / 'ledger.db'}"), echo)
    args = PlatformArgs(registry_uri="unused", ledger_url="unused", unauthenticated_per_s=2.0, domains={"events": {}})
    client = TestClient(create_api(args, backend))
    made_up = "csk_0123456789ab_" + "x" * 43
    statuses = [post(client, "/v1/events/classify", {"text": "a"}, made_up).status_code for _ in range(6)]
    assert statuses[:5] == [401] * 4 + [429] and backend.asked == 1


def test_forwarded_for_is_read_only_as_far_as_the_trusted_proxies(tmp_path: Path) -> None:
    from starlette.requests import Request

    from services.shield import client_address

    def address(forwarded: str, hops: int) -> str:
        scope = {"type": "http", "client": ("10.0.0.9", 5000), "headers": [(b"x-forwarded-for", forwarded.encode())]}
        return client_address(Request(scope), hops)

    assert address("1.2.3.4", 0) == "10.0.0.9"  # no proxy trusted: the peer
    assert address("6.6.6.6, 1.2.3.4", 1) == "1.2.3.4"  # what the ingress appended, not what the client forged
    assert address("", 1) == "10.0.0.9"


def test_public_answers_are_computed_at_most_once_a_second(
        setup: tuple[TestClient, LocalBackend, dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    client, backend, _ = setup
    calls: list[str] = []
    real = backend.info

    async def info(domain: str) -> dict[str, Any]:
        calls.append(domain)
        return await real(domain)

    monkeypatch.setattr(backend, "info", info)
    for _ in range(5):
        assert client.get("/v1/models").status_code == 200 and client.get("/readyz").status_code == 503
    assert len(calls) == len(DOMAINS)  # one round for all ten answers


def test_a_tenant_sending_invalid_bodies_is_throttled_by_its_quota(
        setup: tuple[TestClient, LocalBackend, dict[str, str]]) -> None:
    client, backend, _ = setup
    key = backend.keeper.store.create_tenant(Tenant("sloppy", ["events", "energy"], 3, 1000, 4), 1)
    statuses = [post(client, "/v1/events/classify", {"text": ""}, key).status_code for _ in range(3)]
    assert statuses == [422] * 3
    over = post(client, "/v1/events/classify", {"text": "a"}, key)  # the quota is spent on refusals
    assert over.status_code == 429 and over.json()["code"] == "quota_exceeded"


def test_explain_is_a_bounded_flag_of_every_domain(setup: tuple[TestClient, LocalBackend, dict[str, str]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client, backend, _ = setup
    key = backend.keeper.store.create_tenant(Tenant("desk", ["events", "traffic"], 100, 1000, 4), 1)
    assert post(client, "/v1/events/classify?explain=true", {"text": "a"}, key).status_code == 200
    assert backend.explained
    assert post(client, "/v1/events/classify?explain=0", {"text": "a"}, key).status_code == 200
    assert not backend.explained
    maybe = post(client, "/v1/events/classify?explain=maybe", {"text": "a"}, key)
    assert maybe.status_code == 422 and maybe.json()["field"] == "explain" and "'maybe'" in maybe.json()["message"]
    traffic = request_example(get_domain("traffic").request_model)
    assert post(client, "/v1/traffic/forecast?explain=true", traffic, key).status_code == 200
    assert backend.explained
    monkeypatch.setattr(gateway, "EXPLAIN_MAX_ITEMS", 2)
    many = post(client, "/v1/events/classify?explain=true", [{"text": "a"}] * 3, key)
    assert many.status_code == 413 and many.json()["field"] == "explain"
    unknown_key = post(client, "/v1/events/classify?explain=maybe", {"text": "a"}, "csk_000000000000_" + "A" * 43)
    assert unknown_key.status_code == 401  # a bad key learns nothing about the request
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/v1/events/classify", "/v1/traffic/forecast"):
        assert [p["name"] for p in paths[route]["post"]["parameters"]] == ["explain"]
