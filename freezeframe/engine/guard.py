"""The freeze guard: a process of its own that makes sure an instance is thawed even when
the process taking the snapshot dies (SIGKILL included) or hangs.

The engine arms it before the first freeze, with the snapshot, the instance's target and a
deadline, over a pipe to the guard's stdin, and disarms it after a confirmed thaw. The
guard acts when:

* its stdin reaches EOF without a disarm: the snapshot process is gone (the kernel closed
  the pipe). It thaws at once; the dead process has let go of the guest-agent channel.
* the deadline passes: the snapshot process is alive but stuck, and still holds the
  guest-agent channel (qemu-ga serves one client). The guard kills it, then thaws.

Either way it confirms the thaw, retrying until it can, and records in the catalog what
it did, so ``snapshot show`` tells the story. It runs in its own session, so a signal to
the snapshot process's group does not reach it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.errors import FreezeframeError, HypervisorError
from freezeframe.process import start_time

#: How long the guard keeps trying to thaw once it acts.
THAW_PATIENCE = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Arming:
    snapshot_id: str
    catalog: str
    owner_pid: int
    #: The owner's start time (/proc/PID/stat), so a reused pid is never killed.
    owner_start: int
    deadline_s: float  # seconds from arming
    kind: str  # "qemu", "libvirt" or "host"
    qga_socket: str | None = None
    qmp_socket: str | None = None
    mounts: tuple[str, ...] = ()
    libvirt_uri: str | None = None
    libvirt_domain: str | None = None


class Watcher:
    """The engine's handle on a watching process: the freeze guard, or a backup's sentinel.

    ``start`` launches it early, so that Python's start-up overlaps the run's preflight;
    ``arm`` hands it its task later and waits until it holds it. One never armed is let go
    with ``cancel``."""

    def __init__(self, process: subprocess.Popen[bytes], what: str, channel: socket.socket | None = None) -> None:
        self._process = process
        self.what = what
        self.armed = False
        self._channel = channel
        self._channel_lock = threading.Lock()

    @classmethod
    def start(cls, module: str, *, what: str, holds_fds: bool = False) -> Watcher:
        """Start ``python -m module`` in its own session (a signal to our group does not reach it).
        ``holds_fds``: give it a socket over which ``hold`` passes it file descriptors."""
        ours, theirs = socket.socketpair() if holds_fds else (None, None)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *([str(theirs.fileno())] if theirs else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True, pass_fds=[theirs.fileno()] if theirs else [],
            )
        finally:
            if theirs is not None:
                theirs.close()
        return cls(process, what, ours)

    def hold(self, fd: int) -> None:
        """Have the watcher keep a duplicate of ``fd`` open until it exits, so what ``fd``
        connects to outlives this process (see sentinel.py on why). Best effort: a watcher
        that is gone cannot hold anything, and ``confirm`` reports it."""
        if self._channel is None:
            raise ValueError(f"{self.what} was started without a channel for file descriptors")
        with self._channel_lock, contextlib.suppress(OSError):
            socket.send_fds(self._channel, [b"h"], [fd])

    def arm(self, payload: dict[str, Any]) -> None:
        """Hand over the task and wait for 'armed'. Raises when the process does not hold it."""
        self.send(payload)
        self.confirm()

    def send(self, payload: dict[str, Any]) -> None:
        """Hand over the task without waiting: ``confirm`` before relying on it, so the
        watcher's start-up overlaps whatever comes in between."""
        process = self._process
        assert process.stdin is not None
        try:
            process.stdin.write(json.dumps(payload).encode() + b"\n")
            process.stdin.flush()
        except OSError:
            pass  # it died: ``confirm`` finds out

    def confirm(self) -> None:
        """Wait for 'armed' (at once when already confirmed). Raises when the process does not hold its task."""
        if self.armed:
            return
        process = self._process
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        if not ready or process.stdout.readline().strip() != b"armed":
            process.kill()
            raise HypervisorError(f"{self.what} did not start; not going on without it")
        self.armed = True

    def cancel(self) -> None:
        """Let an unarmed watcher go: it reads no task and exits."""
        with contextlib.suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        self._let_go()

    def release(self) -> None:
        """Hand over: close the pipe without disarming, and the guard thaws now."""
        with contextlib.suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.close()

    def disarm(self) -> None:
        """Call only after a confirmed thaw."""
        process = self._process
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            process.stdin.write(b"disarm\n")
            process.stdin.flush()
            process.stdin.close()
        self._let_go()

    def _let_go(self) -> None:
        """Not waited for: it exits by itself once it has read the pipe, and the run
        need not spend tens of milliseconds (a Python start-up, at worst) watching it go.
        ``subprocess`` reaps it later."""
        if self._channel is not None:
            self._channel.close()
        self._process.poll()


# -- the guard process ---------------------------------------------------------------------


