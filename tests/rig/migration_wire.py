"""One client migration as the wire shows it: client datagrams split by path, and its checks.

Shared by the RFC 9000 conformance tests (`analyse_old_path`: strict, asserts) and the local
interop suite (`split_migration` + `MigrationSplit.checks`: each check a bool, recorded per peer
before anything is asserted). Input: `quic_wire.wire_packets` of a capture decrypted with the
client's key log. Path A is the client's old local address, B the new one (after a preferred
address switch, B also talks to another server address).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from .aioquic_server import Addr
from .capture import UdpCapture
from .quic_wire import ACK_TYPES, PADDING, PATH_CHALLENGE, PATH_RESPONSE, WirePacket

__all__ = [
    "MIN_PROBE_DATAGRAM",
    "MigrationSplit",
    "OldPathReport",
    "analyse_old_path",
    "split_migration",
    "wait_captured",
]

#: RFC 9000 §8.2.1: a datagram carrying PATH_CHALLENGE is expanded to at least 1200 bytes.
MIN_PROBE_DATAGRAM = 1200


@dataclass
class MigrationSplit:
    """The client's datagrams of one migration from A to B, and the peer's answers on B."""

    a: Addr
    b: Addr
    from_a: list[WirePacket]
    from_b: list[WirePacket]
    #: Wire numbers of client datagrams tshark could not decrypt (unknown content: a failure).
    undecrypted: list[int]
    #: The switch: wire number of our first non-probing datagram from B (None: never switched).
    switch_at: int | None
    #: Client datagrams from A after the switch.
    a_after_switch: list[WirePacket]
    #: Destination CIDs used from both addresses (RFC 9000 §9.5 forbids it).
    shared_dcids: set[str]
    #: PATH_CHALLENGE data we sent from B, and PATH_RESPONSE data the peer sent to B.
    challenges_from_b: list[str] = field(default_factory=list)
    responses_to_b: list[str] = field(default_factory=list)
    #: The peer's datagrams to B after the switch (decrypted or not: ngtcp2's GSO batches are
    #: one large datagram on lo that tshark cannot decrypt).
    peer_to_b_after_switch: list[WirePacket] = field(default_factory=list)

    @property
    def first_on_b(self) -> WirePacket | None:
        return self.from_b[0] if self.from_b else None

    def checks(self) -> dict[str, bool]:
        """Each interop check of a client migration, by name (see the interop suite)."""
        first = self.first_on_b
        carried_before = any(
            not p.probing_only for p in self.from_a if first is None or p.number < first.number
        )
        return {
            # The capture holds what the other checks inspect: both paths, all decrypted, and
            # A carried the connection before B was probed.
            "captured_both_paths": bool(self.from_a and self.from_b)
            and not self.undecrypted
            and carried_before,
            "first_on_new_is_padded_path_challenge": first is not None
            and set(first.frame_types) == {PATH_CHALLENGE, PADDING}
            and len(first.challenges) == 1
            and first.length >= MIN_PROBE_DATAGRAM,
            "path_challenge_answered": bool(set(self.challenges_from_b) & set(self.responses_to_b)),
            "old_path_probing_only_after_switch": self.switch_at is not None
            and all(p.probing_only for p in self.a_after_switch),
            "no_dcid_on_two_addresses": not self.shared_dcids,
            "peer_followed": bool(self.peer_to_b_after_switch),
        }


def split_migration(packets: list[WirePacket], a: Addr, b: Addr) -> MigrationSplit:
    """Split a capture's client datagrams into path A and path B around the switch."""
    client = [p for p in packets if p.src in (a, b)]
    from_a = [p for p in client if p.src == a]
    from_b = [p for p in client if p.src == b]
    switch_at = next((p.number for p in from_b if not p.probing_only), None)
    after = [] if switch_at is None else [p for p in from_a if p.number > switch_at]
    return MigrationSplit(
        a=a,
        b=b,
        from_a=from_a,
        from_b=from_b,
        undecrypted=[p.number for p in client if not p.decrypted],
        switch_at=switch_at,
        a_after_switch=after,
        shared_dcids={d for p in from_a for d in p.dcids} & {d for p in from_b for d in p.dcids},
        challenges_from_b=[c for p in from_b for c in p.challenges],
        responses_to_b=[r for p in packets if p.dst == b for r in p.responses],
        peer_to_b_after_switch=[
            p for p in packets if p.dst == b and switch_at is not None and p.number > switch_at
        ],
    )


