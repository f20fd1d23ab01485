"""``freezeframe instance ...`` and ``freezeframe template ...``"""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from freezeframe.cli.context import App, pass_app
from freezeframe.cli.output import (
    emit_json,
    instance_json,
    output_option,
    record_table,
    records_table,
    stdout,
    template_json,
)
from freezeframe.engine.check import check_instance

_APP_CONSISTENT = "--application-consistent-snapshot-enabled/--no-application-consistent-snapshot-enabled"
_BUDGET_HELP = "Seconds this instance may stay frozen at most (default 10, the VSS hold limit)."
_APP_HELP = ("Ask for application-consistent snapshots by default (else crash). "
             "Unset: inherit from the template.")
_HOOKS_HELP = ("The guest's freeze hooks (names in /etc/qemu/fsfreeze-hook.d, comma-separated) that must "
               "have run with exit status 0 on freeze and thaw for application level; 'all' (the "
               "default): every hook found must have, and at least one must be found.")
_HOOK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}")


def _guest_hooks(value: str | None) -> tuple[str, ...] | None:
    """``all`` -> () (every hook found); ``a,b`` -> ("a", "b"); None: not given."""
    if value is None:
        return None
    if value.strip() == "all":
        return ()
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if not _HOOK_NAME.fullmatch(n)]
    if not names or bad:
        raise click.BadParameter(f"{', '.join(bad) or value!r} is not a hook file name: give names as in "
                                 "/etc/qemu/fsfreeze-hook.d (e.g. 10-postgresql,20-app) or 'all'",
                                 param_hint="--guest-hooks")
    return names


