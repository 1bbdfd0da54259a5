"""The control server answers every malformed frame with a typed error and keeps serving.

Before: a 650-byte frame nested 600 deep raised RecursionError inside the server; the client got
no reply at all. Now each bad frame gets a ``remote.Error`` (``EnvelopeError``/``FrameError``), the
server hangs up that one connection as the protocol says (see ``supervisor/remote/control.py``), and
every other client, and the next connection, is served. Over the real Unix socket.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
import pytest

from actors.envelope import EXT_MESSAGE, decode, encode
from supervisor import Supervisor
from supervisor.core.messages import DialRequest, SnapshotRequest
from supervisor.remote.control import ControlClient, ControlServer, frame
from supervisor.remote.protocol import ErrorReply

# An envelope (remote.Error) whose dict[str, Any] field holds one value, appended by hand.
_PREFIX = msgpack.packb(
    {"v": 1, "type": "remote.Error", "body": {"type": "X", "message": "m", "attrs": {"a": None}}}
)[:-1]


def _deep_messages(depth: int) -> bytes:
    inner = msgpack.packb(None)
    body = _PREFIX.split(b"\xa4body", 1)[1]
    for _ in range(depth):
        payload = b"\x92" + msgpack.packb("remote.Error") + body + inner
        inner = msgpack.packb(msgpack.ExtType(EXT_MESSAGE, payload))
    return _PREFIX + inner


BAD_FRAMES = {
    "600 deep in a field (650 bytes)": _PREFIX + b"\x91" * 600 + b"\xc0",
    "10000 deep arrays": b"\x91" * 10_000 + b"\xc0",
    "10000 deep maps": b"\x81\xa1k" * 10_000 + b"\xc0",
    "200 nested messages": _deep_messages(200),
    "garbage": b"\xc1\xff\x00 not msgpack \xde\xad",
    "empty": b"",
    "truncated envelope": encode(SnapshotRequest(None))[:-3],
    "invalid utf-8": b"\x81\xa1v\xa2\xff\xfe",
    "array map key": b"\x81\x91\x01\x02",
}


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ctl.sock"


async def _read_reply(reader: asyncio.StreamReader) -> Any:
    size = int.from_bytes(await reader.readexactly(4), "big")
    return decode(await reader.readexactly(size)).body


@pytest.mark.parametrize("payload", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_a_malformed_frame_gets_a_typed_error_and_the_server_keeps_serving(
    sup: Supervisor, sock_path: Path, payload: bytes
) -> None:
    async with ControlServer(sup, sock_path):
        # A client in the middle of a conversation, to show it is not disturbed.
        bystander = ControlClient(sock_path)
        assert await bystander.snapshot() == ()

        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        try:
            writer.write(frame(payload))
            await writer.drain()
            reply = await asyncio.wait_for(_read_reply(reader), 10)
            assert isinstance(reply, ErrorReply) and reply.type == "EnvelopeError", reply
            assert reply.message  # says what is wrong
            assert await asyncio.wait_for(reader.read(), 10) == b""  # that connection ends
        finally:
            writer.close()

        assert await bystander.snapshot() == ()  # same connection as before the bad frame
        await bystander.close()
        async with ControlClient(sock_path) as fresh:  # and a new one
            assert await fresh.snapshot() == ()


async def test_deep_frame_error_names_the_limit(sup: Supervisor, sock_path: Path) -> None:
    async with ControlServer(sup, sock_path):
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        try:
            writer.write(frame(BAD_FRAMES["600 deep in a field (650 bytes)"]))
            await writer.drain()
            reply = await asyncio.wait_for(_read_reply(reader), 10)
        finally:
            writer.close()
    assert isinstance(reply, ErrorReply)
    assert "nested deeper than 64 levels" in reply.message


async def test_a_valid_but_wrong_message_keeps_the_connection(
    sup: Supervisor, sock_path: Path
) -> None:
    """Framing intact and the envelope decodes: the error is the request's, the stream is fine."""
    async with ControlServer(sup, sock_path):
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        try:
            writer.write(frame(encode(DialRequest("/ip4/127.0.0.1/udp/1/quic-v1"))))
            writer.write(frame(encode(SnapshotRequest(None))))
            await writer.drain()
            first = await asyncio.wait_for(_read_reply(reader), 10)
            second = await asyncio.wait_for(_read_reply(reader), 10)
        finally:
            writer.close()
    assert isinstance(first, ErrorReply) and first.type == "TypeError"
    assert getattr(second, "conns", None) == ()


async def test_an_error_whose_text_cannot_be_encoded_still_reaches_the_client(
    sup: Supervisor, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def ask(msg: object) -> object:
        raise ValueError("interface \udcff is gone")  # a lone surrogate: msgpack refuses it

    monkeypatch.setattr(sup, "ask", ask)
    async with ControlServer(sup, sock_path), ControlClient(sock_path) as client:
        with pytest.raises(ValueError, match=r"interface \\udcff is gone"):
            await client.snapshot()
        with pytest.raises(ValueError):  # and the connection is still good
            await client.snapshot()


async def test_the_client_reconnects_after_the_server_hung_up_on_a_bad_frame(
    sup: Supervisor, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import supervisor.remote.control as control
    from actors.envelope import EnvelopeError

    async with ControlServer(sup, sock_path), ControlClient(sock_path) as client:
        assert await client.snapshot() == ()
        real = control.encode

        def garbled(msg: object, **kwargs: Any) -> bytes:  # the client's requests only
            if isinstance(msg, SnapshotRequest):
                return BAD_FRAMES["garbage"]
            return real(msg, **kwargs)

        monkeypatch.setattr(control, "encode", garbled)
        with pytest.raises(EnvelopeError):
            await client.snapshot()
        monkeypatch.setattr(control, "encode", real)
        assert await client.snapshot() == ()  # a new connection, not the one the server closed
