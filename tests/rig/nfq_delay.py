"""NFQUEUE userspace delayer: holds every packet of one queue for a fixed time, then accepts it.

``tc netem`` is not in this kernel, and neither is nftables' ``queue`` statement
(CONFIG_NFT_QUEUE is off), but the xtables NFQUEUE target is: the rig adds an iptables rule
(``-j NFQUEUE --queue-num N``) inside a ``qs-`` namespace and runs this script there with
`NetNS.popen` (see `tests.rig.netns.NfqDelay`). Queues are per network namespace.

Packets keep their order (one fixed delay, FIFO). The verdict is given after the callback has
returned (NetfilterQueue >= 1.0 allows it), from a select() loop whose timeout is the next
packet's due time. Prints ``ready`` once bound; runs until SIGTERM (the rig stops it).

    python tests/rig/nfq_delay.py --queue 7 --delay 0.03
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import sys
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number")
    parser.add_argument("--delay", type=float, required=True, help="seconds to hold a packet")
    parser.add_argument("--max-len", type=int, default=20000, help="kernel queue length")
    args = parser.parse_args(argv)

    from netfilterqueue import NetfilterQueue  # imported here: the rig checks availability

    pending: collections.deque[tuple[float, Any]] = collections.deque()
    delay = args.delay

    def on_packet(pkt: Any) -> None:
        pending.append((time.monotonic() + delay, pkt))

    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    nfq = NetfilterQueue()
    nfq.bind(args.queue, on_packet, max_len=args.max_len)
    fd = nfq.get_fd()
    print("ready", flush=True)
    held = 0
    try:
        while not stop:
            now = time.monotonic()
            while pending and pending[0][0] <= now:
                pending.popleft()[1].accept()
                held += 1
            timeout = max(0.0, pending[0][0] - now) if pending else 0.5
            try:
                readable, _, _ = select.select([fd], [], [], timeout)
            except InterruptedError:
                continue
            if readable:
                nfq.run(block=False)  # queues every packet available now via on_packet
    finally:
        for _due, pkt in pending:  # never leave packets stuck in the kernel queue
            pkt.accept()
        nfq.unbind()
        print(f"delayed {held} packets", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
