"""The records the platform keeps about tenants: the tenant, its API keys and its usage rows, and
the rules a tenant must meet (its name, its grants and limits)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import InvalidInput

# A tenant's name reaches CLI arguments (a leading '-' reads as an option), metric labels, the audit
# log and Kubernetes Secrets; ASCII only, so 'аdmin' (a Cyrillic а) cannot pass for 'admin'.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
USAGE_COLUMNS = ("request_id", "at", "tenant", "domain", "items", "status", "latency_ms", "model_version", "lease",
                 "route")


def check_tenant_name(name: str) -> str:
    """`name` if it is a valid tenant name (`TENANT_NAME`); ValueError saying the rule otherwise."""
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant name {name[:80]!r}: use 1 to 63 ASCII letters, digits, '-' and '_', "
                         "starting with a letter or digit")
    return name


@dataclass
class Tenant:
    """A tenant app: which domains it may call and how much."""

    name: str
    grants: list[str]
    requests_per_minute: int
    items_per_minute: int
    max_concurrent: int
    created_at: float = 0.0
    revoked_at: float | None = None
    # The share of its answered requests the platform keeps, masked, in the sample log (0: none).
    sample_rate: float = 0.0


def check_limits(tenant: Tenant) -> None:
    """Refuses a tenant with a bad name, a grant of an unknown domain or a limit under 1."""
    from domains import DOMAINS

    try:
        check_tenant_name(tenant.name)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="name") from None
    unknown = sorted(set(tenant.grants) - set(DOMAINS))
    if unknown:
        raise InvalidInput(f"unknown domains {unknown}; choose from {sorted(DOMAINS)}", field="grants")
    for name in ("requests_per_minute", "items_per_minute", "max_concurrent"):
        if getattr(tenant, name) < 1:
            raise InvalidInput(f"{name} must be at least 1, got {getattr(tenant, name)}", field=name)
    if not 0.0 <= tenant.sample_rate <= 1.0:
        raise InvalidInput(f"sample_rate must be between 0 and 1, got {tenant.sample_rate}", field="sample_rate")


@dataclass
class ApiKey:
    key_id: str
    tenant: str
    digest: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None

    def problem(self, now: float) -> str | None:
        """Why this key is refused now, or None."""
        if self.revoked_at is not None:
            return "API key revoked"
        if self.expires_at <= now:
            return f"API key expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(self.expires_at))}"
        return None


@dataclass
class Usage:
    """One admitted request, as the ledger keeps it for chargeback."""

    request_id: str
    at: float  # when it was admitted (wall clock): quota windows and billing periods count from it
    tenant: str
    domain: str
    items: int
    status: int
    latency_ms: float
    model_version: str = ""
    # The row's key: the admission's lease, which the platform makes. The request id comes from the
    # client (X-Request-Id) when it sends one, so a client repeating an id must not merge rows.
    lease: str = field(default_factory=lambda: uuid.uuid4().hex)
    route: str = "predict"  # or "feedback": ground truth sent back about a prediction (`POST .../feedback`)

    def row(self) -> tuple[Any, ...]:
        return (self.request_id, self.at, self.tenant, self.domain, self.items, self.status, self.latency_ms,
                self.model_version, self.lease, self.route)


USAGE_SUMMARY_COLUMNS = ("tenant", "domain", "route", "requests", "answered", "items", "errors", "p50_ms",
                         "p99_ms", "versions")


def summarise_usage(rows: Sequence[Usage]) -> list[tuple[Any, ...]]:
    """Per tenant, domain and route, one row of `USAGE_SUMMARY_COLUMNS`: requests, answered, items
    billed, errors, p50/p99 latency, the versions that answered."""
    import numpy as np

    groups: dict[tuple[str, str, str], list[Usage]] = {}
    for u in rows:
        groups.setdefault((u.tenant, u.domain, u.route), []).append(u)
    out = []
    for (tenant, domain, route), us in sorted(groups.items()):
        ok = [u for u in us if u.status == 200]
        latency = np.array([u.latency_ms for u in us])
        out.append((tenant, domain, route, len(us), len(ok), sum(u.items for u in ok), len(us) - len(ok),
                    round(float(np.percentile(latency, 50)), 1), round(float(np.percentile(latency, 99)), 1),
                    ",".join(sorted({u.model_version for u in ok if u.model_version}))))
    return out
