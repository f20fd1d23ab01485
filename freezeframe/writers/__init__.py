"""Application writers: one module per application, one interface (``base.Writer``)."""

from __future__ import annotations

from freezeframe.errors import InvalidInput
from freezeframe.model import WriterSpec
from freezeframe.writers.base import Writer, WriterError, validate_options
from freezeframe.writers.mysql import MySQLWriter
from freezeframe.writers.postgresql import PostgresWriter
from freezeframe.writers.redis import RedisWriter
from freezeframe.writers.script import ScriptWriter
from freezeframe.writers.sqlite import SqliteWriter

KINDS: dict[str, type[Writer]] = {
    cls.kind: cls for cls in (PostgresWriter, MySQLWriter, SqliteWriter, RedisWriter, ScriptWriter)
}


def writer_class(kind: str) -> type[Writer]:
    try:
        return KINDS[kind]
    except KeyError:
        raise InvalidInput(f"unknown writer kind {kind!r}", hint=f"kinds: {', '.join(sorted(KINDS))}") from None


def make_writer(spec: WriterSpec) -> Writer:
    return writer_class(spec.kind)(spec)


__all__ = ["KINDS", "Writer", "WriterError", "make_writer", "validate_options", "writer_class"]
