"""Single files out of a backup: list a directory, copy files or trees out. The guest's
file systems are read in the sandbox (``jobs/sandbox.py``) from the backup served over
NBD (``jobs/serve.py``): no disk is restored first, no guest file system is mounted here.

Paths are ``NAME/path/inside``, NAME being a file system as the sandbox names it (``vdb``,
``vdb1``, ``lvm-vg-lv``); the top level (an empty path) lists the file systems.

What is copied out is what a user can safely open: regular files (with their mode, less
the setuid, setgid and sticky bits, and their times), directories, and symbolic links
that stay inside what is extracted. A link that points out of it (an absolute one, or one
climbing out with ``..``), device nodes, FIFOs and sockets are not created; each is
reported. Owners are kept only when asked (``owner=True``), as root restoring for a guest.
Names are the guest's: one that is not a plain name is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freezeframe.errors import InvalidInput, NotFound
from freezeframe.jobs.sandbox import FileSystem, Sandbox, SandboxError, sandbox
from freezeframe.jobs.serve import ServeRequest, serve

log = logging.getLogger(__name__)

_SAFE_MODE = 0o777  # no setuid, setgid or sticky bit on what lands here


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    kind: str  # file, dir, symlink, char, block, fifo, socket, filesystem
    size: int
    mode: int
    mtime: float
    uid: int = 0
    gid: int = 0
    target: str | None = None  # a symlink's
    fstype: str | None = None  # a file system's (top level)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "type": self.kind, "size": self.size,
                                "mode": f"{stat.S_IMODE(self.mode):04o}", "mtime": self.mtime,
                                "uid": self.uid, "gid": self.gid}
        if self.target is not None:
            data["target"] = self.target
        if self.fstype is not None:
            data["fstype"] = self.fstype
        return data


@dataclass(slots=True)
class ExtractReport:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    #: What was not created, and why.
    skipped: list[dict[str, str]] = field(default_factory=list)
    #: Files that could not be read (a damaged chunk): path -> error.
    failed: list[dict[str, str]] = field(default_factory=list)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def split(path: str) -> tuple[str, str]:
    """``NAME/rest`` -> (NAME, /rest). Refuses ``..`` and empty names."""
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidInput(f"{path!r}: a path into a backup cannot hold '..'")
    if not parts:
        return "", "/"
    return parts[0], "/" + "/".join(parts[1:])


def _checked_name(name: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise SandboxError(f"the guest file system lists a strange name {name[:80]!r} in {where}")
    return name


class GuestFiles:
    """Listing and copying out of a running sandbox."""

    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.g = box.g

    def _inside(self, path: str) -> tuple[FileSystem, str]:
        name, rest = split(path)
        if not name:
            raise InvalidInput("name a file system first", hint=f"one of: {', '.join(sorted(self.box.filesystems))}")
        fs = self.box.filesystems.get(name)
        if fs is None:
            raise NotFound(f"the backup has no file system {name!r}",
                           hint=f"it has: {', '.join(sorted(self.box.filesystems)) or 'none'}")
        root = self.box.mount(name)
        return fs, posixpath.join(root, rest.lstrip("/")) if rest != "/" else root

    def _stat(self, inside: str, shown: str) -> dict[str, Any]:
        try:
            st: dict[str, Any] = self.g.lstatns(inside)
        except RuntimeError:
            raise NotFound(f"{shown} does not exist in the backup") from None
        return st

    def _entry(self, name: str, st: dict[str, Any], inside: str) -> Entry:
        mode = int(st["st_mode"])
        kind = _kind(mode)
        target = self.g.readlink(inside) if kind == "symlink" else None
        return Entry(name=name, kind=kind, size=int(st["st_size"]), mode=mode,
                     mtime=int(st["st_mtime_sec"]) + int(st["st_mtime_nsec"]) / 1e9,
                     uid=int(st["st_uid"]), gid=int(st["st_gid"]), target=target)

    def listing(self, path: str) -> list[Entry]:
        """A directory's entries (a file: the file itself); the top level: the file systems."""
        name, _ = split(path)
        if not name:
            return [Entry(name=fs.name, kind="filesystem", size=0, mode=stat.S_IFDIR | 0o755, mtime=0.0,
                          fstype=fs.fstype) for fs in sorted(self.box.filesystems.values(), key=lambda f: f.name)]
        _, inside = self._inside(path)
        st = self._stat(inside, path)
        if not stat.S_ISDIR(int(st["st_mode"])):
            return [self._entry(posixpath.basename(inside), st, inside)]
        names = [_checked_name(n, path) for n in self.g.ls(inside)]
        stats = self.g.lstatnslist(inside, names) if names else []
        return [self._entry(n, s, posixpath.join(inside, n)) for n, s in zip(names, stats, strict=True)]

    # -- extracting -----------------------------------------------------------------------

    def extract(self, paths: list[str], dest: Path, *, owner: bool = False,
                progress: Callable[[str], None] | None = None) -> ExtractReport:
        """Copy each of ``paths`` (a file or a tree) into ``dest``, under its own base name."""
        report = ExtractReport()
        dest.mkdir(parents=True, exist_ok=True)
        for path in paths:
            _, inside = self._inside(path)
            st = self._stat(inside, path)
            base = posixpath.basename(inside.rstrip("/")) or split(path)[0]
            top = dest / base
            self._copy(inside, st, top, top, path.rstrip("/"), report, owner=owner, progress=progress)
        return report

    def extract_tree(self, path: str, dest: Path) -> ExtractReport:
        """Copy the directory ``path`` into ``dest`` (made here) in one stream: the appliance
        packs it (``tar-out``) and it is unpacked here through Python's ``data`` filter, so
        nothing lands outside ``dest``, no device node is made, no setuid bit set, no owner
        kept. Far fewer round trips than ``extract`` for a tree of many small files (a
        database's data directory); a read error fails it whole, not one file."""
        _, inside = self._inside(path)
        if not stat.S_ISDIR(int(self._stat(inside, path)["st_mode"])):
            raise InvalidInput(f"{path} is not a directory")
        report = ExtractReport()
        dest.mkdir(mode=0o700)
        with tempfile.TemporaryDirectory(prefix="ff-tar-") as tmp:
            fifo = os.path.join(tmp, "stream")
            os.mkfifo(fifo, 0o600)
            failed: list[str] = []

            def pack() -> None:
                try:
                    self.g.tar_out(inside, fifo, numericowner=True)
                except RuntimeError as err:
                    failed.append(_why(err))
                    with contextlib.suppress(OSError), open(fifo, "wb"):
                        pass  # the reader may still wait for a writer

            packer = threading.Thread(target=pack, daemon=True)
            packer.start()
            with open(fifo, "rb") as stream:
                try:
                    with tarfile.open(fileobj=stream, mode="r|") as archive:
                        archive.extractall(dest, filter=lambda member, where: _admitted(member, where, report))
                except (tarfile.TarError, OSError) as err:
                    failed.append(f"unpacking the stream: {err}")
                while stream.read(1 << 20):
                    pass  # the rest (tar's padding, or what followed an error): the appliance waits to write it
            packer.join()
        if failed:
            report.failed.append({"path": path, "error": failed[0]})
            log.error("could not copy %s out of the backup: %s", path, failed[0])
        for member in dest.rglob("*"):
            if member.is_file() and not member.is_symlink():
                report.files += 1
                report.bytes += member.stat().st_size
        return report

    def _copy(self, inside: str, st: dict[str, Any], local: Path, top: Path, shown: str, report: ExtractReport,
              *, owner: bool, progress: Callable[[str], None] | None) -> None:
        mode = int(st["st_mode"])
        kind = _kind(mode)
        if kind == "dir":
            local.mkdir(mode=0o700, exist_ok=True)
            names = [_checked_name(n, shown) for n in self.g.ls(inside)]
            stats = self.g.lstatnslist(inside, names) if names else []
            for name, child in zip(names, stats, strict=True):
                self._copy(posixpath.join(inside, name), child, local / name, top, f"{shown}/{name}", report,
                           owner=owner, progress=progress)
            report.directories += 1
        elif kind == "file":
            if progress is not None:
                progress(shown)
            try:
                self._download(inside, local)
            except RuntimeError as err:
                report.failed.append({"path": shown, "error": _why(err)})
                log.error("could not read %s from the backup: %s", shown, _why(err))
                return
            report.files += 1
            report.bytes += int(st["st_size"])
        elif kind == "symlink":
            target = str(self.g.readlink(inside))
            if not _stays_inside(local, target, top):
                report.skipped.append({"path": shown, "why": f"a symbolic link out of the tree ({target})"})
                return
            with contextlib.suppress(FileNotFoundError):
                local.unlink()
            os.symlink(target, local)
            report.symlinks += 1
        else:
            report.skipped.append({"path": shown, "why": f"a {kind}: not created"})
            return
        _finish(local, st, kind, owner=owner)

    def _download(self, inside: str, local: Path) -> None:
        """The file's bytes into ``local``, by way of a temporary file beside it, so that a
        file that fails midway (a damaged chunk) leaves nothing behind."""
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name[:40]}.", dir=local.parent)
        os.close(fd)
        try:
            self.g.download(inside, tmp)
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _admitted(member: tarfile.TarInfo, dest: str, report: ExtractReport) -> tarfile.TarInfo | None:
    """Python's ``data`` filter, with what it refuses reported and left out, not fatal."""
    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError as err:
        report.skipped.append({"path": member.name, "why": str(err)})
        return None


