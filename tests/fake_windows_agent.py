"""A fake qemu-ga for Windows at the socket seam: this machine cannot run Windows, so this
answers freezeframe exactly as qemu-ga for Windows does, and only what the Windows tests
need. Every answer below comes from qemu-ga's own Windows sources (QEMU 7.2 to 9.x):

* ``qga/commands-win32.c``: ``qmp_guest_fsfreeze_status/freeze/thaw`` answer
  ``QERR_UNSUPPORTED`` ("this feature or command is not currently supported") when
  ``vss_initialized()`` is false (no usable VSS provider); a failed freeze thaws before it
  answers; the thaw always unsets the frozen state (``ga_unset_frozen``).
* ``qga/vss-win32/requester.cpp``: ``requester_freeze`` reports the failing step ("failed
  to initialize for backup", "failed to add %S to snapshot set", ...); ``requester_thaw``
  answers "couldn't hold writes: fsfreeze is limited up to 10 seconds" on
  ``VSS_E_HOLD_WRITES_TIMEOUT`` (VSS holds writes for ``VSS_TIMEOUT_FREEZE_MSEC`` = 10000).
* ``util/error.c`` (``error_setg_win32_internal``): the Windows error text follows ": ";
  for VSS codes Windows has no text and QEMU writes "unknown Windows error 0x%x".
* ``qga/main.c``: frozen, the agent disables every command but the fsfreeze ones and a few
  others, answering "Command %s has been disabled" (class CommandNotFound).
* ``guest-get-osinfo`` on Windows reports id ``mswindows``; volumes are named "C:\\".

The protocol part (0xFF resets the parser, ``guest-sync-delimited`` answers after a 0xFF)
is the same on every platform. The fake keeps a log of the commands it was sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

HOLD_LIMIT_S = 10.0  # VSS_TIMEOUT_FREEZE_MSEC / 1000
UNSUPPORTED = "this feature or command is not currently supported"  # QERR_UNSUPPORTED
HOLD_TIMEOUT = ("couldn't hold writes: fsfreeze is limited up to 10 seconds: "
                "unknown Windows error 0x80042314")  # VSS_E_HOLD_WRITES_TIMEOUT
SERVICE_DISABLED = ("failed to initialize for backup: The service cannot be started, either because it is "
                    "disabled or because it has no enabled devices associated with it.")
NOT_REGISTERED = "failed to add C:\\ to snapshot set: unknown Windows error 0x80042304"  # PROVIDER_NOT_REGISTERED
ALWAYS_ENABLED = {"guest-sync", "guest-sync-delimited", "guest-ping", "guest-info", "guest-fsfreeze-status",
                  "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw"}
COMMANDS = sorted(ALWAYS_ENABLED | {"guest-get-osinfo", "guest-get-fsinfo", "guest-file-open", "guest-file-read",
                                    "guest-file-close", "guest-exec", "guest-shutdown"})

OSINFO = {
    "id": "mswindows", "name": "Microsoft Windows", "pretty-name": "Windows Server 2022 Standard",
    "version": "Microsoft Windows Server 2022", "version-id": "2022", "variant": "server",
    "variant-id": "server", "kernel-release": "20348", "kernel-version": "10.0", "machine": "x86_64",
}
FSINFO = [{
    "name": "\\\\?\\Volume{5c2a0c3e-0000-0000-0000-100000000000}\\", "mountpoint": "C:\\", "type": "NTFS",
    "total-bytes": 42947571712, "used-bytes": 15032385536,
    "disk": [{"pci-controller": {"domain": 0, "bus": 0, "slot": 4, "function": 0}, "bus-type": "scsi", "bus": 0,
              "target": 0, "unit": 0, "dev": "\\\\.\\PhysicalDrive0", "serial": "ffdata0"}],
}]


class FakeWindowsAgent:
    """``mode``: "vss" (a working VSS provider), "no-provider" (qemu-ga without its
    provider), "service-disabled", "not-registered". ``guest_seconds``: guest time one
    freeze takes on top of the real time (a guest whose VSS writers are slow)."""

    def __init__(self, socket_path: Path, *, mode: str = "vss", guest_seconds: float = 0.0) -> None:
        self.socket_path = socket_path
        self.mode = mode
        self.guest_seconds = guest_seconds
        self.frozen_at: float | None = None
        self.log: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def frozen(self) -> bool:
        return self.frozen_at is not None

    def __enter__(self) -> FakeWindowsAgent:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake agent did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.socket_path.unlink(missing_ok=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_unix_server(self._client, path=str(self.socket_path)))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while chunk := await reader.read(4096):
                buffer += chunk
                while b"\xff" in buffer:  # 0xFF: drop what came before, answer with a parse error
                    buffer = buffer.split(b"\xff", 1)[1]
                    await self._send(writer, {"error": {"class": "GenericError", "desc": "Invalid JSON syntax"}})
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        await self._answer(writer, json.loads(line))
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, reply: dict[str, Any], prefix: bytes = b"") -> None:
        writer.write(prefix + json.dumps(reply).encode() + b"\n")
        await writer.drain()

    async def _answer(self, writer: asyncio.StreamWriter, request: dict[str, Any]) -> None:
        command = request.get("execute", "")
        self.log.append(command)
        args = request.get("arguments") or {}
        if command == "guest-sync-delimited":
            await self._send(writer, {"return": args["id"]}, prefix=b"\xff")
            return
        try:
            result = self._execute(command, args)
            reply: dict[str, Any] = {"return": result}
        except _AgentError as err:
            reply = {"error": {"class": err.error_class, "desc": err.desc}}
        if "id" in request:
            reply["id"] = request["id"]
        await self._send(writer, reply)

    def _execute(self, command: str, args: dict[str, Any]) -> Any:
        if self.frozen and command not in ALWAYS_ENABLED:
            raise _AgentError(f"Command {command} has been disabled", "CommandNotFound")
        vss_ready = self.mode != "no-provider"
        if command == "guest-sync":
            return args["id"]
        if command == "guest-ping":
            return {}
        if command == "guest-info":
            return {"version": "9.2.0", "supported_commands": [
                {"name": name, "enabled": True, "success-response": name != "guest-shutdown"} for name in COMMANDS]}
        if command == "guest-get-osinfo":
            return OSINFO
        if command == "guest-get-fsinfo":
            return FSINFO
        if command == "guest-file-open":
            raise _AgentError(f"failed to open file '{args.get('path')}': The system cannot find the path specified.")
        if command == "guest-fsfreeze-status":
            if not vss_ready:
                raise _AgentError(UNSUPPORTED)
            return "frozen" if self.frozen else "thawed"
        if command in ("guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list"):
            if not vss_ready:
                raise _AgentError(UNSUPPORTED)
            if self.mode == "service-disabled":
                raise _AgentError(SERVICE_DISABLED)  # thawed and aborted before answering
            if self.mode == "not-registered":
                raise _AgentError(NOT_REGISTERED)
            if self.frozen:
                return 0  # requester_freeze: "already frozen"
            self.frozen_at = time.monotonic()
            return 1
        if command == "guest-fsfreeze-thaw":
            if not vss_ready:
                raise _AgentError(UNSUPPORTED)
            if self.frozen_at is None:
                return 0
            held = time.monotonic() - self.frozen_at + self.guest_seconds
            self.frozen_at = None  # ga_unset_frozen, whatever VSS said
            if held > HOLD_LIMIT_S:
                raise _AgentError(HOLD_TIMEOUT)
            return 1
        raise _AgentError(f"The command {command} has not been found", "CommandNotFound")


class _AgentError(Exception):
    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
