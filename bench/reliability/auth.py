"""Who may call what: the auth matrix (every kind of credential against every route, the same
answer time for an unknown key id and a wrong secret) and where a key must never be found (logs,
metrics pages, Ray's session files).
"""

from __future__ import annotations

import hmac
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.reliability import Check, Target, command
from bench.reliability.hostile import PUBLIC_ROUTES, REVOKE_TAKES_S, Route, error_problem, served_routes
from bench.reliability.serving import CLIENT_TIMEOUT_S, body, headers

# ---- auth matrix ---------------------------------------------------------------------------------
# Each credential and the status it gets on a model route (docs/serving.md, "Errors"): who is calling is
# settled before the body is looked at, and a key must be granted the route's domain.
EXPECTED = {"no key": 401, "malformed header": 401, "unknown key": 401, "wrong secret": 401, "revoked key": 401,
            "not granted": 403, "valid key": 200}


@dataclass
class Keys:
    """The keys the matrix sends: every tenant the check made, and keys that were never issued."""

    valid: str
    revoked: str
    # Two tenants splitting the served domains between them: for each domain one lacks its grant.
    halves: list[tuple[list[str], str]]
    unknown: str = field(init=False)
    wrong_secret: str = field(init=False)

    def __post_init__(self) -> None:
        from services.tenants import new_key

        prefix, key_id, _ = self.valid.split("_", 2)  # a secret may hold '_' itself
        self.unknown = new_key()[0]  # well-formed, never stored
        self.wrong_secret = f"{prefix}_{key_id}_{new_key()[0].split('_', 2)[2]}"

    def authorizations(self, domain: str) -> dict[str, list[str | None]]:
        """Authorization header values per credential (None: no header)."""
        not_granted = next(key for grants, key in self.halves if domain not in grants)
        return {
            "no key": [None],
            # A valid key in the wrong scheme is still no bearer key.
            "malformed header": ["", "Bearer", "Bearer ", "Basic Y3NrOnNlY3JldA==", f"Token {self.valid}",
                                 "Bearer csk_only", "Bearer xyz_0123_abcdef", "Bearer csk__secret", f"{self.valid}"],
            "unknown key": [f"Bearer {self.unknown}"],
            "wrong secret": [f"Bearer {self.wrong_secret}"],
            "revoked key": [f"Bearer {self.revoked}"],
            "not granted": [f"Bearer {not_granted}"],
            "valid key": [f"Bearer {self.valid}", f"bearer {self.valid}"],
        }

    def secrets(self) -> dict[str, str]:
        """Every key the check sent and its secret part, by a label that names neither."""
        keys = {"valid key": self.valid, "revoked key": self.revoked, "unknown key": self.unknown,
                "wrong-secret key": self.wrong_secret}
        keys |= {f"key of tenant {i}": key for i, (_, key) in enumerate(self.halves)}
        return {**keys, **{f"secret of the {label}": k.split("_", 2)[2] for label, k in keys.items()}}


