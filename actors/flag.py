"""``Flag``: the behaviour of ``asyncio.Event`` without its per-instance deque.

Why: ``asyncio.Event()`` allocates a deque for its waiters at once (~0.6 KiB), and every
connection keeps several flags that rarely have anyone waiting (bench B4 counts RSS per
connection; streams have two each). Same semantics: ``set()`` wakes every waiter, ``clear()``
resets, ``wait()`` returns True once set; the waiter list exists only while someone waits.
"""

from __future__ import annotations

import asyncio


class Flag:
    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            if self._waiters:
                for fut in self._waiters:
                    if not fut.done():
                        fut.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
            return True
        finally:
            self._waiters.remove(fut)
            if not self._waiters:
                self._waiters = None
