"""``freezeframe schedule ...`` and ``freezeframe daemon``: backups that run without a person."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import click

from freezeframe.catalog.store import parse_time, utc_now
from freezeframe.cli.context import App, pass_app
from freezeframe.cli.output import emit_json, output_option, records_table, stdout
from freezeframe.errors import InvalidInput
from freezeframe.jobs.schedule import check_cron, parse_every
from freezeframe.jobs.systemd import unit_files
from freezeframe.logs import configure as configure_log
from freezeframe.model import BackupType, Level, Schedule

WEEK_S = 7 * 86400


@click.group("schedule")
def group() -> None:
    """When the daemon backs instances up (and verifies, restore-tests and prunes them)."""


def _row(s: Schedule) -> dict[str, Any]:
    return {"instance": s.instance, "every_s": s.every_s, "cron": s.cron, "type": s.backup_type,
            "repository": s.repository, "consistency": s.consistency, "verify_every_s": s.verify_every_s,
            "test_every_s": s.test_every_s, "prune": s.prune, "created_at": s.created_at, "last_slot": s.last_slot,
            "last_verify_at": s.last_verify_at, "last_test_at": s.last_test_at}


@group.command("add")
@click.argument("instance")
@click.option("--every", help="Back up at this interval from now: 90s, 15m, 1h, 1d, 1w.")
@click.option("--cron", help='Back up at the times of this cron expression (local time), e.g. "0 3 * * *".')
@click.option("--type", "kind", type=click.Choice([t.value for t in BackupType]),
              help="Backup type. Default: incremental once a full exists, else full.")
@click.option("--repo", "repository", metavar="PATH|s3://...", help="Repository. Default: repo/ in the home.")
@click.option("--consistency", type=click.Choice([level.value for level in Level]),
              help="Consistency to ask for. Default: the instance's own setting.")
@click.option("--verify-every", metavar="INTERVAL", help="Verify the instance's backups this often.")
@click.option("--verify-weekly", is_flag=True, help="Same as --verify-every 1w.")
@click.option("--test-every", metavar="INTERVAL", help="Restore-test the newest backup this often.")
@click.option("--test-weekly", is_flag=True, help="Same as --test-every 1w.")
@click.option("--prune", is_flag=True, help="Prune the instance by its retention policy after each backup.")
@output_option
@pass_app
def add(app: App, instance: str, every: str | None, cron: str | None, kind: str | None, repository: str | None,
        consistency: str | None, verify_every: str | None, verify_weekly: bool, test_every: str | None,
        test_weekly: bool, prune: bool, fmt: str) -> None:
    """Schedule INSTANCE's backups (replacing its schedule). With --every the first backup is
    one interval from now; missed backups (the daemon was down) are caught up once."""
    if (every is None) == (cron is None):
        raise InvalidInput("give exactly one of --every and --cron")
    if (verify_every and verify_weekly) or (test_every and test_weekly):
        raise InvalidInput("give an interval or --*-weekly, not both")
    app.catalog.instance(instance)
    if repository is not None:
        repository = app.repository_location(repository)
    schedule = Schedule(
        instance=instance, every_s=parse_every(every) if every else None, cron=check_cron(cron) if cron else None,
        backup_type=kind, repository=repository, consistency=consistency,
        verify_every_s=WEEK_S if verify_weekly else parse_every(verify_every) if verify_every else None,
        test_every_s=WEEK_S if test_weekly else parse_every(test_every) if test_every else None,
        prune=prune, created_at=utc_now())
    app.catalog.save_schedule(schedule)
    _emit([schedule], fmt)


def _interval(seconds: float | None) -> str | None:
    """An interval as it was most likely written: 6h, 1w, 90s."""
    if seconds is None:
        return None
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _emit(schedules: list[Schedule], fmt: str) -> None:
    rows = [_row(s) for s in schedules]
    if fmt == "json":
        emit_json(rows)
    else:
        shown = [{**r, "when": f"every {_interval(r['every_s'])}" if r["every_s"] else f"cron {r['cron']}",
                  "verify": _interval(r["verify_every_s"]), "test": _interval(r["test_every_s"])} for r in rows]
        stdout.print(records_table(shown, ["instance", "when", "type", "verify", "test", "prune", "last_slot"]))


@group.command("list")
@output_option
@pass_app
def list_(app: App, fmt: str) -> None:
    """List the schedules."""
    _emit(app.catalog.schedules(), fmt)


@group.command("remove")
@click.argument("instance")
@pass_app
def remove(app: App, instance: str) -> None:
    """Remove INSTANCE's schedule."""
    app.catalog.remove_schedule(instance)