def _show(record: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(record_table(record))


def _socket(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().absolute())


# -- instances -------------------------------------------------------------------------------


@click.group("instance")
def instance_group() -> None:
    """Register and manage the VMs freezeframe snapshots."""


@instance_group.command("add")
@click.argument("name")
@click.option("--qmp", "qmp", help="Path of the VM's QMP unix socket.")
@click.option("--qga", "qga", help="Path of the VM's guest-agent unix socket (needed above crash level).")
@click.option("--libvirt", "domain", metavar="DOMAIN",
              help="A running libvirt domain: disks, agent and snapshots all go through libvirt.")
@click.option("--uri", default="qemu:///system", show_default=True, help="With --libvirt: the libvirt connection.")
@click.option("--host", "host", is_flag=True, help="This Linux host, with the file systems given by --mount.")
@click.option("--mount", "mounts", multiple=True, help="With --host: a mount point to snapshot (repeatable).")
@click.option("--template", help="Template whose defaults the instance inherits.")
@click.option(_APP_CONSISTENT, "app_consistent", default=None, help=_APP_HELP)
@click.option("--freeze-budget", type=click.FloatRange(0.1, 3600), help=_BUDGET_HELP)
@output_option
@pass_app
def instance_add(app: App, name: str, qmp: str | None, qga: str | None, domain: str | None, uri: str, host: bool,
                 mounts: tuple[str, ...], template: str | None, app_consistent: bool | None,
                 freeze_budget: float | None, fmt: str) -> None:
    """Register instance NAME: a running QEMU VM (--qmp, --qga), a libvirt domain (--libvirt
    DOMAIN [--uri URI]) or this host (--host --mount ...)."""
    if domain is not None:
        if qmp or qga or host or mounts:
            raise click.UsageError("--libvirt instances have no --qmp, --qga, --host or --mount: libvirt owns them")
        inst = app.catalog.add_instance(name, kind="libvirt", qmp_socket=None, qga_socket=None, template=template,
                                        application_consistent=app_consistent, freeze_budget=freeze_budget,
                                        libvirt_uri=uri, libvirt_domain=domain)
    elif host:
        if qmp or qga:
            raise click.UsageError("--host instances have no --qmp or --qga")
        if not mounts:
            raise click.UsageError("--host needs at least one --mount PATH")
        inst = app.catalog.add_instance(name, kind="host", qmp_socket=None, qga_socket=None, template=template,
                                        application_consistent=app_consistent, freeze_budget=freeze_budget,
                                        mounts=tuple(str(Path(m).absolute()) for m in mounts))
    else:
        if not qmp:
            raise click.UsageError("give --qmp SOCKET for a VM, or --host --mount PATH for this host")
        if mounts:
            raise click.UsageError("--mount goes with --host")
        inst = app.catalog.add_instance(name, kind="qemu", qmp_socket=_socket(qmp), qga_socket=_socket(qga),
                                        template=template, application_consistent=app_consistent,
                                        freeze_budget=freeze_budget)
    _show(instance_json(inst), fmt)


@instance_group.command("list")
@output_option
@pass_app
def instance_list(app: App, fmt: str) -> None:
    """List instances."""
    records = [instance_json(i) for i in app.catalog.instances()]
    if fmt == "json":
        emit_json(records)
    else:
        stdout.print(records_table(records, ["name", "kind", "template",
                                             "application_consistent_snapshot_enabled", "qmp_socket",
                                             "qga_socket"]))


@instance_group.command("show")
@click.argument("name")
@output_option
@pass_app
def instance_show(app: App, name: str, fmt: str) -> None:
    """Show one instance, with where its settings come from."""
    _show(instance_json(app.catalog.instance(name)), fmt)


@instance_group.command("update")
@click.argument("name")
@click.option("--qmp", "qmp", help="New QMP socket path.")
@click.option("--qga", "qga", help="New guest-agent socket path.")
@click.option("--template", help="New template.")
@click.option("--no-template", is_flag=True, help="Detach the instance from its template.")
@click.option(_APP_CONSISTENT, "app_consistent", default=None, help=_APP_HELP)
@click.option("--inherit-application-consistent", is_flag=True,
              help="Drop the instance's own setting and follow its template again.")
@click.option("--freeze-budget", type=click.FloatRange(0.1, 3600), help=_BUDGET_HELP)
@click.option("--guest-hooks", "guest_hooks", metavar="NAMES|all", help=_HOOKS_HELP)
@output_option
@pass_app
def instance_update(app: App, name: str, qmp: str | None, qga: str | None, template: str | None,
                    no_template: bool, app_consistent: bool | None, inherit_application_consistent: bool,
                    freeze_budget: float | None, guest_hooks: str | None, fmt: str) -> None:
    """Change an instance's sockets, template, default consistency or required guest hooks."""
    changes: dict[str, Any] = {}
    hooks = _guest_hooks(guest_hooks)
    if hooks is not None:
        changes["guest_hooks"] = hooks
    if qmp is not None:
        changes["qmp_socket"] = _socket(qmp)
    if qga is not None:
        changes["qga_socket"] = _socket(qga)
    if template is not None and no_template:
        raise click.UsageError("give either --template or --no-template, not both")
    if template is not None or no_template:
        changes["template"] = template
    if app_consistent is not None and inherit_application_consistent:
        raise click.UsageError("give either --[no-]application-consistent-snapshot-enabled or "
                               "--inherit-application-consistent, not both")
    if app_consistent is not None or inherit_application_consistent:
        changes["application_consistent"] = app_consistent
    if freeze_budget is not None:
        changes["freeze_budget"] = freeze_budget
    if not changes:
        raise click.UsageError("nothing to change: give at least one option (see --help)")
    _show(instance_json(app.catalog.update_instance(name, **changes)), fmt)


@instance_group.command("check")
@click.argument("name")
@click.option("--agent-timeout", type=float, default=3.0, show_default=True,
              help="Seconds the guest agent gets to answer.")
@output_option
@pass_app
def instance_check(app: App, name: str, agent_timeout: float, fmt: str) -> None:
    """Check, without freezing anything, what a snapshot of NAME could achieve now: QMP,
    the guest agent and what it allows, the freeze state, file systems, hooks and writers."""
    report = asyncio.run(check_instance(app.catalog.instance(name), app.writers(name), agent_timeout=agent_timeout))
    if fmt == "json":
        emit_json(report.as_json())
    else:
        stdout.print(records_table([asdict(f) for f in report.findings], ["check", "status", "detail"]))
        verdict = report.verdict.value if report.verdict else "none: no snapshot can be taken"
        click.echo(f"verdict: a snapshot of {name} can be {verdict}")
    if report.verdict is None:
        raise click.exceptions.Exit(6)


@instance_group.command("remove")
@click.argument("name")
@pass_app
def instance_remove(app: App, name: str) -> None:
    """Forget an instance (it must have no live snapshots). The VM itself is not touched."""
    app.catalog.remove_instance(name)
    click.echo(f"removed instance {name}")


# -- templates -------------------------------------------------------------------------------


@click.group("template")
def template_group() -> None:
    """Defaults that new instances inherit."""


@template_group.command("add")
@click.argument("name")
@click.option(_APP_CONSISTENT, "app_consistent", default=False, show_default=True,
              help="Instances of this template ask for application-consistent snapshots by default.")
@output_option
@pass_app
def template_add(app: App, name: str, app_consistent: bool, fmt: str) -> None:
    """Create template NAME."""
    _show(template_json(app.catalog.add_template(name, application_consistent=app_consistent)), fmt)


@template_group.command("list")
@output_option
@pass_app
def template_list(app: App, fmt: str) -> None:
    """List templates."""
    records = [template_json(t) for t in app.catalog.templates()]
    if fmt == "json":
        emit_json(records)
    else:
        stdout.print(records_table(records, ["name", "application_consistent_snapshot_enabled", "created_at"]))


@template_group.command("show")
@click.argument("name")
@output_option
@pass_app
def template_show(app: App, name: str, fmt: str) -> None:
    """Show one template."""
    _show(template_json(app.catalog.template(name)), fmt)


@template_group.command("update")
@click.argument("name")
@click.option(_APP_CONSISTENT, "app_consistent", default=None,
              help="Change the default for instances that inherit it.")
@click.option("--guest-hooks", "guest_hooks", metavar="NAMES|all", help=_HOOKS_HELP)
@output_option
@pass_app
def template_update(app: App, name: str, app_consistent: bool | None, guest_hooks: str | None, fmt: str) -> None:
    """Change a template; instances without their own setting follow it."""
    hooks = _guest_hooks(guest_hooks)
    if app_consistent is None and hooks is None:
        raise click.UsageError("nothing to change: give --[no-]application-consistent-snapshot-enabled "
                               "or --guest-hooks")
    _show(template_json(app.catalog.update_template(name, application_consistent=app_consistent,
                                                    guest_hooks=hooks)), fmt)


@template_group.command("remove")
@click.argument("name")
@pass_app
def template_remove(app: App, name: str) -> None:
    """Remove a template no instance uses."""
    app.catalog.remove_template(name)
    click.echo(f"removed template {name}")
