"""``Supervisor(netns=...)``: path sockets, device names and routes of another namespace.

A socket belongs to the network namespace of the thread that created it, for its whole life,
and asyncio may use it from any thread. So one worker thread enters the namespace once
(``setns(2)`` changes only the calling thread) and every bind, device lookup and route
question for new paths runs there; the event loop never leaves its own namespace. The
namespace is never created here: a missing one is an error that names it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from actors.errors import InvalidArgumentError

__all__ = ["Namespace", "resolve_netns"]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")


def resolve_netns(netns: object) -> str:
    """The namespace file for a name (``ip netns add NAME``) or a path (/proc/PID/ns/net)."""
    if not isinstance(netns, str) or not netns:
        raise InvalidArgumentError(
            "netns", netns, "must be a namespace name (as in `ip netns add NAME`) or a path"
        )
    path = Path(netns) if "/" in netns else NETNS_DIR / netns
    if not path.exists():
        raise InvalidArgumentError(
            "netns",
            netns,
            f"no such network namespace ({path} does not exist): create it with "
            f"`ip netns add {netns}` or give a path such as /proc/PID/ns/net",
        )
    return str(path)


def _enter(path: str, failed: list[BaseException]) -> None:
    """The worker's initializer: a failure is kept for ``run`` to raise (an initializer
    that raises breaks the pool with a generic error and prints a traceback)."""
    try:
        _setns(path)
    except BaseException as exc:
        failed.append(exc)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        setns = getattr(os, "setns", None)  # Python >= 3.12
        if setns is not None:
            setns(fd, CLONE_NEWNET)
            return
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Namespace:
    """One worker thread inside the namespace; ``run`` calls a function there."""

    def __init__(self, netns: str) -> None:
        self.name = netns
        self.path = resolve_netns(netns)
        self._failed: list[BaseException] = []
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns-{netns}",
            initializer=_enter,
            initargs=(self.path, self._failed),
        )

    async def run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        failed = self._failed

        def inside() -> T:
            if failed:  # never run anything in the wrong namespace
                raise failed[0]
            return call()

        return await loop.run_in_executor(self._executor, inside)

    async def check(self) -> None:
        """Enter it now, so a namespace deleted meanwhile or a refused setns is an error at
        start, not at the first path."""
        resolve_netns(self.name)  # still there?
        try:
            await self.run(lambda: None)
        except OSError as exc:
            hint = {
                errno.EPERM: " (entering a namespace needs CAP_SYS_ADMIN)",
                errno.EINVAL: " (it is not a network namespace file)",
            }.get(exc.errno or 0, "")
            raise InvalidArgumentError("netns", self.name, f"cannot enter it: {exc}{hint}") from exc

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
