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

from freezeframe.errors import MissingObject, RepositoryError


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int
    #: When the object was stored, in seconds since the epoch by the store's own clock (a
    #: file's mtime, an S3 object's Last-Modified). Garbage collection compares these only
    #: with each other, never with a host's clock.
    mtime: float = 0.0


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

    def replace(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name`` whether or not it exists, atomically and durably.
        Only for the one object that changes (the key object, on a new passphrase)."""

    def remove_leftovers(self, before: float) -> int:
        """Remove what crashed writes left (temporary files) stored before ``before`` (store
        clock); returns how many. A store whose writes leave nothing does nothing."""


_FOLDERS_THAT_EMPTY = ("locks/", "indexes/")


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
            for attempt in range(3):
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
                    # Missing, or removed by a delete that found it empty just now.
                    self._make_dirs(path.parent)
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

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and its missing parents. Each new directory's entry lives in
        its parent: that parent is synced by the next ``flush``, before an index names an
        object below it, or a crash could lose the whole directory with the object."""
        missing = []
        while not directory.exists() and directory != directory.parent:
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):
                new.mkdir()
            if self.durable:
                with self._lock:
                    self._unsynced.add(new.parent)

    def flush(self) -> None:
        with self._lock:
            pending, self._unsynced = self._unsynced, set()
        try:
            for directory in sorted(pending):
                # A folder removed meanwhile (a released lease's) holds nothing to keep.
                with contextlib.suppress(FileNotFoundError):
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
            raise MissingObject(name, str(self.root)) from None
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
                    st = full.stat()
                    yield ObjectInfo(str(full.relative_to(self.root)), st.st_size, st.st_mtime)

    def delete(self, name: str) -> None:
        path = self._path(name)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # A lease's or an unpublished backup's folder goes with its last object (the 256
        # chunk folders stay: they fill again).
        if name.startswith(_FOLDERS_THAT_EMPTY) and path.parent != self.root:
            with contextlib.suppress(OSError):
                path.parent.rmdir()

    def replace(self, name: str, data: bytes) -> None:
        path = self._path(name)
        tmp = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
        try:
            with open(tmp, "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as err:
            raise RepositoryError(f"cannot write {name} in the repository {self.root}: {err.strerror}") from err
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def remove_leftovers(self, before: float) -> int:
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for file in files:
                if not file.startswith(".tmp-"):
                    continue
                full = Path(dirpath, file)
                with contextlib.suppress(FileNotFoundError):
                    if full.stat().st_mtime < before:
                        full.unlink()
                        removed += 1
        return removed


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
