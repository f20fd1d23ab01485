"""The backup sentinel: a process of its own that takes a backup's fleecing view out of
the VM when the backup process dies (SIGKILL included) before it could.

The backup hands it the ``Layout`` (every name the backup will create) and confirms it is
armed before it creates anything in the VM, and disarms it after its own teardown. On EOF without a
disarm it reaches the VM (QMP: the dead process's connection is gone, so QEMU accepts a
new one; or libvirt), removes the export, the job, the fleecing nodes and files and the
bitmaps (checkpoints) the backup started, and marks the backup failed in the catalog. The bitmap of the last good
backup is left recording, so the next backup still sees every change.

It also holds a duplicate of every NBD connection the backup opens (``Watcher.hold``), so
that a backup process that dies does not close them: QEMU 7.2 aborts, and the VM with it,
when a client of an export of a disk in an iothread disconnects first
("nbd_blockdev_client_closed: Assertion `qemu_in_main_thread() && nbd_server' failed").
The teardown deletes the exports, QEMU closes the connections itself, and only then does
the sentinel exit and let go of its duplicates.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freezeframe.engine.guard import Watcher, wait_for_owner
from freezeframe.errors import FreezeframeError

if TYPE_CHECKING:
    from freezeframe.targets.fleecing import Layout

#: How long the sentinel keeps trying to reach QMP (the guard may hold it for a moment).
PATIENCE = 60.0


def start() -> Watcher:
    """Start a sentinel process; hand it its task with ``send`` once the layout is known."""
    return Watcher.start("freezeframe.engine.sentinel", what="the backup sentinel", holds_fds=True)


#: The NBD connections the backup handed over (file descriptors), held until the teardown
#: has deleted the exports.
_held: list[int] = []


def _hold_fds(channel_fd: int) -> None:
    """In a thread: keep every file descriptor the backup passes."""
    import socket

    channel = socket.socket(fileno=channel_fd)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 1, 16)
        except OSError:
            return
        _held.extend(fds)
        if not message:
            return  # the backup closed its end


def _let_go() -> None:
    """Close the held connections: QEMU has closed them from its side (see ``teardown``)."""
    import os

    while _held:
        with contextlib.suppress(OSError):
            os.close(_held.pop())


def send(watcher: Watcher, catalog: Path, layout: Layout) -> None:
    """Hand the sentinel its task; ``watcher.confirm()`` before anything is created in the VM."""
    watcher.send({"catalog": str(catalog), "layout": layout.to_json()})


async def _teardown(layout: Layout) -> list[str]:
    import asyncio

    from freezeframe.targets.backup_source import source_of

    source = source_of(layout, timeout=10)
    last: Exception | None = None
    end = time.monotonic() + PATIENCE
    while time.monotonic() < end:
        try:
            return await source.teardown(layout, success=False, exports_deleted=_let_go)
        except FreezeframeError as err:
            last = err
            await asyncio.sleep(0.5)
    return [f"QMP could not be reached: {last}"]


def _record(catalog: str, backup_id: str, text: str) -> None:
    from freezeframe.catalog.store import Catalog
    from freezeframe.model import BackupState

    with Catalog.open(Path(catalog)) as cat:
        backup = cat.backup(backup_id)
        if backup.state is BackupState.CREATING:
            backup.state = BackupState.FAILED
            backup.error = text
            cat.save_backup(backup)


def main() -> int:
    # Only what waiting needs is imported before "armed": the backup waits for that word.
    # The payload comes from our own backup process, so it is parsed when it is needed.
    line = sys.stdin.readline()
    if not line:
        return 0  # cancelled before it was armed: nothing to watch
    data: dict[str, Any] = json.loads(line)
    if len(sys.argv) > 1:
        import threading

        threading.Thread(target=_hold_fds, args=(int(sys.argv[1]),), daemon=True).start()
    print("armed", flush=True)
    if wait_for_owner(float("inf")) == "disarm":
        return 0
    import asyncio

    from freezeframe.targets.fleecing import Layout

    layout = Layout.from_json(data["layout"])
    problems = asyncio.run(_teardown(layout))
    text = "interrupted: the backup process died; the sentinel removed its fleecing view from the VM"
    if problems:
        text += f" (not all of it: {'; '.join(problems)})"
    try:
        _record(data["catalog"], layout.backup_id, text)
    except FreezeframeError:
        return 1
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
