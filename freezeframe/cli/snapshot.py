"""``freezeframe snapshot ...``"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import click

from freezeframe.cli.context import App, pass_app
from freezeframe.cli.output import (
    emit_json,
    output_option,
    progress,
    snapshot_json,
    snapshot_table,
    snapshots_table,
    stdout,
)
from freezeframe.cli.point import plan_point, point_options
from freezeframe.engine.run import delete_snapshot, take_snapshot
from freezeframe.errors import InvalidInput, SnapshotFailed
from freezeframe.model import Snapshot, SnapshotState
from freezeframe.targets.host import mount_copies, unmount_copies


@click.group("snapshot")
def group() -> None:
    """Take, list, inspect and delete snapshots."""


def _show(snap: Snapshot, fmt: str) -> None:
    if fmt == "json":
        emit_json(snapshot_json(snap))
    else:
        stdout.print(snapshot_table(snap))


@group.command("create")
@click.argument("instance")
@click.option("--name", help="Snapshot name. Default: <instance>-<UTC timestamp>.")
@point_options
@output_option
@pass_app
def create(app: App, /, instance: str, name: str | None, fmt: str, **point: Any) -> None:
    """Snapshot every disk of INSTANCE at one instant, as consistent as it allows.

    application: every selected writer quiesced, file systems frozen; filesystem: file
    systems frozen; crash: nothing coordinated. The record says which level held and why
    it stepped down."""
    plan = plan_point(app, instance, name=name, **point)
    with progress(f"snapshot of {plan.instance.name}") as say:
        try:
            snap = asyncio.run(take_snapshot(plan, app.catalog, lock_dir=app.home.locks, progress=say))
        except SnapshotFailed as failure:
            if failure.snapshot_id is not None:
                _show(app.catalog.snapshot(failure.snapshot_id), fmt)
            raise
    _show(snap, fmt)


@group.command("list")
@click.option("--instance", help="Only this instance's snapshots.")
@click.option("--all", "include_deleted", is_flag=True, help="Include deleted snapshots.")
@output_option
@pass_app
def list_(app: App, instance: str | None, include_deleted: bool, fmt: str) -> None:
    """List snapshots, oldest first."""
    if instance is not None:
        app.catalog.instance(instance)  # a typo should say so, not print an empty list
    snaps = app.catalog.snapshots(instance=instance, include_deleted=include_deleted)
    if fmt == "json":
        emit_json([snapshot_json(s) for s in snaps])
    else:
        stdout.print(snapshots_table(snaps))


@group.command("show")
@click.argument("snapshot")
@output_option
@pass_app
def show(app: App, snapshot: str, fmt: str) -> None:
    """Show one snapshot (by id, id prefix or name)."""
    _show(app.catalog.snapshot(snapshot), fmt)


@group.command("manifest")
@click.argument("snapshot")
@pass_app
def manifest(app: App, snapshot: str) -> None:
    """Print the snapshot's manifest (JSON): disks, file systems, levels, timings, events."""
    click.echo(json.dumps(app.catalog.snapshot(snapshot).manifest, indent=2))


@group.command("mount")
@click.argument("snapshot")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@pass_app
def mount(app: App, snapshot: str, directory: Path) -> None:
    """Mount a host snapshot's copies read-only at DIRECTORY."""
    snap = app.catalog.snapshot(snapshot)
    if app.catalog.instance(snap.instance).kind != "host":
        raise InvalidInput(f"snapshot {snap.name} is of a VM; only host snapshots can be mounted",
                           hint="read a VM snapshot's images with qemu-img (see snapshot show)")
    if snap.state is not SnapshotState.CREATED:
        raise InvalidInput(f"snapshot {snap.name} is {snap.state.value}, not created")
    for device, where in mount_copies(snap.disks, directory.absolute()):
        click.echo(f"{device} -> {where} (read-only)")


@group.command("unmount")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
def unmount(directory: Path) -> None:
    """Unmount a snapshot mounted with snapshot mount."""
    for where in unmount_copies(directory):
        click.echo(f"unmounted {where}")


@group.command("delete")
@click.argument("snapshot")
@output_option
@pass_app
def delete(app: App, snapshot: str, fmt: str) -> None:
    """Delete a snapshot, merging its images back so the VM keeps a valid chain."""
    with progress(f"deleting {snapshot}") as say:
        snap = asyncio.run(delete_snapshot(app.catalog, snapshot, lock_dir=app.home.locks, progress=say))
    _show(snap, fmt)
