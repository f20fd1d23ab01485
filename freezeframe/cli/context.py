"""What every command shares: the home, the catalog, the repository, and the options
that several command groups take. Command modules import this, never ``main``."""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from freezeframe.backup.repository import RepoIdentity, Repository
from freezeframe.backup.s3 import is_s3, s3_location
from freezeframe.backup.store import open_store
from freezeframe.catalog import Catalog
from freezeframe.config import Home, config_path, load_config_writers
from freezeframe.errors import InvalidInput, NotFound, RepositoryError
from freezeframe.model import BackupState, WriterSpec
from freezeframe.writers import validate_options, writer_class

PASSPHRASE_ENV = "FREEZEFRAME_PASSPHRASE"
#: glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """For commands that move disk data: let glibc keep freed chunk buffers for reuse.

    Every chunk passes through a few fresh 4 MiB buffers (the NBD read, the compressed
    copy). By default glibc maps such buffers anew and unmaps them when freed, so each
    one is page-faulted in again: measured here, that cost a backup about 15% of its
    speed (and QEMU's NBD server, sharing the cores, half its CPU). The process is ours
    (the CLI owns it), so this process-wide setting is made here, not in the library.
    """
    try:
        # The running program's own symbols (libc among them): no library search, which
        # would run ldconfig.
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass  # not glibc: only slower


class App:
    """What every command needs: the state directory and, on demand, the catalog."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._catalog: Catalog | None = None
        #: ``--log-level`` as given (None: $FREEZEFRAME_LOG or the default), for the
        #: processes a command starts.
        self.log_level: str | None = None

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog.open(self.home.catalog)
        return self._catalog

    def writers(self, instance: str) -> list[WriterSpec]:
        """The instance's writers: those added with ``writer add``, then those of the config file."""
        added = self.catalog.writers(instance)
        declared = load_config_writers(config_path(self.home)).get(instance, [])
        clash = {w.name for w in added} & {w.name for w in declared}
        if clash:
            raise InvalidInput(f"writer {', '.join(sorted(clash))} of {instance} is both in the catalog and in "
                               f"{config_path(self.home)}", hint="remove one of them")
        for spec in declared:
            validate_options(writer_class(spec.kind), spec.options)
        return added + declared

    def repository_location(self, location: str | None, endpoint: str | None = None) -> str:
        """Where a repository is, as the catalog records it: ``s3://BUCKET/PREFIX[?endpoint=URL]``,
        or an absolute directory (default: repo/ in the home)."""
        if location is not None and is_s3(location):
            return s3_location(location, endpoint)
        if endpoint is not None:
            raise InvalidInput("--endpoint is for s3:// repositories")
        return str(Path(location or self.home.repository).absolute())

    def repository(self, location: str | None, passphrase: bytes | None) -> Repository:
        """The repository, refused if it is not the one this host pinned there on first use
        (its id, chunk hash, chunk size and encryption); pinned now if it is new here."""
        where = self.repository_location(location)
        pinned = self.catalog.repository_pin(where)
        expect = RepoIdentity(**pinned) if pinned is not None else None
        repo = Repository.open(open_store(where), passphrase=passphrase, expect=expect)
        if pinned is None:
            self.pin(where, repo)
        return repo

    def pin(self, where: str, repo: Repository) -> None:
        self.catalog.pin_repository(where, asdict(repo.identity))

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()


pass_app = click.make_pass_decorator(App)


def repo_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--repo", "repo_path", metavar="PATH|s3://BUCKET/PREFIX[?endpoint=URL]",
                        envvar="FREEZEFRAME_REPO",
                        help="The backup repository: a directory, or an S3 bucket and prefix (credentials from "
                             "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws/credentials). "
                             "Default: $FREEZEFRAME_REPO, else repo/ in the home.")(f)


def passphrase_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--passphrase-env", metavar="VAR",
                     help=f"Read the repository passphrase from this environment variable. "
                          f"Default: {PASSPHRASE_ENV}, when set.")(f)
    return click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
                        help="Read the repository passphrase from this file (owner-only; first line).")(f)


def read_passphrase(passphrase_file: Path | None, passphrase_env: str | None) -> bytes | None:
    """The passphrase from a file or a variable; None when neither is given (a plain repository)."""
    if passphrase_file is not None:
        try:
            info = passphrase_file.stat()
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise InvalidInput(f"the passphrase file {passphrase_file} is readable by others",
                                   hint=f"chmod 600 {passphrase_file}")
            return passphrase_file.read_bytes().splitlines()[0] if info.st_size else b""
        except OSError as err:
            raise RepositoryError(f"cannot read the passphrase file {passphrase_file}: {err.strerror}") from err
    variable = passphrase_env or PASSPHRASE_ENV
    value = os.environ.get(variable)
    if value is None and passphrase_env is not None:
        raise InvalidInput(f"the variable {passphrase_env} is not set")
    return value.encode() if value is not None else None


def locate_backup(app: App, ref: str, repo_path: str | None, passphrase: bytes | None) -> tuple[Repository, str]:
    """The repository and full id of a complete backup: from the catalog, else (restoring
    without the original catalog) from the repository's own list."""
    try:
        found = app.catalog.backup(ref)
    except NotFound:
        repo = app.repository(repo_path, passphrase)
        return repo, repo.resolve(ref)
    if found.state is not BackupState.CREATED:
        raise InvalidInput(f"backup {found.id[:8]} is {found.state.value}: only complete backups can be restored")
    return app.repository(repo_path or found.repository, passphrase), found.id
