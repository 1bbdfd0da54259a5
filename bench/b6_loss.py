"""B6 migrations under loss: 10,000 switches back and forth with 5 % random loss on both paths.

    python -m bench.b6_loss [--quick] [--connections N] [--migrations N] [--baseline N]

One ``TwoPathTopology`` (tests/rig/netns.py, IPv4) and the stock aioquic echo server in its
own process in the server namespace (``bench._server``). One ``Supervisor`` (no failover
policy, no network monitor: only the bench moves connections) binds its path sockets in the
client namespace and dials ``CONNECTIONS`` connections from 10.77.1.2 (net0, c0), each with a
second path from 10.77.2.2 (net1, c1), probed once. Every connection runs a paced echo stream
(1 KiB every 100 ms) whose bytes are checked as they come back (the writer's bytes come from a
seeded generator, the reader regenerates and compares them: "verified" bytes are the prefix
that came back intact, in order).

**An attempt** (one migration the bench asked for) moves a connection to its other path:
the path is probed first, every time (a fresh PATH_CHALLENGE under loss, as a client does
before moving to a path whose last validation it no longer trusts: without it the target,
used a second before, is within ``stale_after`` and no challenge would cross the lossy
links at all), then ``switch()``. Each attempt ends in exactly one outcome: ``completed_first_try``,
``completed_after_retry`` or the library's failure outcome (``supervisor.core.events.OUTCOMES``,
named by the same ``outcome_of`` the library puts on ``EvtConnectionMigrationFailed``; a
failed pre-switch probe is named so too, e.g. ``probe_timeout``). First try vs after retry:
the PATH_CHALLENGEs sent on the target during the attempt, read from the path's own counter
(``Supervisor.path_samples(...).probes_sent``, before and after; without a failover policy
there are no keep-alives, so it counts exactly the bench's probe and the switch's re-probe of
a stale target): at most one = first try; more = a challenge or its response was lost and the
challenge was retried. (``SwitchResult.reprobed`` only says the switch re-probed a stale
target, not whether that probe needed a retry; the confirmation after the switch has no retry
of its own: any packet of the peer on the new path within 3 PTO confirms it.) After each
attempt the connection's echo must return 8-12 KiB more (data crossed the new path) before its
next attempt. Connections move in parallel until the total number of attempts is reached.

**Loss**: ``TwoPathTopology.random_drop`` (``tests.rig.netns.random_drop``: nftables ``numgen
random`` drop on the receiving side, the kernel has no ``tc netem``) on c0, c1 (client side)
and s0, s1 (server side): 5 % of the UDP datagrams each way, on both paths. The measured loss
is the nft drop counters over the datagrams each end sent (output-hook counters).

**Baseline** (same run, same connections): ``BASELINE`` attempts at 0 % loss, half before
the loss goes on and half after it is lifted (each with fresh streams), pooled: the machine is
shared and its load drifts over minutes, so the baseline brackets the lossy phase in time.

Figures: success rate (completed / attempted, goal >= 99.9 %); outcome counts; echo bytes
sent and verified (goal 0 lost); stalls for want of CIDs (``no_connection_id`` outcomes, goal
0; the minimum ``spare_connection_ids`` seen, sampled after every attempt); per-migration time
(``switch()`` call -> returned, completed ones: a measurement, no goal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from actors.errors import MigrationError
from bench._common import (
    Deadline,
    Figure,
    Report,
    proc_cpu_s,
    raise_nofile,
    run,
    summary,
    write_result,
)
from bench._server import ServerInfo, ServerSpec, make_cert, server_process
from supervisor import Supervisor
from supervisor.core.handles import Connection
from supervisor.core.handles import Path as QuicPath
from supervisor.core.messages import MigrationStats
from supervisor.orchestration.supervisor_actor import outcome_of
from tests.rig.netns import Filters, TwoPathTopology, UdpCounters, cleanup_stale, netns_available

NAME = "b6_loss"
LOSS = 0.05
CONNECTIONS = 64
MIGRATIONS = 10_000
BASELINE = 1_000
QUICK = {"connections": 16, "migrations": 500, "baseline": 100}
GOAL_RATE = 0.999
PARALLEL_DIALS = 16
SERVER_RCVBUF = 8 * 1024 * 1024
PROBE_TIMEOUT = 5.0  # the bench's probe and switch(probe_timeout=): the library's default
#: The bench's own guards (never what is measured): one attempt, an echo advance, a finish.
ATTEMPT_GUARD = 60.0
ECHO_GUARD = 30.0
FINISH_GUARD = 90.0
#: Echoed after an attempt before the connection's next one (plus up to half as much again, at
#: random: connections that moved in step would queue behind each other at every move).
ECHO_BETWEEN = 8 * 1024
CHUNK = 1024
INTERVAL = 0.1
#: The loss phase stops starting attempts after this (a full run needs ~3 min): the figure
#: then says how many were attempted.
LOSS_BUDGET_S = 270.0
BASELINE_BUDGET_S = 60.0

FIRST_TRY = "completed_first_try"
AFTER_RETRY = "completed_after_retry"
COMPLETED = (FIRST_TRY, AFTER_RETRY)
#: The bench's own: its attempt guard fired (no library outcome; never seen so far).
GUARD_TIMEOUT = "bench_guard_timeout"


# ----------------------------------------------------------------------- pure arithmetic


def classify(outcome: str | None, challenges: int) -> str:
    """One attempt's outcome: a failure keeps the library's name; a completed one is a first
    try when at most one PATH_CHALLENGE went out on its target (none: validated recently
    enough to switch at once; one: probed and answered), after retry when more did."""
    if outcome is not None:
        return outcome
    return FIRST_TRY if challenges <= 1 else AFTER_RETRY


def tally(outcomes: Iterable[str]) -> dict[str, Any]:
    """Counts by outcome (completed ones first), attempted, completed and the success rate
    (completed / attempted; None before any attempt)."""
    counts = Counter(outcomes)
    attempted = sum(counts.values())
    completed = sum(counts[k] for k in COMPLETED)
    ordered = {k: counts[k] for k in COMPLETED}
    ordered.update(sorted((k, v) for k, v in counts.items() if k not in COMPLETED))
    return {
        "attempted": attempted,
        "completed": completed,
        "rate": completed / attempted if attempted else None,
        "outcomes": ordered,
    }


def rate_text(t: dict[str, Any]) -> dict[str, str]:
    """A tally as the table shows it (strings: the table's number format rounds 99.95 to 100)."""
    rate = t["rate"]
    return {
        "completed/attempted": f"{t['completed']:,}/{t['attempted']:,}",
        "rate": "-" if rate is None else f"{100 * rate:.2f} %",
    }


def stats_delta(before: MigrationStats, after: MigrationStats) -> dict[str, Any]:
    """What the library counted between two ``migration_stats()``: completed and failed by
    outcome (the cross-check of the bench's own tally for the switches it made)."""
    failed = {
        k: after.failed.get(k, 0) - before.failed.get(k, 0)
        for k in sorted(set(after.failed) | set(before.failed))
    }
    return {
        "completed": after.completed - before.completed,
        "failed": {k: v for k, v in failed.items() if v},
    }


def first_difference(got: bytes, expected: bytes | bytearray) -> int | None:
    """Offset of the first byte of ``got`` that differs from ``expected`` (its first
    ``len(got)`` bytes); None when they agree."""
    if got == expected[: len(got)]:
        return None
    pairs = enumerate(zip(got, expected, strict=False))
    return next((i for i, (a, b) in pairs if a != b), min(len(got), len(expected)))


def _ms(samples: list[float]) -> dict[str, Any]:
    """``summary`` in ms plus p90 (nearest rank, as ``summary``'s percentiles)."""
    out = summary(samples, 1000)
    if samples:
        xs = sorted(x * 1000 for x in samples)
        out["p90"] = round(xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))], 3)
    return out


