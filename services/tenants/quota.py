"""Quota arithmetic: what a tenant reads in its contract, kept in memory by the admission actor.

In any 60 s window the requests (and items) a tenant was admitted never exceed its per-minute quota.
`SlidingWindow` keeps the admitted events of the last minute, so there is no fixed-window edge where
twice the quota gets through; a `Pacer` spreads the requests over the minute, so a flood reaches the
models evenly rather than in bursts. Concurrency slots are `Leases` with a time-to-live: a gateway
replica killed mid-request cannot leak one. `Expiring` remembers refusals for a while, in bounded
memory.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Generic, TypeVar

WINDOW_S = 60.0
K = TypeVar("K")
V = TypeVar("V")


class SlidingWindow:
    """Amounts admitted in the last `span` seconds (requests: amount 1; items: the batch size)."""

    def __init__(self, span: float = WINDOW_S) -> None:
        self.span = span
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def _expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - self.span:
            self.total -= self.events.popleft()[1]

    def wait(self, now: float, amount: int, limit: int) -> float:
        """Seconds until `amount` more fits under `limit` (0: it fits now). `amount > limit`
        never fits; callers refuse that before asking."""
        self._expire(now)
        excess = self.total + amount - limit
        if excess <= 0:
            return 0.0
        freed = 0
        for at, n in self.events:  # oldest first: the window frees them in this order
            freed += n
            if freed >= excess:
                return at + self.span - now
        return self.span

    def add(self, now: float, amount: int) -> None:
        self.events.append((now, amount))
        self.total += amount


class Pacer:
    """Spreads a tenant's requests over the minute: one per `60 / per_minute` s on average, up to
    `burst` at once after a quiet spell (GCRA: a token bucket kept as one timestamp, the time its
    next request is due). `wait` is how far ahead of its turn a request is: the admission actor
    refuses it past a limit and has the gateway hold it until its turn below."""

    def __init__(self) -> None:
        self.due = -float("inf")

    def wait(self, now: float, per_minute: int, burst: int) -> float:
        """Seconds until one more request's turn (0: now)."""
        interval = WINDOW_S / per_minute
        # Rounded to the microsecond: a sum of float intervals is off in its last digits (far below a
        # microsecond), and that rounding error alone must not refuse a request that is on time.
        return max(0.0, round(max(self.due, now) - (burst - 1) * interval - now, 6))

    def add(self, now: float, per_minute: int) -> None:
        self.due = max(self.due, now) + WINDOW_S / per_minute


class Leases:
    """Concurrency slots per tenant, each with an expiry so a lost release frees itself."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, float]] = {}  # tenant -> lease id -> expiry (monotonic)
        self.owner: dict[str, str] = {}  # lease id -> tenant

    def active(self, tenant: str, now: float) -> int:
        leases = self.held.get(tenant, {})
        for lease in [k for k, expiry in leases.items() if expiry <= now]:
            del leases[lease]
            self.owner.pop(lease, None)
        return len(leases)

    def acquire(self, tenant: str, cap: int, now: float, ttl: float) -> str | None:
        if self.active(tenant, now) >= cap:
            return None
        lease = uuid.uuid4().hex
        self.held.setdefault(tenant, {})[lease] = now + ttl
        self.owner[lease] = tenant
        return lease

    def release(self, lease: str) -> None:
        tenant = self.owner.pop(lease, None)
        if tenant is not None:
            self.held.get(tenant, {}).pop(lease, None)


# Each table remembers at most this many entries (keys, addresses); past it the oldest go first,
# so a flood of made-up keys or spoofed addresses costs bounded memory.
MOST = 10_000


class Expiring(Generic[K, V]):
    """A bounded map whose entries hold until a time of their own."""

    def __init__(self, most: int = MOST) -> None:
        self.most = most
        self.entries: dict[K, tuple[float, V]] = {}

    def get(self, key: K, now: float) -> V | None:
        until, value = self.entries.get(key, (0.0, None))
        if value is not None and now >= until:
            del self.entries[key]
            return None
        return value

    def put(self, key: K, value: V, until: float) -> None:
        self.entries.pop(key, None)
        while len(self.entries) >= self.most:
            del self.entries[next(iter(self.entries))]
        self.entries[key] = (until, value)
