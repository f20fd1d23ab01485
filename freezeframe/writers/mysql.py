"""MySQL and MariaDB: flush tables while they run, then hold a global read lock across the
freeze on a session kept open; record the binlog position and GTID under the lock.

``FLUSH TABLES WITH READ LOCK`` blocks every commit and DDL until ``UNLOCK TABLES`` (or the
session ends), and InnoDB has written every acknowledged commit to its redo log, so the copy
holds exactly the transactions committed before the lock. The binlog position read under
the lock is the point a replica restored from this copy starts from.

A lock that cannot be had (a long query holds a table) fails after ``lock_wait_timeout``;
``abort`` kills the holding session from a second connection, which releases the lock even
if the first is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import pymysql
import pymysql.cursors

from freezeframe.writers.base import CREDENTIAL_OPTIONS, Option, WorkerThread, Writer, WriterError, password

T = TypeVar("T")


#: The connected account's global privileges (an ALL PRIVILEGES account lists each one).
_GLOBAL_PRIVILEGES = (
    "SELECT PRIVILEGE_TYPE AS p FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = "
    "CONCAT(\"'\", SUBSTRING_INDEX(CURRENT_USER(), '@', 1), \"'@'\", SUBSTRING_INDEX(CURRENT_USER(), '@', -1), \"'\")"
)


class MySQLWriter(Writer):
    kind = "mysql"
    summary = "FLUSH TABLES in prepare; FLUSH TABLES WITH READ LOCK across the freeze; binlog position and GTID"
    options: ClassVar[Mapping[str, Option]] = {
        "unix_socket": Option("server socket (used instead of host/port when set)"),
        "host": Option("host", default="localhost"),
        "port": Option("port", default="3306"),
        "user": Option("account (needs RELOAD, and BINLOG MONITOR or REPLICATION CLIENT)", default="root"),
        "connect_timeout": Option("seconds", default="5"),
        "lock_wait_timeout": Option("seconds the read lock may wait for running statements", default="10"),
        **CREDENTIAL_OPTIONS,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._worker = WorkerThread(f"mysql-{self.name}")
        self._closed = False
        self._conn: pymysql.connections.Connection[Any] | None = None
        self._session_id: int | None = None

    def _open(self) -> pymysql.connections.Connection[Any]:
        kwargs: dict[str, Any] = {
            "user": self.option("user"), "password": password(self) or "",
            "connect_timeout": int(self.required("connect_timeout")), "autocommit": True,
        }
        if self.option("unix_socket"):
            kwargs["unix_socket"] = self.option("unix_socket")
        else:
            kwargs.update(host=self.option("host"), port=int(self.required("port")))
        try:
            return pymysql.connect(**kwargs)
        except pymysql.MySQLError as err:
            where = self.option("unix_socket") or f"{self.option('host')}:{self.option('port')}"
            raise WriterError(f"cannot connect to MySQL/MariaDB at {where}: {err.args[-1]}") from err

    def _query(self, sql: str) -> list[dict[str, Any]]:
        if self._conn is None:
            self._conn = self._open()
            self._session_id = self._conn.thread_id()
        try:
            with self._conn.cursor(pymysql.cursors.DictCursor) as cursor:
                cursor.execute(sql)
                return list(cursor.fetchall())
        except pymysql.MySQLError as err:
            raise WriterError(f"MySQL/MariaDB: {sql.split()[0]} failed: {err.args[-1]}") from err

    async def _call(self, fn: Callable[[], T]) -> T:
        return await self._worker.call(fn)

    async def check(self) -> str:
        try:
            row = (await self._call(lambda: self._query(
                "SELECT @@version AS v, @@datadir AS d, @@log_bin AS log_bin, CURRENT_USER() AS who")))[0]
            granted = {str(r["p"]).upper() for r in await self._call(lambda: self._query(_GLOBAL_PRIVILEGES))}
        finally:
            await self._close()
        missing = []
        if "RELOAD" not in granted:
            missing.append("RELOAD")  # FLUSH TABLES, and FLUSH TABLES WITH READ LOCK
        mariadb = "mariadb" in str(row["v"]).lower()
        binlog = {"BINLOG MONITOR", "SUPER"} if mariadb else {"REPLICATION CLIENT", "SUPER"}
        if int(row["log_bin"] or 0) and not granted & binlog:
            missing.append("BINLOG MONITOR" if mariadb else "REPLICATION CLIENT")  # SHOW MASTER STATUS
        if missing:
            user, _, host = str(row["who"]).rpartition("@")
            raise WriterError(f"MySQL/MariaDB: {row['who']} lacks {', '.join(missing)}, which the writer needs; "
                              f"as an administrator, run: GRANT {', '.join(missing)} ON *.* TO '{user}'@'{host}';")
        return f"{row['v']}, data in {row['d']}"

    async def prepare(self) -> None:
        def work() -> None:
            row = self._query("SELECT @@version AS version, @@version_comment AS comment, @@datadir AS datadir")[0]
            self.record["server_version"] = f"{row['version']} ({row['comment']})"
            self.record["data_directory"] = str(row["datadir"]).rstrip("/") or "/"
            self._query("FLUSH TABLES")  # the slow part, while commits still go on

        await self._call(work)

    async def freeze(self) -> None:
        def work() -> None:
            self._query(f"SET SESSION lock_wait_timeout = {int(self.required('lock_wait_timeout'))}")
            self._query("FLUSH TABLES WITH READ LOCK")
            status = self._query("SHOW MASTER STATUS")
            if status:
                self.record["binlog"] = {"file": status[0]["File"], "position": int(status[0]["Position"])}
            else:
                self.record["binlog"] = None  # binary logging is off
            is_mariadb = "mariadb" in self.record.get("server_version", "").lower()
            gtid = self._query("SELECT @@global.gtid_current_pos AS g" if is_mariadb
                               else "SELECT @@global.gtid_executed AS g")
            self.record["gtid"] = gtid[0]["g"] if gtid else None

        await self._call(work)

    async def thaw(self) -> None:
        await self._call(lambda: self._query("UNLOCK TABLES"))
        await self._close()

    async def abort(self) -> None:
        session = self._session_id
        if session is not None:
            # The holding session may be stuck; kill it from outside, which releases its lock.
            def kill() -> None:
                killer = self._open()
                try:
                    with killer.cursor() as cursor:
                        cursor.execute(f"KILL {int(session)}")
                except pymysql.MySQLError:
                    pass  # gone already
                finally:
                    killer.close()

            with contextlib.suppress(WriterError, TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(kill), 10)
        await self._close()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn, self._conn, self._session_id = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(pymysql.MySQLError, TimeoutError, RuntimeError):
                await asyncio.wait_for(self._call(conn.close), 5)
        self._worker.stop()
