"""``freezeframe writer ...``: the applications an instance quiesces for application-consistent snapshots."""

from __future__ import annotations

from typing import Any

import click

from freezeframe.cli.context import App, pass_app
from freezeframe.cli.output import emit_json, output_option, records_table, stdout
from freezeframe.config import config_path
from freezeframe.errors import InvalidInput
from freezeframe.model import WriterFailure, WriterSpec
from freezeframe.writers import KINDS, validate_options, writer_class


def _kinds_help() -> str:
    lines = ["\b", "Kinds and their options:"]
    for kind in sorted(KINDS):
        cls = writer_class(kind)
        lines.append(f"  {kind}: {cls.summary}")
        lines.append("    options: " + ", ".join(
            f"{k}{'*' if o.required else ''}" for k, o in cls.options.items()))
    lines.append("  (* required)")
    return "\n".join(lines)


@click.group("writer")
def group() -> None:
    """Configure the writers an instance quiesces for application-consistent snapshots."""


def _spec_json(spec: WriterSpec) -> dict[str, Any]:
    return {"name": spec.name, "kind": spec.kind, "options": spec.options, "timeout": spec.timeout,
            "retries": spec.retries, "on_failure": spec.on_failure.value}


class _AddCommand(click.Command):
    """Lists the kinds and their options in its help, importing the writers only then."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = _kinds_help()
        super().format_epilog(ctx, formatter)


@group.command("add", cls=_AddCommand)
@click.argument("instance")
@click.argument("kind", type=click.Choice(sorted(KINDS)))
@click.option("--name", help="Writer name (default: the kind). Unique per instance.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="A kind's option (repeatable). Passwords: password_env=VAR or password_file=PATH only.")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="Seconds each of prepare, freeze and thaw may take.")
@click.option("--retries", type=click.IntRange(0, 10), default=0, show_default=True,
              help="Extra attempts at prepare and freeze before the writer counts as failed.")
@click.option("--on-failure", type=click.Choice([f.value for f in WriterFailure]), default="fallback",
              show_default=True,
              help="fail: no snapshot; continue: the others go on, this one is marked failed, the level steps "
                   "down; fallback: release every writer and step down to filesystem.")
@output_option
@pass_app
def add(app: App, instance: str, kind: str, name: str | None, options: tuple[str, ...], timeout: float,
        retries: int, on_failure: str, fmt: str) -> None:
    """Add a KIND writer to INSTANCE. Writers quiesce in the order they were added."""
    parsed: dict[str, str] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--option")
        parsed[key.strip()] = value
    spec = WriterSpec(name=name or kind, kind=kind, options=validate_options(writer_class(kind), parsed),
                      timeout=timeout, retries=retries, on_failure=WriterFailure(on_failure))
    app.catalog.add_writer(instance, spec)
    if fmt == "json":
        emit_json(_spec_json(spec))
    else:
        click.echo(f"added {kind} writer {spec.name} to {instance}")


@group.command("list")
@click.argument("instance")
@output_option
@pass_app
def list_(app: App, instance: str, fmt: str) -> None:
    """List INSTANCE's writers in the order they quiesce (the config file's come last)."""
    added = {w.name for w in app.catalog.writers(instance)}
    records = [{**_spec_json(s), "source": "catalog" if s.name in added else str(config_path(app.home))}
               for s in app.writers(instance)]
    if fmt == "json":
        emit_json(records)
    else:
        stdout.print(records_table(records, ["name", "kind", "options", "timeout", "retries", "on_failure",
                                             "source"]))


@group.command("remove")
@click.argument("instance")
@click.argument("name")
@pass_app
def remove(app: App, instance: str, name: str) -> None:
    """Remove writer NAME from INSTANCE (one added with writer add; edit the config file for the others)."""
    if name not in {w.name for w in app.catalog.writers(instance)} and name in {w.name for w in app.writers(instance)}:
        raise InvalidInput(f"writer {name} is declared in {config_path(app.home)}", hint="remove it there")
    app.catalog.remove_writer(instance, name)
    click.echo(f"removed writer {name} from {instance}")