async def wait_captured(cap: UdpCapture, sent: Mapping[Addr, int], timeout: float = 15.0) -> None:
    """Wait until tshark has shown ``sent[addr]`` datagrams from each client address (e.g. a
    PathActor's ``datagrams_sent``): the capture is then complete for them, so "nothing from
    A" means nothing was sent, not nothing was caught."""

    def complete() -> bool:
        seen = Counter(f.src for f in cap.flows)
        return all(seen[addr] >= n for addr, n in sent.items())

    await cap.wait_for(complete, timeout, f"capture holds all client datagrams {dict(sent)}")


# ---- the strict RFC 9000 conformance view (tests/test_conformance_wire.py) ---------------------


@dataclass
class OldPathReport:
    """What the capture says about paths A (old) and B (new) of one client migration."""

    first_on_b: WirePacket
    #: Wire number of the switch's first non-probing packet on B.
    switch_at: int
    #: Datagrams the client sent from A after that, and after the switch() call returned.
    client_from_a_after: list[WirePacket]
    client_from_a_after_completed: list[WirePacket]
    #: Datagrams the peer sent to A after the switch began (frame names -> count).
    peer_to_a_after: Counter[tuple[str, ...]]
    #: PATH_RESPONSE data the client sent from A after the switch.
    responses_from_a: list[str]


def analyse_old_path(
    packets: list[WirePacket], a: Addr, b: Addr, completed_at: float
) -> OldPathReport:
    """Assert the conformance checks of a switch from A to B (stricter than the interop
    checks: after the switch A may carry only PATH_RESPONSE + PADDING answering the peer)."""
    s = split_migration(packets, a, b)
    assert (s.from_a or s.from_b) and not s.undecrypted, (
        f"client datagrams tshark could not decrypt: {s.undecrypted}"
    )
    assert s.from_a and s.from_b

    # RFC 9000 §9.5: no destination CID is used from both local addresses.
    assert not s.shared_dcids, f"CIDs used on both paths: {s.shared_dcids}"

    # The first datagram from B is our probe: a padded PATH_CHALLENGE and nothing else.
    first = s.from_b[0]
    assert set(first.frame_types) == {PATH_CHALLENGE, PADDING}, first
    assert len(first.challenges) == 1 and first.length >= MIN_PROBE_DATAGRAM, first
    # A carried the connection before the switch (stream data, ACKs: non-probing).
    assert any(not p.probing_only for p in s.from_a if p.number < first.number)

    # The switch: our first non-probing packet on B. Only probing frames came before it on B.
    assert s.switch_at is not None, "no non-probing packet ever left B"
    switch_at = s.switch_at
    before = [p for p in s.from_b if p.number < switch_at]
    assert all(set(p.frame_types) <= {PATH_CHALLENGE, PATH_RESPONSE, PADDING} for p in before)

    # After it: nothing non-probing on A; only answers to the peer's challenges, no ACK.
    after = s.a_after_switch
    offending = [
        (p.number, p.names) for p in after if not set(p.frame_types) <= {PATH_RESPONSE, PADDING}
    ]
    assert not offending, f"non-probing frames left the old path after the switch: {offending}"
    assert not any(set(p.frame_types) & ACK_TYPES for p in after)
    responses = [r for p in after for r in p.responses]
    # And every such datagram does answer something.
    assert all(p.responses for p in after), [(p.number, p.names) for p in after]

    peer_to_a: Counter[tuple[str, ...]] = Counter(
        p.names if p.decrypted else ("<not decrypted>",)
        for p in packets
        if p.dst == a and p.number > switch_at
    )
    return OldPathReport(
        first_on_b=first,
        switch_at=switch_at,
        client_from_a_after=after,
        client_from_a_after_completed=[p for p in after if p.time >= completed_at],
        peer_to_a_after=peer_to_a,
        responses_from_a=responses,
    )
