"""actors.flag.Flag behaves as asyncio.Event does (set wakes all, clear resets, cancel-safe)."""

from __future__ import annotations

import asyncio

from actors.flag import Flag


async def test_set_wakes_every_waiter_and_a_cancelled_one_leaves_no_trace() -> None:
    flag = Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    waiters[0].cancel()
    await asyncio.gather(waiters[0], return_exceptions=True)
    flag.set()
    assert await asyncio.gather(*waiters[1:]) == [True, True]
    assert flag.is_set() and flag._waiters is None


async def test_clear_then_wait_blocks_until_set_again() -> None:
    flag = Flag()
    flag.set()
    assert await flag.wait() is True  # already set: no waiting
    flag.clear()
    assert not flag.is_set()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    flag.set()
    assert await waiter is True
