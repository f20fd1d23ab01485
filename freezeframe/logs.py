"""The product's log: Python ``logging`` under the ``freezeframe`` logger.

Modules log what they decide and why (``logging.getLogger(__name__)``); the CLI, the
daemon and helper processes (the NBD server's plugin) choose where it goes with
``configure``: standard error at the level asked for (``--log-level``, else
``$FREEZEFRAME_LOG``, else warnings only), and a file for long jobs, at least at info, so
that what a live restore or a served backup did can be read afterwards.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from freezeframe.errors import InvalidInput

LEVELS = ("debug", "info", "warning", "error")
ENV = "FREEZEFRAME_LOG"
_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def level_of(name: str | None) -> int:
    """A level by name; ``None`` means ``$FREEZEFRAME_LOG``, else warning."""
    chosen = (name or os.environ.get(ENV) or "warning").lower()
    if chosen not in LEVELS:
        raise InvalidInput(f"unknown log level {chosen!r}", hint=f"one of: {', '.join(LEVELS)}")
    return int(getattr(logging, chosen.upper()))


def configure(level: str | None = None, file: Path | None = None, *, console: bool = True) -> None:
    """Send the ``freezeframe`` log to standard error at ``level`` (unless ``console`` is
    false: a server whose standard error is that file already), and to ``file`` (at info
    or finer) when given. Called again, it replaces what it set before."""
    root = logging.getLogger("freezeframe")
    for handler in list(root.handlers):
        if getattr(handler, "_freezeframe", False):
            root.removeHandler(handler)
            handler.close()
    wanted = level_of(level)
    console_handler = logging.StreamHandler(sys.stderr)
    console_handler.setLevel(wanted)
    console_handler.setFormatter(logging.Formatter(_FORMAT, "%H:%M:%S"))
    handlers: list[logging.Handler] = [console_handler] if console else []
    finest = wanted
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(file, encoding="utf-8")
        to_file.setLevel(min(wanted, logging.INFO))
        to_file.setFormatter(logging.Formatter(_FORMAT))
        handlers.append(to_file)
        finest = min(finest, logging.INFO)
    for handler in handlers:
        handler._freezeframe = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(finest)
    root.propagate = False
