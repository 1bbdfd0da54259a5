"""The remote protocol without a carrier: the dispatcher's answers and the typed-error codec.

The carriers (control socket, Ray agent) run the same table in ``test_remote_conformance.py``;
here are the paths no carrier reaches easily: a failing ``prepare``, text that cannot be
encoded, every library error class across the codec, and a reply of the wrong type.
"""

from __future__ import annotations

import pytest

from actors import errors as library_errors
from actors.envelope import decode, encode
from actors.path_state import PathState
from supervisor.core.messages import MigrationStats, StatsRequest, expect
from supervisor.remote.protocol import (
    Dispatcher,
    ErrorReply,
    Ok,
    RemoteError,
    Snapshots,
    encode_error,
    error_reply,
    rebuild_error,
    reply_body,
)


async def _answer(dispatcher: Dispatcher, msg: object) -> object:
    return decode(await dispatcher.answer_bytes(encode(msg))).body


async def test_results_none_and_tuples_become_envelopes_and_come_back() -> None:
    async def stats(_msg: StatsRequest) -> object:
        return MigrationStats()

    async def nothing(_msg: object) -> None:
        return None

    d = Dispatcher(handlers={StatsRequest: stats})
    assert isinstance(reply_body(await _answer(d, StatsRequest())), MigrationStats)
    d = Dispatcher(handlers={StatsRequest: nothing})
    body = await _answer(d, StatsRequest())
    assert isinstance(body, Ok) and reply_body(body) is None

    async def many(_msg: object) -> tuple[object, ...]:
        return ()

    body = await _answer(Dispatcher(handlers={StatsRequest: many}), StatsRequest())
    assert isinstance(body, Snapshots) and reply_body(body) == ()


async def test_an_unknown_request_is_refused_naming_what_is_accepted() -> None:
    async def stats(_msg: StatsRequest) -> object:
        return MigrationStats()

    body = await _answer(Dispatcher(handlers={StatsRequest: stats}, name="test"), Ok())
    assert isinstance(body, ErrorReply) and body.type == "TypeError"
    assert "not a test request" in body.message and "sup.Stats" in body.message


async def test_a_failing_prepare_is_the_requests_error_and_nothing_runs() -> None:
    ran: list[object] = []

    async def prepare() -> None:
        raise library_errors.SupervisorClosedError("restoring failed")

    async def stats(msg: StatsRequest) -> object:
        ran.append(msg)
        return MigrationStats()

    body = await _answer(
        Dispatcher(handlers={StatsRequest: stats}, prepare=prepare), StatsRequest()
    )
    assert isinstance(body, ErrorReply) and body.type == "SupervisorClosedError"
    assert ran == []
    with pytest.raises(library_errors.SupervisorClosedError, match="restoring failed"):
        reply_body(body)


async def test_a_drain_without_a_supervisor_is_refused() -> None:
    from supervisor.remote.protocol import DrainRequest

    body = await _answer(Dispatcher(name="test"), DrainRequest(local_addr="127.0.0.1"))
    assert isinstance(body, ErrorReply) and body.type == "TypeError" and "no drain" in body.message


def test_text_that_cannot_be_encoded_still_gets_a_reply() -> None:
    exc = ValueError("bad \udcff surrogate")
    exc.detail = "\udcff"  # type: ignore[attr-defined]
    body = decode(encode_error(exc)).body
    assert isinstance(body, ErrorReply) and body.type == "ValueError"
    assert "surrogate" in body.message and body.attrs == {}


@pytest.mark.parametrize("name", library_errors.__all__)
def test_every_library_error_class_crosses_as_itself(name: str) -> None:
    cls = getattr(library_errors, name)
    exc = cls.__new__(cls)
    exc.args = ("it failed",)
    exc.state = PathState.NEW  # an enum attribute travels as its text
    exc.where = ["a", 1]
    exc._private = object()  # left out
    rebuilt = rebuild_error(decode(encode(error_reply(exc))).body)
    assert type(rebuilt) is cls
    assert str(rebuilt) == str(exc)
    assert rebuilt.state == str(PathState.NEW) and rebuilt.where == ["a", 1]  # type: ignore[attr-defined]
    assert not hasattr(rebuilt, "_private")


def test_an_unknown_class_comes_back_as_remote_error_naming_it() -> None:
    rebuilt = rebuild_error(ErrorReply("SomethingElse", "boom"))
    assert isinstance(rebuilt, RemoteError) and rebuilt.type_name == "SomethingElse"
    assert "SomethingElse: boom" in str(rebuilt)


def test_a_reply_of_the_wrong_type_is_a_type_error_not_an_assert() -> None:
    assert isinstance(expect(MigrationStats(), MigrationStats), MigrationStats)
    with pytest.raises(TypeError, match="expected a MigrationStats reply, got Ok"):
        expect(Ok(), MigrationStats)
