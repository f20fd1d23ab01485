"""``freezeframe lab ...``: small real VMs to try freezeframe on."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from freezeframe.cli.context import App, locate_backup, pass_app, passphrase_options, read_passphrase, repo_option
from freezeframe.cli.output import (
    byte_progress,
    emit_json,
    emit_progress,
    output_option,
    progress,
    record_table,
    records_table,
    stdout,
)
from freezeframe.engine.backup import restore_backup
from freezeframe.errors import NotFound
from freezeframe.jobs import live_restore
from freezeframe.lab import apps as lab_apps
from freezeframe.lab import debian as lab_debian
from freezeframe.lab import image as lab_image
from freezeframe.lab import vm as lab_vm
from freezeframe.lab.image import SAMPLE_HOOKS
from freezeframe.model import WriterSpec

DISTROS = ("busybox", "debian")


@click.group("lab")
def group() -> None:
    """Build and run small lab VMs (Debian kernel, busybox, qemu-ga) under QEMU."""


def _record(vm: lab_vm.LabVM) -> dict[str, Any]:
    data = asdict(vm)
    data["running"] = vm.running
    return data


@group.command("build")
@click.option("--distro", type=click.Choice(DISTROS), default="busybox", show_default=True,
              help="busybox: the fast lab guest (the host's kernel, busybox and qemu-ga in an initramfs). "
                   "debian: a Debian 12 installation (systemd, its own kernel and qemu-guest-agent with the "
                   "stock fsfreeze-hook, PostgreSQL 15 on a second disk), built with mmdebstrap from this "
                   "machine's apt sources: minutes, once.")
@pass_app
def build(app: App, distro: str) -> None:
    """Build a lab guest image now, if it is not cached yet."""
    if distro == "debian":
        built = lab_debian.ensure_image(app.home.images)
        click.echo(f"kernel: {built.kernel}\ninitrd: {built.initrd}\nroot: {built.root}\npgdata: {built.pgdata}")
        return
    image = lab_image.ensure_image(app.home.images)
    click.echo(f"kernel: {image.kernel}\ninitrd: {image.initrd}")


@group.command("up")
@click.argument("name")
@click.option("--disks", type=click.IntRange(1, 8), default=2, show_default=True, help="Number of data disks.")
@click.option("--fs", type=click.Choice(lab_vm.FILESYSTEMS), default="ext4", show_default=True,
              help="File system on every data disk.")
@click.option("--no-agent", is_flag=True, help="Do not run qemu-ga in the guest.")
@click.option("--workload", is_flag=True, help="Keep appending sequence numbers to every data disk.")
@click.option("--workload-sync", is_flag=True, help="With --workload: fdatasync after every write.")
@click.option("--app", "application", type=click.Choice(["sqlite", "postgresql", "mariadb"]),
              help="Run an application in the guest: sqlite commits rows to /mnt/ffdata0/app.db; postgresql "
                   "and mariadb run the host's server on /mnt/ffdata0, reachable on a port of 127.0.0.1 "
                   "(app_port), with its writer registered.")
@click.option("--hook", "hooks", multiple=True, type=click.Choice(sorted(SAMPLE_HOOKS)),
              help="Install a sample freeze hook in /etc/qemu/fsfreeze-hook.d (repeatable, in order): "
                   "sqlite holds the app's write lock; ok, fail, hang and badowner show the failure policies.")
@click.option("--hook-policy", type=click.Choice(["fail", "continue"]), default="fail", show_default=True,
              help="What a failing hook does: fail the freeze, or continue and report it.")
@click.option("--hook-timeout", type=click.FloatRange(0.1, 600), default=10.0, show_default=True,
              help="Seconds each hook may take before its process group is killed.")
@click.option("--hook-runner", type=click.Choice(lab_vm.HOOK_RUNNERS), default="python", show_default=True,
              help="Who runs the hooks: freezeframe's guest hook runner (python, or sh for guests without "
                   "Python), or qemu-ga's stock fsfreeze-hook script (qemu-ga -F/etc/qemu/fsfreeze-hook), "
                   "whose log freezeframe reads as evidence.")
@click.option("--distro", type=click.Choice(DISTROS), default="busybox", show_default=True,
              help="The guest: busybox (boots in seconds), or debian (a Debian 12 installation with PostgreSQL "
                   "on its second disk; under TCG it boots in about a minute). See 'lab build --help'.")
@click.option("--stock-hook", "stock_hooks", multiple=True, type=click.Choice(sorted(lab_debian.STOCK_HOOKS)),
              help="With --distro debian: put this hook in /etc/qemu/fsfreeze-hook.d, run by the stock "
                   "fsfreeze-hook script (postgresql: a CHECKPOINT at the freeze).")
@click.option("--libvirt", "libvirt", is_flag=True,
              help="Run it as a transient libvirt domain (starting virtlogd and libvirtd if none runs).")
@click.option("--uri", default="qemu:///system", show_default=True, help="With --libvirt: the libvirt connection.")
@click.option("--template", help="Template the new instance inherits from.")
@click.option("--from-backup", "from_backup", metavar="BACKUP",
              help="Boot on the disks of this backup (restored as qcow2 first) instead of new empty ones.")
@click.option("--live", is_flag=True,
              help="With --from-backup: boot at once on empty local overlays backed by the backup served over "
                   "NBD, and copy the backup in behind the running guest (block-stream); returns when every disk "
                   "is local (with --libvirt: a libvirt domain, pulled by libvirt). If interrupted, finish with: "
                   "freezeframe backup restore --live --resume NAME (the daemon does it by itself).")
@click.option("--rate-limit", "rate_mib", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="MiB/s", help="With --live: the most each disk's copy reads per second.")
@click.option("--repo-wait", "repo_wait", type=click.FloatRange(min=0), default=30.0, show_default=True,
              metavar="SECONDS", help="With --live: how long a read waits for an unreachable repository before "
                                      "the VM pauses (it is resumed once the repository answers again).")
@repo_option
@passphrase_options
@output_option
@pass_app
def up(app: App, name: str, disks: int, fs: str, no_agent: bool, workload: bool, workload_sync: bool,
       application: str | None, hooks: tuple[str, ...], hook_policy: str, hook_timeout: float,
       hook_runner: str, distro: str, stock_hooks: tuple[str, ...], libvirt: bool, uri: str,
       template: str | None, from_backup: str | None, live: bool, rate_mib: float | None, repo_wait: float,
       repo_path: str | None,
       passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Start lab VM NAME and register it as instance NAME."""
    # Check names before the slow part, so a clash is reported at once.
    try:
        app.catalog.instance(name)
    except NotFound:
        pass
    else:
        raise click.UsageError(f"an instance named {name!r} exists already; choose another name")
    if template is not None:
        app.catalog.template(template)
    if live or rate_mib is not None:
        if from_backup is None or not live:
            raise click.UsageError("--live goes with --from-backup, and --rate-limit with --live")
        if distro != "busybox" or application or hooks:
            raise click.UsageError("--live boots the busybox lab guest (no --distro, --app or --hook)")
        _up_live(app, name, from_backup, repo_path, read_passphrase(passphrase_file, passphrase_env),
                 template=template, workload=workload, rate=int((rate_mib or 0) * (1 << 20)), wait_s=repo_wait,
                 libvirt_uri=uri if libvirt else None, fmt=fmt)
        return
    images: list[Path] | None = None
    with progress(f"lab VM {name}") as say, tempfile.TemporaryDirectory(dir=app.home.root) as scratch:
        if from_backup is not None:
            say(f"restoring backup {from_backup}")
            repo, backup_id = locate_backup(app, from_backup, repo_path,
                                            read_passphrase(passphrase_file, passphrase_env))
            images = [path for _, path in restore_backup(repo, backup_id, Path(scratch), fmt="qcow2")]
        say("booting")
        if distro == "debian":
            if from_backup is not None or libvirt or hooks or application:
                raise click.UsageError("--distro debian boots its own disks under QEMU, with PostgreSQL: "
                                       "without --from-backup, --libvirt, --hook or --app")
            vm = lab_vm.up_debian(app.home.lab, app.home.images, name, stock_hooks=stock_hooks)
        elif stock_hooks:
            raise click.UsageError("--stock-hook goes with --distro debian (the busybox guest has --hook)")
        else:
            vm = lab_vm.up(app.home.lab, app.home.images, name, disks=disks, fs=fs, agent=not no_agent,
                           workload=workload, workload_sync=workload_sync, app=application, hooks=hooks,
                           hook_policy=hook_policy, hook_timeout=hook_timeout, hook_runner=hook_runner,
                           disk_images=images, libvirt_uri=uri if libvirt else None)
    try:
        if vm.libvirt_uri is not None:
            app.catalog.add_instance(name, kind="libvirt", qmp_socket=None, qga_socket=None, template=template,
                                     lab=True, libvirt_uri=vm.libvirt_uri, libvirt_domain=vm.name)
        else:
            app.catalog.add_instance(name, kind="qemu", qmp_socket=vm.qmp_socket,
                                     qga_socket=vm.qga_socket if vm.agent else None, template=template, lab=True,
                                     application_consistent=True if vm.app in lab_apps.DATABASES else None)
        if vm.app in lab_apps.DATABASES and vm.app_port is not None:
            kind, options = lab_apps.writer_for(vm.app, vm.app_port)
            app.catalog.add_writer(name, WriterSpec(name=kind, kind=kind, options=options))
    except BaseException:
        lab_vm.down(app.home.lab, name)
        raise
    if fmt == "json":
        emit_json(_record(vm))
    else:
        stdout.print(record_table(_record(vm)))


