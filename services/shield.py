"""What keeps callers without a good key cheap for a gateway replica: refusals repeated from memory,
a limit on unauthenticated requests per client address, and the public answers kept for a second.

A request is checked here before its body is read: a key refused a moment ago, or an address that
has sent too many bad keys, costs the replica a dictionary lookup and never reaches the admission
actor or the database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from starlette.requests import Request

from services.tenants import Expiring

T = TypeVar("T")

class AddressLimiter:
    """Unauthenticated requests per client address, as a token bucket: each refused key (401)
    spends a token of its address's bucket, which refills at `per_s` up to twice that. An address
    whose bucket is empty has its requests refused (429) before any work — except those whose key
    this replica admitted lately, so a tenant behind the same address (a NAT, a proxy that hides
    addresses) keeps working while a flood from there is turned away.

    Args:
        per_s: bad keys an address may send a second, on average.
    """

    def __init__(self, per_s: float) -> None:
        self.per_s, self.burst = per_s, 2 * per_s
        self.buckets: Expiring[str, tuple[float, float]] = Expiring()  # address -> (tokens, at)
        self.good: Expiring[tuple[str, str], bool] = Expiring()  # keys admitted lately

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self.buckets.get(address, now) or (self.burst, now)
        return min(self.burst, tokens + (now - at) * self.per_s)

    def wait(self, address: str, key: tuple[str, str], now: float) -> float:
        """Seconds until this address may send an unknown key again; 0 when it may now."""
        if self.good.get(key, now):
            return 0.0
        tokens = self._tokens(address, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.per_s

    def refused(self, address: str, now: float) -> None:
        tokens = self._tokens(address, now) - 1
        # kept until the bucket would be full again; then it is as if the address had never erred
        self.buckets.put(address, (tokens, now), now + (self.burst - tokens) / self.per_s)

    def admitted(self, key: tuple[str, str], now: float, hold_s: float = 60.0) -> None:
        self.good.put(key, True, now + hold_s)


def client_address(request: Request, trusted_hops: int) -> str:
    """The caller's address: the connection's peer, or — behind `trusted_hops` proxies that each
    append their peer to X-Forwarded-For — the entry the outermost of them wrote. Entries further
    left come from the client and may be forged, so they are never used."""
    if trusted_hops:
        forwarded = [a.strip() for a in request.headers.get("x-forwarded-for", "").split(",") if a.strip()]
        if len(forwarded) >= trusted_hops:
            return forwarded[-trusted_hops]
    return request.client.host if request.client else "-"


class Recent(Generic[T]):
    """The answer of `compute` for `ttl_s` seconds; callers that arrive while it is computed share
    that one computation. For public answers (health, the models served) that would otherwise fan
    out to every model deployment on each request."""

    def __init__(self, compute: Callable[[], Awaitable[T]], ttl_s: float = 1.0) -> None:
        self.compute, self.ttl_s = compute, ttl_s
        self.value: tuple[float, T] | None = None
        self.running: asyncio.Future[T] | None = None

    async def _refresh(self) -> T:
        value = await self.compute()
        self.value = (time.monotonic() + self.ttl_s, value)
        return value

    async def __call__(self) -> T:
        if self.value is not None and time.monotonic() < self.value[0]:
            return self.value[1]
        if self.running is None or self.running.done():
            self.running = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self.running)