# ------------------------------------------------------------------------ the echo stream


class VerifiedEcho:
    """A paced echo stream whose returning bytes are checked in order as they arrive.

    The writer sends ``chunk`` bytes from ``random.Random(seed)`` every ``interval``; the
    reader regenerates the same bytes and compares: ``verified`` counts the intact prefix,
    ``corrupt_at`` is the offset of the first byte that differs (None: none did).
    """

    def __init__(self, conn: Connection, seed: int) -> None:
        self.conn = conn
        self.seed = seed
        self.sent = 0
        self.received = 0
        self.verified = 0
        self.corrupt_at: int | None = None
        self.error: str | None = None
        self._expect = bytearray()
        self._want = random.Random(seed)
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> VerifiedEcho:
        self.stream = await self.conn.open_stream()
        self._tasks = [
            asyncio.create_task(self._write(), name="b6-writer"),
            asyncio.create_task(self._read(), name="b6-reader"),
        ]
        return self

    async def _write(self) -> None:
        rng = random.Random(self.seed)
        # A random phase: streams started together would otherwise tick (and move) in step.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(random.Random(~self.seed).uniform(0, INTERVAL)):
                await self._stop.wait()
        try:
            while not self._stop.is_set():
                data = rng.randbytes(CHUNK)
                await self.stream.write(data)
                self.sent += len(data)
                # Pacing, not synchronisation: a steady stream, woken early by stop().
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(INTERVAL):
                        await self._stop.wait()
            await self.stream.close()
        except Exception as exc:  # recorded: the figure counts what did not come back
            self.error = self.error or f"write: {type(exc).__name__}: {exc}"[:200]

    async def _read(self) -> None:
        try:
            while chunk := await self.stream.read(65536):
                self.received += len(chunk)
                while len(self._expect) < len(chunk):
                    self._expect += self._want.randbytes(CHUNK)
                if self.corrupt_at is None:
                    same = first_difference(chunk, self._expect)
                    if same is None:
                        self.verified += len(chunk)
                    else:
                        self.corrupt_at = self.verified + same
                        self.verified += same
                del self._expect[: len(chunk)]
                self._progress.set()
        except Exception as exc:
            self.error = self.error or f"read: {type(exc).__name__}: {exc}"[:200]
        finally:
            self._progress.set()

    async def advance(self, nbytes: int, timeout: float) -> bool:
        """Wait until ``nbytes`` more came back; False when not within ``timeout``."""
        goal = self.received + nbytes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.received < goal and not self._tasks[1].done():
                    self._progress.clear()
                    await self._progress.wait()
        return self.received >= goal

    async def finish(self, timeout: float) -> dict[str, Any]:
        """FIN, then wait for the echo's FIN (at most ``timeout``); what came back."""
        self._stop.set()
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if pending and self.error is None:
            self.error = f"echo not finished within {timeout} s"
        return {
            "sent": self.sent,
            "received": self.received,
            "verified": self.verified,
            "corrupt_at": self.corrupt_at,
            "error": self.error,
        }


