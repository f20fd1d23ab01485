"""Where repository objects live: a small interface of immutable objects, and the local
directory that implements it.

Every object is written once and never changed, so the interface needs only put (if
absent), get, list and delete. An object store (S3) gives the same four operations, so a
repository on one is the same repository; only this module knows about files.

The local store's writes are crash-safe: an object is written to a temporary name in the
same directory, flushed to disk, then linked to its real name (the directory entries are
synced by ``flush``, which the repository calls before an index or manifest names them). ``link`` fails when the
name exists, so a put never overwrites and two writers of the same content cannot
interleave. A crash leaves at worst a temporary file (``.tmp-*``), never a torn object.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from freezeframe.errors import RepositoryError


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int


class ObjectStore(Protocol):
    """Immutable, named objects. Names are relative paths with '/' separators."""

    location: str

    def put(self, name: str, data: bytes) -> bool:
        """Store ``data`` under ``name`` unless it exists; True if this call stored it. The
        object is complete under its name at once, and durable at the latest after ``flush``."""

    def flush(self) -> None:
        """Make every object put so far durable (a store that is durable at put does nothing)."""

    def get(self, name: str) -> bytes:
        """The object's bytes; RepositoryError if there is none."""

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose names start with ``prefix`` (a folder ending in '/')."""

    def delete(self, name: str) -> None: ...


class LocalStore:
    """Objects as files under a directory."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.location = str(root)
        #: fsync every object before it gets its name. Off only for throwaway repositories.
        self.durable = durable
        # Directories whose new entries are not yet synced. An object's data is synced before
        # it is linked (a name never points at a torn object), but the directory that holds
        # the name is synced once per ``flush``, not once per object: a backup of hundreds of
        # chunks pays for a sync of each of the 256 chunk directories at most once per index.
        self._unsynced: set[Path] = set()
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        if name.startswith("/") or ".." in name.split("/"):
            raise RepositoryError(f"invalid object name {name!r}")
        return self.root / name

    def put(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        if path.exists():
            return False
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        try:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.durable:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            if self.durable:
                with self._lock:
                    self._unsynced.add(path.parent)
            return True
        except OSError as err:
            raise RepositoryError(f"cannot write {name} in the repository {self.root}: {err.strerror}",
                                  hint="is the disk full, or the repository read-only?") from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def flush(self) -> None:
        with self._lock:
            pending, self._unsynced = self._unsynced, set()
        try:
            for directory in sorted(pending):
                _fsync_dir(directory)
        except OSError as err:
            with self._lock:
                self._unsynced |= pending
            raise RepositoryError(f"cannot sync the repository {self.root}: {err.strerror}",
                                  hint="is the disk failing or full?") from err

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise RepositoryError(f"the repository {self.root} has no object {name}") from None
        except OSError as err:
            raise RepositoryError(f"cannot read {name} in the repository {self.root}: {err.strerror}") from err

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for file in files:
                if file.startswith(".tmp-"):
                    continue
                full = Path(dirpath, file)
                with contextlib.suppress(FileNotFoundError):
                    yield ObjectInfo(str(full.relative_to(self.root)), full.stat().st_size)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()


def open_store(location: str | Path) -> ObjectStore:
    """The store at ``location``: ``s3://BUCKET/PREFIX[?endpoint=URL]``, else a directory."""
    if str(location).startswith("s3://"):
        from freezeframe.backup.s3 import S3Store

        return S3Store(str(location))
    return LocalStore(Path(location))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
