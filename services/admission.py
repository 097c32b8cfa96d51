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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.redact import redact
from services.tenants import (
    WINDOW_S,
    ApiKey,
    Expiring,
    Leases,
    Pacer,
    SlidingWindow,
    Store,
    Tenant,
    Usage,
    UsageSpill,
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
# A key refused (unknown id or wrong secret) is refused again from memory for this long, without
# reading the store; at most MAX_UNKNOWN such keys are remembered, the oldest forgotten first.
UNKNOWN_TTL_S, MAX_UNKNOWN = 2.0, 10_000
# While the store cannot be read, admission goes on from the tenants and keys read last (revocations
# seen before the outage still apply) for this long; after it, requests get 503 until it is back.
STALE_LIMIT_S = 300.0


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
    sample_rate: float = 0.0  # the tenant's: the chance the gateway keeps this request in the sample log


class Gatekeeper:
    """Keys, grants, sliding-window quotas and leases over a `Store`.

    Args:
        store: where tenants and keys live; re-read every `refresh_s` so a revoke or a new quota
            reaches every replica within that time.
        refresh_s: how stale the cached tenants may be.
        inline: read the store itself when it must (the CLI's and the tests' use); the admission
            actor passes False and does every read in a thread beforehand (`Admission`).
    """

    def __init__(self, store: Store, refresh_s: float = 2.0, inline: bool = True) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.inline = inline
        self.loaded_at = -float("inf")  # when the cache was read; -inf asks for a re-read now
        self.read_ok_at = -float("inf")  # when the store was last read: how stale admission may be
        self.keys: dict[str, ApiKey] = {}
        self.tenants: dict[str, Tenant] = {}
        self.unknown: Expiring[tuple[str, str], bool] = Expiring(MAX_UNKNOWN)  # (key id, digest) refused lately
        self.requests: dict[str, SlidingWindow] = {}
        self.items: dict[str, SlidingWindow] = {}
        self.pacers: dict[str, Pacer] = {}
        self.leases = Leases()
        self.pending: list[Usage] = []

    def load(self, tenants: list[Tenant], keys: list[ApiKey], now: float) -> None:
        """Replaces the cached tenants and keys with a fresh read of the store."""
        self.tenants = {t.name: t for t in tenants}
        self.keys = {k.key_id: k for k in keys}
        self.loaded_at = self.read_ok_at = now

    def refresh(self, now: float) -> None:
        """Re-reads tenants and keys when stale (the store is read here: `inline` use only)."""
        if now - self.loaded_at >= self.refresh_s:
            self.load(self.store.tenants(), self.store.api_keys(), now)

    def _cached(self, key_id: str, key_digest: str) -> ApiKey | None:
        """The cached key whose digest this is (one constant-time comparison), or None. A key whose
        tenant is not cached counts as not cached: a re-read of tenants and then keys can straddle a
        new tenant's creation, holding its key but not the tenant, and its calls would be refused
        until the next re-read; its lookup brings both."""
        key = self.keys.get(key_id)
        return key if key is not None and key.tenant in self.tenants and same_digest(key.digest, key_digest) else None

    def wants_lookup(self, key_id: str, key_digest: str, now: float) -> bool:
        """Whether a key must be read from the store: the cache does not match it (a tenant created
        since the last re-read works from its first request) and it was not refused a moment ago.
        Unknown ids and wrong secrets take the same path — one lookup, then the refusal cache — so
        their 401s take equally long and do not tell an id that exists from one that does not."""
        return self._cached(key_id, key_digest) is None and not self.unknown.get((key_id, key_digest), now)

    def learn(self, key_id: str, key_digest: str, found: tuple[ApiKey, Tenant] | None, now: float) -> bool:
        """Takes in what a lookup found; returns whether it matches the digest. A key that does not
        is refused from the cache for UNKNOWN_TTL_S (a bounded cache: a flood of distinct made-up
        keys ages its oldest out)."""
        if found is not None:
            key, tenant = found
            self.keys[key.key_id], self.tenants[tenant.name] = key, tenant
            if same_digest(key.digest, key_digest):
                return True
        self.unknown.put((key_id, key_digest), True, now + UNKNOWN_TTL_S)
        return False

    def _matching(self, key_id: str, key_digest: str, now: float) -> ApiKey | None:
        """The key whose digest this is: from the cache, else — used inline, and not refused a
        moment ago — looked up in the store."""
        key = self._cached(key_id, key_digest)
        if key is None and self.inline and not self.unknown.get((key_id, key_digest), now):
            found = self.store.api_key(key_id)
            if self.learn(key_id, key_digest, found, now) and found is not None:
                key = found[0]
        return key

    def authenticate(self, key_id: str, key_digest: str, domain: str, wall: float,
                     now: float | None = None) -> Decision:
        """Who is calling and may they call `domain` (401/403), without touching any quota."""
        key = self._matching(key_id, key_digest, time.monotonic() if now is None else now)
        if key is None:
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

        `items == 0` only authenticates (the gateway refuses the request's body itself). A request
        refused after authentication — that body, a domain not granted (403), more items than the
        quota (413) — costs the tenant one request of its quota, so refused requests are no way
        around it; past the quota it gets 429 like any other.
        """
        if self.inline:
            self.refresh(now)
        elif now - self.read_ok_at > self.refresh_s + STALE_LIMIT_S:
            return Decision(503, code="unavailable", retry_after=5.0, message="the tenant store has been "
                            f"unreachable for over {STALE_LIMIT_S:.0f} s; retry shortly")
        who = self.authenticate(key_id, key_digest, domain, wall, now)
        if who.status not in (200, 403):
            return who
        tenant = self.tenants[who.tenant]
        requests = self.requests.setdefault(tenant.name, SlidingWindow())
        refusal = who if who.status == 403 or items == 0 else None
        if refusal is None and items > tenant.items_per_minute:
            refusal = Decision(413, tenant=tenant.name, code="too_large", field="items",
                               message=f"{items} items exceed the tenant's quota of {tenant.items_per_minute} "
                                       "items per minute; send smaller batches")
        if refusal is not None:
            wait = requests.wait(now, 1, tenant.requests_per_minute)
            if wait > 0:
                return over_quota(tenant, wait)
            requests.add(now, 1)
            return refusal
        item_window = self.items.setdefault(tenant.name, SlidingWindow())
        pacer = self.pacers.setdefault(tenant.name, Pacer())
        turn = pacer.wait(now, tenant.requests_per_minute, BURST)
        wait = max(requests.wait(now, 1, tenant.requests_per_minute),
                   item_window.wait(now, items, tenant.items_per_minute), turn - QUEUE_S)
        if wait > 0:
            return over_quota(tenant, wait)
        lease = self.leases.acquire(tenant.name, tenant.max_concurrent, now, lease_ttl + turn)
        if lease is None:
            return Decision(429, tenant=tenant.name, code="too_many_concurrent", retry_after=1.0,
                            message=f"more than {tenant.max_concurrent} requests in flight")
        requests.add(now, 1)
        item_window.add(now, items)
        pacer.add(now, tenant.requests_per_minute)
        return Decision(200, tenant=tenant.name, lease=lease, admitted_at=wall, delay=turn,
                        sample_rate=tenant.sample_rate)

    def release(self, lease: str, usage: Usage | None) -> None:
        self.leases.release(lease)
        if usage is not None:
            self.pending.append(usage)


# A request whose key could not be looked up (the store is away): it may be valid, so not a 401.
LOOKUP_FAILED = Decision(503, code="unavailable", retry_after=2.0,
                         message="the tenant store is unreachable and this key was not seen before; retry shortly")


def over_quota(tenant: Tenant, wait: float) -> Decision:
    return Decision(429, tenant=tenant.name, code="quota_exceeded", retry_after=wait,
                    message=f"over quota ({tenant.requests_per_minute} requests and "
                            f"{tenant.items_per_minute} items per {WINDOW_S:.0f} s, "
                            f"paced at {tenant.requests_per_minute / WINDOW_S:g} a second)")


class Admission:
    """The actor: `Gatekeeper` behind async methods, and a task flushing the ledger.

    The store is only ever read or written from threads, never on the actor's event loop: a slow
    or unreachable database delays the requests that need it (a key not seen before, the flush),
    not every tenant's admissions. Tenants and keys are re-read in the background every
    `refresh_s`; while that fails, admission goes on from the last good read (`STALE_LIMIT_S`).
    Usage rows are written within `flush_s` of the response (and on shutdown); a row is acknowledged
    to the gateway only once it is in the actor, so a gateway replica restarting loses none; rows
    the ledger cannot take are spilled to `spill_dir` (`UsageSpill`) and written when it is back.
    """

    def __init__(self, ledger_url: str, tenants_file: str | None = None, refresh_s: float = 2.0,
                 flush_s: float = 0.2, spill_dir: str | None = None) -> None:
        self.keeper = Gatekeeper(Store(ledger_url), refresh_s, inline=False)
        self.flush_s = flush_s
        self.flusher: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.read_retry_at = 0.0
        self.flushing = asyncio.Lock()
        default_spill = Path(tempfile.gettempdir()) / f"cityserve-usage-{url_digest(ledger_url)}"
        self.spill = UsageSpill(Path(spill_dir) if spill_dir else default_spill)
        self.tenants_file = Path(tenants_file) if tenants_file else None
        self.synced: float | None = None  # the mtime of the file applied last
        self._sync_tenants()  # a bad file fails the actor, so the gateway reports it at deploy time

    def _sync_tenants(self) -> None:
        """Applies the tenants file when it changed (Kubernetes swaps a mounted Secret in place), and
        only then: the same file applied again would change nothing (`Store.sync_tenants`)."""
        if self.tenants_file is None:
            return
        mtime = self.tenants_file.stat().st_mtime
        if mtime == self.synced:
            return
        changed = self.keeper.store.sync_tenants(read_tenants_file(self.tenants_file))
        self.synced = mtime
        self.keeper.loaded_at = -float("inf")  # the next request sees the change
        logger.info("tenants file %s applied; changed: %s", self.tenants_file, changed or "nothing")

    def _start(self) -> None:
        if self.flusher is None:
            self.flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self._flush()
            try:
                await asyncio.to_thread(self._sync_tenants)
            except Exception:  # a bad edit of the file, or the database away: keep the tenants applied last
                logger.exception("tenants file %s not applied", self.tenants_file)

    async def _flush(self) -> int:
        """Writes the spilled rows, then the pending ones; what the ledger does not take is spilled.
        Returns the rows written."""
        async with self.flushing:
            rows, self.keeper.pending = self.keeper.pending, []
            written = 0
            try:
                if self.spill.files():
                    written += await asyncio.to_thread(self.spill.replay, self.keeper.store)
                if rows:
                    await asyncio.to_thread(self.keeper.store.record, rows)
                    written += len(rows)
            except Exception as exc:
                if rows:
                    try:
                        await asyncio.to_thread(self.spill.write, rows)
                    except Exception:  # the disk too: the rows stay in memory for the next flush
                        self.keeper.pending = rows + self.keeper.pending
                        logger.exception("usage rows not spilled; %d kept in memory", len(self.keeper.pending))
                        return written
                # redact: a driver's error can quote the ledger URL (libpq echoes a malformed one).
                logger.warning("usage ledger write failed (%s); %d rows spilled to %s", redact(str(exc)), len(rows),
                               self.spill.folder)
            return written

    async def _read_tenants(self) -> None:
        """Re-reads tenants and keys in a thread; on failure the cache stays as it was."""
        store = self.keeper.store
        try:
            tenants, keys = await asyncio.to_thread(lambda: (store.tenants(), store.api_keys()))
        except Exception as exc:
            self.read_retry_at = time.monotonic() + 1.0
            logger.warning("tenants not re-read (%s); admitting from the read of %.0f s ago", redact(str(exc)),
                           time.monotonic() - self.keeper.read_ok_at)
            return
        self.keeper.load(tenants, keys, time.monotonic())

    async def _fresh_enough(self, now: float) -> None:
        """Starts a background re-read when the cache is stale; waits for it only when there has
        never been a good read (nothing to admit from)."""
        if now - self.keeper.loaded_at < self.keeper.refresh_s or now < self.read_retry_at:
            return
        if self.reader is None or self.reader.done():
            self.reader = asyncio.get_running_loop().create_task(self._read_tenants())
        if self.keeper.read_ok_at == -float("inf"):
            await asyncio.shield(self.reader)

    async def admit_many(self, requests: list[tuple[str, str, str, int, float]]) -> list[Decision]:
        """Decisions for (key id, key digest, domain, items, lease ttl), in order. Keys the cache does
        not match are looked up at once, each in a thread; a lookup that fails refuses only its own
        requests (503), never the batch."""
        self._start()
        now = time.monotonic()
        await self._fresh_enough(now)
        wanted = list({(r[0], r[1]) for r in requests if self.keeper.wants_lookup(r[0], r[1], now)})
        found = await asyncio.gather(*(asyncio.to_thread(self.keeper.store.api_key, key_id) for key_id, _ in wanted),
                                     return_exceptions=True)
        failed = set()
        for (key_id, key_digest), result in zip(wanted, found, strict=True):
            if isinstance(result, BaseException):
                failed.add((key_id, key_digest))
                logger.warning("key lookup failed: %s", type(result).__name__)
            else:
                self.keeper.learn(key_id, key_digest, result, now)
        now, wall = time.monotonic(), time.time()
        return [LOOKUP_FAILED if (r[0], r[1]) in failed else self.keeper.admit(*r, now=now, wall=wall)
                for r in requests]

    async def release_many(self, releases: list[tuple[str, Usage | None]]) -> list[None]:
        self._start()
        for lease, usage in releases:
            self.keeper.release(lease, usage)
        return [None] * len(releases)

    async def flush(self) -> int:
        return await self._flush()

    async def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"pending_usage": len(self.keeper.pending), "spilled_usage": len(self.spill.files()),
                "tenants_read_s_ago": round(now - self.keeper.read_ok_at, 1),
                "leases": {t: self.keeper.leases.active(t, now) for t in self.keeper.leases.held}}


def url_digest(url: str) -> str:
    """A short name for a URL (a ledger's, a registry's) that does not show it: it may hold a password."""
    return hashlib.sha256(url.encode()).hexdigest()[:12]


def admission_actor(ledger_url: str, tenants_file: str | None = None, resource: str | None = None,
                    spill_dir: str | None = None) -> Any:
    """The cluster's admission actor, created by the first gateway replica that asks.

    Args:
        ledger_url: the ledger (`env:NAME` for a URL in that environment variable).
        tenants_file: a YAML tenants file to apply (see `Store.sync_tenants`).
        resource: a Ray custom resource the actor needs: where the ledger's SQLite volume is mounted.
        spill_dir: where usage rows wait while the ledger is away (default: in the node's temp dir).
    """
    import ray

    # One actor per ledger: a config that moves the ledger gets an owner that writes to the new one.
    name = f"{ACTOR_NAME}-{url_digest(ledger_url)}"
    actor_class = ray.remote(Admission)
    return actor_class.options(
        name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, max_concurrency=1000, resources={resource: 0.001} if resource else None,
    ).remote(ledger_url, tenants_file, spill_dir=spill_dir)