# ------------------------------------------------------------------------ one connection


@dataclass
class Attempt:
    outcome: str
    seconds: float  # attempt start (before a probe, if any) -> switch() returned or failed
    switch_s: float | None  # switch() call -> returned (completed ones)
    confirmation_s: float | None  # SwitchResult.confirmation_s
    challenges: int  # PATH_CHALLENGEs sent on the target during the attempt
    probed: bool  # the target was not standby: the bench probed it first
    reprobed: bool  # the switch re-probed a stale target (SwitchResult.reprobed)
    spare_cids: int | None  # spare_connection_ids right after the attempt
    error: str = ""


@dataclass
class Mover:
    """One connection, its two paths and the attempts made on it."""

    sup: Supervisor
    conn: Connection
    paths: list[QuicPath]
    echo: VerifiedEcho | None = None
    echo_stalls: int = 0
    attempts: list[Attempt] = field(default_factory=list)

    def _challenges(self, path: QuicPath) -> int:
        sample = self.sup.path_samples(self.conn.conn_id).get(path.path_id)
        return sample.probes_sent if sample is not None else 0

    def _spare(self) -> int | None:
        try:
            return self.conn.as_migratable().spare_connection_ids()
        except Exception:  # closed meanwhile
            return None

    async def attempt(self) -> Attempt:
        target = next(p for p in self.paths if not p.info().active)
        before = self._challenges(target)
        probed = reprobed = False
        outcome: str | None = None
        error = ""
        switch_s = confirmation = None
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(ATTEMPT_GUARD):
                probed = True  # every attempt validates afresh (see the docstring)
                await target.probe(timeout=PROBE_TIMEOUT)
                t1 = time.perf_counter()
                result = await target.switch(probe_timeout=PROBE_TIMEOUT)
                switch_s = time.perf_counter() - t1
                confirmation = result.confirmation_s
                reprobed = result.reprobed
        except MigrationError as exc:
            outcome = outcome_of(exc, closed=self.conn.is_closed)
            error = f"{type(exc).__name__}: {exc}"[:200]
        except TimeoutError:
            outcome, error = GUARD_TIMEOUT, f"attempt guard {ATTEMPT_GUARD} s"
        seconds = time.perf_counter() - t0
        challenges = self._challenges(target) - before
        attempt = Attempt(
            outcome=classify(outcome, challenges),
            seconds=seconds,
            switch_s=switch_s,
            confirmation_s=confirmation,
            challenges=challenges,
            probed=probed,
            reprobed=reprobed,
            spare_cids=self._spare(),
            error=error,
        )
        self.attempts.append(attempt)
        return attempt


