"""What every writer is: prepare, freeze, thaw, abort, and a manifest of what it did.

The engine's runner (``engine/quiesce.py``) calls them in this order, each call under the
writer's timeout::

    prepare()   slow work while the application still runs (checkpoint, flush)
    freeze()    the short hold, just before the file systems freeze
    thaw()      release, after the file systems thaw (only if freeze succeeded)
    abort()     release whatever is held, after a failure or a timeout; must not hang

A writer records what it did in ``self.record`` (positions, sizes, versions): the runner
stores it as the writer's manifest. Nothing secret ever goes there.
"""

from __future__ import annotations

import abc
import asyncio
import os
import queue
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from freezeframe.errors import InvalidInput
from freezeframe.model import WriterSpec

T = TypeVar("T")


class WriterError(Exception):
    """A writer could not do its part; the runner applies the writer's failure policy."""


@dataclass(frozen=True, slots=True)
class Option:
    help: str
    required: bool = False
    default: str | None = None


#: Options every kind of writer that logs in understands.
CREDENTIAL_OPTIONS = {
    "password_env": Option("name of an environment variable holding the password"),
    "password_file": Option("file holding the password; must be readable by its owner only"),
}


class Writer(abc.ABC):
    kind: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[Mapping[str, Option]]

    def __init__(self, spec: WriterSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.record: dict[str, Any] = {}

    def option(self, key: str) -> str | None:
        value = self.spec.options.get(key)
        if value is None:
            return self.options[key].default
        return value

    def required(self, key: str) -> str:
        value = self.option(key)
        if value is None:
            raise WriterError(f"option {key} is not set")
        return value

    async def prepare(self) -> None:  # noqa: B027 - optional: not every application has slow work
        """Slow work while the application still runs. Optional."""

    async def check(self) -> str:
        """Is the application reachable? Returns what was found; changes nothing. Raises
        WriterError when it is not reachable."""
        return "nothing to check"

    @abc.abstractmethod
    async def freeze(self) -> None: ...

    @abc.abstractmethod
    async def thaw(self) -> None: ...

    @abc.abstractmethod
    async def abort(self) -> None:
        """Release everything; called after any failure, and must not hang."""


def validate_options(cls: type[Writer], options: Mapping[str, str]) -> dict[str, str]:
    """Check options against the kind's schema, with errors that say what to do."""
    if "password" in options:
        raise InvalidInput(
            "passwords are never stored in the catalog",
            hint="use password_env=VARIABLE or password_file=PATH (readable by its owner only)",
        )
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise InvalidInput(
            f"{cls.kind} writers have no option {', '.join(unknown)}",
            hint=f"options: {', '.join(sorted(cls.options))}",
        )
    missing = [k for k, o in cls.options.items() if o.required and k not in options]
    if missing:
        raise InvalidInput(f"{cls.kind} writers need {', '.join(missing)}",
                           hint=f"add --option {missing[0]}=VALUE")
    if "password_file" in options:
        read_secret_file(options["password_file"])  # refuse a loose file now, not at 3 a.m.
    return dict(options)


def read_secret_file(path: str) -> str:
    """The first line of a file only its owner can read, or a clear refusal."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise InvalidInput(f"password file {path}: {err.strerror}") from err
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidInput(
            f"password file {path} must be owned by this user and not readable by group or others",
            hint=f"chmod 600 {path}",
        )
    return Path(path).read_text().splitlines()[0] if Path(path).stat().st_size else ""


def password(writer: Writer) -> str | None:
    """The writer's password, from the environment or an owner-only file, if it has one."""
    env = writer.option("password_env")
    if env:
        value = os.environ.get(env)
        if value is None:
            raise WriterError(f"environment variable {env} (password_env) is not set")
        return value
    path = writer.option("password_file")
    if path:
        try:
            return read_secret_file(path)
        except InvalidInput as err:
            raise WriterError(str(err)) from err
    return None


def bounded(text: str, limit: int = 4096) -> str:
    """Output worth keeping, cut to its last ``limit`` characters."""
    return text if len(text) <= limit else "..." + text[-limit:]


class WorkerThread:
    """One daemon thread that runs a writer's blocking calls in order (a database
    connection stays on one thread). Daemon, so a call stuck in a driver can never keep
    the process from exiting; ``abort`` paths must still unblock it properly."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]]
                                      | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, loop, future = job
            try:
                result = fn()
            except BaseException as err:
                loop.call_soon_threadsafe(_settle, future, None, err)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    async def call(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, loop, future))
        return await future

    def stop(self) -> None:
        self._jobs.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
