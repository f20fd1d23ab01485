"""SQLite: checkpoint the WAL while applications run, then hold the write lock across the freeze.

``BEGIN IMMEDIATE`` takes SQLite's RESERVED lock: no other connection can commit until we
roll back, and no commit is half-written when we hold it, so the database file (and its
WAL, which SQLite replays on open) is at a committed state in the copy. Readers go on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from freezeframe.writers.base import Option, Writer, WriterError

T = TypeVar("T")


class SqliteWriter(Writer):
    kind = "sqlite"
    summary = "checkpoint the WAL, then hold the write lock (BEGIN IMMEDIATE) across the freeze"
    options: ClassVar[Mapping[str, Option]] = {
        "path": Option("the database file", required=True),
        "busy_timeout_ms": Option("how long to wait for another writer's lock", default="5000"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One thread owns the connection, so every call on it is serialised there.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{self.name}")
        self._db: sqlite3.Connection | None = None

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            path = self.required("path")
            try:
                # mode=rw: never create an empty database where one was expected.
                self._db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute(f"PRAGMA busy_timeout = {int(self.required('busy_timeout_ms'))}")
            except sqlite3.Error as err:
                raise WriterError(f"cannot open {path}: {err}") from err
        return self._db

    async def prepare(self) -> None:
        def work() -> None:
            db = self._connect()
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            self.record["journal_mode"] = mode
            if mode == "wal":
                busy, frames, done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                self.record["checkpoint"] = {"busy": bool(busy), "wal_frames": frames, "checkpointed": done}

        await self._guarded(work)

    async def freeze(self) -> None:
        def work() -> None:
            db = self._connect()
            db.execute("BEGIN IMMEDIATE")
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
        db = self._db
        if db is not None:
            db.interrupt()  # safe from any thread; unblocks a statement stuck on a lock
        await self._close()

    async def _close(self) -> None:
        def work() -> None:
            if self._db is not None:
                self._db.close()  # closing ends any transaction, releasing the lock
                self._db = None

        try:
            await asyncio.wait_for(self._call(work), 5)
        finally:
            self._thread.shutdown(wait=False)

    async def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            await self._call(fn)
        except sqlite3.Error as err:
            raise WriterError(f"sqlite {self.option('path')}: {err}") from err
