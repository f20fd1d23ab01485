"""How records look to people (rich tables) and to scripts (JSON with snake_case keys)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from freezeframe.model import Instance, Snapshot, Template

# Piped output (logs, CI) gets full rows instead of rich's 80-column guess.
stdout = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 220)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 220)

FORMATS = click.Choice(["table", "json"])


def output_option(f: Any) -> Any:
    return click.option("-o", "--output", "fmt", type=FORMATS, default="table", show_default=True,
                        help="table for people, json for scripts")(f)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


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
        ("Freeze Window", _ms(snap.freeze_window_ms)),
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


def snapshots_table(snaps: Sequence[Snapshot]) -> Table:
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
        "created_at": inst.created_at,
    }


def template_json(tmpl: Template) -> dict[str, Any]:
    return {
        "name": tmpl.name,
        "application_consistent_snapshot_enabled": tmpl.application_consistent,
        "created_at": tmpl.created_at,
    }


def record_table(record: dict[str, Any]) -> Table:
    table = Table(show_header=True, header_style="bold")
    table.add_column("Field")
    table.add_column("Value", overflow="fold")
    for key, value in record.items():
        label = key.replace("_", " ").capitalize()
        table.add_row(label, "-" if value is None else _yes_no(value) if isinstance(value, bool) else str(value))
    return table


def records_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> Table:
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
    if not stderr.is_terminal:
        yield lambda phase: None
        return
    with stderr.status(f"{label}: starting") as status:
        yield lambda phase: status.update(f"{label}: {phase}")
