"""The guest-agent client against a hostile agent (a fake at the socket seam). These add to
the real-agent tests in test_agent_real.py; they do not replace them.

Every case must end in one of the package's AgentError subclasses, within its deadline,
with bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fake_agent import Behaviour, fake_agent, reply
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freezeframe.agent.qga import FreezeState, GuestAgent
from freezeframe.errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
)

MiB = 1 << 20


def against(tmp_path: Path, behaviour: Behaviour, call: Callable[[GuestAgent], Awaitable[Any]], *,
            timeout: float = 2.0, sync: bool = True, flood: list[bytes] | None = None) -> Any:
    async def go() -> Any:
        async with fake_agent(tmp_path / "qga.sock", behaviour, sync=sync, flood=flood) as path:
            agent = GuestAgent(path, timeout=timeout)
            try:
                return await call(agent)
            finally:
                await agent.close()

    return asyncio.run(go())


def silent(request: dict[str, Any]) -> None:
    return None


def test_garbage_reply_is_a_protocol_error(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(AgentProtocolError, match="not JSON"):
        against(tmp_path, lambda r: b"\x00\x01garbage{{\n", lambda a: a.ping())
    assert time.monotonic() - start < 2


def test_hundred_megabyte_line_is_refused_within_the_timeout_and_bounded_memory(tmp_path: Path) -> None:
    chunk = b"A" * MiB
    tracemalloc.start()
    try:
        start = time.monotonic()
        with pytest.raises(AgentProtocolError, match=r"over 1048576 bytes"):
            against(tmp_path, lambda r: [chunk] * 100, lambda a: a.ping(), timeout=5)
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 5
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB for a 100 MiB line"


def test_huge_stale_line_before_the_handshake_is_skipped_with_bounded_memory(tmp_path: Path) -> None:
    chunk = b"B" * MiB
    tracemalloc.start()
    try:
        result = against(tmp_path, lambda r: reply(r, {}), lambda a: a.ping(), timeout=20,
                         flood=[chunk] * 100 + [b"\n"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result is None
    assert peak < 16 * MiB, f"peak {peak / MiB:.1f} MiB while skipping a 100 MiB line"


def test_replies_with_wrong_ids_end_in_a_timeout_that_says_so(tmp_path: Path) -> None:
    def wrong_id(request: dict[str, Any]) -> bytes:
        return json.dumps({"return": {}, "id": "not-yours"}).encode() + b"\n"

    start = time.monotonic()
    with pytest.raises(AgentTimeout, match="replies to other requests were discarded"):
        against(tmp_path, wrong_id, lambda a: a.ping(), timeout=1.5)
    assert 1.4 < time.monotonic() - start < 3


def test_a_flood_of_wrong_ids_cannot_hold_the_caller_past_the_deadline(tmp_path: Path) -> None:
    line = json.dumps({"return": {}, "id": "not-yours"}).encode() + b"\n"
    start = time.monotonic()
    with pytest.raises(AgentTimeout):
        against(tmp_path, lambda r: [line * 10_000] * 200, lambda a: a.ping(), timeout=1.0)
    assert time.monotonic() - start < 3


def test_silence_is_a_timeout(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(AgentTimeout, match=r"no reply from the guest agent within 1s"):
        against(tmp_path, silent, lambda a: a.fsfreeze_status(), timeout=1.0)
    assert time.monotonic() - start < 2.5


def test_no_answer_to_the_handshake_means_no_agent(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(AgentUnavailable, match=r"did not answer within 1s"):
        against(tmp_path, silent, lambda a: a.connect(1.0), sync=False)
    assert time.monotonic() - start < 2.5


def test_stale_replies_and_parse_errors_before_the_sync_are_dropped(tmp_path: Path) -> None:
    stale = [b'{"return": 5}\n', b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n',
             b"\xff{\"return\": 12345}\n", b"\x00\x00 not json\n"]
    state = against(tmp_path, lambda r: reply(r, "frozen"), lambda a: a.fsfreeze_status(), flood=stale)
    assert state is FreezeState.FROZEN


def test_after_a_timeout_the_next_call_resynchronises(tmp_path: Path) -> None:
    pings: list[str] = []

    def first_silent(request: dict[str, Any]) -> bytes | None:
        pings.append(request["execute"])
        return None if len(pings) == 1 else reply(request, {})

    async def twice(agent: GuestAgent) -> None:
        with pytest.raises(AgentTimeout):
            await agent.ping(timeout=0.5)
        await agent.ping()

    against(tmp_path, first_silent, twice)
    assert pings == ["guest-ping", "guest-ping"]


def test_agent_error_reply_is_a_command_error(tmp_path: Path) -> None:
    def refuse(request: dict[str, Any]) -> bytes:
        error = {"class": "GenericError", "desc": "Command guest-fsfreeze-freeze has been disabled"}
        return json.dumps({"error": error, "id": request["id"]}).encode() + b"\n"

    with pytest.raises(AgentCommandError, match="has been disabled") as caught:
        against(tmp_path, refuse, lambda a: a.fsfreeze_freeze())
    assert caught.value.error_class == "GenericError"


def test_connection_closed_mid_reply_is_unavailable(tmp_path: Path) -> None:
    async def go() -> None:
        path = tmp_path / "qga.sock"

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            request = json.loads(line.lstrip(b"\xff"))
            writer.write(b"\xff" + json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
            await reader.readline()
            writer.write(b'{"return": {}, "id": "ff-')  # half a reply, then gone
            writer.close()

        server = await asyncio.start_unix_server(serve, path=str(path))
        try:
            async with GuestAgent(path, timeout=2) as agent:
                await agent.ping()
        finally:
            server.close()

    with pytest.raises(AgentUnavailable, match="closed the connection"):
        asyncio.run(go())


def test_missing_socket_names_the_path(tmp_path: Path) -> None:
    async def go() -> None:
        await GuestAgent(tmp_path / "nope.sock").connect(1)

    with pytest.raises(AgentUnavailable, match=r"nope\.sock"):
        asyncio.run(go())


WRONG_SHAPES = [
    ("guest-fsfreeze-status", 42, lambda a: a.fsfreeze_status()),
    ("guest-fsfreeze-status", "melting", lambda a: a.fsfreeze_status()),
    ("guest-fsfreeze-freeze", "two", lambda a: a.fsfreeze_freeze()),
    ("guest-fsfreeze-freeze", -1, lambda a: a.fsfreeze_freeze()),
    ("guest-fsfreeze-thaw", True, lambda a: a.fsfreeze_thaw()),
    ("guest-info", [], lambda a: a.info()),
    ("guest-info", {"version": "7", "supported_commands": [{"name": 1, "enabled": True}]}, lambda a: a.info()),
    ("guest-info", {"version": "x" * 10_000, "supported_commands": []}, lambda a: a.info()),
    ("guest-get-fsinfo", [{"name": "vda", "mountpoint": 7, "type": "ext4"}], lambda a: a.get_fsinfo()),
    ("guest-get-fsinfo", [{}] * 5000, lambda a: a.get_fsinfo()),
    ("guest-file-open", "handle", lambda a: a.file_open("/etc/hostname")),
    ("guest-file-read", {"count": 3, "buf-b64": "!!!!", "eof": True}, lambda a: a.file_read(1, 3)),
    ("guest-file-read", {"count": 2, "buf-b64": "YWJj", "eof": True}, lambda a: a.file_read(1, 3)),
    ("guest-file-read", {"count": 5, "buf-b64": "YWJjZGU=", "eof": "yes"}, lambda a: a.file_read(1, 5)),
]


@pytest.mark.parametrize(("command", "value", "call"), WRONG_SHAPES)
def test_replies_of_the_wrong_shape_are_refused(tmp_path: Path, command: str, value: Any,
                                                call: Callable[[GuestAgent], Awaitable[Any]]) -> None:
    def answer(request: dict[str, Any]) -> bytes:
        assert request["execute"] == command
        return reply(request, value)

    with pytest.raises(AgentProtocolError):
        against(tmp_path, answer, call)


@pytest.mark.parametrize("line", [b"[1, 2]\n", b'{"id": "x"}\n', b"null\n", b"\xff\xfe\n"])
def test_replies_that_are_not_replies_are_refused(tmp_path: Path, line: bytes) -> None:
    with pytest.raises(AgentProtocolError):
        against(tmp_path, lambda r: line, lambda a: a.ping())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                 max_leaves=12).map(lambda v: json.dumps({"return": v}).encode()),
))
def test_any_reply_ends_in_a_value_or_an_agent_error(tmp_path: Path, payload: bytes) -> None:
    """Whatever comes back, the result is a valid value or one of our errors, in time."""

    def answer(request: dict[str, Any]) -> bytes:
        text = payload.replace(b"\n", b" ")
        if text.startswith(b'{"return"'):
            # Put the right id in, so the shape checks are what is being exercised.
            text = text[:-1] + b', "id": ' + json.dumps(request["id"]).encode() + b"}"
        return text + b"\n"

    async def calls(agent: GuestAgent) -> None:
        for call in (agent.fsfreeze_status, agent.info, agent.get_fsinfo, agent.fsfreeze_thaw):
            with contextlib.suppress(AgentError):
                await call()

    start = time.monotonic()
    against(tmp_path, answer, calls, timeout=1.0)
    assert time.monotonic() - start < 4 * 1.0 + 2
