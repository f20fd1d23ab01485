"""Who holds a QEMU chardev socket (QMP, the guest agent) when a connection gets no answer.

QEMU serves one client per QMP or agent socket. While one is connected, QEMU accepts no
other: the kernel still completes a second client's ``connect()`` and queues it, so that
client waits for a greeting (QMP) or a sync reply (agent) that never comes. From inside
the connection this looks exactly like a hung QEMU or a guest without qemu-ga, so the
error would point the operator the wrong way. The listening socket's queue tells them
apart: connections waiting there mean QEMU is busy with another client. ``ss`` (iproute2)
reads it, and the established connection on QEMU's side names the holder's socket, whose
owner ``ss -p`` shows.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

_SS_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Socket:
    state: str
    queued: int  # Recv-Q: for a listener, connections not yet accepted
    local: str
    inode: str
    peer_inode: str
    users: str  # ss -p's users:(("name",pid=N,fd=M)), or ""


@dataclass(frozen=True, slots=True)
class Held:
    """The socket at ``path`` has connections QEMU has not accepted."""

    path: str
    queued: int
    #: The processes holding QEMU's one accepted connection, as ``name (pid N)``.
    holders: tuple[str, ...]

    def describe(self, what: str) -> str:
        who = f": {', '.join(self.holders)} is connected" if self.holders else ""
        return (f"the {what} socket {self.path} is held by another client? QEMU serves one client per "
                f"socket{who}, and {self.queued} connection(s) wait unaccepted behind it")

    @property
    def hint(self) -> str:
        return f"find the client with: ss -xp | grep {self.path}; close it, or wait until it is done"


def held(path: str) -> Held | None:
    """Whether QEMU's listening socket at ``path`` has connections waiting; None when it
    has none, or when ``ss`` cannot tell."""
    sockets = _sockets()
    listener = next((s for s in sockets if s.local == path and s.state == "LISTEN"), None)
    if listener is None or listener.queued == 0:
        return None
    accepted = {s.peer_inode for s in sockets if s.local == path and s.state == "ESTAB"}
    holders = tuple(sorted({_user(s.users) for s in sockets if s.inode in accepted and s.users}))
    return Held(path=path, queued=listener.queued, holders=holders)


def _sockets() -> list[Socket]:
    try:
        done = subprocess.run(["ss", "-xapH"], capture_output=True, text=True, timeout=_SS_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in done.stdout.splitlines():
        parsed = _parse(line)
        if parsed is not None:
            found.append(parsed)
    return found


def _parse(line: str) -> Socket | None:
    """One line of ``ss -xapH``: netid, state, Recv-Q, Send-Q, local address and port
    (the inode), peer address and port, then the users. The path may hold spaces, so the
    fields after it are taken from the end."""
    users = ""
    at = line.find(" users:(")
    if at >= 0:
        line, users = line[:at], line[at + 1:].strip()
    head = line.split(None, 4)
    if len(head) < 5 or not head[0].startswith("u_"):
        return None
    rest = head[4].rsplit(None, 3)
    if len(rest) != 4 or not head[2].isdigit():
        return None
    local, inode, _peer, peer_inode = rest
    return Socket(state=head[1], queued=int(head[2]), local=local, inode=inode, peer_inode=peer_inode, users=users)


def _user(users: str) -> str:
    """``users:(("python3",pid=1044,fd=3))`` -> ``python3 (pid 1044)`` (the first one)."""
    try:
        name = users.split('"', 2)[1]
        pid = users.split("pid=", 1)[1].split(",", 1)[0].split(")", 1)[0]
    except IndexError:
        return users
    return f"{name} (pid {pid})"
