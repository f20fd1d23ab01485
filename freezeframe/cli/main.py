"""The ``freezeframe`` command: the only code that prints and exits."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.text import Text

from freezeframe.catalog import Catalog
from freezeframe.cli.output import stderr
from freezeframe.config import Home, config_path, load_config_writers
from freezeframe.errors import FreezeframeError, InvalidInput
from freezeframe.model import WriterSpec
from freezeframe.writers import validate_options, writer_class

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
"""


class App:
    """What every command needs: the state directory and, on demand, the catalog."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self._catalog: Catalog | None = None

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog.open(self.home.catalog)
        return self._catalog

    def writers(self, instance: str) -> list[WriterSpec]:
        """The instance's writers: those added with ``writer add``, then those of the config file."""
        added = self.catalog.writers(instance)
        declared = load_config_writers(config_path(self.home)).get(instance, [])
        clash = {w.name for w in added} & {w.name for w in declared}
        if clash:
            raise InvalidInput(f"writer {', '.join(sorted(clash))} of {instance} is both in the catalog and in "
                               f"{config_path(self.home)}", hint="remove one of them")
        for spec in declared:
            validate_options(writer_class(spec.kind), spec.options)
        return added + declared

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()


pass_app = click.make_pass_decorator(App)


@click.group(epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="FREEZEFRAME_HOME",
              help="State directory (catalog, lab VMs). Default: $FREEZEFRAME_HOME, else "
                   "/var/lib/freezeframe for root, else ~/.local/share/freezeframe.")
@click.version_option(package_name="freezeframe")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """Consistent snapshots of QEMU/KVM virtual machines.

    Every snapshot records the consistency level it achieved (application, filesystem or
    crash) and, when it stepped down from what was asked, why.
    """
    app = App(Home.open(home.resolve() if home else None))
    ctx.obj = app
    ctx.call_on_close(app.close)


def _register() -> None:
    from freezeframe.cli import instance, lab, snapshot, writer

    cli.add_command(snapshot.group)
    cli.add_command(writer.group)
    cli.add_command(instance.instance_group)
    cli.add_command(instance.template_group)
    cli.add_command(lab.group)


_register()


def main() -> None:
    try:
        # Without standalone mode, click returns (not raises) the code of an Exit.
        code = cli.main(standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except FreezeframeError as err:
        # Text, not markup: messages quote guest data and paths, which may hold brackets.
        stderr.print(Text.assemble(("error: ", "bold red"), err.message), highlight=False)
        if err.hint:
            stderr.print(Text.assemble(("hint: ", "dim"), err.hint), highlight=False)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        stderr.print("aborted")
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
