"""``freezeframe guest ...``: freezeframe's code inside a VM guest (the freeze hook runner)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import asdict
from pathlib import Path

import click

from freezeframe.cli.context import App, pass_app
from freezeframe.cli.output import emit_json, output_option, record_table, stdout
from freezeframe.engine.run import make_target
from freezeframe.errors import InvalidInput
from freezeframe.targets import guest_install
from freezeframe.targets.guest_install import Installed
from freezeframe.targets.qemu import GuestTarget


@click.group("guest")
def group() -> None:
    """Install and show freezeframe's guest hook runner (qemu-ga's fsfreeze hook)."""


@group.command("install")
@click.argument("name")
@click.option("--path", "hook_path", metavar="PATH",
              help="Where to put the runner. Default: the fsfreeze hook qemu-ga already runs (its -F path).")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=10.0, show_default=True,
              help="Seconds each hook may take (written only where the guest has no configuration yet).")
@click.option("--on-failure", type=click.Choice(["fail", "continue"]), default="fail", show_default=True,
              help="What a failing hook does: fail the freeze, or continue and report it (idem).")
@click.option("--agent-timeout", type=float, default=10.0, show_default=True,
              help="Seconds to wait for the guest agent.")
@output_option
@pass_app
def install(app: App, name: str, hook_path: str | None, timeout: float, on_failure: str, agent_timeout: float,
            fmt: str) -> None:
    """Install the POSIX sh hook runner into VM NAME through its guest agent.

    It replaces the script qemu-ga runs as its fsfreeze hook (the stock one is kept beside
    it as PATH.before-freezeframe) and runs the same /etc/qemu/fsfreeze-hook.d hooks, with
    a timeout each, thaws in reverse order, a report freezeframe reads after every thaw,
    and a deadman that thaws the guest if no thaw ever comes. Needs guest-file-* and
    guest-exec; without them, see 'freezeframe guest runner'."""
    instance = app.catalog.instance(name)
    if instance.kind == "host":
        raise InvalidInput(f"{name} is this host, not a VM: there is no guest to install into")
    target = make_target(instance)
    assert isinstance(target, GuestTarget)

    async def run() -> Installed:
        await target.connect()
        try:
            agent = await target.connect_agent(agent_timeout, max(agent_timeout, 60.0))
            return await guest_install.install(agent, path=hook_path, timeout=timeout, on_failure=on_failure)
        finally:
            await target.close()

    done = asyncio.run(run())
    if fmt == "json":
        emit_json(asdict(done))
        return
    stdout.print(record_table(asdict(done)))
    click.echo(f"freezeframe's hook runner is {done.path} in {name}; the next freeze runs it", err=True)


@group.command("runner")
@click.option("--to", "dest", type=click.Path(dir_okay=False, path_type=Path),
              help="Write it to this file (mode 0755) instead of standard output.")
def runner(dest: Path | None) -> None:
    """Print the POSIX sh hook runner, to install by hand where the agent cannot.

    \b
    In the guest, as root:
      install -m 0755 -o root runner.sh /etc/qemu/fsfreeze-hook
      start qemu-ga with -F/etc/qemu/fsfreeze-hook
      optional settings: /etc/freezeframe/guest-hooks.json, e.g.
        {"timeout": 10, "on_failure": "fail", "deadman_s": 60}"""
    script = guest_install.runner_script()
    if dest is None:
        sys.stdout.buffer.write(script)
        return
    dest.write_bytes(script)
    dest.chmod(0o755)
