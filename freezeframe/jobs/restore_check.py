"""Restore tests (``backup test``): a backup restored to scratch images, its file systems checked with their
own tools, and the applications its writers recorded opened and checked.

Per file system found on a restored image (a bare one, or each partition):

* ext2/3/4: the journal must need no recovery when the backup was taken at filesystem
  level or above (a frozen file system leaves a clean journal); then ``e2fsck -fn``.
* XFS: the log must hold nothing to replay but the superblock (what a freeze leaves:
  Linux writes no unmount record when it freezes XFS); then the log is replayed on the
  scratch copy (a mount, as a boot would) and ``xfs_repair -n`` checks the structure.

At crash level a journal that needs recovery is expected: it is replayed on the scratch
copy first, as a boot would, and the check runs after. SQLite databases the guest's hook
held (the freeze hook names them) are copied out of a read-only mount and pass ``PRAGMA
integrity_check``; PostgreSQL and MariaDB data directories their writers recorded are
started on a copy and checked by the server's own tool (``jobs/app_check.py``).
Everything runs on loop devices this module attaches and always detaches; nothing is ever
frozen.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freezeframe.backup.repository import Repository
from freezeframe.catalog import Catalog
from freezeframe.catalog.store import utc_now
from freezeframe.engine.backup import restore_backup
from freezeframe.errors import FreezeframeError, InvalidInput
from freezeframe.jobs.app_check import RecordedApp, check_app, output_tail, recorded_apps
from freezeframe.model import Backup, BackupState, Level

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
        self.checks.append(Check(what, where, passed, detail))
        self.passed = self.passed and passed

    def to_json(self) -> dict[str, Any]:
        return {"outcome": "passed" if self.passed else "failed", "checks": [asdict(c) for c in self.checks]}


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:
        raise InvalidInput(f"{argv[0]} is not installed; a restore test needs it",
                           hint="run make setup (it installs e2fsprogs and xfsprogs)") from err


@contextlib.contextmanager
def _loop(image: Path) -> Iterator[list[str]]:
    """The image attached to a loop device with its partitions scanned: the devices that
    may hold a file system (the partitions, else the whole device). Always detached."""
    done = _run(["losetup", "--find", "--show", "--partscan", str(image)])
    if done.returncode != 0:
        raise InvalidInput(f"cannot attach {image} to a loop device: {output_tail(done)}")
    device = done.stdout.strip()
    try:
        # Partition nodes appear through devtmpfs; udev, where it runs, may still be busy with them.
        if shutil.which("udevadm"):
            _run(["udevadm", "settle", "--timeout=10"])
        parts = sorted(str(p) for p in Path("/dev").glob(f"{Path(device).name}p*"))
        yield parts or [device]
    finally:
        _run(["losetup", "--detach", device])


def _fs_type(device: str) -> str | None:
    done = _run(["blkid", "-p", "-o", "value", "-s", "TYPE", device])
    return done.stdout.strip() or None if done.returncode == 0 else None


@contextlib.contextmanager
def _mounted(device: str, options: str) -> Iterator[Path]:
    point = Path(tempfile.mkdtemp(prefix="ff-restore-test-"))
    try:
        done = _run(["mount", "-o", options, device, str(point)])
        if done.returncode != 0:
            raise InvalidInput(f"cannot mount {device}: {output_tail(done)}")
        try:
            yield point
        finally:
            _run(["umount", str(point)])
    finally:
        with contextlib.suppress(OSError):
            point.rmdir()


def _check_ext(result: RestoreCheck, device: str, where: str, level: Level | None) -> None:
    header = _run(["dumpe2fs", "-h", device])
    features = next((line.split(":", 1)[1].split() for line in header.stdout.splitlines()
                     if line.startswith("Filesystem features:")), None)
    if features is None:
        result.add("ext4 superblock", where, False, f"dumpe2fs found no superblock: {output_tail(header)}")
        return
    dirty = "needs_recovery" in features
    if level is not None and level >= Level.FILESYSTEM:
        result.add("journal clean", where, not dirty,
                   "the journal needs recovery: the file system was not frozen at the point" if dirty
                   else "no recovery needed")
    elif dirty:
        replay = _run(["e2fsck", "-E", "journal_only", "-y", device])
        result.add("journal replay (crash level)", where, replay.returncode in (0, 1),
                   output_tail(replay) or "replayed")
    fsck = _run(["e2fsck", "-fn", device])
    # A clean run says it in its summary line (files and blocks); a failing one needs all of it.
    summary = next((line.strip() for line in fsck.stdout.splitlines() if " files (" in line), None)
    result.add("e2fsck -fn", where, fsck.returncode == 0,
               summary if fsck.returncode == 0 and summary else output_tail(fsck))


def _xfs_log_quiesced(device: str) -> tuple[bool | None, str]:
    """Whether the log holds nothing to replay but superblock buffers (see the module doc)."""
    done = _run(["xfs_logprint", "-t", device])
    if "log tail:" not in done.stdout:
        return None, f"xfs_logprint gave nothing to judge by: {output_tail(done)}"
    items = re.findall(r"^(\w+): cnt:", done.stdout, flags=re.MULTILINE)
    blocks = re.findall(r"start blkno:(0x[0-9a-f]+)", done.stdout)
    quiet = all(kind == "BUF" for kind in items) and all(int(b, 16) == 0 for b in blocks)
    return quiet, "only the superblock in the log" if quiet else f"log items to replay: {sorted(set(items))}"


def _check_xfs(result: RestoreCheck, device: str, where: str, level: Level | None) -> None:
    quiet, why = _xfs_log_quiesced(device)
    if level is not None and level >= Level.FILESYSTEM:
        result.add("log clean", where, bool(quiet), why)
    # xfs_repair -n will not look at a file system whose log needs replaying: replay it on
    # the scratch copy, as a boot would.
    with contextlib.suppress(InvalidInput), _mounted(device, "rw"):
        pass
    repair = _run(["xfs_repair", "-n", device])
    result.add("xfs_repair -n", where, repair.returncode == 0, output_tail(repair))


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


def _find(result: RestoreCheck, what: str, path: str, manifest: dict[str, Any], mounted: dict[str, Path],
          exists: Callable[[Path], bool]) -> tuple[str, Path] | None:
    """The one restored file system holding the guest's ``path``, and where; else a failed check."""
    if ".." in Path(path).parts:
        result.add(what, path, False, "the path the backup recorded climbs out with '..': not followed")
        return None
    # The file systems are the guest's: a symbolic link there must not lead into this host.
    hits = [(where, root / rel) for rel in _relative_candidates(path, manifest)[:1]
            for where, root in mounted.items()
            if exists(root / rel) and (root / rel).resolve().is_relative_to(root.resolve())]
    if len(hits) != 1:
        result.add(what, path, False, "not found on any restored file system" if not hits
                   else f"found on {len(hits)} file systems: {', '.join(w for w, _ in hits)}")
        return None
    return hits[0]


