"""Restore onto existing images, writing only what differs (Veeam calls it Quick Rollback).

Rolling a disk back after a bad upgrade should cost the change, not the disk. Each chunk's
range of the existing image is read and hashed the way the repository names chunks (keyed
in an encrypted repository); a range whose hash is the chunk's id is left alone, any other
is written from the repository (a chunk of zeros: written as zeros, which the image may
keep as a hole). What is read is the whole image, once; what is written is what changed.

The image is opened through ``qemu-nbd`` (raw or qcow2 alike; ``backup/nbd_image.py``),
which takes QEMU's image lock: an image a running VM holds is refused, and nothing is
written to it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.backup.nbd_image import per_thread, served
from freezeframe.backup.pipeline import RESTORE_WORKERS, bounded_map
from freezeframe.backup.repository import DiskIndex, Repository
from freezeframe.errors import InvalidInput


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


def roll_back(repo: Repository, index: DiskIndex, image: Path, *, workers: int = RESTORE_WORKERS,
              progress: Callable[[int], None] | None = None) -> RollbackReport:
    """Make ``image`` hold the disk ``index`` describes, writing only the chunks that differ."""
    fmt = image_format(image)
    report = RollbackReport(device=index.device, image=str(image))
    # A connection per worker, and this thread's.
    with served(image, fmt, workers + 1) as uri, per_thread(uri) as handle:
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
    return report