async def _open(sup: Supervisor, server: ServerInfo, topo: TwoPathTopology) -> Mover:
    conn = await sup.dial(
        server.quic_maddr,
        alpn_protocols=["echo"],
        verify=False,
        local_addr=f"/ip4/{topo.paths[0].client_v4}/udp/0/quic-v1",
        idle_timeout=60.0,
        timeout=30.0,
    )
    mc = conn.as_migratable()
    second = await mc.add_path(f"/ip4/{topo.paths[1].client_v4}/udp/0/quic-v1")
    await second.probe(timeout=30.0)
    first = next(p for p in mc.paths() if p.path_id != second.path_id)
    return Mover(sup, conn, [first, second])


async def _open_all(
    sup: Supervisor, server: ServerInfo, topo: TwoPathTopology, n: int
) -> tuple[list[Mover], list[str]]:
    movers: list[Mover] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(PARALLEL_DIALS)

    async def one() -> None:
        async with gate:
            try:
                movers.append(await _open(sup, server, topo))
            except Exception as exc:  # counted and reported
                failures.append(f"{type(exc).__name__}: {exc}"[:200])

    await asyncio.gather(*(one() for _ in range(n)))
    return movers, failures


# ------------------------------------------------------------------------------ a phase


@dataclass
class Phase:
    """What one run of attempts left: the raw attempts and streams, and its conditions."""

    target: int
    budget: float
    connections: int
    closed: int
    flowing: int  # streams that echoed before the first move
    attempts: list[Attempt]
    streams: list[dict[str, Any]]
    echo_stalls: int
    wall_s: float
    cpu_s: float
    load_at_start: list[float]
    load_at_end: list[float]
    library: dict[str, Any]


