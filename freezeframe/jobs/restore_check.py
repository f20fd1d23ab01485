"""Restore tests (``backup test``): a backup restored to scratch images, its file systems checked with their
own tools, and the applications its writers recorded opened and checked.

No guest file system is parsed by this host's kernel, not even a partition table: the
restored images are attached read-only to the sandbox appliance (``jobs/sandbox.py``),
which finds partitions, logical volumes and file systems, and runs the checkers there.
Per file system found:

* ext2/3/4: the journal must need no recovery when the backup was taken at filesystem
  level or above (a frozen file system leaves a clean journal); then ``e2fsck -fn``.
* XFS: the log must hold nothing to replay but the superblock (what a freeze leaves:
  Linux writes no unmount record when it freezes XFS); then the log is replayed (a mount,
  as a boot would) and ``xfs_repair -n`` checks the structure.

At crash level a journal that needs recovery is expected: it is replayed first, as a boot
would, and the check runs after. Replays write only to the appliance's overlay. SQLite
databases the guest's hook held (the freeze hook names them) are copied out of the
appliance and pass ``PRAGMA integrity_check`` here; PostgreSQL and MariaDB data
directories their writers recorded are copied out, started and checked by the server's own
tool (``jobs/app_check.py``). Copies out go through the same guarded extraction as ``backup
extract`` (``jobs/file_restore.py``): no device nodes, no setuid bits, no link followed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import re
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freezeframe.backup.repository import Repository
from freezeframe.catalog import Catalog
from freezeframe.catalog.store import utc_now
from freezeframe.engine.backup import restore_backup
from freezeframe.errors import FreezeframeError, InvalidInput
from freezeframe.jobs.app_check import RecordedApp, check_app, recorded_apps
from freezeframe.jobs.file_restore import GuestFiles
from freezeframe.jobs.sandbox import FileSystem, Sandbox, sandbox_of_images
from freezeframe.model import Backup, BackupState, Level

log = logging.getLogger(__name__)

#: Boots the restored images (device, raw image) and says what it saw; raises when it fails.
Booter = Callable[[list[tuple[str, Path]]], str]


@dataclass(slots=True)
class Check:
    """One finding: what was checked, where, whether it passed, and the evidence."""

    what: str
    where: str
    passed: bool
    detail: str


@dataclass(slots=True)
class RestoreCheck:
    backup: str
    passed: bool = True
    checks: list[Check] = field(default_factory=list)

    def add(self, what: str, where: str, passed: bool, detail: str) -> None:
        log.log(logging.INFO if passed else logging.WARNING, "restore test of %s: %s on %s %s: %s", self.backup[:8],
                what, where, "passed" if passed else "FAILED", detail[:300])
        self.checks.append(Check(what, where, passed, detail))
        self.passed = self.passed and passed

    def to_json(self) -> dict[str, Any]:
        return {"outcome": "passed" if self.passed else "failed", "checks": [asdict(c) for c in self.checks]}


def _tail(text: str) -> str:
    return text.strip()[-600:]


def _check_ext(result: RestoreCheck, box: Sandbox, fs: FileSystem, level: Level | None) -> None:
    status, header = box.run(["dumpe2fs", "-h", fs.device])
    features = next((line.split(":", 1)[1].split() for line in header.splitlines()
                     if line.startswith("Filesystem features:")), None)
    if features is None:
        result.add("ext4 superblock", fs.name, False, f"dumpe2fs found no superblock: {_tail(header)}")
        return
    dirty = "needs_recovery" in features
    if level is not None and level >= Level.FILESYSTEM:
        result.add("journal clean", fs.name, not dirty,
                   "the journal needs recovery: the file system was not frozen at the point" if dirty
                   else "no recovery needed")
    elif dirty:
        status, said = box.run(["e2fsck", "-E", "journal_only", "-y", fs.device])
        result.add("journal replay (crash level)", fs.name, status in (0, 1), _tail(said) or "replayed")
    status, said = box.run(["e2fsck", "-fn", fs.device])
    # A clean run says it in its summary line (files and blocks); a failing one needs all of it.
    summary = next((line.strip() for line in said.splitlines() if " files (" in line), None)
    result.add("e2fsck -fn", fs.name, status == 0, summary if status == 0 and summary else _tail(said))


def _xfs_log_quiesced(box: Sandbox, fs: FileSystem) -> tuple[bool | None, str]:
    """Whether the log holds nothing to replay but superblock buffers (see the module doc)."""
    _, said = box.run(["xfs_logprint", "-t", fs.device])
    if "log tail:" not in said:
        return None, f"xfs_logprint gave nothing to judge by: {_tail(said)}"
    items = re.findall(r"^(\w+): cnt:", said, flags=re.MULTILINE)
    blocks = re.findall(r"start blkno:(0x[0-9a-f]+)", said)
    quiet = all(kind == "BUF" for kind in items) and all(int(b, 16) == 0 for b in blocks)
    return quiet, "only the superblock in the log" if quiet else f"log items to replay: {sorted(set(items))}"


def _check_xfs(result: RestoreCheck, box: Sandbox, fs: FileSystem, level: Level | None) -> None:
    quiet, why = _xfs_log_quiesced(box, fs)
    if level is not None and level >= Level.FILESYSTEM:
        result.add("log clean", fs.name, bool(quiet), why)
    # xfs_repair -n will not look at a file system whose log needs replaying: replay it,
    # as a boot would (into the overlay).
    try:
        box.replay(fs.name)
    except FreezeframeError as err:
        result.add("log replay", fs.name, False, err.message)
        return
    status, said = box.run(["xfs_repair", "-n", fs.device])
    result.add("xfs_repair -n", fs.name, status == 0, _tail(said))


def _guest_databases(manifest: dict[str, Any]) -> list[str]:
    """SQLite files the guest's freeze hook held (freezeframe's sqlite hook names them)."""
    found: list[str] = []
    for writer in manifest.get("point", {}).get("writers", []):
        if not isinstance(writer, dict) or writer.get("where") != "guest":
            continue
        output = (writer.get("manifest") or {}).get("freeze_output")
        try:
            held = json.loads(output) if isinstance(output, str) else None
        except ValueError:
            continue  # not the sqlite hook's report: nothing to open
        if isinstance(held, dict) and isinstance(held.get("databases"), list):
            found += [d["path"] for d in held["databases"] if isinstance(d, dict) and isinstance(d.get("path"), str)]
    return found


def _relative_candidates(path: str, manifest: dict[str, Any]) -> list[str]:
    """Where ``path`` (in the guest) lies inside a file system: relative to each mount
    point that holds it, the longest first (the guest's own view of where it lives)."""
    mounts = sorted({fs.get("mountpoint", "") for fs in manifest.get("point", {}).get("filesystems", [])
                     if isinstance(fs, dict)}, key=len, reverse=True)
    found = [path[len(m):].lstrip("/") for m in mounts if m and (path == m or path.startswith(m.rstrip("/") + "/"))]
    return found or [path.lstrip("/")]


#: Answers whether a path in the appliance is of the wanted kind (a file, a directory).
Exists = Callable[[str], bool]


def _find(result: RestoreCheck, what: str, path: str, manifest: dict[str, Any], mounted: dict[str, str],
          exists: Exists, realpath: Callable[[str], str]) -> tuple[str, str] | None:
    """The one restored file system holding the guest's ``path``, and the path there
    relative to it (``NAME/rel``, as ``backup extract`` takes it); else a failed check."""
    if ".." in Path(path).parts:
        result.add(what, path, False, "the path the backup recorded climbs out with '..': not followed")
        return None
    # The file systems are the guest's: a symbolic link there must not lead out of them.
    hits = []
    for rel in _relative_candidates(path, manifest)[:1]:
        for name, root in mounted.items():
            inside = posixpath.join(root, rel)
            if exists(inside) and _under(realpath(inside), root):
                hits.append((name, f"{name}/{rel}".rstrip("/")))
    if len(hits) != 1:
        result.add(what, path, False, "not found on any restored file system" if not hits
                   else f"found on {len(hits)} file systems: {', '.join(w for w, _ in hits)}")
        return None
    return hits[0]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_sqlite(result: RestoreCheck, files: GuestFiles, mounted: dict[str, str], databases: list[str],
                  manifest: dict[str, Any], scratch: Path) -> None:
    g = files.g
    for database in databases:
        found = _find(result, "sqlite integrity_check", database, manifest, mounted,
                      lambda p: bool(g.is_file(p, followsymlinks=False)), g.realpath)
        if found is None:
            continue
        where, relative = found
        copy = scratch / f"sqlite-{len(result.checks)}"
        inside = posixpath.join(mounted[where], relative.partition("/")[2])
        names = [relative] + [relative + suffix for suffix in ("-wal", "-journal")  # what a crash-level copy may need
                              if g.is_file(inside + suffix, followsymlinks=False)]
        report = files.extract(names, copy)
        if report.failed:
            result.add("sqlite integrity_check", f"{database} ({where})", False,
                       f"cannot copy it out: {report.failed[0]['error']}")
            continue
        try:
            with contextlib.closing(sqlite3.connect(copy / posixpath.basename(relative))) as db:
                answer = [row[0] for row in db.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as err:
            answer = [f"cannot open: {err}"]
        result.add("sqlite integrity_check", f"{database} ({where})", answer == ["ok"], "; ".join(answer)[:600])


def _check_app(result: RestoreCheck, files: GuestFiles, mounted: dict[str, str], app: RecordedApp,
               manifest: dict[str, Any]) -> None:
    g = files.g
    found = _find(result, f"{app.kind} data directory", app.data_directory, manifest, mounted,
                  lambda p: bool(g.is_dir(p, followsymlinks=False)), g.realpath)
    if found is None:
        return
    where, relative = found
    label = f"{app.data_directory} ({where}, writer {app.writer})"

    def fetch(data: Path) -> str | None:
        report = files.extract_tree(relative, data)
        trouble = [f"{f['path']}: {f['error']}" for f in report.failed] + [
            f"{s['path']}: {s['why']}" for s in report.skipped]
        return "; ".join(trouble)[:600] or None

    check_app(app, fetch, lambda what, passed, detail: result.add(what, label, passed, detail))


def _check_filesystems(result: RestoreCheck, box: Sandbox, level: Level | None) -> None:
    for name, fs in sorted(box.filesystems.items()):
        if fs.fstype in ("ext2", "ext3", "ext4"):
            _check_ext(result, box, fs, level)
        elif fs.fstype == "xfs":
            _check_xfs(result, box, fs, level)
        else:
            result.add("file system", name, True, f"{fs.fstype}: not checked")


def check_restore(catalog: Catalog, repo: Repository, backup_id: str, *, scratch: Path,
                  boot: Booter | None = None, keep: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> RestoreCheck:
    """Restore ``backup_id`` into ``scratch``, check it, record the outcome on the backup."""
    manifest = repo.manifest(backup_id)
    level = Level(manifest["consistency"]) if manifest.get("consistency") else None
    result = RestoreCheck(backup=backup_id)
    work = scratch / f"restore-test-{backup_id[:8]}"
    if work.exists():
        raise InvalidInput(f"{work} exists already (another restore test, or one that was killed)",
                           hint="remove it and run again")
    work.mkdir(parents=True)
    try:
        images = restore_backup(repo, backup_id, work, fmt="raw", progress=progress)
        result.add("restore", "every disk", True, f"{len(images)} disks restored, every chunk checked")
        databases = _guest_databases(manifest)
        apps = recorded_apps(manifest)
        with sandbox_of_images(images) as box:
            _check_filesystems(result, box, level)
            if databases or apps:
                mounted = box.mount_all()
                files = GuestFiles(box)
                if databases:
                    _check_sqlite(result, files, mounted, databases, manifest, work)
                for app in apps:
                    _check_app(result, files, mounted, app, manifest)
        if boot is not None:
            try:
                result.add("boot", "restored VM", True, boot(images))
            except FreezeframeError as err:
                result.add("boot", "restored VM", False, err.message)
    except FreezeframeError as err:
        result.add("restore test", backup_id[:8], False, err.message)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    _record(catalog, backup_id, result)
    return result


def _record(catalog: Catalog, backup_id: str, result: RestoreCheck) -> None:
    try:
        backup: Backup = catalog.backup(backup_id)
    except FreezeframeError:
        return  # restored from a repository this catalog does not know
    if backup.state is BackupState.CREATED:
        backup.restore_tested_at = utc_now()
        backup.restore_test = result.to_json()
        catalog.save_backup(backup)
