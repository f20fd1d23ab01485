"""Client for the QEMU guest agent (qemu-ga), speaking its wire protocol and nothing more.

Everything the guest sends is untrusted: every read has a deadline, no line may exceed
``max_message`` bytes (a longer one is an error, never a buffer that grows), and every
reply is checked against the shape the command allows before anything uses it.

Synchronisation (measured against qemu-ga 7.2, see DESIGN.md section 3): after connecting
we send the byte 0xFF, which makes qemu-ga drop any half-parsed input (it answers the byte
itself with a JSON parse error), then ``guest-sync-delimited`` with a random id; the reply
comes after a 0xFF delimiter. Everything before that reply is stale, from us or an earlier
client, and is dropped. Every command also carries an ``id`` that qemu-ga echoes, so a late
reply to an earlier command can never be taken for the answer to this one.

After any error (a timeout, a malformed or oversized reply) the connection is closed and
the next call reconnects and resynchronises: nothing half-read survives an error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.agent import holders, vss
from freezeframe.errors import (
    AgentCommandError,
    AgentError,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    FreezeNotHeld,
)

DEFAULT_TIMEOUT = 10.0
#: Replies larger than this are refused. guest-info with every command is ~6 KiB and a
#: 64 KiB file-read chunk ~88 KiB in base64; 1 MiB leaves room and still bounds memory.
DEFAULT_MAX_MESSAGE = 1 << 20
FILE_CHUNK = 64 * 1024
_MAX_STRING = 4096
_MAX_ITEMS = 4096
_DELIMITER = b"\xff"


class FreezeState(enum.Enum):
    THAWED = "thawed"
    FROZEN = "frozen"


@dataclass(frozen=True, slots=True)
class AgentInfo:
    version: str
    #: Commands the agent knows, mapped to whether they are enabled (not blocked).
    commands: dict[str, bool]

    def allows(self, command: str) -> bool:
        return self.commands.get(command, False)


@dataclass(frozen=True, slots=True)
class GuestDisk:
    bus_type: str
    dev: str | None
    serial: str | None


@dataclass(frozen=True, slots=True)
class GuestFilesystem:
    name: str
    mountpoint: str
    type: str
    disks: tuple[GuestDisk, ...]


@dataclass(frozen=True, slots=True)
class GuestOS:
    id: str | None = None
    name: str | None = None
    pretty_name: str | None = None
    version: str | None = None
    kernel_release: str | None = None
    machine: str | None = None

    @property
    def windows(self) -> bool:
        return vss.is_windows(self.id)

    def describe(self) -> str:
        kernel = f"kernel {self.kernel_release}" if self.kernel_release else None
        return self.pretty_name or self.name or kernel or self.id or "unknown"


class GuestAgent:
    """One connection to one guest agent socket. Use as ``async with GuestAgent(path) as qga``."""

    def __init__(
        self,
        socket_path: str | Path,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_message: int = DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self.max_message = max_message
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buffer = bytearray()
        self._serial = 0
        self._tag = secrets.token_hex(4)
        # One command at a time on the channel: a thaw from a watchdog waits for the call
        # in flight instead of interleaving with it.
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> GuestAgent:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection ------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> None:
        """Connect and synchronise; raises AgentUnavailable if the agent does not answer."""
        limit = self.timeout if timeout is None else timeout
        await self.close()
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path), limit
            )
        except FileNotFoundError as err:
            raise AgentUnavailable(
                f"no guest-agent socket at {self.socket_path}",
                hint="check the instance's --qga path and that the VM is running",
            ) from err
        except TimeoutError as err:
            raise AgentUnavailable(f"connecting to {self.socket_path} timed out") from err
        except OSError as err:
            await self._raise_if_held(err)
            raise AgentUnavailable(
                f"cannot connect to the guest agent at {self.socket_path}: {err.strerror or err}",
                hint="is the VM running? another client may hold the channel",
            ) from err
        try:
            await self._sync(asyncio.get_running_loop().time() + limit)
        except AgentUnavailable as err:  # the connection broke (queued, then refused?)
            await self.close()
            await self._raise_if_held(err)
            raise
        except AgentTimeout as err:
            await self.close()
            await self._raise_if_held(err)
            raise AgentUnavailable(
                f"the guest agent did not answer within {limit:g}s",
                hint="is qemu-ga running in the guest?",
            ) from err
        except BaseException:
            await self.close()
            raise

    async def _raise_if_held(self, err: BaseException) -> None:
        """QEMU passes the guest one client at a time; a connection queued behind another
        looks like a guest without qemu-ga. The socket's queue tells them apart."""
        found = await asyncio.to_thread(holders.held, self.socket_path)
        if found is not None:
            raise AgentUnavailable(found.describe("guest-agent"), hint=found.hint) from err

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        self._buffer.clear()
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _sync(self, deadline: float) -> None:
        sync_id = secrets.randbelow(2**31 - 1) + 1
        request = json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}})
        await self._send(_DELIMITER + request.encode() + b"\n")
        while True:
            # Stale replies and the parse error for our 0xFF may be anything, of any size:
            # skip them without keeping them.
            line = await self._read_line(deadline, skip_oversized=True)
            try:
                message = json.loads(line.lstrip(_DELIMITER))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(message, dict) and message.get("return") == sync_id:
                return

    # -- framing ---------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        assert self._writer is not None
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as err:
            await self.close()
            raise AgentUnavailable(f"the guest-agent connection broke: {err}") from err

    async def _read_line(self, deadline: float, *, skip_oversized: bool = False) -> bytes:
        assert self._reader is not None
        loop = asyncio.get_running_loop()
        skipping = False
        while True:
            # Checked before every line, not only when waiting: a flood of stale lines
            # must not keep a caller past its deadline.
            if loop.time() >= deadline:
                raise AgentTimeout("the guest agent did not reply in time")
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                if skipping:
                    skipping = False
                    continue
                return line
            if len(self._buffer) > self.max_message:
                if not skip_oversized:
                    raise AgentProtocolError(
                        f"the guest agent sent a message over {self.max_message} bytes",
                        hint="the agent or the guest is misbehaving",
                    )
                self._buffer.clear()
                skipping = True
            try:
                chunk = await asyncio.wait_for(self._reader.read(65536), deadline - loop.time())
            except TimeoutError:
                raise AgentTimeout("the guest agent did not reply in time") from None
            except OSError as err:
                raise AgentUnavailable(f"the guest-agent connection broke: {err}") from err
            if not chunk:
                raise AgentUnavailable(
                    "the guest agent closed the connection",
                    hint="QEMU may have stopped, or another client took the channel",
                )
            self._buffer += chunk

    # -- commands --------------------------------------------------------------------

    async def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run one command and return its (unvalidated) ``return`` value.

        Raises AgentCommandError when the agent answers with an error, AgentTimeout when
        no reply comes within ``timeout``; either way the connection is then reset.
        """
        async with self._lock:
            return await self._execute(command, arguments, timeout)

    async def _execute(self, command: str, arguments: dict[str, Any] | None, timeout: float | None) -> Any:
        limit = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        if self._writer is None:
            await self.connect(limit)
        self._serial += 1
        request_id = f"ff-{self._tag}-{self._serial}"
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        stale = 0
        try:
            await self._send(json.dumps(message).encode() + b"\n")
            while True:
                line = await self._read_line(deadline)
                reply = _parse_reply(line, command)
                if reply.get("id") != request_id:
                    stale += 1  # a late answer to an earlier, timed-out command
                    continue
                if "error" in reply:
                    error = _dict(reply["error"], f"{command} error")
                    raise AgentCommandError(
                        command,
                        _str(error, "class", command, default="GenericError"),
                        _str(error, "desc", command, default=""),
                    )
                return reply["return"]
        except AgentCommandError:
            raise
        except AgentTimeout as err:
            await self.close()
            note = f" ({stale} replies to other requests were discarded)" if stale else ""
            raise AgentTimeout(f"{command}: no reply from the guest agent within {limit:g}s{note}") from err
        except AgentError:
            await self.close()
            raise
        except BaseException:
            # Cancelled mid-read: the stream position is unknown, so start over next time.
            await self.close()
            raise

    async def ping(self, *, timeout: float | None = None) -> None:
        result = await self.execute("guest-ping", timeout=timeout)
        _dict(result, "guest-ping")

    async def info(self) -> AgentInfo:
        result = _dict(await self.execute("guest-info"), "guest-info")
        commands = {}
        for item in _list(result.get("supported_commands"), "guest-info supported_commands"):
            entry = _dict(item, "guest-info command")
            commands[_str(entry, "name", "guest-info")] = _bool(entry, "enabled", "guest-info")
        return AgentInfo(version=_str(result, "version", "guest-info"), commands=commands)

    async def fsfreeze_status(self, *, timeout: float | None = None) -> FreezeState:
        result = await self.execute("guest-fsfreeze-status", timeout=timeout)
        try:
            return FreezeState(result)
        except ValueError:
            raise AgentProtocolError(
                f"guest-fsfreeze-status returned {_preview(result)}, not 'thawed' or 'frozen'"
            ) from None

    async def fsfreeze_freeze(
        self, mountpoints: Sequence[str] | None = None, *, timeout: float | None = None
    ) -> int:
        """Freeze all file systems, or only ``mountpoints``; returns how many were frozen."""
        if mountpoints is None:
            result = await self.execute("guest-fsfreeze-freeze", timeout=timeout)
        else:
            result = await self.execute(
                "guest-fsfreeze-freeze-list", {"mountpoints": list(mountpoints)}, timeout=timeout
            )
        return _count(result, "guest-fsfreeze-freeze")

    async def fsfreeze_thaw(self, *, timeout: float | None = None) -> int:
        """Thaw every frozen file system; returns how many were thawed (0: none were frozen).
        Raises FreezeNotHeld when the guest had let go of the freeze already (Windows VSS)."""
        try:
            result = await self.execute("guest-fsfreeze-thaw", timeout=timeout)
        except AgentCommandError as err:
            if vss.held_too_long(err.desc):
                raise FreezeNotHeld(f"the guest could not hold the freeze until the thaw: {err.desc}") from err
            raise
        return _count(result, "guest-fsfreeze-thaw")

    async def osinfo(self) -> GuestOS:
        """What the guest says it runs (guest-get-osinfo; every field is optional)."""
        result = _dict(await self.execute("guest-get-osinfo"), "guest-get-osinfo")
        return GuestOS(**{field: _opt_str(result, key, "guest-get-osinfo") for field, key in (
            ("id", "id"), ("name", "name"), ("pretty_name", "pretty-name"), ("version", "version"),
            ("kernel_release", "kernel-release"), ("machine", "machine"))})

    async def get_fsinfo(self) -> list[GuestFilesystem]:
        found = []
        for item in _list(await self.execute("guest-get-fsinfo"), "guest-get-fsinfo"):
            entry = _dict(item, "guest-get-fsinfo entry")
            disks = []
            for raw in _list(entry.get("disk", []), "guest-get-fsinfo disk"):
                disk = _dict(raw, "guest-get-fsinfo disk")
                disks.append(
                    GuestDisk(
                        bus_type=_str(disk, "bus-type", "guest-get-fsinfo", default="unknown"),
                        dev=_opt_str(disk, "dev", "guest-get-fsinfo"),
                        serial=_opt_str(disk, "serial", "guest-get-fsinfo"),
                    )
                )
            found.append(
                GuestFilesystem(
                    name=_str(entry, "name", "guest-get-fsinfo"),
                    mountpoint=_str(entry, "mountpoint", "guest-get-fsinfo"),
                    type=_str(entry, "type", "guest-get-fsinfo"),
                    disks=tuple(disks),
                )
            )
        return found

    async def file_open(self, path: str, mode: str = "r") -> int:
        handle = await self.execute("guest-file-open", {"path": path, "mode": mode})
        if type(handle) is not int or handle < 0:
            raise AgentProtocolError(f"guest-file-open returned {_preview(handle)}, not a handle")
        return handle

    async def file_read(self, handle: int, count: int = FILE_CHUNK) -> tuple[bytes, bool]:
        result = _dict(
            await self.execute("guest-file-read", {"handle": handle, "count": count}), "guest-file-read"
        )
        claimed = _int(result, "count", "guest-file-read")
        eof = _bool(result, "eof", "guest-file-read")
        encoded = _str(result, "buf-b64", "guest-file-read", max_len=4 * count // 3 + 8)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as err:
            raise AgentProtocolError("guest-file-read returned invalid base64") from err
        if len(data) != claimed or len(data) > count:
            raise AgentProtocolError(
                f"guest-file-read returned {len(data)} bytes but claimed {claimed} (asked {count})"
            )
        return data, eof

    async def file_write(self, handle: int, data: bytes, *, timeout: float | None = None) -> int:
        result = _dict(
            await self.execute(
                "guest-file-write",
                {"handle": handle, "buf-b64": base64.b64encode(data).decode()},
                timeout=timeout,
            ),
            "guest-file-write",
        )
        written = _int(result, "count", "guest-file-write")
        if not 0 <= written <= len(data):
            raise AgentProtocolError(f"guest-file-write claims {written} bytes written of {len(data)}")
        return written

    async def file_close(self, handle: int) -> None:
        await self.execute("guest-file-close", {"handle": handle})

    async def file_seek(self, handle: int, offset: int, whence: str = "set") -> int:
        """Move the file position (``whence``: set, cur or end); returns the new position."""
        result = _dict(await self.execute("guest-file-seek", {"handle": handle, "offset": offset, "whence": whence}),
                       "guest-file-seek")
        position = _int(result, "position", "guest-file-seek")
        if position < 0:
            raise AgentProtocolError(f"guest-file-seek returned position {position}")
        return position

    async def run_command(self, path: str, args: Sequence[str] = (), *, timeout: float = 60.0,
                          max_output: int = 64 * 1024, stdin: bytes | None = None) -> tuple[int, bytes]:
        """Run a program in the guest (guest-exec) and wait for it: its exit code and its
        output (stdout then stderr, at most ``max_output`` bytes of each). Root in the guest:
        only for what the operator asked for (installing the hook runner)."""
        arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        started = _dict(await self.execute("guest-exec", arguments), "guest-exec")
        pid = _int(started, "pid", "guest-exec")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status = _dict(await self.execute("guest-exec-status", {"pid": pid}), "guest-exec-status")
            if _bool(status, "exited", "guest-exec-status"):
                break
            if loop.time() >= deadline:
                raise AgentTimeout(f"{path} did not finish in the guest within {timeout:g}s")
            await asyncio.sleep(0.1)
        code = status.get("exitcode", -1 if "signal" in status else 0)
        if type(code) is not int:
            raise AgentProtocolError(f"guest-exec-status: 'exitcode' should be an integer, got {_preview(code)}")
        output = b""
        for key in ("out-data", "err-data"):
            encoded = _str(status, key, "guest-exec-status", default="", max_len=self.max_message)
            try:
                output += base64.b64decode(encoded, validate=True)[:max_output]
            except (binascii.Error, ValueError) as err:
                raise AgentProtocolError(f"guest-exec-status returned invalid base64 in {key}") from err
        return code, output

    async def time_ns(self) -> int:
        """The guest's clock, in nanoseconds since the epoch."""
        value = await self.execute("guest-get-time")
        if type(value) is not int or value < 0:
            raise AgentProtocolError(f"guest-get-time returned {_preview(value)}, not a time")
        return value

    async def file_size(self, path: str) -> int:
        """The size of a guest file (its end, found by seeking); AgentCommandError when absent."""
        handle = await self.file_open(path, "r")
        try:
            return await self.file_seek(handle, 0, "end")
        finally:
            if self._writer is not None:
                await self.file_close(handle)

    async def read_from(self, path: str, offset: int, *, max_bytes: int) -> tuple[bytes, int, bool]:
        """What a guest file holds from ``offset`` on, at most ``max_bytes`` of it: returns
        the bytes, the offset they start at (0 when the file is now shorter than
        ``offset``: it was truncated or rotated), and whether more was left unread."""
        handle = await self.file_open(path, "r")
        data = bytearray()
        try:
            size = await self.file_seek(handle, 0, "end")
            start = offset if offset <= size else 0
            await self.file_seek(handle, start, "set")
            while len(data) < max_bytes:
                chunk, eof = await self.file_read(handle, min(FILE_CHUNK, max_bytes - len(data)))
                data += chunk
                if eof or not chunk:
                    return bytes(data), start, False
            return bytes(data), start, start + len(data) < size
        finally:
            if self._writer is not None:
                await self.file_close(handle)

    async def read_file(self, path: str, *, max_bytes: int = 1 << 20) -> bytes:
        """Read a whole guest file, refusing one larger than ``max_bytes``."""
        handle = await self.file_open(path, "r")
        data = bytearray()
        try:
            while True:
                chunk, eof = await self.file_read(handle, FILE_CHUNK)
                data += chunk
                if len(data) > max_bytes:
                    raise AgentProtocolError(f"guest file {path} is larger than {max_bytes} bytes")
                if eof or not chunk:
                    return bytes(data)
        finally:
            if self._writer is not None:
                await self.file_close(handle)


