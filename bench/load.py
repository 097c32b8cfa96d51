"""The load generator every benchmark and reliability check drives the gateway with: aiohttp
clients posting one body, either as fast as answers come (closed loop, `concurrency` clients) or
at a fixed `rate` of requests per second (open loop: a slow answer does not slow the arrivals).
Every request carries an X-Request-Id of its own and is recorded, so a check can match each one
against the usage ledger or a moment of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def tree_rss_gb(pid: int, *, with_root: bool) -> float:
    """Resident memory of process `pid`'s descendants (and its own, `with_root`): a platform's
    Ray processes are the descendants of `ray start`, or of the driver that started the cluster."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)] if with_root else root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker that exited meanwhile
            total += proc.memory_info().rss
    return total / 2**30


@dataclass(frozen=True, slots=True)
class Sent:
    """One request: when it left and returned (monotonic s), its status (0: no HTTP answer — the
    connection failed or the client's timeout passed: `error` says which; 4xx and 5xx: `error` has
    the start of the answer's body) and its request id.
    `late`: in an open loop, how long after its scheduled moment it left (the client itself was
    behind: its delays show as a burst of arrivals, not as the platform's latency)."""

    start: float
    end: float
    status: int
    request_id: str
    error: str = ""
    retry_after: float = 0.0
    late: float = 0.0


async def hammer(url: str, body: bytes, headers: dict[str, str] | Callable[[], dict[str, str]], *, concurrency: int,
                 until: float | Callable[[], bool], rate: float | None = None, timeout_s: float = 60.0,
                 honour_retry_after: float = 0.0) -> list[Sent]:
    """Posts `body` to `url` until `until` (a monotonic deadline, or a predicate that says stop).

    Args:
        headers: the same for every request, or made anew for each (a flood of made-up keys).
        concurrency: clients (closed loop), or the most requests in flight (open loop).
        rate: requests per second for an open loop; None for a closed loop.
        timeout_s: a request unanswered after this counts as hung (status 0, error "timeout").
        honour_retry_after: a closed-loop client told 429/503 waits Retry-After, up to this many s.
    """
    import aiohttp

    deadline = 0.0 if callable(until) else until
    done = until if callable(until) else (lambda: time.monotonic() >= deadline)
    sent: list[Sent] = []

    async def one(session: aiohttp.ClientSession, scheduled: float | None = None) -> Sent:
        rid = uuid.uuid4().hex
        start = time.monotonic()
        late = 0.0 if scheduled is None else max(0.0, start - scheduled)
        try:
            sending = headers() if callable(headers) else headers
            async with session.post(url, data=body, headers={**sending, "X-Request-Id": rid}) as resp:
                payload = await resp.read()
                retry = float(resp.headers.get("Retry-After", 0) or 0)
                error = payload[:200].decode(errors="replace") if resp.status >= 400 else ""
                record = Sent(start, time.monotonic(), resp.status, rid, error, retry_after=retry, late=late)
        except (aiohttp.ClientError, TimeoutError) as exc:
            record = Sent(start, time.monotonic(), 0, rid, "timeout" if isinstance(exc, TimeoutError)
                          else type(exc).__name__, late=late)
        sent.append(record)
        return record

    async def client(session: aiohttp.ClientSession) -> None:
        while not done():
            record = await one(session)
            if honour_retry_after and record.status in (429, 503):
                await asyncio.sleep(min(record.retry_after, honour_retry_after))

    async def arrivals(session: aiohttp.ClientSession) -> None:
        assert rate is not None
        slots = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[Any]] = set()

        async def bounded(scheduled: float) -> None:
            async with slots:
                await one(session, scheduled)

        start, n = time.monotonic(), 0
        while not done():
            task = asyncio.create_task(bounded(start + n / rate))
            n += 1
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    # The objects this process holds already (torch, Ray, a fuzzer: some 320k) leave the collector's
    # reach for the run: a full collection walks them all, ~0.1 s on a quiet core and several
    # times that on cores the platform keeps busy, and the sends it delays leave as one burst.
    gc.freeze()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            if rate is None:
                await asyncio.gather(*(client(session) for _ in range(concurrency)))
            else:
                await arrivals(session)
    finally:
        gc.unfreeze()
    return sent


def summary(sent: list[Sent], seconds: float) -> dict[str, Any]:
    """Answered (200) requests per second and their latency percentiles (ms); the other answers
    apart, with their own latency (a fast 503 must not flatter the percentiles, nor a timeout
    spoil them)."""
    def percentiles(picked: list[Sent], prefix: str) -> dict[str, float | None]:
        ms = np.array([s.end - s.start for s in picked]) * 1000
        return {f"{prefix}p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
                f"{prefix}p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}

    answered = [s for s in sent if s.status == 200]
    failed = [s for s in sent if s.status != 200]
    return {"requests_per_s": len(answered) / seconds, **percentiles(answered, ""), "errors": len(failed),
            **percentiles(failed, "error_")}


def per_second(sent: list[Sent], origin: float, seconds: int) -> list[int]:
    """200 answers in each second since `origin`, by the time they returned."""
    counts = [0] * seconds
    for s in sent:
        i = int(s.end - origin)
        if s.status == 200 and 0 <= i < seconds:
            counts[i] += 1
    return counts
