"""How records look to people (rich tables) and to scripts (JSON with snake_case keys)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from freezeframe.model import Backup, Instance, Snapshot, Template

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


class _LazyConsole:
    """A rich Console made on first use: rich takes a tenth of a second to import, which a
    command that prints JSON (scripts, the incremental backups of a schedule) never needs."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._console: Console | None = None

    def real(self) -> Console:
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # Piped output (logs, CI) gets full rows instead of rich's 80-column guess.
            self._console = Console(stderr=self._stderr, soft_wrap=False, width=None if stream.isatty() else 220)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


_stdout, _stderr = _LazyConsole(stderr=False), _LazyConsole(stderr=True)
stdout: Console = _stdout  # type: ignore[assignment]
stderr: Console = _stderr  # type: ignore[assignment]


def warn(message: str) -> None:
    """A warning for the user, on stderr (stdout stays for the result)."""
    from rich.text import Text

    stderr.print(Text.assemble(("warning: ", "bold yellow"), message), highlight=False)

FORMATS = click.Choice(["table", "json"])


def output_option(f: Any) -> Any:
    return click.option("-o", "--output", "fmt", type=FORMATS, default="table", show_default=True,
                        help="table for people, json for scripts")(f)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def emit_progress(event: dict[str, Any], fmt: str) -> None:
    """A step of a long job on stderr: one JSON line each for -o json (scripts follow it
    while stdout waits for the result), else a short line for people."""
    if fmt == "json":
        sys.stderr.write(json.dumps(event) + "\n")
        sys.stderr.flush()
    elif event.get("event") == "booted":
        _stderr.print(f"{event['instance']} runs on backup {str(event['backup'])[:8]}; copying it in behind the guest",
                      highlight=False)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


# -- snapshots -------------------------------------------------------------------------------


def snapshot_json(snap: Snapshot) -> dict[str, Any]:
    return {
        "id": snap.id,
        "name": snap.name,
        "created_at": snap.created_at,
        "state": snap.state.value,
        "instance": snap.instance,
        "size": snap.size,
        "requested_consistency": snap.requested_level.value,
        "consistency": snap.achieved_level.value if snap.achieved_level else None,
        "application_consistent": snap.application_consistent,
        "fallback_reasons": snap.fallback_reasons,
        "freeze_window_ms": snap.freeze_window_ms,
        "freeze_phases": snap.manifest.get("freeze_phases"),
        "timings_ms": snap.timings_ms,
        "error": snap.error,
        "disks": [asdict(d) for d in snap.disks],
        "writers": [
            {"name": w["name"], "kind": w["kind"], "where": w.get("where", "host"), "status": w["status"],
             "duration_ms": round(sum(w.get("phases_ms", {}).values()), 3), "error": w.get("error")}
            for w in snap.manifest.get("writers", [])
        ],
    }


def snapshot_table(snap: Snapshot) -> Table:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("Field")
    table.add_column("Value", overflow="fold")
    rows = [
        ("ID", snap.id),
        ("Name", snap.name),
        ("Creation Date", snap.created_at),
        ("State", snap.state.value),
        ("Instance", snap.instance),
        ("Size", human_size(snap.size)),
        ("Requested Consistency", snap.requested_level.value),
        ("Consistency", snap.achieved_level.value if snap.achieved_level else "-"),
        ("Application Consistent Snapshot", _yes_no(snap.application_consistent)),
        ("Freeze Window", _window(snap.freeze_window_ms, snap.manifest.get("freeze_phases"))),
        ("Fallback Reason", "\n".join(snap.fallback_reasons) or "-"),
    ]
    if snap.error:
        rows.append(("Error", snap.error))
    for disk in snap.disks:
        where = disk.image or disk.path
        rows.append((f"Disk {disk.device}", f"{where} ({human_size(disk.virtual_size)} virtual, "
                                            f"{human_size(disk.allocated_size)} allocated)"))
    for writer in snapshot_json(snap)["writers"]:
        detail = f"{writer['status']}, {writer['duration_ms']:.1f} ms ({writer['kind']}, {writer['where']})"
        if writer["error"]:
            detail += f": {writer['error']}"
        rows.append((f"Writer {writer['name']}", detail))
    if snap.timings_ms:
        rows.append(("Timings", ", ".join(f"{k} {v:.1f} ms" for k, v in snap.timings_ms.items())))
    for field, value in rows:
        table.add_row(field, value)
    return table


