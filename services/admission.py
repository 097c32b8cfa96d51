"""Admission: the one owner per cluster of tenant keys, quotas, concurrency leases and the ledger.

Every gateway replica asks this named, detached actor before it calls a model, and tells it when
the request is done. One actor sees every replica's traffic, so a tenant's quota holds however
many replicas serve it. `Gatekeeper` is the arithmetic (unit-tested without Ray); `Admission` is
the actor around it, which also batches usage rows into the ledger — its single writer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.tenants import (
    WINDOW_S,
    ApiKey,
    Leases,
    Pacer,
    SlidingWindow,
    Store,
    Tenant,
    Usage,
    read_tenants_file,
    same_digest,
)

logger = logging.getLogger("cityserve.admission")

ACTOR_NAME = "cityserve-admission"
NAMESPACE = "cityserve"
# A tenant's requests are paced at its per-minute average: up to BURST at once after a quiet spell,
# then each waits in the gateway for its turn, up to QUEUE_S; later than that is refused (429).
# Pacing at the average, not at a looser limit per second, keeps a flood from spending its minute's
# quota in its first seconds, which the sliding window would then replay every minute as those
# admissions expire. The short queue absorbs retries that arrive in step: refused at once, every wave
# would reach the models together and slow the other tenants whose requests share those replicas.
BURST, QUEUE_S = 10, 1.0
SYNC_EVERY_S = 86400.0


@dataclass(frozen=True)
class Decision:
    """What the gateway does with a request: go ahead (status 200, with a lease) or refuse it."""

    status: int
    tenant: str = ""
    lease: str = ""
    code: str = ""
    message: str = ""
    field: str | None = None
    retry_after: float = 0.0
    admitted_at: float = 0.0  # wall clock: the usage row's time, the moment the quota counted it
    delay: float = 0.0  # seconds the gateway holds an admitted request before calling the model: its turn


class Gatekeeper:
    """Keys, grants, sliding-window quotas and leases over a `Store`.

    Args:
        store: where tenants and keys live; re-read every `refresh_s` so a revoke or a new quota
            reaches every replica within that time.
        refresh_s: how stale the cached tenants may be.
    """

    def __init__(self, store: Store, refresh_s: float = 2.0) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.loaded_at = -float("inf")
        self.keys: dict[str, ApiKey] = {}
        self.tenants: dict[str, Tenant] = {}
        self.requests: dict[str, SlidingWindow] = {}
        self.items: dict[str, SlidingWindow] = {}
        self.pacers: dict[str, Pacer] = {}
        self.leases = Leases()
        self.pending: list[Usage] = []

    def refresh(self, now: float) -> None:
        """Re-reads tenants and keys when stale."""
        if now - self.loaded_at < self.refresh_s:
            return
        self.tenants = {t.name: t for t in self.store.tenants()}
        self.keys = {k.key_id: k for k in self.store.api_keys()}
        self.loaded_at = now

    def _confirm(self, key_id: str) -> ApiKey | None:
        """A key the cache does not match, read from the store: a tenant created since the last
        re-read works from its first request, without waiting for the next re-read. Unknown ids and
        wrong secrets take the same one-row lookup, so their 401s take equally long and do not tell
        an id that exists from one that does not."""
        found = self.store.api_key(key_id)
        if found is None:
            return None
        key, tenant = found
        self.keys[key.key_id], self.tenants[tenant.name] = key, tenant
        return key

    def authenticate(self, key_id: str, key_digest: str, domain: str, wall: float) -> Decision:
        """Who is calling and may they call `domain` (401/403), without touching any quota."""
        key = self.keys.get(key_id)
        if key is None or not same_digest(key.digest, key_digest):
            key = self._confirm(key_id)
        if key is None or not same_digest(key.digest, key_digest):
            return Decision(401, code="unauthorized", message="invalid API key", field="Authorization")
        problem = key.problem(wall)
        tenant = self.tenants.get(key.tenant)
        if problem is None and (tenant is None or tenant.revoked_at is not None):
            problem = "tenant revoked"
        if problem is not None or tenant is None:
            return Decision(401, code="unauthorized", message=problem or "invalid API key", field="Authorization")
        if domain not in tenant.grants:
            return Decision(403, tenant=tenant.name, code="forbidden",
                            message=f"tenant {tenant.name!r} is not granted the {domain} domain", field="domain")
        return Decision(200, tenant=tenant.name)

    def admit(self, key_id: str, key_digest: str, domain: str, items: int, lease_ttl: float,
              now: float, wall: float) -> Decision:
        """Authenticates, then admits `items` items under the tenant's quotas with a lease.

        `items == 0` only authenticates (a request whose body is invalid takes no quota).
        """
        self.refresh(now)
        who = self.authenticate(key_id, key_digest, domain, wall)
        if who.status != 200 or items == 0:
            return who
        tenant = self.tenants[who.tenant]
        if items > tenant.items_per_minute:
            return Decision(413, tenant=tenant.name, code="too_large", field="items",
                            message=f"{items} items exceed the tenant's quota of {tenant.items_per_minute} "
                                    "items per minute; send smaller batches")
        requests = self.requests.setdefault(tenant.name, SlidingWindow())
        item_window = self.items.setdefault(tenant.name, SlidingWindow())
        pacer = self.pacers.setdefault(tenant.name, Pacer())
        turn = pacer.wait(now, tenant.requests_per_minute, BURST)
        wait = max(requests.wait(now, 1, tenant.requests_per_minute),
                   item_window.wait(now, items, tenant.items_per_minute), turn - QUEUE_S)
        if wait > 0:
            return Decision(429, tenant=tenant.name, code="quota_exceeded", retry_after=wait,
                            message=f"over quota ({tenant.requests_per_minute} requests and "
                                    f"{tenant.items_per_minute} items per {WINDOW_S:.0f} s, "
                                    f"paced at {tenant.requests_per_minute / WINDOW_S:g} a second)")
        lease = self.leases.acquire(tenant.name, tenant.max_concurrent, now, lease_ttl + turn)
        if lease is None:
            return Decision(429, tenant=tenant.name, code="too_many_concurrent", retry_after=1.0,
                            message=f"more than {tenant.max_concurrent} requests in flight")
        requests.add(now, 1)
        item_window.add(now, items)
        pacer.add(now, tenant.requests_per_minute)
        return Decision(200, tenant=tenant.name, lease=lease, admitted_at=wall, delay=turn)

    def release(self, lease: str, usage: Usage | None) -> None:
        self.leases.release(lease)
        if usage is not None:
            self.pending.append(usage)

    def flush(self) -> int:
        """Writes pending usage rows; on failure they stay pending and the next flush retries."""
        rows, self.pending = self.pending, []
        try:
            self.store.record(rows)
        except Exception:
            self.pending = rows + self.pending
            raise
        return len(rows)


class Admission:
    """The actor: `Gatekeeper` behind async methods, and a task flushing the ledger.

    Usage rows are written within `flush_s` of the response (and on shutdown); a row is acknowledged
    to the gateway only once it is in the actor, so a gateway replica restarting loses none.
    """

    def __init__(self, ledger_url: str, tenants_file: str | None = None, refresh_s: float = 2.0,
                 flush_s: float = 0.2) -> None:
        self.keeper = Gatekeeper(Store(ledger_url), refresh_s)
        self.flush_s = flush_s
        self.flusher: asyncio.Task[None] | None = None
        self.tenants_file = Path(tenants_file) if tenants_file else None
        self.synced = (0.0, -float("inf"))  # the file's mtime and when it was applied
        self._sync_tenants()  # a bad file fails the actor, so the gateway reports it at deploy time

    def _sync_tenants(self) -> None:
        """Applies the tenants file when it changed (Kubernetes swaps a mounted Secret in place) or
        a day passed (listed keys stay valid for a year past each sync)."""
        if self.tenants_file is None:
            return
        mtime, now = self.tenants_file.stat().st_mtime, time.monotonic()
        if mtime == self.synced[0] and now - self.synced[1] < SYNC_EVERY_S:
            return
        changed = self.keeper.store.sync_tenants(read_tenants_file(self.tenants_file))
        self.synced = (mtime, now)
        self.keeper.loaded_at = -float("inf")  # the next request sees the change
        logger.info("tenants file %s applied; changed: %s", self.tenants_file, changed or "nothing")

    def _start(self) -> None:
        if self.flusher is None:
            self.flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                self.keeper.flush()
            except Exception:  # the database is away: keep the rows, retry next tick
                logger.exception("usage ledger write failed; %d rows kept for retry", len(self.keeper.pending))
            try:
                self._sync_tenants()
            except Exception:  # a bad edit of the file: keep serving the tenants applied last
                logger.exception("tenants file %s not applied", self.tenants_file)

    async def admit_many(self, requests: list[tuple[str, str, str, int, float]]) -> list[Decision]:
        """Decisions for (key id, key digest, domain, items, lease ttl), in order."""
        self._start()
        now, wall = time.monotonic(), time.time()
        return [self.keeper.admit(*request, now=now, wall=wall) for request in requests]

    async def release_many(self, releases: list[tuple[str, Usage | None]]) -> list[None]:
        self._start()
        for lease, usage in releases:
            self.keeper.release(lease, usage)
        return [None] * len(releases)

    async def flush(self) -> int:
        return self.keeper.flush()

    async def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"pending_usage": len(self.keeper.pending),
                "leases": {t: self.keeper.leases.active(t, now) for t in self.keeper.leases.held}}


def admission_actor(ledger_url: str, tenants_file: str | None = None, resource: str | None = None) -> Any:
    """The cluster's admission actor, created by the first gateway replica that asks.

    Args:
        ledger_url: the ledger (`env:NAME` for a URL in that environment variable).
        tenants_file: a YAML tenants file to apply (see `Store.sync_tenants`).
        resource: a Ray custom resource the actor needs: where the ledger's SQLite volume is mounted.
    """
    import ray

    # One actor per ledger: a config that moves the ledger gets an owner that writes to the new one.
    name = f"{ACTOR_NAME}-{hashlib.sha256(ledger_url.encode()).hexdigest()[:12]}"
    actor_class = ray.remote(Admission)
    return actor_class.options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_concurrency=1000, resources={resource: 0.001} if resource else None,
    ).remote(ledger_url, tenants_file)
