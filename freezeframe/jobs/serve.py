"""Serving a backup's disks over NBD: nbdkit, with freezeframe's plugin
(``backup/nbd_plugin.py``), read-only on a unix socket, straight from the repository.

What people and tools connect to (``qemu-img``, ``nbdcopy``, ``guestfish``), and what a
live restore and a file restore read from. nbdkit is a real NBD server made for this (the
protocol, its options, many connections, block status); the plugin only reads chunks.
nbdkit runs in the foreground as a child of the process that starts it and exits with it
(``--exit-with-parent``), so a served backup never outlives what asked for it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket as sockets
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import freezeframe
from freezeframe.backup.repository import RepoIdentity
from freezeframe.errors import FreezeframeError, InvalidInput
from freezeframe.process import stop_child

PLUGIN = Path(__file__).resolve().parents[1] / "backup" / "nbd_plugin.py"
#: How long nbdkit may take to open the repository and listen.
START_TIMEOUT_S = 60.0


class ServeError(FreezeframeError):
    exit_code = 10


@dataclass(slots=True)
class Served:
    socket: Path
    exports: list[str]
    log: Path
    pid: int
    process: subprocess.Popen[bytes] = field(repr=False)

    def uri(self, device: str | None = None) -> str:
        """The NBD URI of one disk (default: the first)."""
        return f"nbd+unix:///{quote(device or self.exports[0])}?socket={quote(str(self.socket))}"

    def describe(self) -> dict[str, object]:
        return {"socket": str(self.socket), "pid": self.pid, "log": str(self.log),
                "exports": {device: self.uri(device) for device in self.exports}}


@dataclass(frozen=True, slots=True)
class ServeRequest:
    location: str
    backup: str
    devices: list[str]
    identity: RepoIdentity | None = None
    passphrase: bytes | None = None
    cache_mib: int = 256
    read_ahead: int = 4
    #: Seconds a read waits for an unreachable repository before it fails.
    wait_s: float = 0.0
    log_level: str | None = None


@functools.cache
def _nbdkit() -> str:
    found = shutil.which("nbdkit")
    if found is None or subprocess.run([found, "python", "--version"], capture_output=True).returncode != 0:
        raise ServeError("serving a backup needs nbdkit and its Python plugin",
                         hint="apt install nbdkit nbdkit-plugin-python")
    return found


def _python_path() -> str:
    """Where nbdkit's embedded Python finds freezeframe and the libraries it uses (the
    ones this process runs with: same minor version, so the same compiled modules)."""
    paths = [str(Path(freezeframe.__file__).resolve().parents[1]), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"]]
    return os.pathsep.join(dict.fromkeys(paths))


def _listening(path: Path) -> bool:
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


@contextmanager
def serve(request: ServeRequest, socket: Path, log: Path) -> Iterator[Served]:
    """nbdkit serving ``request`` on ``socket`` while the block runs; stopped after it."""
    if not request.devices:
        raise InvalidInput("no disk to serve")
    if socket.exists():
        _outlive_orphan(socket)
        if _listening(socket):
            raise ServeError(f"{socket} is in use by another server", hint="give another --socket")
        socket.unlink(missing_ok=True)
    socket.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    # nbdkit writes its pid file once it listens: the sign it is ready (a probe connection
    # would leave a broken handshake in its log).
    ready = socket.with_name(socket.name + ".pid")
    ready.unlink(missing_ok=True)
    args = [_nbdkit(), "--foreground", "--exit-with-parent", "--readonly", "--unix", str(socket),
            "--pidfile", str(ready),
            "python", str(PLUGIN), f"repo={request.location}", f"backup={request.backup}",
            f"disks={','.join(request.devices)}", f"cache={request.cache_mib}",
            f"read-ahead={request.read_ahead}", f"wait={request.wait_s}", f"log-file={log}"]
    if request.log_level:
        args.append(f"log-level={request.log_level}")
    if request.identity is not None:
        args.append(f"identity={json.dumps(asdict(request.identity))}")
    fds: tuple[int, ...] = ()
    read_end = None
    if request.passphrase is not None:
        read_end, write_end = os.pipe()
        os.write(write_end, request.passphrase)  # a passphrase fits the pipe's buffer
        os.close(write_end)
        args.append(f"passphrase-fd={read_end}")
        fds = (read_end,)
    env = {**os.environ, "PYTHONPATH": _python_path(), "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log, "ab") as err:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                   pass_fds=fds)
    if read_end is not None:
        os.close(read_end)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if process.poll() is not None:
                raise ServeError(f"nbdkit stopped before it served backup {request.backup[:8]}: "
                                 f"{_tail(log)}", hint=f"see {log}")
            if time.monotonic() > deadline:
                raise ServeError(f"nbdkit did not listen on {socket} within {START_TIMEOUT_S:.0f}s",
                                 hint=f"see {log}")
            time.sleep(0.05)
        yield Served(socket, list(request.devices), log, process.pid, process)
    finally:
        stop_child(process)
        ready.unlink(missing_ok=True)
        if socket.exists() and not _listening(socket):
            socket.unlink(missing_ok=True)


def _outlive_orphan(socket: Path, grace_s: float = 5.0) -> None:
    """Stop a server of ours left on ``socket`` by a process that was killed (a live
    restore to resume). It was told to exit with its parent, but nbdkit lets the clients
    it serves finish first, and a QEMU attached to it never does: after a grace period it
    is killed (it only read). Only a process whose command line is ours for this socket,
    and whose parent is gone, is touched."""
    try:
        pid = int(socket.with_name(socket.name + ".pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return
    ours = str(PLUGIN).encode() in cmdline and str(socket).encode() in cmdline
    orphaned = parent in (0, 1) or not Path(f"/proc/{parent}").exists()
    if not (ours and orphaned):
        return
    deadline = time.monotonic() + grace_s
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " / ".join(text[-lines:]) or "(nothing logged)"