def _window(total: float | None, phases: dict[str, Any] | None) -> str:
    """The window, then what of it held applications and what froze file systems."""
    if total is None or not phases:
        return _ms(total)
    resolution = phases.get("resolution_ms") or 1.0
    hooks = [phases.get("hooks_freeze_ms"), phases.get("hooks_thaw_ms")]
    lines = [_ms(total)]
    if hooks[0] is not None:
        lines.append(f"hooks (applications held, file systems writable): {hooks[0]:.0f} ms before the freeze"
                     + (f", {hooks[1]:.0f} ms after the thaw" if hooks[1] is not None else ""))
    lines.append(f"file systems frozen: {phases['frozen_ms']:.0f} ms (at least {phases['frozen_at_least_ms']:.0f} ms)")
    lines.append(f"resolution ±{resolution:g} ms: {phases.get('evidence', '')}")
    return "\n".join(lines)


def snapshots_table(snaps: Sequence[Snapshot]) -> Table:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for column in ("ID", "Name", "Creation Date", "State", "Instance", "Size", "Consistency",
                   "Application Consistent Snapshot", "Freeze Window"):
        table.add_column(column)
    for snap in snaps:
        table.add_row(
            snap.id[:8], snap.name, snap.created_at[:19].replace("T", " "), snap.state.value,
            snap.instance, human_size(snap.size),
            snap.achieved_level.value if snap.achieved_level else "-",
            _yes_no(snap.application_consistent), _ms(snap.freeze_window_ms),
        )
    return table


# -- instances and templates ---------------------------------------------------------------


def instance_json(inst: Instance) -> dict[str, Any]:
    return {
        "name": inst.name,
        "kind": inst.kind,
        "qmp_socket": inst.qmp_socket,
        "qga_socket": inst.qga_socket,
        "template": inst.template,
        "application_consistent_snapshot_enabled": inst.application_consistent,
        "application_consistent_snapshot_source": (
            "instance" if inst.own_application_consistent is not None
            else "template" if inst.template else "default"
        ),
        "lab": inst.lab,
        "mounts": list(inst.mounts),
        "freeze_budget": inst.freeze_budget,
        "libvirt_uri": inst.libvirt_uri,
        "libvirt_domain": inst.libvirt_domain,
        "guest_hooks": list(inst.guest_hooks) or "all found",
        "created_at": inst.created_at,
    }


def template_json(tmpl: Template) -> dict[str, Any]:
    return {
        "name": tmpl.name,
        "application_consistent_snapshot_enabled": tmpl.application_consistent,
        "guest_hooks": "all found" if not tmpl.guest_hooks else list(tmpl.guest_hooks),
        "created_at": tmpl.created_at,
    }