def _up_live(app: App, name: str, from_backup: str, repo_path: str | None, passphrase: bytes | None, *,
             template: str | None, workload: bool, rate: int, wait_s: float, libvirt_uri: str | None,
             fmt: str) -> None:
    repo, backup_id = locate_backup(app, from_backup, repo_path, passphrase)
    state = live_restore.plan(repo, backup_id, name, (app.home.lab / name).resolve(),
                              app.home.run / f"live-{name}.sock", app.home.logs / f"live-{name}.log", rate=rate,
                              wait_s=wait_s, libvirt_uri=libvirt_uri or "")

    def boot(state: live_restore.LiveState) -> str:
        if libvirt_uri is not None:
            # A transient domain whose disks' backing is the export: libvirt knows the chain.
            vm = lab_vm.up(app.home.lab, app.home.images, name, disks=len(state.disks), workload=workload,
                           libvirt_uri=libvirt_uri, setup=lambda _: live_restore.create_overlays(state),
                           libvirt_backing=live_restore.nbd_backing(state))
        else:
            vm = lab_vm.up_attached(app.home.lab, app.home.images, name, attach=live_restore.qemu_args(state),
                                    disks=[d.overlay for d in state.disks], workload=workload,
                                    setup=lambda _: live_restore.create_overlays(state))
        try:
            if vm.libvirt_uri is not None:
                app.catalog.add_instance(name, kind="libvirt", qmp_socket=None, qga_socket=None, template=template,
                                         lab=True, libvirt_uri=vm.libvirt_uri, libvirt_domain=vm.name)
            else:
                app.catalog.add_instance(name, kind="qemu", qmp_socket=vm.qmp_socket, qga_socket=vm.qga_socket,
                                         template=template, lab=True)
        except BaseException:
            lab_vm.down(app.home.lab, name)
            raise
        shown = {"event": "booted", "instance": name, "backup": backup_id, "qmp_socket": vm.qmp_socket,
                 "qga_socket": vm.qga_socket, "libvirt_uri": vm.libvirt_uri}
        emit_progress(shown, fmt)
        return vm.qmp_socket

    done = stream_live(app, state, passphrase, boot=boot, fmt=fmt)
    vm = lab_vm.get(app.home.lab, name) if libvirt_uri is not None else lab_vm.set_attach(
        app.home.lab, name, live_restore.qemu_args(state, backing=False))
    record = {**_record(vm), "live_restore": done.to_json()}
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(record_table({k: v for k, v in record.items() if k != "attach"}))


