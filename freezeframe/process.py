"""Who a process is, in a form another process (on this host or another) can check later:
the machine, its current boot, the PID namespace, the pid and when that pid started.

A pid alone names nothing: it is reused, and inside a container (its own PID namespace)
the same number means another process than outside it. The start time tells a reused pid
from the original, the boot id a pid of an earlier boot, and the namespace whether our
/proc can see it at all.

Also how a server this process starts goes with it (``die_with_parent``) and is stopped
(``stop_child``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Read once per process: neither changes while it runs.
_MACHINE_ID = Path("/etc/machine-id")
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot), or -1 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    # Field 22; the command name (field 2) may hold spaces, so count from its closing ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()[:64]
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    machine_id: str
    boot_id: str
    pid_namespace: str
    pid: int
    pid_start: int
    host: str

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(machine_id=_read(_MACHINE_ID), boot_id=_read(_BOOT_ID), pid_namespace=_pid_namespace(),
                   pid=pid, pid_start=start_time(pid), host=socket.gethostname())

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ProcessIdentity | None:
        """None when ``data`` is not one (an old or damaged record)."""
        if not isinstance(data, dict):
            return None
        try:
            return cls(machine_id=str(data["machine_id"])[:64], boot_id=str(data["boot_id"])[:64],
                       pid_namespace=str(data["pid_namespace"])[:64], pid=int(data["pid"]),
                       pid_start=int(data["pid_start"]), host=str(data["host"])[:255])
        except (KeyError, TypeError, ValueError):
            return None

    def gone(self) -> bool:
        """Certainly not running any more, as seen from this process: it ran on this machine
        and either in an earlier boot, or in our PID namespace and that pid is not the same
        process now. False whenever this process cannot tell (another machine, another
        namespace, no machine id)."""
        here = ProcessIdentity.current()
        if not self.machine_id or self.machine_id != here.machine_id:
            return False
        if self.boot_id and here.boot_id and self.boot_id != here.boot_id:
            return True
        if not self.pid_namespace or self.pid_namespace != here.pid_namespace:
            return False
        return start_time(self.pid) != self.pid_start


def stop_child(process: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """Stop a server this process started: SIGTERM, and SIGKILL if it has not gone within
    ``timeout`` seconds; reaped either way."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when this process dies (Linux's
    PR_SET_PDEATHSIG), so a server without an option of its own for it (qemu-nbd) is not
    left holding an image after this process was killed."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
