"""Coalescing at the gateway: concurrent calls to the same remote method become one call.

Each Serve handle call and each actor call costs a few milliseconds of CPU in the caller, Ray and
the callee, whatever it carries; on a small machine that, not the model, bounds throughput. A
`Coalescer` sends a call at once when none is in flight (no added latency at low load); calls
that arrive while `max_inflight` are in flight wait and leave together, as one list, when one
returns. Under load the lists grow by themselves; nothing waits on a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Calls `send(items)` with the items submitted meanwhile; `send` answers them in order.

    Args:
        send: the remote call taking a list and returning one result per item.
        max_size: most weight one call carries (at least one item goes whatever its weight).
        max_inflight: calls in flight at once before submissions start to wait.
        weight: an item's weight (default 1; a model call weighs its request's items, so one call
            never carries more work than a model batch should).
    """

    def __init__(self, send: Callable[[list[T]], Awaitable[list[R]]], max_size: int = 64,
                 max_inflight: int = 2, weight: Callable[[T], int] = lambda _: 1) -> None:
        self.send = send
        self.max_size = max_size
        self.max_inflight = max_inflight
        self.weight = weight
        self.inflight = 0
        self.waiting: list[tuple[T, asyncio.Future[R]]] = []

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self.waiting.append((item, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        while self.waiting and self.inflight < self.max_inflight:
            take, total = 0, 0
            while take < len(self.waiting):
                total += self.weight(self.waiting[take][0])
                if take and total > self.max_size:
                    break
                take += 1
            batch, self.waiting = self.waiting[:take], self.waiting[take:]
            self.inflight += 1
            asyncio.get_running_loop().create_task(self._run(batch))

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.send([item for item, _ in batch])
        except Exception as exc:  # the call failed: every request it carried fails with it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():  # a caller that timed out has cancelled its future
                    future.set_result(result)
        finally:
            for _, future in batch:  # this task itself was cancelled (shutdown): nobody waits forever
                if not future.done():
                    future.cancel()
            self.inflight -= 1
            self._pump()
