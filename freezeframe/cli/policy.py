"""``freezeframe policy ...``: retention policies."""

from __future__ import annotations

import click

from freezeframe.cli.context import App, pass_app
from freezeframe.cli.output import emit_json, output_option, records_table, stdout
from freezeframe.errors import InvalidInput
from freezeframe.model import RETENTION_RULES, Retention

_EXAMPLE = """\b
Examples:
  freezeframe policy set web1 --keep-last 3 --keep-daily 7 --keep-weekly 4
    keeps the 3 newest backups, then the newest of each of the 7 days before
    those, then the newest of each of the 4 weeks before those.
  freezeframe backup prune --dry-run      shows what every policy would delete
"""


@click.group("policy")
def group() -> None:
    """Retention policies: which backups prune keeps (Proxmox Backup Server's rules)."""


def _rows(policies: dict[str, Retention]) -> list[dict[str, object]]:
    return [{"instance": name, **{f"keep_{r}": getattr(p, r) for r in RETENTION_RULES}}
            for name, p in sorted(policies.items())]


def _emit(policies: dict[str, Retention], fmt: str) -> None:
    rows = _rows(policies)
    if fmt == "json":
        emit_json(rows)
    else:
        stdout.print(records_table(rows, ["instance", *(f"keep_{r}" for r in RETENTION_RULES)]))


@group.command("set", epilog=_EXAMPLE)
@click.argument("instance")
@click.option("--keep-last", type=click.IntRange(min=0), help="Keep the N newest backups.")
@click.option("--keep-hourly", type=click.IntRange(min=0), help="The newest backup of each of N hours.")
@click.option("--keep-daily", type=click.IntRange(min=0), help="The newest backup of each of N days.")
@click.option("--keep-weekly", type=click.IntRange(min=0), help="The newest backup of each of N ISO weeks.")
@click.option("--keep-monthly", type=click.IntRange(min=0), help="The newest backup of each of N months.")
@click.option("--keep-yearly", type=click.IntRange(min=0), help="The newest backup of each of N years.")
@output_option
@pass_app
def set_(app: App, /, instance: str, fmt: str, **keep: int | None) -> None:
    """Set INSTANCE's retention policy (replacing the one it had).

    The rules apply in the order last, hourly, daily, weekly, monthly, yearly, newest
    backup first. Each periodic rule keeps the newest backup of each of the N most recent
    periods that have a backup, skipping periods a rule before it already kept a backup in
    and backups it already kept. Periods are in this host's local time."""
    if all(v is None for v in keep.values()):
        raise InvalidInput("give at least one --keep-* option", hint="or remove the policy: freezeframe policy clear")
    policy = Retention(**{r: keep[f"keep_{r}"] for r in RETENTION_RULES})
    app.catalog.set_retention(instance, policy)
    _emit({instance: policy}, fmt)


@group.command("show")
@click.argument("instance", required=False)
@output_option
@pass_app
def show(app: App, instance: str | None, fmt: str) -> None:
    """Show INSTANCE's retention policy, or every instance's."""
    policies = app.catalog.retentions()
    if instance is not None:
        app.catalog.instance(instance)
        policies = {k: v for k, v in policies.items() if k == instance}
    _emit(policies, fmt)


@group.command("clear")
@click.argument("instance")
@pass_app
def clear(app: App, instance: str) -> None:
    """Remove INSTANCE's retention policy: prune then keeps all its backups."""
    app.catalog.set_retention(instance, None)
