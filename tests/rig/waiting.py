"""Waiting on conditions with a deadline, never on a fixed sleep.

`Notifier` wakes waiters whenever the watched state changes (a datagram arrived, a counter
moved), so a test resumes as soon as its condition holds. `poll_until` is for state outside the
event loop (a subprocess's log file, the kernel): it re-checks on a short interval until a
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

__all__ = ["Notifier", "poll_until", "poll_until_sync"]


class Notifier:
    """Change signal for in-loop state; `wait_for` re-checks on every change.

    Predicates may also read state the notifier does not own (a client socket that receives what
    a shim relayed a moment earlier): `wait_for` re-checks every `recheck` seconds as well.
    """

    def __init__(self, recheck: float = 0.05) -> None:
        self._event = asyncio.Event()
        self._recheck = recheck

    def changed(self) -> None:
        """Wake every current waiter (they re-evaluate their predicates)."""
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_for(
        self, predicate: Callable[[], object], timeout: float = 5.0, what: str = ""
    ) -> None:
        """Return once `predicate()` is truthy; raise TimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s: {what or predicate!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), min(remaining, self._recheck))


async def poll_until(
    predicate: Callable[[], object],
    timeout: float = 5.0,
    interval: float = 0.02,
    what: str = "",
) -> None:
    """Re-check `predicate` every `interval` s until truthy; TimeoutError at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise TimeoutError(f"condition not met within {timeout}s: {what or predicate!r}")
        await asyncio.sleep(interval)


def poll_until_sync(
    predicate: Callable[[], object],
    timeout: float = 5.0,
    interval: float = 0.02,
    what: str = "",
) -> None:
    """Blocking variant of `poll_until`, for synchronous setup code."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout}s: {what or predicate!r}")
        time.sleep(interval)
