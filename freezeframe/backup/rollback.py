"""Restore onto existing images, writing only what differs (Veeam calls it Quick Rollback).

Rolling a disk back after a bad upgrade should cost the change, not the disk. Each chunk's
range of the existing image is read and hashed the way the repository names chunks (keyed
in an encrypted repository); a range whose hash is the chunk's id is left alone, any other
is written from the repository (a chunk of zeros: written as zeros, which the image may
keep as a hole). What is read is the whole image, once; what is written is what changed.

The image is opened through ``qemu-nbd`` (raw or qcow2 alike), which takes QEMU's image
lock: an image a running VM holds is refused, and nothing is written to it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.backup.pipeline import RESTORE_WORKERS, bounded_map
from freezeframe.backup.repository import DiskIndex, Repository
from freezeframe.errors import Conflict, InvalidInput, RepositoryError
from freezeframe.process import die_with_parent, stop_child


@dataclass(slots=True)
class RollbackReport:
    device: str
    image: str
    chunks_same: int = 0
    chunks_written: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


def image_format(path: Path) -> str:
    done = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise InvalidInput(f"{path} is not a disk image qemu-img can open: {done.stderr.strip()}")
    info: dict[str, Any] = json.loads(done.stdout)
    if info.get("backing-filename"):
        raise InvalidInput(f"{path} has a backing file: restore in place onto a standalone image")
    return str(info["format"])


@contextlib.contextmanager
def _opened(path: Path, fmt: str, connections: int) -> Iterator[str]:
    """``path`` served by qemu-nbd on a private socket, writable, to ``connections`` clients
    at once (one more would wait for a free one for ever); yields its URI."""
    with tempfile.TemporaryDirectory(prefix="ff-rollback-") as scratch:
        socket = Path(scratch) / "nbd.sock"
        ready = Path(scratch) / "nbd.pid"  # written once the image is open and served
        server = subprocess.Popen(["qemu-nbd", "--socket", str(socket), "--pid-file", str(ready), "--format", fmt,
                                   "--shared", str(connections), "--discard=unmap", "--cache=writeback",
                                   "--persistent", str(path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if server.poll() is not None:
                    why = server.stderr.read().strip() if server.stderr else ""
                    if "lock" in why:
                        raise Conflict(f"{path} is in use (is its VM still running?): {why}",
                                       hint="stop the VM first: an in-place restore needs the image to itself")
                    raise RepositoryError(f"qemu-nbd could not open {path}: {why}")
                if time.monotonic() > deadline:
                    raise RepositoryError(f"qemu-nbd did not serve {path} within 30s")
                time.sleep(0.02)
            yield f"nbd+unix:///?socket={socket}"
        finally:
            stop_child(server, timeout=60)


def roll_back(repo: Repository, index: DiskIndex, image: Path, *, workers: int = RESTORE_WORKERS,
              progress: Callable[[int], None] | None = None) -> RollbackReport:
    """Make ``image`` hold the disk ``index`` describes, writing only the chunks that differ."""
    import nbd  # Debian's python3-libnbd, linked into the venv

    fmt = image_format(image)
    report = RollbackReport(device=index.device, image=str(image))
    with _opened(image, fmt, workers + 1) as uri:  # a connection per worker, and this thread's
        handles: list[Any] = []
        local = threading.local()
        lock = threading.Lock()

        def handle() -> Any:
            if not hasattr(local, "nbd"):
                connection = nbd.NBD()
                connection.connect_uri(uri)
                local.nbd = connection
                with lock:
                    handles.append(connection)
            return local.nbd

        size = int(handle().get_size())
        if size != index.virtual_size:
            raise InvalidInput(f"{image} holds {size} bytes, the backup's disk {index.device} "
                               f"{index.virtual_size}: not an image of this disk")

        def one(position: int) -> tuple[int, int]:
            """Bytes read and bytes written for one chunk's range."""
            connection = handle()
            length = index.chunk_length(position)
            offset = position * index.chunk_size
            current = connection.pread(length, offset)
            wanted = index.chunks[position]
            if wanted is None:
                if current == bytes(length):
                    return length, 0
                connection.zero(length, offset)
                return length, length
            if repo.chunk_id(current) == wanted:
                return length, 0
            connection.pwrite(repo.get_chunk(wanted, length), offset)
            return length, length

        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ff-rollback") as pool:
                for _, (read, written) in bounded_map(pool, one, range(len(index.chunks)), 2 * workers):
                    report.bytes_read += read
                    report.bytes_written += written
                    if written:
                        report.chunks_written += 1
                    else:
                        report.chunks_same += 1
                    if progress is not None:
                        progress(report.bytes_read)
            handle().flush()
        finally:
            for connection in handles:
                with contextlib.suppress(nbd.Error):
                    connection.shutdown()
    return report