# -- validation of untrusted replies -----------------------------------------------------


def _parse_reply(line: bytes, command: str) -> dict[str, Any]:
    try:
        reply = json.loads(line.lstrip(_DELIMITER))
    except (ValueError, UnicodeDecodeError) as err:
        raise AgentProtocolError(
            f"{command}: the guest agent sent something that is not JSON: {_preview(line)}"
        ) from err
    if not isinstance(reply, dict) or ("return" in reply) == ("error" in reply):
        raise AgentProtocolError(
            f"{command}: the guest agent reply has neither or both of return/error: {_preview(reply)}"
        )
    return reply


def _preview(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AgentProtocolError(f"{what}: expected an object, got {_preview(value)}")
    return value


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise AgentProtocolError(f"{what}: expected a list, got {_preview(value)}")
    if len(value) > _MAX_ITEMS:
        raise AgentProtocolError(f"{what}: {len(value)} items is more than {_MAX_ITEMS}")
    return value


_MISSING = object()


def _str(obj: dict[str, Any], key: str, what: str, *, default: object = _MISSING,
         max_len: int = _MAX_STRING) -> str:
    value = obj.get(key, default)
    if value is _MISSING:
        raise AgentProtocolError(f"{what}: the reply has no {key!r}")
    if not isinstance(value, str):
        raise AgentProtocolError(f"{what}: {key!r} should be a string, got {_preview(value)}")
    if len(value) > max_len:
        raise AgentProtocolError(f"{what}: {key!r} is {len(value)} characters, more than {max_len}")
    return value


def _opt_str(obj: dict[str, Any], key: str, what: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key, what)


def _int(obj: dict[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if type(value) is not int:
        raise AgentProtocolError(f"{what}: {key!r} should be an integer, got {_preview(value)}")
    return value


def _bool(obj: dict[str, Any], key: str, what: str) -> bool:
    value = obj.get(key)
    if type(value) is not bool:
        raise AgentProtocolError(f"{what}: {key!r} should be true or false, got {_preview(value)}")
    return value


def _count(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_ITEMS:
        raise AgentProtocolError(f"{what} returned {_preview(value)}, not a file-system count")
    return value
