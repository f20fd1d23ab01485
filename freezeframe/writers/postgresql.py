"""PostgreSQL: a checkpoint while it runs, then a WAL flush at the freeze; record the LSN.

Why not ``pg_backup_start``/``pg_backup_stop`` around the freeze: the backup_label they
produce makes recovery wait for the backup-end record, which ``pg_backup_stop`` writes
*after* the snapshot, so a copy holding that label refuses to start ("WAL ends before end
of online backup"). A snapshot taken at one instant over the data directory and its WAL
needs no label: the server starts on it as after a power cut and replays WAL from the
last checkpoint (PostgreSQL docs, "File System Level Backup"). So the writer makes that
replay short (CHECKPOINT in prepare) and makes sure every acknowledged commit is in the
WAL on disk at the freeze: a commit with ``synchronous_commit = on`` flushes the WAL up to
itself, and so everything committed before it, even by sessions that run with
``synchronous_commit = off``. Data directory, WAL and tablespaces must all be on file
systems of the same snapshot; the manifest records where they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, ClassVar

import psycopg

from freezeframe.writers.base import CREDENTIAL_OPTIONS, Option, Writer, WriterError, password


class PostgresWriter(Writer):
    kind = "postgresql"
    summary = "CHECKPOINT in prepare; at the freeze, flush the WAL and record its LSN and timeline"
    options: ClassVar[Mapping[str, Option]] = {
        "host": Option("host name or socket directory", default="/var/run/postgresql"),
        "port": Option("port", default="5432"),
        "user": Option("role: a superuser, or one granted pg_checkpoint and pg_read_all_settings "
                       "(instance check names what is missing)", default="postgres"),
        "dbname": Option("database to connect to", default="postgres"),
        "connect_timeout": Option("seconds", default="5"),
        **CREDENTIAL_OPTIONS,
    }

    _conn: psycopg.AsyncConnection[Any] | None = None

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None:
            try:
                self._conn = await psycopg.AsyncConnection.connect(
                    host=self.option("host"), port=self.option("port"), user=self.option("user"),
                    dbname=self.option("dbname"), password=password(self),
                    connect_timeout=int(self.required("connect_timeout")), autocommit=True,
                    application_name="freezeframe",
                )
            except psycopg.Error as err:
                raise WriterError(f"cannot connect to PostgreSQL at {self.option('host')}: {_first_line(err)}") \
                    from err
        return self._conn

    async def _one(self, query: str) -> tuple[Any, ...]:
        conn = await self._connect()
        try:
            cursor = await conn.execute(query)
            row = await cursor.fetchone() if cursor.description is not None else None
        except psycopg.Error as err:
            raise WriterError(f"PostgreSQL: {query.split()[0]} failed: {_first_line(err)}") from err
        return tuple(row) if row is not None else ()

    async def check(self) -> str:
        try:
            missing = await self._missing_grants()
            if missing:
                role = missing[0].rsplit(" ", 1)[-1].rstrip(";")
                raise WriterError(f"PostgreSQL: role {role} may not run CHECKPOINT and SHOW data_directory, which "
                                  f"the writer needs; as a superuser, run: {' '.join(missing)}")
            (version,) = await self._one("SHOW server_version")
            (data_directory,) = await self._one("SHOW data_directory")
        finally:
            await self._close()
        return f"PostgreSQL {version}, data in {data_directory}"

    async def _missing_grants(self) -> list[str]:
        """The statements that would give this role what the writer runs: CHECKPOINT
        (pg_checkpoint, PostgreSQL 15 and later; a superuser before) and SHOW data_directory
        (pg_read_all_settings)."""
        number, role, superuser = await self._one(
            "SELECT current_setting('server_version_num')::int, quote_ident(current_user), "
            "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user)")
        if superuser:
            return []
        if number < 150000:
            return [f"ALTER ROLE {role} SUPERUSER;"]
        checkpoint, settings = await self._one(
            "SELECT pg_has_role(current_user, 'pg_checkpoint', 'USAGE'), "
            "pg_has_role(current_user, 'pg_read_all_settings', 'USAGE')")
        return ([] if checkpoint else [f"GRANT pg_checkpoint TO {role};"]) + \
            ([] if settings else [f"GRANT pg_read_all_settings TO {role};"])

    async def prepare(self) -> None:
        (version,) = await self._one("SHOW server_version")
        (data_directory,) = await self._one("SHOW data_directory")
        # The role initdb made (oid 10): a restore test connects to the copy as it.
        (superuser,) = await self._one("SELECT rolname FROM pg_roles WHERE oid = 10")
        self.record.update({"server_version": version, "data_directory": data_directory, "superuser": superuser})
        tablespaces = await self._tablespaces()
        if tablespaces:
            self.record["tablespaces"] = tablespaces
        await self._one("CHECKPOINT")
        lsn, timeline = await self._one("SELECT checkpoint_lsn::text, timeline_id FROM pg_control_checkpoint()")
        self.record["checkpoint"] = {"lsn": lsn, "timeline": timeline}

    async def _tablespaces(self) -> list[str]:
        conn = await self._connect()
        try:
            cursor = await conn.execute(
                "SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE pg_tablespace_location(oid) <> ''"
            )
            return [row[0] for row in await cursor.fetchall()]
        except psycopg.Error as err:
            raise WriterError(f"PostgreSQL: listing tablespaces failed: {_first_line(err)}") from err

    async def freeze(self) -> None:
        conn = await self._connect()
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL synchronous_commit = on")
                await conn.execute("SELECT txid_current()")  # a real commit record to flush up to
        except psycopg.Error as err:
            raise WriterError(f"PostgreSQL: flushing the WAL failed: {_first_line(err)}") from err
        lsn, timeline = await self._one(
            "SELECT pg_current_wal_flush_lsn()::text, (SELECT timeline_id FROM pg_control_checkpoint())"
        )
        self.record["wal_flushed_at_freeze"] = {"lsn": lsn, "timeline": timeline}
        self.record["restore"] = (
            "start the server on the copy; it replays WAL from the checkpoint above "
            f"up to at least {lsn}; no backup_label is needed"
        )

    async def thaw(self) -> None:
        await self._close()

    async def abort(self) -> None:
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.cancel()
        await self._close()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
