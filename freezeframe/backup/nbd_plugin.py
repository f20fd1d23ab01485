"""The nbdkit plugin that serves the disks of a backup, read-only, one export per disk
(named by its device; the first is the default). nbdkit's Python plugin loads this file
(``nbdkit python .../nbd_plugin.py repo=... backup=...``); ``jobs/serve.py`` starts it.
nbdkit speaks NBD, this file only reads the repository, through ``DiskView``.

Parameters: ``repo`` (where), ``backup`` (id), ``identity`` (the repository identity the
host pinned, JSON: the repository is refused if it differs), ``passphrase-fd`` (a pipe
holding the passphrase of an encrypted repository), ``disks`` (comma-separated devices to
export; default every disk), ``cache`` (MiB), ``read-ahead`` (chunks), ``wait`` (seconds
a read waits for an unreachable repository), ``log-level`` and ``log-file``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import nbdkit  # provided by nbdkit's embedded Python

from freezeframe import logs
from freezeframe.backup.disk_view import ChunkUnreadable, DiskView
from freezeframe.backup.repository import RepoIdentity, Repository
from freezeframe.backup.store import open_store
from freezeframe.errors import FreezeframeError, RepositoryError

API_VERSION = 2

log = logging.getLogger("freezeframe.serve")

_params: dict[str, str] = {}
_views: dict[str, DiskView] = {}
_devices: list[str] = []
_lock = threading.Lock()
_repo: Repository | None = None
_indexes: dict[str, str] = {}


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def config(key: str, value: str) -> None:
    known = {"repo", "backup", "identity", "passphrase-fd", "disks", "cache", "read-ahead", "wait",
             "log-level", "log-file"}
    if key not in known:
        raise ValueError(f"unknown parameter {key!r} (known: {', '.join(sorted(known))})")
    _params[key] = value


def config_complete() -> None:
    global _repo
    # nbdkit's standard error is the log file already (jobs/serve.py): write it once.
    logs.configure(_params.get("log-level"), Path(_params["log-file"]) if "log-file" in _params else None,
                   console="log-file" not in _params)
    for needed in ("repo", "backup"):
        if needed not in _params:
            raise ValueError(f"the parameter {needed}= is missing")
    passphrase = None
    if "passphrase-fd" in _params:
        fd = int(_params["passphrase-fd"])
        with os.fdopen(fd, "rb") as pipe:
            passphrase = pipe.read(64 << 10)
    expect = RepoIdentity(**json.loads(_params["identity"])) if "identity" in _params else None
    _repo = Repository.open(open_store(_params["repo"]), passphrase=passphrase, expect=expect)
    manifest = _repo.manifest(_params["backup"])
    for disk in manifest["disks"]:
        _indexes[str(disk["device"])] = str(disk["index"])
    wanted = _params["disks"].split(",") if _params.get("disks") else list(_indexes)
    unknown = [d for d in wanted if d not in _indexes]
    if unknown:
        raise ValueError(f"backup {_params['backup'][:8]} has no disk {', '.join(unknown)} "
                         f"(it has {', '.join(_indexes)})")
    _devices.extend(wanted)
    log.info("serving backup %s from %s: disks %s", _params["backup"], _params["repo"], ", ".join(_devices))


def list_exports(readonly: bool, is_tls: bool) -> list[str]:
    return list(_devices)


def default_export(readonly: bool, is_tls: bool) -> str:
    return _devices[0]


def _view(device: str) -> DiskView:
    with _lock:
        view = _views.get(device)
        if view is None:
            assert _repo is not None
            view = DiskView(_repo, _repo.index(_indexes[device]), cache_mib=int(_params.get("cache", "256")),
                            read_ahead=int(_params.get("read-ahead", "4")), wait_s=float(_params.get("wait", "0")))
            _views[device] = view
        return view


def open(readonly: bool) -> DiskView:  # shadows the builtin: it is nbdkit's name for the callback
    name = nbdkit.export_name() or _devices[0]
    if name not in _devices:
        nbdkit.set_error(errno.ENOENT)
        raise ValueError(f"no export {name[:64]!r} (exports: {', '.join(_devices)})")
    try:
        return _view(name)
    except FreezeframeError as err:
        log.error("cannot open disk %s: %s", name, err)
        raise


def get_size(h: DiskView) -> int:
    return h.size


def can_write(h: DiskView) -> bool:
    return False


def can_multi_conn(h: DiskView) -> bool:
    return True  # read-only: every connection sees the same bytes


def can_cache(h: DiskView) -> int:
    return int(nbdkit.CACHE_EMULATE)


def can_extents(h: DiskView) -> bool:
    return True


def is_rotational(h: DiskView) -> bool:
    return False


def pread(h: DiskView, buf: Any, offset: int, flags: int) -> None:
    try:
        buf[:] = h.read(offset, len(buf))
    except ChunkUnreadable:
        nbdkit.set_error(errno.EIO)  # logged by the view, once per chunk
        raise
    except RepositoryError as err:
        log.error("read of %d bytes at %d of %s failed: %s", len(buf), offset, h.index.device, err)
        nbdkit.set_error(errno.EIO)
        raise


def extents(h: DiskView, count: int, offset: int, flags: int) -> list[tuple[int, int, int]]:
    hole = int(nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)
    return [(start, length, hole if zero else 0) for start, length, zero in h.zero_ranges(offset, count)]


def close(h: DiskView) -> None:
    return None  # views are shared between connections; they go with the process