async def _phase(
    sup: Supervisor, movers: list[Mover], target: int, budget: float, seed: int
) -> Phase:
    """``target`` attempts spread over ``movers`` (each moves, waits for its echo to come
    back over the new path, moves again) under fresh verified echo streams."""
    live = [m for m in movers if not m.conn.is_closed]
    for i, m in enumerate(live):
        m.attempts = []
        m.echo_stalls = 0
        m.echo = await VerifiedEcho(m.conn, seed + i).start()
    # Every stream flowing before the first move: its bytes then cross both paths.
    flowing = await asyncio.gather(*(m.echo.advance(CHUNK, ECHO_GUARD) for m in live if m.echo))
    stats0 = await sup.migration_stats()
    deadline = Deadline(budget)
    started = 0
    cpu0, wall0 = proc_cpu_s(), time.perf_counter()
    load0 = os.getloadavg()

    async def worker(m: Mover) -> None:
        nonlocal started
        assert m.echo is not None
        jitter = random.Random(m.echo.seed)
        # Staggered first moves: all at once they would queue behind each other (herd gate,
        # one loop), a start-up artefact that is no part of the per-migration time.
        await m.echo.advance(CHUNK * jitter.randrange(ECHO_BETWEEN // CHUNK + 1), ECHO_GUARD)
        while started < target and not deadline.expired() and not m.conn.is_closed:
            started += 1
            await m.attempt()
            if m.conn.is_closed:
                break
            extra = CHUNK * jitter.randrange(ECHO_BETWEEN // CHUNK // 2 + 1)
            if not await m.echo.advance(ECHO_BETWEEN + extra, ECHO_GUARD):
                m.echo_stalls += 1

    await asyncio.gather(*(worker(m) for m in live))
    wall = time.perf_counter() - wall0
    cpu = proc_cpu_s() - cpu0
    load1 = os.getloadavg()
    stats1 = await sup.migration_stats()
    streams = await asyncio.gather(*(m.echo.finish(FINISH_GUARD) for m in live if m.echo))
    return Phase(
        target=target,
        budget=budget,
        connections=len(live),
        closed=sum(m.conn.is_closed for m in live),
        flowing=sum(flowing),
        attempts=[a for m in live for a in m.attempts],
        streams=list(streams),
        echo_stalls=sum(m.echo_stalls for m in live),
        wall_s=wall,
        cpu_s=cpu,
        load_at_start=[round(x, 2) for x in load0],
        load_at_end=[round(x, 2) for x in load1],
        library=stats_delta(stats0, stats1),
    )


def _summarise(phases: list[Phase]) -> dict[str, Any]:
    """One figure's worth of one or more phases (the baseline runs before and after the
    loss): pooled attempts and bytes, summed counts."""
    attempts = [a for p in phases for a in p.attempts]
    streams = [s for p in phases for s in p.streams]
    t = tally(a.outcome for a in attempts)
    target = sum(p.target for p in phases)
    wall = sum(p.wall_s for p in phases)
    cpu = sum(p.cpu_s for p in phases)
    sent = sum(s["sent"] for s in streams)
    verified = sum(s["verified"] for s in streams)
    spares = [a.spare_cids for a in attempts if a.spare_cids is not None]
    done = [a for a in attempts if a.outcome in COMPLETED]
    library = Counter[str]()
    for p in phases:
        library["completed"] += p.library["completed"]
        for k, v in p.library["failed"].items():
            library[f"failed {k}"] += v
    return {
        **t,
        "target": target,
        "stopped_by_budget": t["attempted"] < target,
        "budget_s": sum(p.budget for p in phases),
        "connections": max(p.connections for p in phases),
        "closed_connections": max(p.closed for p in phases),
        "streams_flowing_at_start": [p.flowing for p in phases],
        "wall_s": round(wall, 1),
        "attempts_per_s": round(t["attempted"] / wall, 1) if wall else None,
        "client_cpu_s": round(cpu, 1),
        "client_cpu_ms_per_attempt": (
            round(1000 * cpu / t["attempted"], 2) if t["attempted"] else None
        ),
        "load_at_start": phases[0].load_at_start,
        "load_at_end": phases[-1].load_at_end,
        "library_stats": dict(library),
        "switch_ms": _ms([a.switch_s for a in done if a.switch_s is not None]),
        "attempt_ms": _ms([a.seconds for a in done]),
        "confirmation_ms": _ms([a.confirmation_s for a in done if a.confirmation_s is not None]),
        "probed": sum(a.probed for a in attempts),
        "reprobed": sum(a.reprobed for a in attempts),
        "challenges": dict(sorted(Counter(a.challenges for a in attempts).items())),
        "spare_cids_min": min(spares) if spares else None,
        "spare_cids_zero_samples": sum(1 for s in spares if s == 0),
        "echo_stalls": sum(p.echo_stalls for p in phases),
        "bytes": {
            "sent": sent,
            "received": sum(s["received"] for s in streams),
            "verified": verified,
            "lost": sent - verified,
            "streams": len(streams),
            "streams_corrupt": sum(s["corrupt_at"] is not None for s in streams),
            "stream_errors": [s["error"] for s in streams if s["error"]][:5],
        },
        "failure_sample": [asdict(a) for a in attempts if a.outcome not in COMPLETED][:10],
        "parts": [
            {
                "attempted": len(p.attempts),
                "wall_s": round(p.wall_s, 1),
                "switch_ms_median": _ms(
                    [a.switch_s for a in p.attempts if a.switch_s is not None]
                ).get("median"),
                "load_at_start": p.load_at_start[0],
                "load_at_end": p.load_at_end[0],
            }
            for p in phases
        ],
    }


def _sent_out(counters: list[UdpCounters]) -> int:
    """Datagrams both ends sent on the four links so far (output hooks: before the loss)."""
    total = 0
    for c in counters:
        counts = c.read()
        total += sum(counts.get(f"out:{ifname}", 0) for ifname in c.ifnames)
    return total


# --------------------------------------------------------------------------------- report


def _load_note(d: dict[str, Any]) -> str:
    hi = max(d["load_at_start"][0], d["load_at_end"][0])
    text = f"load {d['load_at_start'][0]} -> {d['load_at_end'][0]}"
    return text + (" (a busy shared machine: other work beside the bench)" if hi > 1.5 else "")


def _figures(report: Report, d: dict[str, Any]) -> None:
    loss, base = d["loss"], d["baseline"]
    pct = f"{LOSS:.0%}"
    outcomes = ", ".join(f"{k} {v:,}" for k, v in loss["outcomes"].items())
    measured = d.get("measured_loss")
    budget = (
        f"; stopped by its {loss['budget_s']:.0f} s budget at {loss['attempted']:,} of "
        f"{loss['target']:,}"
        if loss["stopped_by_budget"]
        else ""
    )
    report.add(
        Figure(
            "B6",
            f"migrations completed under {pct} random loss on both paths, both directions "
            f"({loss['connections']} connections in parallel)",
            f">= {GOAL_RATE:.1%}",
            "",
            rate_text(loss),
            baseline={"0 % loss (half before, half after)": rate_text(base)},
            met=None if loss["rate"] is None else loss["rate"] >= GOAL_RATE,
            note=(
                f"{outcomes}{budget}; measured loss {measured} of the datagrams sent on the four "
                f"link directions (nft drop counters / output counters); {loss['wall_s']} s, "
                f"{loss['attempts_per_s']} attempts/s, client CPU "
                f"{loss['client_cpu_ms_per_attempt']} ms per attempt; {_load_note(loss)}"
            ),
        )
    )
    report.add(
        Figure(
            "B6",
            "outcomes: completed first try / after a retried PATH_CHALLENGE / failures by name",
            "informative",
            "",
            dict(loss["outcomes"]),
            baseline={"0 % loss": dict(base["outcomes"])},
            note=(
                "first try: the switch completed with at most one PATH_CHALLENGE sent on the "
                "target during the attempt (the path's probes_sent counter: the bench's probe "
                "of a failed target, the switch's re-probe of a stale one); after retry: more "
                f"than one. Under loss {loss['probed']} attempts probed first (every one), "
                f"{loss['reprobed']} switches re-probed a stale target; challenges "
                f"per attempt {loss['challenges']}; the library's own count (migration_stats): "
                f"{loss['library_stats']}"
                + (
                    "; no attempt needed a PATH_CHALLENGE: every target had carried the "
                    "connection seconds before (within the library's stale_after, 30 s), so a "
                    "challenge, and a retry of one, only follows a rollback"
                    if set(loss["challenges"]) <= {0}
                    else ""
                )
            ),
        )
    )
    lb, bb = loss["bytes"], base["bytes"]
    report.add(
        Figure(
            "B6",
            "echo bytes lost (sent - verified intact, in order)",
            "0",
            "B",
            float(lb["lost"]),
            baseline={"0 % loss B": bb["lost"]},
            met=lb["lost"] == 0 and lb["streams_corrupt"] == 0,
            note=(
                f"{lb['sent'] / 1e6:.1f} MB sent over {lb['streams']} streams, "
                f"{lb['verified'] / 1e6:.1f} MB verified (baseline {bb['sent'] / 1e6:.1f} MB, "
                f"{bb['verified'] / 1e6:.1f} MB); corrupt streams {lb['streams_corrupt']}; "
                f"echo advances that missed their {ECHO_GUARD:.0f} s guard {loss['echo_stalls']}"
                + (f"; stream errors {lb['stream_errors']}" if lb["stream_errors"] else "")
            ),
        )
    )
    cid = loss["outcomes"].get("no_connection_id", 0)
    report.add(
        Figure(
            "B6",
            "stalls for want of connection IDs (no_connection_id outcomes)",
            "0",
            "",
            float(cid),
            baseline={"0 % loss": base["outcomes"].get("no_connection_id", 0)},
            met=cid == 0,
            note=(
                f"spare_connection_ids after every attempt: min {loss['spare_cids_min']}, "
                f"{loss['spare_cids_zero_samples']} samples at 0 (baseline min "
                f"{base['spare_cids_min']}, {base['spare_cids_zero_samples']} at 0)"
            ),
        )
    )
    report.add(
        Figure(
            "B6",
            f"per-migration time under {pct} loss: switch() call -> returned (completed)",
            "informative",
            "ms",
            loss["switch_ms"],
            baseline={"0 % loss ms": base["switch_ms"]},
            note=(
                f"the peer's confirmation (SwitchResult.confirmation_s) median / p90 "
                f"{loss['confirmation_ms'].get('median')} / {loss['confirmation_ms'].get('p90')}"
                f" ms under loss, {base['confirmation_ms'].get('median')} / "
                f"{base['confirmation_ms'].get('p90')} ms without (a lost PING on the new path, "
                "or the peer's answer to it, leaves the switch waiting for the next packet or "
                "the PING's retransmission: the tail); "
                f"{loss['connections']} connections moving at once share one event loop; "
                f"baseline halves (before, after the loss): "
                + ", ".join(
                    f"{p['switch_ms_median']} ms at load {p['load_at_start']}"
                    for p in base["parts"]
                )
            ),
        )
    )


async def _run_all(quick: bool, connections: int, migrations: int, baseline: int) -> Report:
    report = Report(NAME, quick=quick)
    d: dict[str, Any] = report.detail
    d["config"] = {
        "loss": LOSS,
        "connections": connections,
        "migrations": migrations,
        "baseline_migrations": baseline,
        "probe_timeout_s": PROBE_TIMEOUT,
        "echo": f"{CHUNK} B every {INTERVAL * 1000:.0f} ms per connection",
        "echo_between_attempts_B": ECHO_BETWEEN,
        "policy": "none (failover=None, network monitor off): only the bench moves connections",
    }
    ok, why = netns_available()
    if not ok:
        report.notes.append(f"skipped: {why}")
        return report
    report.detail["rlimit_nofile"] = raise_nofile(4 * connections + 1024)
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qs-bench-") as tmp:
        cert = make_cert(tmp)
        cleanup_stale()
        with TwoPathTopology(ipv6=False) as topo:
            spec = ServerSpec(topo.SERVER_V4, *cert, netns=topo.server.name, rcvbuf=SERVER_RCVBUF)
            with (
                server_process(spec) as server,
                UdpCounters(topo.client.name, [p.client_if for p in topo.paths]) as c_out,
                UdpCounters(topo.server.name, [p.server_if for p in topo.paths]) as s_out,
            ):
                async with Supervisor(
                    enable_experimental_connection_migration=True,
                    network=False,
                    netns=topo.client.name,
                ) as sup:
                    t0 = time.perf_counter()
                    movers, failures = await _open_all(sup, server, topo, connections)
                    d["dial"] = {
                        "opened": len(movers),
                        "failed": len(failures),
                        "failure_sample": failures[:3],
                        "dial_and_probe_s": round(time.perf_counter() - t0, 2),
                    }
                    print(f"{NAME}: dialled {d['dial']}", file=sys.stderr, flush=True)
                    server_cpu0 = proc_cpu_s(server.pid)
                    # The baseline in two halves, before and after the loss: a shared
                    # machine's load changes over minutes, and this brackets it.
                    before = await _phase(sup, movers, baseline // 2, BASELINE_BUDGET_S / 2, 1)
                    print(f"{NAME}: baseline, first half done", file=sys.stderr, flush=True)
                    sent0 = _sent_out([c_out, s_out])
                    drops = Filters(
                        [
                            topo.random_drop(path, LOSS, side=side)
                            for path in (0, 1)
                            for side in ("client", "server")
                        ]
                    )
                    try:
                        lossy = await _phase(sup, movers, migrations, LOSS_BUDGET_S, 1000)
                        dropped = drops.dropped()
                        sent = _sent_out([c_out, s_out]) - sent0
                    finally:
                        drops.close()
                    after = await _phase(
                        sup, movers, baseline - baseline // 2, BASELINE_BUDGET_S / 2, 2000
                    )
                    d["baseline"] = _summarise([before, after])
                    d["loss"] = _summarise([lossy])
                    d["datagrams"] = {"sent_under_loss": sent, "dropped": dropped}
                    d["measured_loss"] = f"{dropped / sent:.2%}" if sent else None
                    d["server_cpu_s"] = round(proc_cpu_s(server.pid) - server_cpu0, 1)
                    print(f"{NAME}: baseline {_brief(d['baseline'])}", file=sys.stderr, flush=True)
                    print(f"{NAME}: loss {_brief(d['loss'])}", file=sys.stderr, flush=True)
                    await asyncio.gather(
                        *(m.conn.close() for m in movers if not m.conn.is_closed),
                        return_exceptions=True,
                    )
    d["elapsed_s"] = round(time.monotonic() - t_start, 1)
    _figures(report, d)
    return report


def _brief(p: dict[str, Any]) -> str:
    return (
        f"{p['completed']}/{p['attempted']} in {p['wall_s']} s, {p['outcomes']}, "
        f"switch {p['switch_ms'].get('median')} ms, lost {p['bytes']['lost']} B, "
        f"spare CIDs min {p['spare_cids_min']}"
    )


def main(
    quick: bool = False,
    connections: int | None = None,
    migrations: int | None = None,
    baseline: int | None = None,
) -> dict[str, Any]:
    n = QUICK["connections"] if quick else CONNECTIONS
    m = QUICK["migrations"] if quick else MIGRATIONS
    b = QUICK["baseline"] if quick else BASELINE
    report = run(lambda: _run_all(quick, connections or n, migrations or m, baseline or b))
    write_result(report)
    return report.as_dict()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--migrations", type=int, default=None)
    parser.add_argument("--baseline", type=int, default=None)
    args = parser.parse_args()
    print(json.dumps(main(args.quick, args.connections, args.migrations, args.baseline), indent=2))
