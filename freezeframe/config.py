"""Where freezeframe keeps its state, and the defaults it runs with.

All state (catalog, lab VMs, image cache, locks) lives under one directory, the home:
``$FREEZEFRAME_HOME`` when set, else ``/var/lib/freezeframe`` for root, else
``$XDG_DATA_HOME/freezeframe`` (``~/.local/share/freezeframe``).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from freezeframe.errors import FreezeframeError, InvalidInput
from freezeframe.model import WriterFailure, WriterSpec


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

    @property
    def repository(self) -> Path:
        """The default backup repository."""
        return self.root / "repo"

    @property
    def fleecing(self) -> Path:
        """Temporary snapshot data of running backups (the fleecing images)."""
        return self.root / "fleecing"

    @property
    def live(self) -> Path:
        """State of live restores in progress (what ``--resume`` picks up)."""
        return self.root / "live"

    @property
    def logs(self) -> Path:
        """Log files of long jobs and of the servers they start (a served backup)."""
        return self.root / "logs"

    @property
    def run(self) -> Path:
        """Sockets of running backups (NBD exports)."""
        return self.root / "run"


def config_path(home: Home) -> Path:
    """The optional config file: ``$FREEZEFRAME_CONFIG``, else ``config.toml`` in the home."""
    env = os.environ.get("FREEZEFRAME_CONFIG")
    return Path(env) if env else home.root / "config.toml"


def load_config_writers(path: Path) -> dict[str, list[WriterSpec]]:
    """Writers declared in the config file, by instance::

        [instances.db1.writers.pg]
        kind = "postgresql"
        timeout = 30          # seconds, optional
        retries = 0           # optional
        on_failure = "fallback"   # fail | continue | fallback, optional
        options = { host = "/var/run/postgresql", password_env = "PGPASSWORD" }

    Options are checked against the writer's kind where the writers are used.
    """
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise InvalidInput(f"cannot read the config file {path}: {err}") from err
    found: dict[str, list[WriterSpec]] = {}
    instances = data.get("instances", {})
    if not isinstance(instances, dict):
        raise InvalidInput(f"{path}: [instances] must be a table")
    for instance, table in instances.items():
        writers = table.get("writers", {}) if isinstance(table, dict) else None
        if not isinstance(writers, dict):
            raise InvalidInput(f"{path}: instances.{instance}.writers must be a table of writers")
        for name, spec in writers.items():
            where = f"{path}: instances.{instance}.writers.{name}"
            if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
                raise InvalidInput(f"{where} needs kind = \"...\"")
            options = spec.get("options", {})
            if not isinstance(options, dict) or not all(isinstance(v, str | int) for v in options.values()):
                raise InvalidInput(f"{where}.options must be a table of strings")
            unknown = set(spec) - {"kind", "timeout", "retries", "on_failure", "options"}
            if unknown:
                raise InvalidInput(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
            try:
                found.setdefault(instance, []).append(WriterSpec(
                    name=name, kind=spec["kind"], options={k: str(v) for k, v in options.items()},
                    timeout=float(spec.get("timeout", 30.0)), retries=int(spec.get("retries", 0)),
                    on_failure=WriterFailure(spec.get("on_failure", "fallback")),
                ))
            except (TypeError, ValueError) as err:
                raise InvalidInput(f"{where}: {err}") from err
    return found
