"""SQLite: checkpoint the WAL while applications run, then hold the write lock across the freeze.

``BEGIN IMMEDIATE`` takes SQLite's RESERVED lock: no other connection can commit until we
roll back, and no commit is half-written when we hold it, so the database file (and its
WAL, which SQLite replays on open) is at a committed state in the copy. Readers go on.

Waiting for another connection's lock is done here, in short attempts, not by SQLite's
busy handler: a statement sleeping in the busy handler ignores ``interrupt()``, so a long
``busy_timeout`` would leave ``abort`` unable to let go of the application.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from freezeframe.writers.base import Option, WorkerThread, Writer, WriterError

T = TypeVar("T")

#: One attempt at a lock waits this long in SQLite's busy handler, then we look up.
_ATTEMPT_MS = 50


class SqliteWriter(Writer):
    kind = "sqlite"
    summary = "checkpoint the WAL, then hold the write lock (BEGIN IMMEDIATE) across the freeze"
    options: ClassVar[Mapping[str, Option]] = {
        "path": Option("the database file", required=True),
        "busy_timeout_ms": Option("how long to wait for another connection's lock", default="5000"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._worker = WorkerThread(f"sqlite-{self.name}")
        self._db: sqlite3.Connection | None = None
        self._aborted = threading.Event()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            path = self.required("path")
            try:
                # mode=rw: never create an empty database where one was expected.
                self._db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute(f"PRAGMA busy_timeout = {_ATTEMPT_MS}")
            except sqlite3.Error as err:
                raise WriterError(f"cannot open {path}: {err}") from err
        return self._db

    def _patiently(self, what: str, attempt: Callable[[], T | None]) -> T:
        """Repeat ``attempt`` (None: busy, try again) until it succeeds, ``busy_timeout_ms``
        passes, or the writer is aborted."""
        deadline = time.monotonic() + int(self.required("busy_timeout_ms")) / 1000
        while not self._aborted.is_set():
            try:
                result = attempt()
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err):
                    raise
                result = None
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise WriterError(f"{what}: the database stayed locked by another connection")
        raise WriterError(f"{what}: aborted")

    async def check(self) -> str:
        def work() -> str:
            mode = self._connect().execute("PRAGMA journal_mode").fetchone()[0]
            return f"{self.option('path')} opens, journal mode {mode}"

        try:
            return await self._worker.call(work)
        except sqlite3.Error as err:
            raise WriterError(f"sqlite {self.option('path')}: {err}") from err
        finally:
            await self._close()

    async def prepare(self) -> None:
        def work() -> None:
            db = self._connect()
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            self.record["journal_mode"] = mode
            if mode == "wal":
                def checkpoint() -> tuple[int, int] | None:
                    busy, frames, done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    return None if busy else (frames, done)

                frames, done = self._patiently("checkpoint", checkpoint)
                self.record["checkpoint"] = {"wal_frames": frames, "checkpointed": done}

        await self._guarded(work)

    async def freeze(self) -> None:
        def work() -> None:
            db = self._connect()

            def begin() -> bool:
                db.execute("BEGIN IMMEDIATE")
                return True

            self._patiently("BEGIN IMMEDIATE", begin)
            self.record["page_count"] = db.execute("PRAGMA page_count").fetchone()[0]
            self.record["data_version"] = db.execute("PRAGMA data_version").fetchone()[0]

        await self._guarded(work)

    async def thaw(self) -> None:
        def work() -> None:
            if self._db is not None:
                self._db.execute("ROLLBACK")

        await self._guarded(work)
        await self._close()

    async def abort(self) -> None:
        self._aborted.set()  # the worker stops waiting for locks within one attempt
        db = self._db
        if db is not None:
            db.interrupt()  # and a running statement stops
        await self._close()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def work() -> None:
            if self._db is not None:
                self._db.close()  # closing ends any transaction, releasing the lock
                self._db = None

        try:
            await self._worker.call(work)
        finally:
            self._worker.stop()

    async def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            await self._worker.call(fn)
        except sqlite3.Error as err:
            raise WriterError(f"sqlite {self.option('path')}: {err}") from err