def record_table(record: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    table.add_column("Field")
    table.add_column("Value", overflow="fold")
    for key, value in record.items():
        label = key.replace("_", " ").capitalize()
        table.add_row(label, "-" if value is None else _yes_no(value) if isinstance(value, bool) else str(value))
    return table


def records_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> Table:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for column in columns:
        table.add_column(column.replace("_", " ").capitalize())
    for record in records:
        cells = []
        for column in columns:
            value = record.get(column)
            cells.append("-" if value is None else _yes_no(value) if isinstance(value, bool) else str(value))
        table.add_row(*cells)
    return table


@contextmanager
def progress(label: str) -> Iterator[Any]:
    """A spinner on stderr (only on a terminal) that shows the current phase."""
    if not sys.stderr.isatty():
        yield lambda phase: None
        return
    with stderr.status(f"{label}: starting") as status:
        yield lambda phase: status.update(f"{label}: {phase}")


# -- backups -------------------------------------------------------------------------------------


def backup_json(backup: Backup) -> dict[str, Any]:
    point = backup.point
    return {
        "id": backup.id,
        "instance": backup.instance,
        "type": backup.type.value,
        "created_at": backup.created_at,
        "state": backup.state.value,
        "repository": backup.repository,
        "parent": backup.parent,
        "consistency": point.achieved_level.value if point and point.achieved_level else None,
        "requested_consistency": point.requested_level.value if point else None,
        "application_consistent": bool(point and point.application_consistent),
        "fallback_reasons": point.fallback_reasons if point else [],
        "freeze_window_ms": point.freeze_window_ms if point else None,
        "freeze_phases": point.manifest.get("freeze_phases") if point else None,
        "duration_s": backup.duration_s,
        "timings_s": backup.timings_s,
        "error": backup.error,
        "disks": [asdict(d) for d in backup.disks],
        "verified_at": backup.verified_at,
        "verify_state": backup.verify_state.value if backup.verify_state else None,
        "verify_problems": backup.verify_problems,
        "restore_tested_at": backup.restore_tested_at,
        "restore_test": backup.restore_test,
    }


def backup_table(backup: Backup) -> Table:
    from rich.table import Table

    data = backup_json(backup)
    table = Table(show_header=True, header_style="bold")
    table.add_column("Field")
    table.add_column("Value", overflow="fold")
    rows = [("ID", data["id"]), ("Instance", data["instance"]), ("Type", data["type"]),
            ("Creation Date", data["created_at"]), ("State", data["state"]), ("Repository", data["repository"]),
            ("Parent", data["parent"] or "-"), ("Consistency", data["consistency"] or "-"),
            ("Application Consistent", _yes_no(data["application_consistent"])),
            ("Freeze Window", _window(data["freeze_window_ms"], data["freeze_phases"])),
            ("Fallback Reason", "\n".join(data["fallback_reasons"]) or "-"),
            ("Duration", "-" if data["duration_s"] is None else f"{data['duration_s']:.1f} s")]
    if data["error"]:
        rows.append(("Error", data["error"]))
    verified = "never" if data["verify_state"] is None else f"{data['verify_state']} at {data['verified_at']}"
    rows.append(("Verified", "\n".join([verified, *data["verify_problems"]])))
    tested = backup.restore_test
    if tested is None:
        rows.append(("Restore Tested", "never"))
    else:
        failed = [f"{c['what']} on {c['where']}: {c['detail']}" for c in tested["checks"] if not c["passed"]]
        rows.append(("Restore Tested", "\n".join([f"{tested['outcome']} at {data['restore_tested_at']}", *failed])))
    for disk in backup.disks:
        text = (f"{human_size(disk.virtual_size)}: read {human_size(disk.bytes_read)}, "
                f"new {human_size(disk.bytes_new)} "
                f"(stored as {human_size(disk.bytes_stored)}), deduplicated {human_size(disk.bytes_reused)}, "
                f"unchanged {human_size(disk.bytes_unchanged)}")
        if disk.full_read_reason:
            text += f"\nread in full: {disk.full_read_reason}"
        rows.append((f"Disk {disk.device}", text))
    for field, value in rows:
        table.add_row(field, value)
    return table


def backups_table(backups: Sequence[Backup]) -> Table:
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for column in ("ID", "Instance", "Type", "Creation Date", "State", "Consistency", "Read", "New", "Parent"):
        table.add_column(column)
    for backup in backups:
        point = backup.point
        table.add_row(
            backup.id[:8], backup.instance, backup.type.value, backup.created_at[:19].replace("T", " "),
            backup.state.value, point.achieved_level.value if point and point.achieved_level else "-",
            human_size(sum(d.bytes_read for d in backup.disks)), human_size(sum(d.bytes_new for d in backup.disks)),
            backup.parent[:8] if backup.parent else "-",
        )
    return table


@contextmanager
def byte_progress(label: str, enabled: bool = True) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr (only on a terminal): ``update(done, total, detail)``, where
    detail is shown beside the rate and ETA (stored, deduplicated, ...)."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total, detail: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[detail]}"))
    with Progress(*columns, console=_stderr.real(), transient=True) as bar:
        # Hidden until the first bytes move: before that the phase spinner says what happens.
        task = bar.add_task(label, total=None, detail="", visible=False)

        def update(done: int, total: int, detail: str) -> None:
            bar.update(task, completed=done, total=total, detail=detail, visible=True)

        yield update
