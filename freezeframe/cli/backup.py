"""``freezeframe backup ...``"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from freezeframe.backup.repository import is_repository
from freezeframe.backup.store import open_store
from freezeframe.catalog.store import validate_name
from freezeframe.cli.context import (
    App,
    keep_freed_memory,
    locate_backup,
    pass_app,
    passphrase_options,
    read_passphrase,
    repo_option,
)
from freezeframe.cli.output import (
    backup_json,
    backup_table,
    backups_table,
    byte_progress,
    emit_json,
    emit_progress,
    human_size,
    output_option,
    progress,
    record_table,
    records_table,
    stderr,
    stdout,
)
from freezeframe.cli.point import plan_point, point_options
from freezeframe.engine.backup import BackupPlan, Transfer, restore_backup, roll_back_backup, take_backup
from freezeframe.errors import BackupFailed, Conflict, InvalidInput, LabError, NotFound, UnreadableData
from freezeframe.jobs.file_restore import Entry, GuestFiles, guest_files
from freezeframe.jobs.prune import plan_prune, prune
from freezeframe.jobs.restore_check import Booter, check_restore
from freezeframe.jobs.serve import ServeError, ServeRequest, serve
from freezeframe.jobs.verify import due, verify_backups
from freezeframe.model import Backup, BackupState, BackupType


@click.group("backup")
def group() -> None:
    """Back up VMs into a repository, list, restore and delete backups.

    A backup takes the same consistent point as a snapshot (levels, writers, guest hooks,
    freeze guard), but copies it into a repository instead of adding an overlay to the
    VM's chain: the VM's disks are left as they were, and the backup outlives the host."""


def _show(backup: Backup, fmt: str) -> None:
    if fmt == "json":
        emit_json(backup_json(backup))
    else:
        stdout.print(backup_table(backup))


@group.command("create")
@click.argument("instance")
@click.option("--type", "kind", type=click.Choice([t.value for t in BackupType]),
              help="full: every allocated block; incremental: what changed since the previous backup; "
                   "differential: since the last full; copy: a full that leaves bitmaps and the chain alone. "
                   "Default: incremental once a full exists, else full.")
@point_options
@repo_option
@passphrase_options
@click.option("--fleecing-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the temporary snapshot data goes (old blocks the guest overwrites during the "
                   "backup). Default: fleecing/ in the home.")
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Parallel reads. Default: two per core.")
@output_option
@pass_app
def create(app: App, /, instance: str, kind: str | None, repo_path: str | None, passphrase_file: Path | None,
           passphrase_env: str | None, fleecing_dir: Path | None, workers: int | None, fmt: str,
           **point: Any) -> None:
    """Back up every disk of INSTANCE at one consistent instant into the repository."""
    keep_freed_memory()
    backup_id = str(uuid.uuid4())
    point_plan = plan_point(app, instance, name=f"backup-{backup_id[:8]}", snapshot_id=backup_id, **point)
    repo = app.repository(repo_path, read_passphrase(passphrase_file, passphrase_env))
    plan = BackupPlan(point=point_plan, type=BackupType(kind) if kind else None, repository=repo,
                      fleecing_dir=(fleecing_dir or app.home.fleecing).absolute(), run_dir=app.home.run,
                      **({"workers": workers} if workers else {}))
    with progress(f"backup of {instance}") as say, \
            byte_progress(f"backup of {instance}", enabled=fmt != "json") as bar:

        def moved(t: Transfer) -> None:
            c = t.counters
            bar(t.done, t.total, f"new {human_size(c.new)}, dedup {human_size(c.reused)}")

        try:
            backup = asyncio.run(take_backup(plan, app.catalog, lock_dir=app.home.locks, progress=say,
                                             transfer=moved))
        except BackupFailed as failure:
            if failure.snapshot_id is not None:
                _show(app.catalog.backup(failure.snapshot_id), fmt)
            raise
    _show(backup, fmt)


@group.command("list")
@click.option("--instance", help="Only this instance's backups.")
@click.option("--all", "everything", is_flag=True, help="Include failed and deleted backups.")
@click.option("--repo", "repo_path", metavar="PATH|s3://BUCKET/PREFIX[?endpoint=URL]",
              help="List what the repository holds, from its manifests: every host's backups, whether this "
                   "host's catalog knows them or not (disaster recovery on a new host).")
@passphrase_options
@output_option
@pass_app
def list_(app: App, instance: str | None, everything: bool, repo_path: str | None, passphrase_file: Path | None,
          passphrase_env: str | None, fmt: str) -> None:
    """List complete backups, oldest first (a partial backup is never listed): this host's,
    from its catalog, or with --repo every backup in a repository, from the repository alone."""
    if repo_path is not None:
        from freezeframe.jobs.repo_import import listing

        repo = app.repository(repo_path, read_passphrase(passphrase_file, passphrase_env))
        found = [b for b in listing(repo) if instance is None or b.get("instance") == instance]
        if fmt == "json":
            emit_json(found)
        else:
            stdout.print(records_table(
                [{**b, "id": b["id"][:8], "created_at": str(b.get("created_at", ""))[:19].replace("T", " "),
                  "parent": (b.get("parent") or "-")[:8], "consistency": b.get("consistency") or "-",
                  "host": b.get("host") or "-", "error": b.get("error") or ""} for b in found],
                ["id", "instance", "host", "created_at", "type", "consistency", "parent", "error"]))
        return
    states = tuple(BackupState) if everything else (BackupState.CREATED,)
    backups = app.catalog.backups(instance=instance, states=states)
    if instance is not None and not backups and not app.catalog.backups(instance=instance, states=tuple(BackupState)):
        app.catalog.instance(instance)  # a typo should say so; backups outlive their instance, so only then
    if fmt == "json":
        emit_json([backup_json(b) for b in backups])
    else:
        stdout.print(backups_table(backups))


@group.command("show")
@click.argument("backup")
@click.option("--repo", "repo_path", metavar="PATH|s3://BUCKET/PREFIX[?endpoint=URL]",
              help="Show it from the repository's manifest (a backup this host's catalog does not know).")
@passphrase_options
@output_option
@pass_app
def show(app: App, backup: str, repo_path: str | None, passphrase_file: Path | None, passphrase_env: str | None,
         fmt: str) -> None:
    """Show one backup (by id or id prefix): level, parent, and per disk what was read and stored."""
    if repo_path is None:
        _show(app.catalog.backup(backup), fmt)
        return
    from freezeframe.jobs.repo_import import backup_from_manifest

    repo = app.repository(repo_path, read_passphrase(passphrase_file, passphrase_env))
    backup_id = repo.resolve(backup)
    try:
        found = backup_from_manifest(repo.manifest(backup_id), repo.location)
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidInput(f"the manifest of backup {backup_id[:8]} in {repo.location} does not make sense: {err}",
                           hint="see: freezeframe backup verify --repo") from None
    _show(found, fmt)


@group.command("restore")
@click.argument("backup", required=False)
@click.option("--to", "dest", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the restored images (one per disk, named by device).")
@click.option("--format", "image_format", type=click.Choice(["qcow2", "raw"]), default="qcow2", show_default=True)
@click.option("--disk", "devices", multiple=True, metavar="DEVICE", help="Restore only this disk (repeatable).")
@click.option("--to-instance", "new_instance", metavar="NAME",
              help="Also register NAME as a new instance, set up like the backed-up one (template, consistency, "
                   "freeze budget, writers), to be given its sockets once QEMU runs on the restored images.")
@repo_option
@passphrase_options
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Parallel writes. Default: one per core.")
@click.option("--in-place", "in_place", is_flag=True,
              help="Onto the images already in DIR (DEVICE.raw or DEVICE.qcow2, as a restore names them; their "
                   "VM stopped): read each chunk's range, write only the chunks that differ.")
@click.option("--live", is_flag=True,
              help="Instant recovery of a libvirt domain's backup (with --to DIR --to-instance NEW): NEW starts at "
                   "once, defined like the backed-up domain, on empty overlays in DIR backed by the backup served "
                   "over NBD, while libvirt copies the backup in behind it; NEW is defined for good when every "
                   "disk is local. Lab VMs: lab up NAME --from-backup ID --live. With --resume: finish one.")
@click.option("--resume", "resume", metavar="NAME", help="With --live: finish the live restore of instance NAME.")
@click.option("--rate-limit", "rate_mib", type=click.FloatRange(min=0), default=None, metavar="MiB/s",
              help="With --live: the most each disk's copy reads per second (0: no limit); with --resume, "
                   "from now on (default: as the live restore began).")
@output_option
@pass_app
def restore(app: App, backup: str | None, dest: Path | None, image_format: str, devices: tuple[str, ...],
            new_instance: str | None, repo_path: str | None, passphrase_file: Path | None,
            passphrase_env: str | None, workers: int | None, in_place: bool, live: bool, resume: str | None,
            rate_mib: float | None, fmt: str) -> None:
    """Restore BACKUP's disks as complete images: sparse, every chunk checked against its hash.

    BACKUP is an id or id prefix from the catalog; with --repo, a backup id found only in
    that repository (restoring without the original catalog or instance) works too.

    --live --resume NAME finishes the live restore of NAME (started by 'lab up NAME
    --from-backup BACKUP --live') after the process copying it was killed: the backup is
    served again on the same socket, QEMU reconnects, the VM and the copy carry on."""
    if resume:
        _resume_live(app, live, resume, read_passphrase(passphrase_file, passphrase_env), rate_mib, fmt)
        return
    if live:
        if backup is None or dest is None or new_instance is None or in_place:
            raise click.UsageError("a live restore takes BACKUP, --to DIR and --to-instance NEW (not --in-place)")
        _restore_live(app, backup, dest, new_instance, repo_path, read_passphrase(passphrase_file, passphrase_env),
                      rate_mib, fmt)
        return
    if backup is None or dest is None:
        raise click.UsageError("give BACKUP and --to DIR")
    keep_freed_memory()
    if new_instance is not None:
        validate_name("instance", new_instance)
        if any(i.name == new_instance for i in app.catalog.instances()):
            raise Conflict(f"instance {new_instance!r} exists already", hint="choose another --to-instance name")
    repo, backup_id = locate_backup(app, backup, repo_path, read_passphrase(passphrase_file, passphrase_env))
    if in_place:
        if new_instance is not None:
            raise click.UsageError("--in-place rolls existing images back: it registers no new instance")
        with byte_progress(f"in-place restore of {backup_id[:8]}", enabled=fmt != "json") as bar:
            rolled = roll_back_backup(repo, backup_id, dest.absolute(), devices=devices,
                                      progress=lambda done, total: bar(done, total, "compared"),
                                      **({"workers": workers} if workers else {}))
        rows = [asdict(r) for r in rolled]
        if fmt == "json":
            emit_json(rows)
        else:
            stdout.print(records_table(rows, list(rows[0]) if rows else ["device"]))
        return
    with byte_progress(f"restore of {backup_id[:8]}", enabled=fmt != "json") as bar:
        restored = restore_backup(repo, backup_id, dest.absolute(), fmt=image_format, devices=devices,
                                  progress=lambda done, total: bar(done, total, ""),
                                  **({"workers": workers} if workers else {}))
    records = [{"device": device, "image": str(path), "format": image_format} for device, path in restored]
    if new_instance is not None:
        _register(app, new_instance, source=repo.manifest(backup_id)["instance"])
        for record in records:
            record["instance"] = new_instance
    if fmt == "json":
        emit_json(records)
    else:
        stdout.print(records_table(records, ["device", "image", "format", *(["instance"] if new_instance else [])]))
    if new_instance is not None:
        stderr.print(f"registered instance {new_instance}; once QEMU runs on these images, give it its sockets: "
                     f"freezeframe instance update {new_instance} --qmp SOCKET --qga SOCKET", highlight=False)


@group.command("serve")
@click.argument("backup")
@click.option("--disk", "devices", multiple=True, metavar="DEVICE",
              help="Serve only this disk (repeatable). Default: every disk, one export each, named by device.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The unix socket to listen on. Default: run/serve-BACKUP.sock in the home.")
@click.option("--cache", "cache_mib", type=click.IntRange(0, 1 << 20), default=256, show_default=True,
              metavar="MiB", help="Chunks kept in memory, per disk.")
@click.option("--read-ahead", type=click.IntRange(0, 256), default=4, show_default=True, metavar="CHUNKS",
              help="Chunks fetched ahead of a sequential reader.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=600.0, show_default=True, metavar="SECONDS",
              help="How long a read waits for an unreachable repository before it fails.")
@repo_option
@passphrase_options
@output_option
@pass_app
def serve_(app: App, backup: str, devices: tuple[str, ...], socket_path: Path | None, cache_mib: int,
           read_ahead: int, wait_s: float, repo_path: str | None, passphrase_file: Path | None,
           passphrase_env: str | None, fmt: str) -> None:
    """Serve BACKUP's disks read-only over NBD on a unix socket, straight from the
    repository (no restore first), until interrupted (Ctrl-C, SIGTERM).

    nbdkit does the serving, with freezeframe's plugin. Every chunk is checked against its
    hash as it is read: a damaged chunk is an I/O error on its sectors, named in the log
    (logs/serve-BACKUP.log in the home), never wrong data. Connect with any NBD client:
    qemu-img info 'nbd+unix:///vda?socket=PATH', nbdcopy, guestfish --format=raw -a URI."""
    request = _serve_request(app, backup, devices, repo_path, passphrase_file, passphrase_env,
                             cache_mib=cache_mib, read_ahead=read_ahead, wait_s=wait_s)
    backup_id = request.backup
    socket = (socket_path or app.home.run / f"serve-{backup_id[:8]}.sock").absolute()
    log = app.home.logs / f"serve-{backup_id[:8]}.log"
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopped.set())
    with serve(request, socket, log) as served:
        if fmt == "json":
            emit_json({"backup": backup_id, **served.describe()})
            sys.stdout.flush()
        else:
            stdout.print(record_table({"backup": backup_id, "socket": str(socket), "log": str(log),
                                       **{f"export {d}": served.uri(d) for d in served.exports}}))
            stderr.print("serving until interrupted (Ctrl-C)", highlight=False)
        with contextlib.suppress(KeyboardInterrupt):
            while not stopped.is_set() and served.process.poll() is None:
                stopped.wait(0.5)
    if served.process.returncode not in (None, 0, -signal.SIGTERM):
        raise ServeError(f"nbdkit stopped (exit {served.process.returncode})", hint=f"see {log}")


def _serve_request(app: App, backup: str, devices: tuple[str, ...], repo_path: str | None,
                   passphrase_file: Path | None, passphrase_env: str | None, **options: Any) -> ServeRequest:
    """What to serve: the backup located (catalog or --repo), the disks checked."""
    passphrase = read_passphrase(passphrase_file, passphrase_env)
    repo, backup_id = locate_backup(app, backup, repo_path, passphrase)
    disks = [str(d["device"]) for d in repo.manifest(backup_id)["disks"]]
    unknown = [d for d in devices if d not in disks]
    if unknown:
        raise NotFound(f"backup {backup_id[:8]} has no disk {', '.join(unknown)}",
                       hint=f"its disks: {', '.join(disks)}")
    return ServeRequest(location=repo.location, backup=backup_id, devices=list(devices) or disks,
                        identity=repo.identity, passphrase=passphrase, log_level=app.log_level, **options)


@contextlib.contextmanager
def _files_of(app: App, request: ServeRequest) -> Iterator[GuestFiles]:
    tag = f"{request.backup[:8]}-{os.getpid()}"
    with guest_files(request, app.home.run / f"files-{tag}.sock", app.home.logs / f"files-{request.backup[:8]}.log") \
            as files:
        yield files


def _mode_text(entry: Entry) -> str:
    return stat.filemode(entry.mode) if entry.kind != "filesystem" else "d---------"


@group.command("files")
@click.argument("backup")
@click.argument("path", default="")
@click.option("--disk", "devices", multiple=True, metavar="DEVICE", help="Look only at this disk (repeatable).")
@repo_option
@passphrase_options
@output_option
@pass_app
def files(app: App, backup: str, path: str, devices: tuple[str, ...], repo_path: str | None,
          passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """List a directory of BACKUP: PATH is FILESYSTEM/dir/..., where FILESYSTEM is a disk
    (vdb), a partition (vdb1) or a logical volume (lvm-VG-LV); without PATH, the file
    systems found.

    The guest's file systems are read in a sandbox appliance VM (libguestfs) from the
    backup served over NBD: nothing is restored first, and the host kernel never mounts a
    guest file system. Starting the appliance takes seconds (more without KVM)."""
    request = _serve_request(app, backup, devices, repo_path, passphrase_file, passphrase_env)
    with progress(f"files of {request.backup[:8]}") as say:
        say("starting the sandbox")
        with _files_of(app, request) as guest:
            entries = guest.listing(path)
    if fmt == "json":
        emit_json([e.to_json() for e in entries])
        return
    rows = [{"name": e.name + ("/" if e.kind in ("dir", "filesystem") else ""),
             "type": e.fstype if e.kind == "filesystem" else e.kind, "size": "" if e.kind == "filesystem" else
             str(e.size), "mode": _mode_text(e), "modified": "" if e.kind == "filesystem" else
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime)),
             "target": e.target or ""} for e in entries]
    stdout.print(records_table(rows, ["name", "type", "size", "mode", "modified", "target"]))


@group.command("extract")
@click.argument("backup")
@click.argument("paths", nargs=-1, required=True)
@click.option("--to", "dest", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to copy into (each PATH lands under its own base name).")
@click.option("--disk", "devices", multiple=True, metavar="DEVICE", help="Look only at this disk (repeatable).")
@click.option("--owner", is_flag=True, help="Keep the guest's owners (uid, gid); default: the files are yours.")
@repo_option
@passphrase_options
@output_option
@pass_app
def extract(app: App, backup: str, paths: tuple[str, ...], dest: Path, devices: tuple[str, ...], owner: bool,
            repo_path: str | None, passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Copy files or trees (PATH: FILESYSTEM/path, see 'backup files') out of BACKUP into DIR.

    Modes and times are kept; setuid, setgid and sticky bits are dropped; device nodes,
    FIFOs, sockets and symbolic links pointing out of what is extracted are not created
    (each is reported). Read in the sandbox, as 'backup files' is. A file that cannot be
    read (a damaged chunk) is named, the others are still copied, and the exit code is 11."""
    request = _serve_request(app, backup, devices, repo_path, passphrase_file, passphrase_env)
    with progress(f"extract from {request.backup[:8]}") as say:
        say("starting the sandbox")
        with _files_of(app, request) as guest:
            report = guest.extract(list(paths), dest.absolute(), owner=owner, progress=say)
    summary = {"backup": request.backup, "to": str(dest.absolute()), "files": report.files,
               "directories": report.directories, "symlinks": report.symlinks, "bytes": report.bytes,
               "skipped": report.skipped, "failed": report.failed}
    if fmt == "json":
        emit_json(summary)
    else:
        stdout.print(f"extracted {report.files} file(s), {report.directories} director(ies), {report.symlinks} "
                     f"link(s), {human_size(report.bytes)} into {dest}", highlight=False)
        for item in report.skipped:
            stderr.print(f"skipped {item['path']}: {item['why']}", highlight=False)
    if report.failed:
        raise UnreadableData("could not read " + "; ".join(f"{f['path']}: {f['error']}" for f in report.failed),
                              hint="the other files were extracted; see: freezeframe backup verify")


def _restore_live(app: App, backup: str, dest: Path, name: str, repo_path: str | None, passphrase: bytes | None,
                  rate_mib: float | None, fmt: str) -> None:
    from freezeframe.cli.lab import stream_live
    from freezeframe.jobs import live_restore
    from freezeframe.targets import libvirt_clone

    validate_name("instance", name)
    if any(i.name == name for i in app.catalog.instances()):
        raise Conflict(f"instance {name!r} exists already", hint="choose another --to-instance name")
    repo, backup_id = locate_backup(app, backup, repo_path, passphrase)
    source = app.catalog.instance(str(repo.manifest(backup_id)["instance"]))
    if source.kind != "libvirt" or not source.libvirt_uri:
        raise InvalidInput(f"backup {backup_id[:8]} is of {source.name}, a {source.kind} instance: a live restore "
                           "starts a libvirt domain (or a lab VM: lab up NAME --from-backup ID --live)",
                           hint="restore the images (backup restore --to DIR) and start the VM on them")
    dest = dest.absolute()
    if dest.exists() and any(dest.iterdir()):
        raise InvalidInput(f"{dest} is not empty", hint="a live restore puts its overlays into an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    state = live_restore.plan_clone(repo, backup_id, name, dest, app.home.run / f"live-{name}.sock",
                                    app.home.logs / f"live-{name}.log", libvirt_uri=source.libvirt_uri,
                                    rate=int((rate_mib or 0) * (1 << 20)))
    definition = libvirt_clone.source_definition(source.libvirt_uri, source.libvirt_domain or source.name)

    def boot(state: live_restore.LiveState) -> str:
        live_restore.start_clone(state, definition, dest)
        app.catalog.add_instance(name, kind="libvirt", qmp_socket=None, qga_socket=None, template=source.template,
                                 libvirt_uri=state.libvirt_uri, libvirt_domain=name)
        emit_progress({"event": "booted", "instance": name, "backup": backup_id, "libvirt_uri": state.libvirt_uri},
                      fmt)
        return ""

    done = stream_live(app, state, passphrase, boot=boot, fmt=fmt)
    record = {"instance": name, "backup": backup_id, "to": str(dest), "libvirt_uri": state.libvirt_uri,
              "live_restore": done.to_json()}
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(f"{name} runs on local images in {dest}: every disk is local, the domain is defined",
                     highlight=False)


def _resume_live(app: App, live: bool, resume: str | None, passphrase: bytes | None, rate_mib: float | None,
                 fmt: str) -> None:
    from freezeframe.cli.lab import stream_live
    from freezeframe.jobs import live_restore
    from freezeframe.lab import vm as lab_vm

    if not (live and resume):
        raise click.UsageError("a live restore starts with: freezeframe lab up NAME --from-backup BACKUP --live; "
                               "'backup restore --live --resume NAME' finishes one that was interrupted")
    state = live_restore.LiveState.load(app.home.live / f"{resume}.json")
    if rate_mib is not None:
        state.rate = int(rate_mib * (1 << 20))
    done = stream_live(app, state, passphrase, boot=None, fmt=fmt)
    if not state.libvirt_uri:  # libvirt rewrote its domain itself
        with contextlib.suppress(NotFound):
            lab_vm.set_attach(app.home.lab, resume, live_restore.qemu_args(state, backing=False))
    record = {"instance": resume, "backup": state.backup, "live_restore": done.to_json()}
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(f"live restore of {resume} finished: every disk is local", highlight=False)


def _mounted_at(mountpoint: Path) -> str | None:
    """The file system type mounted at ``mountpoint``, if any (from /proc/mounts)."""
    wanted = str(mountpoint).replace(" ", "\\040")
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[1] == wanted:
            return fields[2]
    return None


def _mount_record(app: App, mountpoint: Path) -> Path:
    """Where the pid of the process holding a mount is kept."""
    app.home.run.mkdir(parents=True, exist_ok=True)
    return app.home.run / f"mount-{hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]}.pid"


@group.command("mount")
@click.argument("backup")
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--disk", "devices", multiple=True, metavar="DEVICE", help="Show only this disk (repeatable).")
@click.option("--foreground", is_flag=True, help="Stay in the foreground until unmounted (default: in the background).")
@repo_option
@passphrase_options
@output_option
@pass_app
def mount(app: App, backup: str, mountpoint: Path, devices: tuple[str, ...], foreground: bool, repo_path: str | None,
          passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Show BACKUP's file systems read-only at MOUNTPOINT (one directory per file system,
    named as in 'backup files'), until 'backup unmount MOUNTPOINT'.

    The file systems are read in the sandbox appliance, as 'backup files' does; the host
    sees them through FUSE (it relays calls, it parses no guest file system)."""
    mountpoint = mountpoint.absolute()
    if not mountpoint.is_dir() or any(mountpoint.iterdir()):
        raise InvalidInput(f"{mountpoint} is not an empty directory", hint="mount on an empty directory")
    if _mounted_at(mountpoint) is not None:
        raise Conflict(f"something is mounted at {mountpoint} already")
    request = _serve_request(app, backup, devices, repo_path, passphrase_file, passphrase_env)
    if foreground:
        record = _mount_record(app, mountpoint)
        record.write_text(str(os.getpid()))
        try:
            with _files_of(app, request) as guest:
                shown = guest.box.mount_all()
                if not shown:
                    raise InvalidInput(f"backup {request.backup[:8]} has no file system to show",
                                       hint="see: freezeframe backup files " + request.backup[:8])
                guest.box.export(mountpoint)
        finally:
            record.unlink(missing_ok=True)
        return
    log = app.home.logs / f"mount-{request.backup[:8]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "freezeframe", "--home", str(app.home.root), "backup", "mount", request.backup,
            str(mountpoint), "--foreground", "--repo", request.location,
            *(a for d in devices for a in ("--disk", d)),
            *(["--passphrase-file", str(passphrase_file)] if passphrase_file else []),
            *(["--passphrase-env", passphrase_env] if passphrase_env else [])]
    with open(log, "ab") as out:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 600
    with progress(f"mount of {request.backup[:8]}") as say:
        say("starting the sandbox")
        while _mounted_at(mountpoint) is None:
            if child.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise ServeError(f"the mount of backup {request.backup[:8]} failed: {' / '.join(tail)}",
                                 hint=f"see {log}")
            if time.monotonic() > deadline:
                child.kill()
                raise ServeError(f"the sandbox did not show backup {request.backup[:8]} within 600s",
                                 hint=f"see {log}")
            time.sleep(0.2)
    described = {"backup": request.backup, "mountpoint": str(mountpoint), "pid": child.pid, "log": str(log)}
    if fmt == "json":
        emit_json(described)
    else:
        stdout.print(f"backup {request.backup[:8]} is at {mountpoint} (read-only) until: freezeframe backup "
                     f"unmount {mountpoint}", highlight=False)


@group.command("unmount")
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@pass_app
def unmount(app: App, mountpoint: Path) -> None:
    """Take a backup shown by 'backup mount' away from MOUNTPOINT; its sandbox and server stop."""
    mountpoint = mountpoint.absolute()
    kind = _mounted_at(mountpoint)
    if kind is None or not kind.startswith("fuse"):
        raise NotFound(f"no backup is mounted at {mountpoint}")
    record = _mount_record(app, mountpoint)
    done = subprocess.run(["guestunmount", str(mountpoint)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ServeError(f"cannot unmount {mountpoint}: {done.stderr.strip()}",
                         hint="close what uses files under it, then try again")
    with contextlib.suppress(OSError, ValueError):
        pid = int(record.read_text())
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    click.echo(f"unmounted {mountpoint}")


def _register(app: App, name: str, *, source: str) -> None:
    """A new instance set up like ``source`` (when the catalog still knows it), without sockets."""
    try:
        original = app.catalog.instance(source)
    except NotFound:
        app.catalog.add_instance(name, kind="qemu", qmp_socket=None, qga_socket=None)
        return
    app.catalog.add_instance(name, kind="qemu", qmp_socket=None, qga_socket=None, template=original.template,
                             application_consistent=original.own_application_consistent,
                             freeze_budget=original.freeze_budget)
    for spec in app.catalog.writers(source):
        app.catalog.add_writer(name, spec)


@group.command("delete")
@click.argument("backup")
@passphrase_options
@output_option
@pass_app
def delete(app: App, backup: str, passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Delete a backup: its manifest and indexes. Chunks other backups use stay; every other
    backup stays restorable (each index is complete). A backup whose repository is gone is
    only marked deleted."""
    found = app.catalog.backup(backup)
    if found.state is BackupState.CREATED:
        where = found.repository
        if is_repository(open_store(where)):
            repo = app.repository(where, read_passphrase(passphrase_file, passphrase_env))
            repo.delete_backup(found.id)
        else:
            found.error = f"its repository {where} was gone when it was deleted"
    found.state = BackupState.DELETED
    app.catalog.save_backup(found)
    _show(app.catalog.backup(found.id), fmt)


@group.command("verify")
@click.argument("backups", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every backup in the repository.")
@click.option("--subset", type=click.FloatRange(0, 100, min_open=True), default=100.0, metavar="PERCENT",
              help="Read back only this percentage of the chunks, chosen at random (a subset that holds "
                   "records nothing; one that fails records the failure). Default: all of them.")
@click.option("--outdated-after", type=click.FloatRange(min=0), metavar="DAYS",
              help="With --all: only backups not verified in full within DAYS (or never, or failed).")
@repo_option
@passphrase_options
@output_option
@pass_app
def verify(app: App, backups: tuple[str, ...], everything: bool, subset: float, outdated_after: float | None,
           repo_path: str | None, passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Read back every chunk of BACKUPS (or --all) and check each against its hash (and its
    authentication tag when encrypted); check that every index names only stored chunks.

    Each damaged or missing chunk is reported with every backup that uses it. The outcome
    is recorded on each backup (see backup show). Exits 11 when anything is damaged or
    missing, 0 when every backup held."""
    if bool(backups) == everything:
        raise InvalidInput("name the backups to verify, or give --all", hint="see: freezeframe backup list")
    if outdated_after is not None and not everything:
        raise InvalidInput("--outdated-after selects among --all", hint="add --all")
    passphrase = read_passphrase(passphrase_file, passphrase_env)
    if everything:
        repo = app.repository(repo_path, passphrase)
        ids = repo.backup_ids()
        if outdated_after is not None:
            known = {b.id for b in app.catalog.backups(repository=repo.location)}
            wanted = set(due(app.catalog, repo.location, outdated_after_days=outdated_after))
            ids = [i for i in ids if i in wanted or i not in known]
    else:
        located = [locate_backup(app, ref, repo_path, passphrase) for ref in backups]
        places = {repo.location for repo, _ in located}
        if len(places) > 1:
            raise InvalidInput(f"the backups are in {len(places)} repositories: {', '.join(sorted(places))}",
                               hint="verify each repository's backups in a run of their own")
        repo, ids = located[0][0], [backup_id for _, backup_id in located]
    with byte_progress("verify", enabled=fmt != "json") as bar:
        outcome = verify_backups(app.catalog, repo, ids, subset=subset,
                                 progress=lambda done, total: bar(done, total, ""))
    report = outcome.report
    damaged = [{"chunk": c, "why": why, "backups": report.users[c]} for c, why in sorted(report.damaged.items())]
    missing = [{"chunk": c, "backups": report.users[c]} for c in report.missing]
    failed = sorted(report.failed_backups())
    record: dict[str, Any] = {
        "repository": repo.location, "backups": report.backups, "held": outcome.held,
        "failed_backups": failed, "coverage_percent": report.coverage,
        "chunks_named": report.chunks_named, "chunks_read": report.chunks_read, "bytes_read": report.bytes_read,
        "damaged": damaged, "missing": missing, "broken": report.broken, "quarantined": report.quarantined,
    }
    if fmt == "json":
        emit_json(record)
    else:
        problems = [f"chunk {c}: {why}; used by {', '.join(b[:8] for b in report.users[c])}"
                    for c, why in sorted(report.damaged.items())]
        problems += [f"chunk {c} is missing; used by {', '.join(b[:8] for b in report.users[c])}"
                     for c in report.missing]
        problems += [f"backup {b[:8]}: {p}" for b, found in report.broken.items() for p in found]
        if report.quarantined:
            problems.append(f"{len(report.quarantined)} damaged chunk(s) moved to quarantine/: the next backup that "
                            "reads their content stores it again, and the backups naming them restore again")
        shown = {"repository": repo.location, "backups": len(report.backups),
                 "read": f"{report.chunks_read} of {report.chunks_named} chunks ({human_size(report.bytes_read)})",
                 "held": "yes" if outcome.held else "NO",
                 "failed backups": ", ".join(b[:8] for b in failed) or "none",
                 "problems": "\n".join(problems) or "none"}
        stdout.print(record_table(shown))
    if not outcome.held:
        raise click.exceptions.Exit(11)


@group.command("test")
@click.argument("backup")
@click.option("--boot", is_flag=True, help="Also boot the restored disks as a lab VM and wait for its guest agent "
                                           "(lab images only).")
@click.option("--scratch", type=click.Path(file_okay=False, path_type=Path),
              help="Where to restore. Default: scratch/ in the home. Needs room for the disks (sparse).")
@click.option("--keep", is_flag=True, help="Keep the restored images (in the scratch directory).")
@repo_option
@passphrase_options
@output_option
@pass_app
def test(app: App, backup: str, boot: bool, scratch: Path | None, keep: bool, repo_path: str | None,
         passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Restore BACKUP to scratch images and prove it works.

    Checks every file system on the restored disks with its own tool (e2fsck -fn,
    xfs_repair -n), and that a backup taken at filesystem level or above has a clean ext4
    journal or XFS log. Opens the SQLite databases the guest's freeze hook held and runs
    PRAGMA integrity_check on copies. With --boot, boots the disks. The outcome is recorded
    on the backup (see backup show). Exits 7 when a check failed."""
    repo, backup_id = locate_backup(app, backup, repo_path, read_passphrase(passphrase_file, passphrase_env))
    booter = _lab_booter(app, backup_id) if boot else None
    with byte_progress(f"restore test of {backup_id[:8]}", enabled=fmt != "json") as bar:
        result = check_restore(app.catalog, repo, backup_id, scratch=(scratch or app.home.root / "scratch").absolute(),
                               boot=booter, keep=keep, progress=lambda done, total: bar(done, total, "restoring"))
    record = {"backup": backup_id, **result.to_json()}
    if fmt == "json":
        emit_json(record)
    else:
        rows = [{"check": c.what, "where": c.where, "passed": "yes" if c.passed else "NO", "detail": c.detail}
                for c in result.checks]
        stdout.print(records_table(rows, ["check", "where", "passed", "detail"]))
        stdout.print(f"restore test of {backup_id[:8]}: {record['outcome']}")
    if not result.passed:
        raise click.exceptions.Exit(7)


def _lab_booter(app: App, backup_id: str) -> Booter:
    def boot(images: list[tuple[str, Path]]) -> str:
        import subprocess

        from freezeframe.agent.qga import GuestAgent
        from freezeframe.lab import vm as lab_vm

        name = f"restore-test-{backup_id[:8]}"
        qcows = []
        for _, raw in images:
            qcow = raw.with_suffix(".boot.qcow2")
            done = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise LabError(f"qemu-img could not make a bootable copy of {raw.name}: {done.stderr.strip()}")
            qcows.append(qcow)
        vm = lab_vm.up(app.home.lab, app.home.images, name, disk_images=qcows)
        try:

            async def ping() -> dict[str, Any]:
                async with GuestAgent(vm.qga_socket, timeout=30) as agent:
                    info: dict[str, Any] = await agent.execute("guest-get-osinfo")
                    return info

            info = asyncio.run(ping())
            return (f"lab VM booted on {len(qcows)} restored disks; its guest agent answered "
                    f"({info.get('pretty-name') or info.get('kernel-release', 'an OS')})")
        finally:
            lab_vm.down(app.home.lab, name)

    return boot


@group.command("prune")
@click.argument("instance", required=False)
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@passphrase_options
@output_option
@pass_app
def prune_(app: App, instance: str | None, dry_run: bool, passphrase_file: Path | None, passphrase_env: str | None,
           fmt: str) -> None:
    """Delete the backups that INSTANCE's retention policy (or every instance's) no longer
    keeps (see: freezeframe policy set). Their chunks are freed by: freezeframe repo gc."""
    decisions = plan_prune(app.catalog, instance)
    if not dry_run:
        passphrase = read_passphrase(passphrase_file, passphrase_env)
        prune(app.catalog, decisions, lambda where: app.repository(where, passphrase))
    rows = [{"instance": d.instance, "backup": d.backup, "created_at": d.created_at, "repository": d.repository,
             "action": "keep" if d.kept_by else ("would delete" if dry_run else "deleted"), "rule": d.kept_by}
            for d in decisions]
    if fmt == "json":
        emit_json(rows)
    else:
        shown = [{**r, "backup": str(r["backup"])[:8], "rule": r["rule"] or "-"} for r in rows]
        stdout.print(records_table(shown, ["instance", "backup", "created_at", "action", "rule"]))
