"""Where freezeframe keeps its state, and the defaults it runs with.

All state (catalog, lab VMs, image cache, locks) lives under one directory, the home:
``$FREEZEFRAME_HOME`` when set, else ``/var/lib/freezeframe`` for root, else
``$XDG_DATA_HOME/freezeframe`` (``~/.local/share/freezeframe``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from freezeframe.errors import FreezeframeError


def default_home() -> Path:
    env = os.environ.get("FREEZEFRAME_HOME")
    if env:
        return Path(env).expanduser().resolve()
    if os.geteuid() == 0:
        return Path("/var/lib/freezeframe")
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "freezeframe"


@dataclass(frozen=True, slots=True)
class Home:
    """The state directory and the well-known places inside it."""

    root: Path

    @classmethod
    def open(cls, root: Path | None = None) -> Home:
        home = cls(root if root is not None else default_home())
        try:
            home.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise FreezeframeError(
                f"cannot create the freezeframe home {home.root}: {err.strerror}",
                hint="set FREEZEFRAME_HOME to a writable directory",
            ) from err
        return home

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def lab(self) -> Path:
        return self.root / "lab"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def locks(self) -> Path:
        return self.root / "locks"