def wait_for_owner(deadline: float) -> str:
    """In the watching process: read stdin until 'disarm' or EOF (the owner died) or the
    monotonic ``deadline``; returns 'disarm', 'eof' or 'deadline'."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "deadline"
        ready, _, _ = select.select([sys.stdin], [], [], None if remaining == float("inf") else remaining)
        if ready:
            line = sys.stdin.readline()
            if not line:
                return "eof"
            if line.strip() == "disarm":
                return "disarm"


def _kill_owner(pid: int, started: int) -> bool:
    """Kill the stuck snapshot process, if it still is that process (not a reused pid)."""
    if start_time(pid) != started:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if start_time(pid) != started:
            break
        time.sleep(0.05)
    return True


async def _thaw_guest(socket: str) -> int:
    from freezeframe.agent.qga import GuestAgent

    @contextlib.asynccontextmanager
    async def agent() -> AsyncIterator[Any]:
        async with GuestAgent(socket, timeout=10) as connected:
            yield connected

    return await _thaw_through(agent)


async def _thaw_libvirt(uri: str, domain: str) -> int:
    from freezeframe.targets.libvirt import LibvirtTarget

    @contextlib.asynccontextmanager
    async def agent() -> AsyncIterator[Any]:
        async with LibvirtTarget(uri=uri, domain=domain) as target:
            yield await target.connect_agent(10, 10)

    return await _thaw_through(agent)


async def _thaw_through(agent: Callable[[], contextlib.AbstractAsyncContextManager[Any]]) -> int:
    """Thaw through a fresh agent connection each try, until the guest says it is thawed."""
    import asyncio

    from freezeframe.agent.qga import FreezeState

    last: Exception | None = None
    end = time.monotonic() + THAW_PATIENCE
    while time.monotonic() < end:
        try:
            async with agent() as connected:
                thawed = 0
                if await connected.fsfreeze_status() is FreezeState.FROZEN:
                    thawed = await connected.fsfreeze_thaw()
                if await connected.fsfreeze_status() is FreezeState.THAWED:
                    return int(thawed)
        except FreezeframeError as err:
            last = err
        await asyncio.sleep(0.5)
    raise HypervisorError(f"could not thaw the guest: {last}")


def _thaw_host(mounts: tuple[str, ...]) -> int:
    from freezeframe.targets.host import FITHAW, fs_ioctl

    thawed = 0
    for mountpoint in reversed(mounts):
        with contextlib.suppress(OSError):
            if fs_ioctl(mountpoint, FITHAW):
                thawed += 1
    return thawed


async def _adopt(arming: Arming) -> tuple[list[Any], list[str]]:
    if arming.kind == "libvirt":
        from freezeframe.targets.libvirt import LibvirtTarget

        assert arming.libvirt_uri is not None
        assert arming.libvirt_domain is not None
        async with LibvirtTarget(uri=arming.libvirt_uri, domain=arming.libvirt_domain) as domain:
            return await domain.adopt(arming.snapshot_id)
    from freezeframe.targets.qemu import QemuTarget

    assert arming.qmp_socket is not None
    async with QemuTarget(qmp_socket=arming.qmp_socket, qga_socket=None) as target:
        return await target.adopt(arming.snapshot_id)


def _record(arming: Arming, text: str, disks: list[Any] | None = None) -> None:
    """Note what the guard did; a record still being created is one whose run died: failed."""
    from freezeframe.catalog.store import Catalog, utc_now
    from freezeframe.model import SnapshotState

    with Catalog.open(Path(arming.catalog)) as catalog:
        snap = catalog.snapshot(arming.snapshot_id)
        snap.manifest.setdefault("events", []).append({"at": utc_now(), "event": f"guard: {text}"})
        if disks:
            snap.disks = disks
        if snap.state is SnapshotState.CREATING:
            snap.state = SnapshotState.FAILED
            snap.achieved_level = None
            snap.error = text
        elif snap.error is None:
            snap.error = text
        catalog.save_snapshot(snap)


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 0  # cancelled before it was armed: nothing to watch
    data = json.loads(line)
    arming = Arming(**{**data, "mounts": tuple(data.get("mounts", ()))})
    print("armed", flush=True)
    started = time.monotonic()
    why = wait_for_owner(started + arming.deadline_s)
    if why == "disarm":
        return 0
    if why == "deadline":
        killed = _kill_owner(arming.owner_pid, arming.owner_start)
        cause = (f"the freeze outlived its deadline of {arming.deadline_s:g}s"
                 + ("; the stuck snapshot process was killed" if killed else ""))
    else:
        cause = "the snapshot process died while the instance was frozen"
    # Imported only now: the run waits for "armed", so waiting needs as little as it can.
    import asyncio

    try:
        if arming.kind == "host":
            thawed = _thaw_host(arming.mounts)
        elif arming.kind == "libvirt":
            assert arming.libvirt_uri is not None
            assert arming.libvirt_domain is not None
            thawed = asyncio.run(_thaw_libvirt(arming.libvirt_uri, arming.libvirt_domain))
        else:
            assert arming.qga_socket is not None
            thawed = asyncio.run(_thaw_guest(arming.qga_socket))
    except FreezeframeError as err:
        _record(arming, f"{cause}; the guard could not thaw it: {err}")
        return 1
    after = time.monotonic() - started
    text = f"{cause}; the guard thawed {thawed} file systems {after:.1f}s after arming"
    disks: list[Any] = []
    if (arming.kind == "qemu" and arming.qmp_socket) or arming.kind == "libvirt":
        # Only now: the thaw comes first, then the bookkeeping.
        try:
            disks, removed = asyncio.run(_adopt(arming))
        except FreezeframeError as err:
            text += f"; what the run left in the VM could not be checked: {err}"
        else:
            if disks:
                text += (f"; the snapshot had been taken ({len(disks)} disks): its copies are kept in this record "
                         "(delete it to merge them back)")
            if removed:
                text += f"; removed {len(removed)} overlays that were prepared but never used"
    _record(arming, text, disks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