def _why(err: RuntimeError) -> str:
    text = str(err)
    if "Input/output error" in text:
        return "an I/O error reading it from the backup (a damaged or missing chunk; see the serve log)"
    return text


def _stays_inside(link: Path, target: str, top: Path) -> bool:
    if posixpath.isabs(target):
        return False
    resolved = posixpath.normpath(posixpath.join(str(link.parent), target))
    return resolved == str(top) or resolved.startswith(str(top) + "/")


def _finish(local: Path, st: dict[str, Any], kind: str, *, owner: bool) -> None:
    times = (int(st["st_atime_sec"]) * 10**9 + int(st["st_atime_nsec"]),
             int(st["st_mtime_sec"]) * 10**9 + int(st["st_mtime_nsec"]))
    if owner:
        os.chown(local, int(st["st_uid"]), int(st["st_gid"]), follow_symlinks=False)
    if kind != "symlink":
        os.chmod(local, stat.S_IMODE(int(st["st_mode"])) & _SAFE_MODE)
    os.utime(local, ns=times, follow_symlinks=False)



@contextmanager
def guest_files(request: ServeRequest, socket: Path, log_file: Path) -> Iterator[GuestFiles]:
    """The backup served and attached to a sandbox, while the block runs."""
    with serve(request, socket, log_file) as served, sandbox(socket, served.exports) as box:
        yield GuestFiles(box)