def stream_live(app: App, state: live_restore.LiveState, passphrase: bytes | None, *,
                 boot: Callable[[live_restore.LiveState], str] | None, fmt: str) -> live_restore.Progress:
    """The stream with its progress shown: a bar on a terminal, JSON lines on stderr for -o json."""
    last = [0.0]

    def show(step: live_restore.Progress) -> None:
        if fmt == "json":
            if time.monotonic() - last[0] >= 2 or step.done >= step.total:
                last[0] = time.monotonic()
                emit_progress({"event": "progress", **step.to_json()}, fmt)
        else:
            bar(step.done, step.total, "waiting for the repository" if step.paused else "")

    with byte_progress(f"live restore of {state.instance}", enabled=fmt != "json") as bar:
        return live_restore.run(state, app.home.live / f"{state.instance}.json", passphrase, boot=boot,
                                on_progress=show)


@group.command("down")
@click.argument("name")
@pass_app
def down(app: App, name: str) -> None:
    """Stop lab VM NAME, remove its files, and forget the instance and its snapshots."""
    lab_vm.down(app.home.lab, name)
    with contextlib.suppress(NotFound):
        app.catalog.remove_instance(name, force=True)
    click.echo(f"stopped and removed lab VM {name}")


@group.command("list")
@output_option
@pass_app
def list_(app: App, fmt: str) -> None:
    """List lab VMs."""
    records = [_record(vm) for vm in lab_vm.list_vms(app.home.lab)]
    if fmt == "json":
        emit_json(records)
    else:
        stdout.print(records_table(records, ["name", "running", "accel", "fs", "agent", "workload", "pid",
                                             "directory"]))
