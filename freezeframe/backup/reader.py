"""Reading a disk over NBD with libnbd: block status first, then only the chunks needed,
over several connections at once.

libnbd's Python module comes from Debian (``python3-libnbd``), not PyPI; the Makefile
makes the virtualenv see it. Its calls release the GIL while they wait, so threads, one
connection each, read in parallel.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Any

from freezeframe.errors import HypervisorError

try:
    import nbd
except ImportError:  # pragma: no cover - depends on the machine
    nbd = None

ALLOCATION = "base:allocation"
_STATE_ZERO = 2  # NBD_STATE_ZERO: reads as zeros (holes have it too)
_DIRTY = 1  # qemu:dirty-bitmap: the block changed
#: One block status request covers at most this much (servers may answer less).
_STATUS_SPAN = 1 << 30


class Need(enum.Enum):
    """What to do with one chunk of a disk."""

    ZERO = "zero"  # nothing allocated: stored as nothing
    READ = "read"
    KEEP = "keep"  # unchanged since the parent: its entry is reused without reading


def _require_nbd() -> Any:
    if nbd is None:
        raise HypervisorError(
            "libnbd's Python module (nbd) is not importable",
            hint="install python3-libnbd and run make setup, which links it into the virtualenv")
    return nbd


class NbdExport:
    """One read-only NBD export on a unix socket; a connection per thread."""

    def __init__(self, socket: str, export: str, on_connect: Callable[[int], None] | None = None) -> None:
        """``on_connect`` gets the socket of every connection made (to keep it open elsewhere)."""
        self.socket = socket
        self.export = export
        self._on_connect = on_connect
        self._local = threading.local()
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self.size = self.handle().get_size()

    def _connect(self, contexts: tuple[str, ...] = ()) -> Any:
        module = _require_nbd()
        handle = module.NBD()
        handle.set_export_name(self.export)
        for context in contexts:
            handle.add_meta_context(context)
        try:
            handle.connect_unix(self.socket)
        except module.Error as err:
            raise HypervisorError(f"cannot read NBD export {self.export} at {self.socket}: {err}") from err
        if self._on_connect is not None:
            self._on_connect(handle.aio_get_fd())
        with self._lock:
            self._handles.append(handle)
        return handle

    def handle(self) -> Any:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = self._connect()
        return handle

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return bytes(self.handle().pread(length, offset))
        except Exception as err:  # nbd.Error, and libnbd reports a dropped socket as others
            raise HypervisorError(f"reading {length} bytes at {offset} of export {self.export} failed: {err}") from err

    def extents(self, context: str) -> list[tuple[int, int, int]]:
        """(offset, length, flags) over the whole disk for one meta context."""
        handle = self._connect((context,))
        if not handle.can_meta_context(context):
            raise HypervisorError(f"the NBD export {self.export} does not offer {context}")
        found: list[tuple[int, int, int]] = []
        offset = 0
        while offset < self.size:
            answered = offset

            def collect(meta: str, start: int, entries: list[int], err: Any) -> int:
                nonlocal answered
                if meta != context:
                    return 0
                position = start
                for i in range(0, len(entries) - 1, 2):
                    length = min(entries[i], self.size - position)
                    if length <= 0:
                        break
                    found.append((position, length, entries[i + 1]))
                    position += length
                answered = max(answered, position)
                return 0

            try:
                handle.block_status(min(_STATUS_SPAN, self.size - offset), offset, collect)
            except Exception as err:
                raise HypervisorError(f"block status of export {self.export} failed: {err}") from err
            if answered <= offset:
                raise HypervisorError(f"the NBD server answered no block status at offset {offset}")
            offset = answered
        return found

    def close(self) -> None:
        """Let go of every connection. Call it after the export is deleted: the server has
        closed them then, and no disconnect request is sent (see engine/backup.py on why
        QEMU must be the one to close). libnbd closes the sockets when the handles go."""
        with self._lock:
            self._handles = []
        self._local = threading.local()



def plan_chunks(size: int, chunk_size: int, allocation: list[tuple[int, int, int]],
                dirty: list[tuple[int, int, int]] | None) -> list[Need]:
    """For each chunk: ZERO when nothing in it reads as data; with ``dirty`` (an
    incremental), KEEP when nothing in it changed; else READ."""
    count = -(-size // chunk_size)
    data = bytearray(count)
    for offset, length, flags in allocation:
        if not flags & _STATE_ZERO:
            data[offset // chunk_size:(offset + length - 1) // chunk_size + 1] = b"\x01" * (
                (offset + length - 1) // chunk_size + 1 - offset // chunk_size)
    changed = bytearray(b"\x01" * count) if dirty is None else bytearray(count)
    for offset, length, flags in dirty or ():
        if flags & _DIRTY:
            first, last = offset // chunk_size, (offset + length - 1) // chunk_size
            changed[first:last + 1] = b"\x01" * (last + 1 - first)
    return [Need.KEEP if not changed[i] else Need.READ if data[i] else Need.ZERO for i in range(count)]
