"""The gateway's coalescing of concurrent remote calls."""

from __future__ import annotations

import asyncio

import pytest

from services.coalesce import Coalescer


class Remote:
    """A remote call that takes `delay` and records the lists it was sent."""

    def __init__(self, delay: float = 0.05, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.delay = delay
        self.fail = fail

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("remote failed")
        return [2 * i for i in items]


def test_an_idle_coalescer_sends_at_once_and_concurrent_calls_share_one() -> None:
    async def run() -> tuple[list[int], Remote, float]:
        remote = Remote()
        coalescer = Coalescer(remote, max_size=10, max_inflight=1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await coalescer.submit(1) == 2
        alone = loop.time() - start
        results = await asyncio.gather(*(coalescer.submit(i) for i in range(25)))
        return results, remote, alone

    results, remote, alone = asyncio.run(run())
    assert alone < 0.1  # no timer: the first call leaves immediately
    assert results == [2 * i for i in range(25)]  # each caller gets its own answer
    # 1 alone, then 0 leaves at once; 1..10, 11..20, 21..24 wait for the call in flight
    assert [len(c) for c in remote.calls] == [1, 1, 10, 10, 4]


def test_a_failed_call_fails_every_request_it_carried_and_the_next_ones_still_go() -> None:
    async def run() -> list[object]:
        coalescer = Coalescer(Remote(fail=True), max_size=10, max_inflight=1)
        failed = await asyncio.gather(*(coalescer.submit(i) for i in range(3)), return_exceptions=True)
        coalescer.send = Remote()
        return [*failed, await coalescer.submit(5)]

    out = asyncio.run(run())
    assert all(isinstance(o, RuntimeError) for o in out[:3]) and out[3] == 10


def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    async def run() -> list[int]:
        coalescer = Coalescer(Remote(delay=0.2), max_size=10, max_inflight=1)
        impatient = asyncio.ensure_future(asyncio.wait_for(coalescer.submit(1), timeout=0.05))
        patient = asyncio.ensure_future(coalescer.submit(2))
        with pytest.raises(TimeoutError):
            await impatient
        return [await patient, await coalescer.submit(3)]

    assert asyncio.run(run()) == [4, 6]


def test_calls_are_bounded_by_weight_so_big_requests_do_not_pile_into_one_call() -> None:
    async def run() -> Remote:
        remote = Remote()
        coalescer: Coalescer[int, int] = Coalescer(remote, max_size=20, max_inflight=1, weight=lambda n: n)
        await asyncio.gather(*(coalescer.submit(n) for n in [1, 16, 16, 4, 30, 2]))
        return remote

    # 1 leaves alone; then 16+16 > 20 splits; 16+4 = 20 fits; 30 is over the bound but goes alone
    assert asyncio.run(run()).calls == [[1], [16], [16, 4], [30], [2]]
