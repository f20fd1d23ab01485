"""Application writers: one module per application, one interface (``base.Writer``).

The registry names each writer's module instead of importing it: a writer pulls in its
application's client library (psycopg, PyMySQL, redis), and a command that uses none of
them should not pay for loading all of them.
"""

from __future__ import annotations

import importlib

from freezeframe.errors import InvalidInput
from freezeframe.model import WriterSpec
from freezeframe.writers.base import Writer, WriterError, validate_options

#: Writer kind -> (module, class).
KINDS: dict[str, tuple[str, str]] = {
    "postgresql": ("freezeframe.writers.postgresql", "PostgresWriter"),
    "mysql": ("freezeframe.writers.mysql", "MySQLWriter"),
    "sqlite": ("freezeframe.writers.sqlite", "SqliteWriter"),
    "redis": ("freezeframe.writers.redis", "RedisWriter"),
    "script": ("freezeframe.writers.script", "ScriptWriter"),
}


def writer_class(kind: str) -> type[Writer]:
    try:
        module, name = KINDS[kind]
    except KeyError:
        raise InvalidInput(f"unknown writer kind {kind!r}", hint=f"kinds: {', '.join(sorted(KINDS))}") from None
    cls: type[Writer] = getattr(importlib.import_module(module), name)
    return cls


def make_writer(spec: WriterSpec) -> Writer:
    return writer_class(spec.kind)(spec)


__all__ = ["KINDS", "Writer", "WriterError", "make_writer", "validate_options", "writer_class"]