def _check_sqlite(result: RestoreCheck, mounted: dict[str, Path], databases: list[str],
                  manifest: dict[str, Any], scratch: Path) -> None:
    for database in databases:
        found = _find(result, "sqlite integrity_check", database, manifest, mounted, Path.is_file)
        if found is None:
            continue
        where, source = found
        copy = scratch / f"sqlite-{len(result.checks)}.db"
        shutil.copyfile(source, copy)
        for suffix in ("-wal", "-journal"):  # what a crash-level copy may still need
            if source.with_name(source.name + suffix).exists():
                shutil.copyfile(source.with_name(source.name + suffix), copy.with_name(copy.name + suffix))
        try:
            with contextlib.closing(sqlite3.connect(copy)) as db:
                answer = [row[0] for row in db.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as err:
            answer = [f"cannot open: {err}"]
        result.add("sqlite integrity_check", f"{database} ({where})", answer == ["ok"], "; ".join(answer)[:600])


def _check_app(result: RestoreCheck, mounted: dict[str, Path], app: RecordedApp, manifest: dict[str, Any]) -> None:
    found = _find(result, f"{app.kind} data directory", app.data_directory, manifest, mounted, Path.is_dir)
    if found is not None:
        where, source = found
        label = f"{app.data_directory} ({where}, writer {app.writer})"
        check_app(app, source, lambda what, passed, detail: result.add(what, label, passed, detail))


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
        with contextlib.ExitStack() as stack:
            mounted: dict[str, Path] = {}
            for device, image in images:
                devices = stack.enter_context(_loop(image))
                for part in devices:
                    where = device if len(devices) == 1 else f"{device} {Path(part).name}"
                    kind = _fs_type(part)
                    if kind in ("ext2", "ext3", "ext4"):
                        _check_ext(result, part, where, level)
                        options = "ro,noload"
                    elif kind == "xfs":
                        _check_xfs(result, part, where, level)
                        options = "ro,norecovery"
                    else:
                        result.add("file system", where, True, f"{kind or 'no file system'}: not checked")
                        continue
                    if databases or apps:
                        mounted[where] = stack.enter_context(_mounted(part, options))
            if databases:
                _check_sqlite(result, mounted, databases, manifest, work)
            for app in apps:
                _check_app(result, mounted, app, manifest)
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
