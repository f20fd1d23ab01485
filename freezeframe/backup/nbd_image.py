"""A disk image opened writable through ``qemu-nbd``, for restores that write into it.

One way in for every format QEMU knows (raw, qcow2): a restore to qcow2 writes each chunk
once into the new image (no raw image converted afterwards), and an in-place restore
reads and writes an existing one. ``qemu-nbd`` takes QEMU's image lock, so an image a
running VM holds is refused and nothing is written to it. Readiness is qemu-nbd's pid
file, written once the image is open and served.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from freezeframe.errors import Conflict, RepositoryError
from freezeframe.process import die_with_parent, stop_child


@contextlib.contextmanager
def served(path: Path, fmt: str, connections: int) -> Iterator[str]:
    """``path`` served by qemu-nbd on a private socket, writable, to ``connections`` clients
    at once (one more would wait for a free one for ever); yields its URI."""
    with tempfile.TemporaryDirectory(prefix="ff-nbd-image-") as scratch:
        socket = Path(scratch) / "nbd.sock"
        ready = Path(scratch) / "nbd.pid"
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
                                       hint="stop the VM first: a restore into an image needs it to itself")
                    raise RepositoryError(f"qemu-nbd could not open {path}: {why}")
                if time.monotonic() > deadline:
                    raise RepositoryError(f"qemu-nbd did not serve {path} within 30s")
                time.sleep(0.02)
            yield f"nbd+unix:///?socket={socket}"
        finally:
            stop_child(server, timeout=60)


@contextlib.contextmanager
def per_thread(uri: str) -> Iterator[Callable[[], Any]]:
    """A function giving each calling thread its own libnbd connection to ``uri`` (one NBD
    handle serves one thread at a time); all are shut down when the block ends."""
    import nbd  # Debian's python3-libnbd, linked into the venv

    local = threading.local()
    lock = threading.Lock()
    handles: list[Any] = []

    def handle() -> Any:
        if not hasattr(local, "nbd"):
            connection = nbd.NBD()
            connection.connect_uri(uri)
            local.nbd = connection
            with lock:
                handles.append(connection)
        return local.nbd

    try:
        yield handle
    finally:
        for connection in handles:
            with contextlib.suppress(nbd.Error):
                connection.shutdown()