def check_auth_matrix(target: Target, short: bool = False) -> Check:
    """Every model route × {no key, malformed header, unknown key, right key id with a wrong
    secret, revoked key, key without the route's grant, valid key} gets exactly 401, 401, 401, 401,
    401, 403, 200; the public routes answer 200 to anyone. Then: keys are compared in constant
    time (the code path, and the latencies of two kinds of wrong key), and no key sent here shows
    up in the Ray logs, the metrics or any table of the ledger.
    """
    routes = served_routes(target)
    domains = [r.domain for r in routes]
    _, valid = target.tenant("auth-valid", domains)
    revoked_name, revoked = target.tenant("auth-revoked", domains)
    target.store().revoke(revoked_name)
    halves = [domains[: len(domains) // 2], domains[len(domains) // 2:]]
    keys = Keys(valid, revoked, [(grants, target.tenant("auth-half", grants)[1]) for grants in halves])
    time.sleep(REVOKE_TAKES_S + 0.5)  # the revoke has reached every gateway; a new key works at once
    problems: list[str] = []
    cells: dict[str, dict[str, list[int]]] = {}  # the distinct statuses each credential got
    with requests.Session() as session:
        for route in routes:
            cells[route.path] = {}
            for credential, values in keys.authorizations(route.domain).items():
                expected = EXPECTED[credential]
                got = set()
                for value in values:
                    sent = {"Content-Type": "application/json"}
                    if value is not None:
                        sent["Authorization"] = value
                    response = session.post(f"{target.gateway_url}{route.path}", data=body(route.domain),
                                            headers=sent, timeout=CLIENT_TIMEOUT_S)
                    got.add(response.status_code)
                    problem = (None if expected == 200 and response.status_code == 200 else
                               error_problem(response, expected, None if expected == 200 else _auth_field(expected)))
                    if problem is not None:
                        problems.append(f"POST {route.path} with {credential} ({_shown(value, keys)}): {problem}")
                cells[route.path][credential] = sorted(got)
            # An unauthenticated caller learns nothing about the body, even a broken one.
            response = session.post(f"{target.gateway_url}{route.path}", data=b"{broken", timeout=CLIENT_TIMEOUT_S)
            if response.status_code != 401:
                problems.append(f"POST {route.path} without a key, broken body: {response.status_code}, expected 401")
        public = {}
        for path in PUBLIC_ROUTES:
            statuses = {session.get(f"{target.gateway_url}{path}", headers=who, timeout=CLIENT_TIMEOUT_S).status_code
                        for who in ({}, {"Authorization": f"Bearer {keys.unknown}"})}
            public[path] = sorted(statuses)
            if statuses != {200}:
                problems.append(f"GET {path} (public) answered {sorted(statuses)}, expected 200 with or without a key")
        timing = compare_latencies(session, target, routes[0], keys, pairs=60 if short else 300)
    if not timing["constant_time_code"]:
        problems.append("Gatekeeper.authenticate does not compare digests with hmac.compare_digest")
    if timing["sign_test_p"] < 0.001:
        problems.append(f"unknown key vs wrong secret: medians {timing['median_unknown_ms']} vs "
                        f"{timing['median_wrong_secret_ms']} ms, one slower beyond chance (p={timing['sign_test_p']})")
    time.sleep(1.0)  # the ledger's writer commits every 0.2 s; loggers flush
    leaks, searched = find_keys(target, keys.secrets())
    problems += [f"the {label} appears in {where}" for label, where in leaks]
    figures = {"routes": cells, "expected": EXPECTED,
               "public_routes": public, "timing": timing, "searched": searched, "leaks": len(leaks)}
    return Check("auth_matrix", not problems, figures, command("auth_matrix"), problems)


def _auth_field(status: int) -> str:
    return "Authorization" if status == 401 else "domain"


def _shown(value: str | None, keys: Keys) -> str:
    """An Authorization value as a problem may quote it: secrets replaced by what they are."""
    if value is None:
        return "no header"
    for label, secret in keys.secrets().items():
        value = value.replace(secret, f"<{label}>")
    return repr(value)


def compare_latencies(session: requests.Session, target: Target, route: Route, keys: Keys,
                      pairs: int) -> dict[str, Any]:
    """Is a wrong key refused as fast whether its id exists or not?

    The criterion: requests with an unknown key (right format) and with a real key id but a
    wrong secret are sent in pairs, in random order within each pair (so drift and ordering
    cancel); a sign test on the pairs' differences asks whether one kind is slower more often
    than chance allows. Fail below p = 0.001. A sign test ignores how much slower, so a rare
    request that pays the ledger's periodic re-read cannot sway it, and it needs no assumption
    about latency's distribution. Over HTTP this resolves
    a path that does different work (a lookup, a query), never the nanoseconds a digest
    comparison takes: that is why the code path itself is checked too.
    """
    url = f"{target.gateway_url}{route.path}"
    data = body(route.domain)
    sent = {"unknown": headers(keys.unknown), "wrong_secret": headers(keys.wrong_secret)}
    times: dict[str, list[float]] = {"unknown": [], "wrong_secret": []}
    for _ in range(pairs):
        for kind in random.sample(list(sent), 2):
            started = time.perf_counter()
            session.post(url, data=data, headers=sent[kind], timeout=CLIENT_TIMEOUT_S)
            times[kind].append((time.perf_counter() - started) * 1000)
    differences = [a - b for a, b in zip(times["unknown"], times["wrong_secret"], strict=True) if a != b]
    slower = sum(d > 0 for d in differences)
    return {"pairs": pairs, "median_unknown_ms": round(statistics.median(times["unknown"]), 3),
            "median_wrong_secret_ms": round(statistics.median(times["wrong_secret"]), 3),
            "median_difference_ms": round(statistics.median(differences), 3) if differences else 0.0,
            "unknown_slower_in": slower, "sign_test_p": round(sign_test(slower, len(differences)), 4),
            "constant_time_code": compares_in_constant_time()}


def sign_test(k: int, n: int) -> float:
    """Two-sided p-value of `k` successes in `n` fair coin flips."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)


def compares_in_constant_time() -> bool:
    """Whether the admission code (`Gatekeeper.authenticate`, what the platform runs) compares a
    key's digest with `hmac.compare_digest`: a right key id with a wrong secret, and a spy on it."""
    from unittest import mock

    from services.admission import Gatekeeper
    from services.tenants import ApiKey, Store, Tenant, digest, new_key

    _, key_id, stored = new_key()
    keeper = Gatekeeper(Store("sqlite:///:memory:"))  # never read: its keys are set here
    keeper.keys = {key_id: ApiKey(key_id, "t", stored, 0.0, math.inf)}
    keeper.tenants = {"t": Tenant("t", ["events"], 1, 1, 1)}
    wrong = digest("not the secret")
    with mock.patch("hmac.compare_digest", wraps=hmac.compare_digest) as spy:
        decision = keeper.authenticate(key_id, wrong, "events", time.time())
    compared = set(spy.call_args.args) if spy.called else set()
    return decision.status == 401 and spy.call_count == 1 and compared == {stored.encode(), wrong.encode()}


# ---- where keys must never be --------------------------------------------------------------------
def find_keys(target: Target, secrets: dict[str, str]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(label, where) for each secret found in the platform's Ray logs, its Prometheus metrics or
    the ledger's tables, and what was searched (a place not reachable is said, not skipped silently)."""
    needles = {label: secret.encode() for label, secret in secrets.items()}
    leaks: list[tuple[str, str]] = []
    searched: dict[str, Any] = {}
    session = ray_session_dir(target)
    if session is None:
        searched["logs"] = "not searched: no Ray session (settings.ray_temp_dir unset, no platform record)"
        searched["metrics"] = "not searched: no Ray session"
    else:
        files = [p for p in (session / "logs").rglob("*") if p.is_file()]
        size = 0
        for path in files:
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # rotated away meanwhile
                continue
            size += len(data)
            leaks += [(label, f"log {path.relative_to(session)}") for label, n in needles.items() if n in data]
        searched["logs"] = {"files": len(files), "mb": round(size / 2**20, 1)}
        pages, unreachable = metrics_pages(session.parent)
        for url, text in pages.items():
            leaks += [(label, f"metrics at {url}") for label, n in needles.items() if n in text]
        searched["metrics"] = {"endpoints": len(pages), "kb": round(sum(map(len, pages.values())) / 1024, 1),
                               "unreachable": unreachable}
    store = target.store()
    catalogue = ("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
                 if store.postgres else "SELECT name FROM sqlite_master WHERE type = 'table'")
    rows = 0
    for (table,) in store.query(catalogue):
        for row in store.query(f'SELECT * FROM "{table}"'):  # names from the catalogue, not from input
            rows += 1
            text = "\x1f".join(map(str, row)).encode()
            leaks += [(label, f"ledger table {table}") for label, n in needles.items() if n in text]
    searched["ledger_rows"] = rows
    return sorted(set(leaks)), searched


def ray_session_dir(target: Target) -> Path | None:
    """The platform's Ray session folder: under the settings' Ray temp dir (a test session's
    cluster), else the one `cityserve serve up` recorded; None when neither is known."""
    from cluster.serve import Platform

    temp = target.settings.ray_temp_dir
    if temp is None:
        platform = Platform.load(target.settings.state_dir)
        temp = Path(platform.temp_dir) if platform is not None and platform.temp_dir else None
    session = temp / "session_latest" if temp is not None else None
    return session.resolve() if session is not None and session.is_dir() else None


def metrics_pages(temp_dir: Path) -> tuple[dict[str, bytes], list[str]]:
    """Each node's Prometheus text, from the targets Ray lists for Prometheus's file service
    discovery (README "Metrics and logs"), and the targets that did not answer."""
    listing = temp_dir / "prom_metrics_service_discovery.json"
    pages, unreachable = {}, []
    for group in json.loads(listing.read_text()) if listing.is_file() else []:
        for address in group.get("targets", []):
            url = f"http://{address}/metrics"
            try:
                pages[url] = requests.get(url, timeout=CLIENT_TIMEOUT_S).content
            except requests.RequestException as exc:
                unreachable.append(f"{url}: {type(exc).__name__}")
    return pages, unreachable