@group.command("install-systemd")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/etc/systemd/system"), show_default=True, help="Where to write the unit files.")
@pass_app
def install_systemd(app: App, directory: Path) -> None:
    """Write systemd units instead of running the daemon: a service and a timer per
    schedule (then: systemctl daemon-reload; systemctl enable --now NAME.timer), and
    freezeframe-daemon.service for those who prefer the daemon."""
    files = unit_files(app.catalog.schedules(), home=app.home.root, executable=sys.executable)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
        stdout.print(str(directory / name))


@click.command("daemon")
@click.option("--tick", "tick_s", type=click.FloatRange(min=0.05), default=10.0, show_default=True,
              metavar="SECONDS", help="How often to look for due jobs.")
@click.option("--metrics-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write Prometheus metrics here after every job (for node_exporter's textfile collector).")
@click.option("--clock", "clock_start", metavar="ISO-TIME",
              help="Run on a simulated clock starting at this time (testing schedules and retention).")
@click.option("--speed", type=click.FloatRange(min=1), default=1.0, show_default=True,
              help="With --clock: simulated seconds per real second.")
@click.option("--run-for", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Stop after this many real seconds (default: run until SIGTERM or Ctrl-C).")
@click.option("--gc-every", metavar="INTERVAL", default="1d", show_default=True,
              help="Collect garbage in every repository the schedules use this often (90s, 15m, 1h, 1d, 1w; "
                   "'never' to leave it to repo gc). It runs beside backups: neither waits for the other.")
@pass_app
def daemon(app: App, tick_s: float, metrics_file: Path | None, clock_start: str | None, speed: float,
           run_for: float | None, gc_every: str) -> None:
    """Run due backups, prunes, verifies, restore tests and garbage collection, one job per
    instance at a time, until stopped. Logs one JSON line per job on stdout."""
    from freezeframe.jobs.daemon import Daemon, cli_runner

    if clock_start is not None:
        origin, began = parse_time(clock_start), time.monotonic()

        def clock() -> datetime:
            return origin + timedelta(seconds=(time.monotonic() - began) * speed)
    else:
        def clock() -> datetime:
            return datetime.now().astimezone()

    printing = threading.Lock()
    # The daemon's own log, and what its jobs log, also go to logs/daemon.log in the home.
    configure_log(app.log_level, app.home.logs / "daemon.log")
    journal = logging.getLogger("freezeframe.daemon")

    def log(line: dict[str, Any]) -> None:
        # One line whole per job: jobs end on threads of their own, at the same time.
        with printing:
            print(json.dumps(line), flush=True)
        journal.info("%s", json.dumps(line))

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if run_for is not None:
        threading.Timer(run_for, stop.set).start()
    gc_every_s = None if gc_every == "never" else parse_every(gc_every)
    worker = Daemon(app.home.catalog, cli_runner(app.home.root, fake_clock=clock_start is not None), clock, log,
                    metrics_file, gc_every_s=gc_every_s, live_dir=app.home.live)
    log({"at": clock().isoformat(), "event": "daemon started", "schedules": len(app.catalog.schedules())})
    try:
        worker.run_forever(tick_s=tick_s, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        worker.join()
    log({"at": clock().isoformat(), "event": "daemon stopped"})
