"""When jobs are due (pure), cron schedules as systemd timers (checked by systemd's own
calendar parser against cronsim), and bad schedules refused."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import run_cli
from cronsim import CronSim

from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.errors import InvalidInput
from freezeframe.jobs.schedule import due, parse_every
from freezeframe.jobs.systemd import on_calendar, unit_files
from freezeframe.model import Schedule

START = datetime(2026, 11, 1, tzinfo=UTC)


def test_interval_slots_missed_runs_and_periodic_jobs() -> None:
    s = Schedule(instance="a", every_s=3600, created_at=START.isoformat(), verify_every_s=86400)
    assert due(s, START + timedelta(minutes=59)).slot is None
    first = due(s, START + timedelta(minutes=61))
    assert (first.slot, first.missed, first.verify, first.test) == (START + timedelta(hours=1), 0, True, False)
    s.last_slot = first.slot.isoformat()  # type: ignore[union-attr]
    s.last_verify_at = (START + timedelta(minutes=61)).isoformat()
    late = due(s, START + timedelta(hours=10, minutes=5))
    assert (late.slot, late.missed, late.verify) == (START + timedelta(hours=10), 8, False)
    assert not due(s, START + timedelta(days=1, hours=1)).verify
    assert due(s, START + timedelta(days=1, hours=1, minutes=1)).verify


def test_cron_slots_are_counted_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")  # cron times are local
    time.tzset()
    s = Schedule(instance="a", cron="0 3 * * *", created_at=START.isoformat())
    found = due(s, START + timedelta(days=3, hours=4))  # 03:00 of Nov 1, 2, 3 and 4 passed
    assert found.slot is not None
    assert (found.slot.astimezone(UTC), found.missed) == (START + timedelta(days=3, hours=3), 3)
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800),
                                               ("1w", 604800), ("30", 30)])
def test_intervals(text: str, seconds: float) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("bad", ["", "0s", "-1h", "1y", "soon", "infh"])
def test_bad_intervals_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput, match="is not an interval"):
        parse_every(bad)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("cron", ["0 3 * * *", "*/15 * * * *", "30 2 * * 1-5", "0 0 1 * *", "5 4 * * sun",
                                  "0 */6 * * *", "0 12 1,15 jan,jul *"])
def test_cron_becomes_the_same_systemd_calendar(cron: str) -> None:
    calendar = on_calendar(cron)
    out = subprocess.run(["systemd-analyze", "calendar", "--iterations=5", calendar], capture_output=True,
                         text=True, check=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"}).stdout
    systemd = [line.split(":", 1)[1].strip() for line in out.splitlines()
               if line.strip().startswith(("Next elapse:", "Iter. #"))]
    ours = CronSim(cron, datetime.now(UTC).replace(second=0, microsecond=0))
    expected = [next(ours).strftime("%a %Y-%m-%d %H:%M:%S UTC") for _ in range(5)]
    assert systemd == expected, (cron, calendar)


def test_cron_systemd_cannot_say_is_refused() -> None:
    with pytest.raises(InvalidInput, match="day-of-month OR day-of-week"):
        on_calendar("0 3 1 * 1")
    with pytest.raises(InvalidInput, match="no systemd calendar equivalent"):
        on_calendar("0 3-5/2 * * *")


def test_unit_files_run_the_same_commands(tmp_path: Path) -> None:
    schedules = [Schedule(instance="web", cron="0 3 * * *", prune=True, repository="s3://b/p?endpoint=http%3A//x",
                          verify_every_s=604800, created_at=START.isoformat()),
                 Schedule(instance="db", every_s=3600, backup_type="full", created_at=START.isoformat())]
    files = unit_files(schedules, home=tmp_path, executable="/usr/bin/python3")
    assert set(files) == {"freezeframe-daemon.service", "freezeframe-backup-web.service",
                          "freezeframe-backup-web.timer", "freezeframe-verify-web.service",
                          "freezeframe-verify-web.timer",
                          "freezeframe-backup-db.service", "freezeframe-backup-db.timer"}
    assert "OnCalendar=*-*-* 3:0:00\nPersistent=true" in files["freezeframe-backup-web.timer"]
    assert "ExecStartPost=/usr/bin/python3 -m freezeframe --home " in files["freezeframe-backup-web.service"]
    assert "backup prune web" in files["freezeframe-backup-web.service"]
    assert "OnUnitActiveSec=3600s" in files["freezeframe-backup-db.timer"]
    assert "backup create db --type full" in files["freezeframe-backup-db.service"]


def test_bad_schedules_are_refused(home: Home, catalog: Catalog) -> None:
    catalog.add_instance("sched-host", kind="host", qmp_socket=None, qga_socket=None, mounts=("/srv",))
    for args, code, text in [((), 2, "exactly one of --every and --cron"),
                             (("--every", "1h", "--cron", "0 3 * * *"), 2, "exactly one of --every and --cron"),
                             (("--every", "soon"), 2, "is not an interval"),
                             (("--cron", "61 * * * *"), 2, "is not a cron expression"),
                             (("--every", "1h", "--verify-every", "1d", "--verify-weekly"), 2, "not both")]:
        done = run_cli(home, "schedule", "add", "sched-host", *args)
        assert done.returncode == code, (args, done.stderr)
        assert text in done.stderr
    assert run_cli(home, "schedule", "add", "nosuch", "--every", "1h").returncode == 3
    assert run_cli(home, "schedule", "remove", "sched-host").returncode == 3
    assert run_cli(home, "schedule", "add", "sched-host", "--every", "1h").returncode == 0
    catalog.remove_instance("sched-host")
    assert [s.instance for s in catalog.schedules() if s.instance == "sched-host"] == []


def test_the_shipped_daemon_unit_runs_a_command_that_works(tmp_path: Path) -> None:
    from importlib.resources import files

    unit = (files("freezeframe.units") / "freezeframe-daemon.service").read_text()
    exec_start = next(line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("ExecStart="))
    program, *args = shlex.split(exec_start)
    assert program.endswith("/freezeframe")
    assert args[0] == "daemon"
    metrics = tmp_path / "m.prom"
    args = [a if not a.endswith(".prom") else str(metrics) for a in args]
    done = subprocess.run([sys.executable, "-m", "freezeframe", "--home", str(tmp_path / "home"), *args,
                           "--run-for", "0.5", "--tick", "0.1"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["event"] for line in done.stdout.splitlines()] == ["daemon started", "daemon stopped"]
    assert metrics.exists(), "the daemon wrote no metrics file"
