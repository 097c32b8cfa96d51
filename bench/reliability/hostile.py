"""Hostile input: schema fuzzing and a fixed list of nasty inputs (`auth.py` checks access).

Each check talks real HTTP to the running gateway and passes only on what came back: no 5xx, no
hang, every answer the status and JSON body the API documents (`services/errors.py`). Nothing here
knows how the gateway is deployed: the same functions run against the platform (`make
reliability`, the integration tests) and against an in-process gateway (the unit tests).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from bench.reliability import Check, Target, command
from bench.reliability.serving import CLIENT_TIMEOUT_S, body, headers
from domains import get_domain
from domains.base import request_example
from services.config import VERBS

# Routes anyone may call: liveness, readiness, the versions served and the API's own description.
# They carry no tenant data, so a load balancer or a monitor needs no key.
PUBLIC_ROUTES = ("/healthz", "/readyz", "/v1/models", "/openapi.json", "/docs")
# README "Tenants, keys and quotas": a revoke reaches every gateway within 2 s (the admission
# actor re-reads tenants that often).
REVOKE_TAKES_S = 2.0
# The documented body limit (PlatformArgs.max_body_bytes; README "Errors": 413 over 1 MiB).
BODY_LIMIT = 1_048_576


@dataclass(frozen=True)
class Route:
    """A model route as /openapi.json documents it."""

    domain: str
    path: str
    max_items: int


def served_routes(target: Target) -> list[Route]:
    """The platform's model routes, from its own OpenAPI (a platform may serve fewer than four)."""
    spec = requests.get(f"{target.gateway_url}/openapi.json", timeout=CLIENT_TIMEOUT_S).json()
    routes = []
    for domain, verb in VERBS.items():
        operation = spec["paths"].get(f"/v1/{domain}/{verb}", {}).get("post")
        if operation is not None:
            shapes = operation["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
            max_items = next(s["maxItems"] for s in shapes if s.get("type") == "array")
            routes.append(Route(domain, f"/v1/{domain}/{verb}", max_items))
    return routes


def error_problem(response: requests.Response, status: int, named: str | None) -> str | None:
    """Why `response` is not the documented error (`status`, a JSON `{code, message, field}`
    whose field is `named`), or None."""
    if response.status_code != status:
        return f"status {response.status_code}, expected {status}"
    try:
        answer = response.json()
    except ValueError:
        return f"a {status} whose body is not JSON"
    if not (isinstance(answer, dict) and isinstance(answer.get("code"), str) and answer.get("message")):
        return f"a {status} without code and message: {str(answer)[:200]}"
    if answer.get("field") != named:
        return f"field {answer.get('field')!r}, expected {named!r} ({answer['message'][:200]})"
    return None


# ---- fuzz ----------------------------------------------------------------------------------------
def check_fuzz(target: Target, short: bool = False) -> Check:
    """Schemathesis cases generated from the gateway's /openapi.json for every operation, half
    fitting the schema and half breaking it somewhere, sent without a key and with a valid one.

    Pass: no 5xx, no hang, and every answer conforms: its status is documented for the route and
    its body matches the documented schema. Every route with a body gets `cases` cases each way;
    a route without parameters has one distinct request, so it gets one.
    """
    import schemathesis
    from schemathesis.core.result import Ok

    cases = 25 if short else 200
    _, key = target.tenant("fuzz", list(VERBS))
    seed = random.randrange(2**32)  # a failure is reproduced with this seed
    schema = schemathesis.openapi.from_url(f"{target.gateway_url}/openapi.json", timeout=CLIENT_TIMEOUT_S)
    operations, problems = [], []
    for result in schema.get_all_operations():
        if isinstance(result, Ok):
            operations.append(result.ok())
        else:
            problems.append(f"/openapi.json documents an operation schemathesis cannot read: {result.err()}")
    rows = [fuzz_operation(op, target.gateway_url, credential, cases, seed)
            for op in operations for credential in (None, key)]
    for row in rows:
        who = "with a valid key" if row["key"] else "without a key"
        if row["server_errors"] or row["nonconforming"] or row["no_answer"]:
            problems.append(f"{row['route']} {who}: {row['server_errors']} 5xx, {row['nonconforming']} "
                            f"nonconforming, {row['no_answer']} unanswered, of {row['cases']}; "
                            f"e.g. {row['failures'][:2]}")
        if row["has_body"] and row["cases"] < cases:
            problems.append(f"{row['route']} {who}: only {row['cases']} of {cases} cases generated")
    figures = {"cases_per_route": cases, "seed": seed, "routes": len(rows) // 2,
               "cases": sum(r["cases"] for r in rows), "server_errors": sum(r["server_errors"] for r in rows),
               "nonconforming": sum(r["nonconforming"] for r in rows), "no_answer": sum(r["no_answer"] for r in rows),
               "by_route": rows}
    return Check("fuzz", not problems, figures, command("fuzz"), problems)


def fuzz_operation(operation: Any, base_url: str, key: str | None, cases: int, seed: int) -> dict[str, Any]:
    """Sends `cases` generated cases to one operation; counts statuses, 5xx, nonconforming answers
    and requests without an answer (a hang past the client's timeout, or a dropped connection).
    Each failure is kept as its title and first line, never with the request body."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as with_seed
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import Failure, FailureGroup, ServerError
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    # Conformance only: schemathesis's default set also wants every schema-valid body accepted,
    # which a domain refuses by design for what only a trained model knows (an unknown sensor).
    conformance = [not_a_server_error, status_code_conformance, content_type_conformance,
                   response_schema_conformance]
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    statuses: Counter[int] = Counter()
    row: dict[str, Any] = {"route": operation.label, "key": key is not None, "has_body": bool(operation.body),
                           "cases": 0, "server_errors": 0, "nonconforming": 0, "no_answer": 0, "failures": []}

    @with_seed(seed)
    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate], print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(case=st.one_of(*(operation.as_strategy(mode) for mode in GenerationMode)))
    def send(case: Any) -> None:
        row["cases"] += 1
        try:
            response = case.call(base_url=base_url, headers=sent, timeout=CLIENT_TIMEOUT_S)
        except requests.RequestException as exc:
            row["no_answer"] += 1
            row["failures"].append(f"no answer: {type(exc).__name__}")
            return
        statuses[response.status_code] += 1
        row["server_errors"] += response.status_code >= 500
        try:
            case.validate_response(response, checks=conformance, headers=sent)
        except (Failure, FailureGroup) as exc:
            failures = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
            if not all(isinstance(f, ServerError) for f in failures):
                row["nonconforming"] += 1
            row["failures"] += [f"{response.status_code}: {f.title}: {f.message.partition(chr(10))[0][:200]}"
                                for f in failures]

    send()
    row["statuses"] = dict(sorted(statuses.items()))
    row["failures"] = sorted(set(row["failures"]))[:10]
    return row


# ---- nasty inputs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Nasty:
    """One hostile request and the documented answer: `status`, and for an error the `field` its
    body names. `data` is the body, or chunks to stream without a Content-Length."""

    name: str
    domain: str
    data: bytes | Callable[[], Iterator[bytes]]
    status: int
    field: str | None
    content_type: str = "application/json"


def _example(domain: str, **changes: Any) -> dict[str, Any]:
    return {**request_example(get_domain(domain).request_model), **changes}


def _raw(document: Any, token: str) -> bytes:
    """`document` as JSON with its "<raw>" string replaced by `token` (NaN, 1e999: no encoder writes those)."""
    return json.dumps(document).replace('"<raw>"', token).encode()


def _chunks(size: int) -> Callable[[], Iterator[bytes]]:
    def stream() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(size // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    return stream


def nasty_inputs(routes: list[Route]) -> list[Nasty]:
    """The fixed list, for whichever domains are served (a text domain, traffic, energy)."""
    served = {r.domain: r for r in routes}
    cases: list[Nasty] = []
    any_domain = routes[0].domain
    example = _example(any_domain)
    cases += [
        Nasty("body over the limit", any_domain, b" " * BODY_LIMIT + json.dumps(example).encode(), 413, "body"),
        Nasty("body over the limit, streamed without a length", any_domain, _chunks(2 * BODY_LIMIT), 413, "body"),
        Nasty("array nested 100,000 deep", any_domain, b"[" * 100_000 + b"]" * 100_000, 422, "body"),
        Nasty("object nested 50,000 deep", any_domain, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 422, "body"),
        Nasty("invalid UTF-8", any_domain, b'{"text": "caf\xe9 \xff\xfe"}', 422, "body"),
        Nasty("empty body", any_domain, b"", 422, "body"),
        Nasty("a top-level number", any_domain, b"42", 422, "body"),
        Nasty("a top-level string", any_domain, b'"hello"', 422, "body"),
        Nasty("null", any_domain, b"null", 422, "body"),
        Nasty("an integer of 5,000 digits", any_domain, b"[" + b"9" * 5000 + b"]", 422, "body"),
        Nasty("duplicate member", any_domain, json.dumps(example).encode()[:-1] + b', "'
              + next(iter(example)).encode() + b'": null}', 422, "body"),
        Nasty("empty batch", any_domain, b"[]", 422, "body"),
        Nasty("batch one over the limit", any_domain, json.dumps([example] * (served[any_domain].max_items + 1))
              .encode(), 413, "body"),
        Nasty("an unknown member", any_domain, json.dumps({**example, "admin": True}).encode(), 422, "admin"),
        Nasty("a bad item in a batch", any_domain, json.dumps([example, {}]).encode(), 422,
              f"[1].{next(iter(example))}"),
        Nasty("JSON sent as text/plain", any_domain, json.dumps(example).encode(), 415, "Content-Type",
              content_type="text/plain"),
        Nasty("JSON sent as a form", any_domain, json.dumps(example).encode(), 415, "Content-Type",
              content_type="application/x-www-form-urlencoded"),
        Nasty("a form sent as JSON", any_domain, b"text=pothole&priority=high", 422, "body"),
    ]
    text = next((d for d in ("events", "sentiment") if d in served), None)
    if text is not None:
        cases += [
            Nasty("100 kB text", text, json.dumps({"text": "pothole " * 12_500}).encode(), 422, "text"),
            Nasty("a text of spaces", text, json.dumps({"text": " \t\n "}).encode(), 422, "text"),
            Nasty("NUL in text", text, json.dumps({"text": "pothole\x00 on Main St"}).encode(), 422, "text"),
            Nasty("escape sequence in text", text, json.dumps({"text": "\x1b[2Jpothole"}).encode(), 422, "text"),
            Nasty("unpaired surrogate in text", text, b'{"text": "pothole \\ud800 on Main St"}', 422, "text"),
            Nasty("a number as text", text, b'{"text": 5}', 422, "text"),
            # Accepted by design: bidi marks are part of real text (a street name in Arabic or Hebrew
            # inside an English report), and a text is never echoed back or logged, so an override
            # cannot spoof anything we display.
            Nasty("right-to-left override in text", text,
                  json.dumps({"text": "\u202eteews si enil sub wen ehT"}).encode(), 200, None),
            Nasty("right-to-left marks in text", text,
                  json.dumps({"text": "pothole on \u200f\u05d4\u05e8\u05e6\u05dc\u200f street, deep"}).encode(),
                  200, None),
            # A text the models cannot read is refused by name (422 unsupported_language), not guessed at.
            Nasty("a report in Hebrew", text,
                  json.dumps({"text": "\u05d1\u05d5\u05e8 \u05d1\u05db\u05d1\u05d9\u05e9 \u200f(pothole)"}).encode(),
                  422, "text"),
        ]
    if "energy" in served:
        demand = _example("energy")["demand"]
        cases += [
            Nasty("NaN in a series", "energy", _raw(_example("energy", demand=[*demand[:3], "<raw>", *demand[4:]]),
                                                    "NaN"), 422, "demand[3]"),
            Nasty("1e999 in a series", "energy", _raw(_example("energy", demand=["<raw>", *demand[1:]]), "1e999"),
                  422, "demand[0]"),
            Nasty("1e300 in a series", "energy", json.dumps(_example("energy", demand=[1e300, *demand[1:]])).encode(),
                  422, "demand[0]"),
            Nasty("a string in a series", "energy",
                  json.dumps(_example("energy", demand=[*demand[:5], "lots", *demand[6:]])).encode(), 422, "demand[5]"),
            Nasty("a series one short", "energy", json.dumps(_example("energy", demand=demand[1:])).encode(),
                  422, "demand"),
            Nasty("a series of 100,000", "energy", json.dumps(_example("energy", demand=demand * 298)).encode(),
                  422, "demand"),
            Nasty("a start between half hours", "energy",
                  json.dumps(_example("energy", start="2014-12-01T00:10:00")).encode(), 422, "start"),
        ]
    if "traffic" in served:
        history = _example("traffic")["history"]
        cases += [
            Nasty("Infinity in a series", "traffic",
                  _raw(_example("traffic", history=[["<raw>", *history[0][1:]], *history[1:]]), "Infinity"),
                  422, "history[0][0]"),
            Nasty("1e30 in a series", "traffic",
                  json.dumps(_example("traffic", history=[[1e30, *history[0][1:]], *history[1:]])).encode(),
                  422, "history[0][0]"),
            Nasty("a series one short", "traffic",
                  json.dumps(_example("traffic", history=[history[0][1:], *history[1:]])).encode(), 422, "history"),
            Nasty("more series than sensors", "traffic",
                  json.dumps(_example("traffic", history=[*history, history[0]])).encode(), 422, "history"),
            Nasty("an unknown network", "traffic",
                  json.dumps(_example("traffic", network="'; DROP TABLE usage; --")).encode(), 422, "network"),
        ]
    return cases


def check_nasty_inputs(target: Target, short: bool = False) -> Check:
    """A fixed list of hostile bodies, each sent with a valid key: every one gets its documented
    answer — a 4xx whose JSON `{code, message, field}` names the problem (or, for text a person
    may really write, 200) — never a 5xx, never a hang; the platform still answers afterwards. A
    batch above the tenant's items quota gets 413. Tenant names with quotes, SQL or lookalike
    letters are refused by `Store.create_tenant` and by the tenants file reader, naming the field.
    (`short` changes nothing: the list is the check.)
    """
    routes = served_routes(target)
    _, key = target.tenant("nasty", [r.domain for r in routes])
    # Items per minute 2: a batch of 3 can never fit (413 at once, not 429).
    _, small = target.tenant("nasty-small", [routes[0].domain], items_per_minute=2)
    cases = [(case, key) for case in nasty_inputs(routes)]
    cases.append((Nasty("batch above the tenant's items quota", routes[0].domain,
                        json.dumps([_example(routes[0].domain)] * 3).encode(), 413, "items"), small))
    problems, answered = [], {}
    for case, case_key in cases:
        sent = {**headers(case_key), "Content-Type": case.content_type}
        path = next(r.path for r in routes if r.domain == case.domain)
        try:
            response = requests.post(f"{target.gateway_url}{path}", data=case.data() if callable(case.data) else
                                     case.data, headers=sent, timeout=CLIENT_TIMEOUT_S)
        except requests.RequestException as exc:
            problems.append(f"{case.domain}: {case.name}: no answer ({type(exc).__name__})")
            answered[f"{case.domain}: {case.name}"] = 0
            continue
        answered[f"{case.domain}: {case.name}"] = response.status_code
        problem = (None if case.status == 200 and response.status_code == 200
                   else error_problem(response, case.status, case.field))
        if problem is not None:
            problems.append(f"{case.domain}: {case.name}: {problem}")
    after = requests.post(f"{target.gateway_url}{routes[0].path}", data=body(routes[0].domain),
                          headers=headers(key), timeout=CLIENT_TIMEOUT_S).status_code
    if after != 200:
        problems.append(f"after the nasty inputs a valid request got {after}")
    names = tenant_names_refused(target)
    problems += [f"tenant name {name!r}: {problem}" for name, problem in names.items() if problem]
    figures = {"cases": len(cases), "answered": answered, "valid_request_after": after,
               "tenant_names": {name: problem or "refused" for name, problem in names.items()}}
    return Check("nasty_inputs", not problems, figures, command("nasty_inputs"), problems)


# Names that try SQL, quoting, paths, format strings, lookalike letters and sheer length.
HOSTILE_TENANT_NAMES = ("x'; DROP TABLE tenants; --", 'r"); DELETE FROM api_keys; --', "a' OR '1'='1",
                        "a b", "", "-rf", "a" * 64, "\u0430dmin", "tab\tname", "nul\x00name", "name\n",
                        "caf\u00e9", "../etc/passwd", "%s%n", "${jndi:ldap://x}")


def tenant_names_refused(target: Target) -> dict[str, str | None]:
    """Per hostile name, None when both `Store.create_tenant` and `read_tenants_file` refused it
    naming the name field, else what happened instead. Refusals change nothing in the ledger."""
    import yaml

    from core.errors import ConfigError, InvalidInput
    from services.tenants import KeyEntry, Tenant, new_key, read_tenants_file

    store = target.store()
    before = store.query("SELECT COUNT(*) FROM tenants")
    outcome: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "tenants.yaml"
        for name in HOSTILE_TENANT_NAMES:
            problem = None
            try:
                store.create_tenant(Tenant(name, ["events"], 10, 10, 1), key_ttl_days=1)
                problem = "created by Store.create_tenant"
            except InvalidInput as exc:
                if exc.field != "name":
                    problem = f"refused by Store.create_tenant naming {exc.field!r}"
            entry = {"name": name, "grants": ["events"], "requests_per_minute": 10, "items_per_minute": 10,
                     "max_concurrent": 1, "keys": [KeyEntry.of(new_key()[0]).model_dump(exclude_none=True)]}
            listing.write_text(yaml.safe_dump({"tenants": [entry]}))
            try:
                read_tenants_file(listing)
                problem = problem or "accepted by the tenants file reader"
            except ConfigError as exc:
                if "tenants[0].name" not in exc.message:
                    problem = problem or f"tenants file refused without naming tenants[0].name: {exc.message[:200]}"
            outcome[name] = problem
    if store.query("SELECT COUNT(*) FROM tenants") != before:
        outcome["(ledger)"] = "the tenants table changed"
    return outcome
