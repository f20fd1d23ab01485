"""The ``freezeframe`` command: the only code that prints and exits."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import sys
import threading
from pathlib import Path
from typing import NoReturn

import click

from freezeframe.cli.context import App
from freezeframe.cli.output import stderr
from freezeframe.config import Home
from freezeframe.errors import FreezeframeError
from freezeframe.logs import LEVELS
from freezeframe.logs import configure as configure_log

EXIT_CODES = """\b
Exit codes:
  0  success
  1  unexpected error
  2  invalid input (a name, option or policy)
  3  not found (instance, template, snapshot, lab VM)
  4  conflict (exists already, or another run holds the instance)
  5  guest agent error
  6  QEMU / QMP error
  7  snapshot failed, or the policy said fail (a failed record is kept)
  8  catalog error
  9  lab VM error
  10 backup repository error (missing, wrong passphrase)
  11 a repository object is damaged (fails its hash or authentication)
"""


#: command group -> (module under freezeframe.cli, attribute)
_GROUPS = {
    "snapshot": ("snapshot", "group"),
    "backup": ("backup", "group"),
    "repo": ("repo", "group"),
    "policy": ("policy", "group"),
    "schedule": ("schedule", "group"),
    "daemon": ("schedule", "daemon"),
    "writer": ("writer", "group"),
    "instance": ("instance", "instance_group"),
    "template": ("instance", "template_group"),
    "lab": ("lab", "group"),
    "guest": ("guest", "group"),
}


class _LazyGroup(click.Group):
    """The command groups, each imported only when it runs (or ``--help`` lists them all).

    A backup command then pays for its own imports, not for the lab's or the writers':
    start-up is part of every scheduled run and of the incremental backup's few tenths of
    a second."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = _GROUPS.get(cmd_name)
        if found is None:
            return None
        module = importlib.import_module(f"freezeframe.cli.{found[0]}")
        command: click.Command = getattr(module, found[1])
        return command


@click.group(cls=_LazyGroup, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="FREEZEFRAME_HOME",
              help="State directory (catalog, lab VMs). Default: $FREEZEFRAME_HOME, else "
                   "/var/lib/freezeframe for root, else ~/.local/share/freezeframe.")
@click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), default=None,
              help="What the log shows on standard error. Default: $FREEZEFRAME_LOG, else warning. Long jobs "
                   "(a served backup, the daemon) also log to a file in the home's logs/ directory.")
@click.version_option(package_name="freezeframe")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, log_level: str | None) -> None:
    """Consistent snapshots and backups of QEMU/KVM virtual machines.

    Every snapshot records the consistency level it achieved (application, filesystem or
    crash) and, when it stepped down from what was asked, why.
    """
    configure_log(log_level)
    app = App(Home.open(home.resolve() if home else None))
    app.log_level = log_level
    ctx.obj = app
    ctx.call_on_close(app.close)



def main() -> NoReturn:
    _leave(_run())


def _run() -> int:
    """The command's exit code; an error it knows is printed here."""
    try:
        # Without standalone mode, click returns (not raises) the code of an Exit.
        code = cli.main(standalone_mode=False)
        return code if isinstance(code, int) else 0
    except FreezeframeError as err:
        from rich.text import Text

        # Text, not markup: messages quote guest data and paths, which may hold brackets.
        stderr.print(Text.assemble(("error: ", "bold red"), err.message), highlight=False)
        if err.hint:
            stderr.print(Text.assemble(("hint: ", "dim"), err.hint), highlight=False)
        return err.exit_code
    except click.exceptions.Abort:
        stderr.print("aborted")
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except KeyboardInterrupt:
        stderr.print("interrupted")
        return 130


def _leave(code: int) -> NoReturn:
    """Exit without tearing the interpreter down. The command is over and has closed what
    it opened; what the teardown would add is freeing the memory of every module and
    object, which the kernel does at once anyway: 25-40 ms measured here, a tenth of an
    incremental backup. What must happen still does: the threads that Python would wait
    for, the functions registered with ``atexit`` (libraries flush and clean up there),
    and the standard streams."""
    threading._shutdown()  # type: ignore[attr-defined]  # what Python's own exit does first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
