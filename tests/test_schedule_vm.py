"""The scheduler on a real lab VM: three simulated days of backups every 6 hours, pruned
to exactly the set a table of dates says, every kept backup restoring whole, the newest of
each day passing its restore test; missed runs caught up once; metrics; and the real daemon on a real clock."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from backups import cli_json, init_repo
from conftest import LabFactory, run_cli
from prometheus_client.parser import text_string_to_metric_families

from freezeframe.config import Home
from freezeframe.jobs.daemon import Daemon, cli_runner

pytestmark = pytest.mark.vm


def test_three_simulated_days_keep_exactly_the_policy_and_every_kept_backup_restores(
        home: Home, lab: LabFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")  # the retention periods are local time: pin it for the table below
    repo = tmp_path / "repo"
    init_repo(home, repo, "--lock-lease", "5")
    vm = lab(disks=1)
    assert run_cli(home, "policy", "set", vm.name, "--keep-last", "2", "--keep-daily", "2").returncode == 0
    start = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    assert run_cli(home, "schedule", "add", vm.name, "--every", "6h", "--repo", str(repo), "--consistency",
                   "filesystem", "--prune", "--test-every", "1d", "--verify-every", "1d",
                   env={"FREEZEFRAME_NOW": start.isoformat()}).returncode == 0

    now = start
    lines: list[dict[str, Any]] = []
    metrics = tmp_path / "metrics.prom"
    daemon = Daemon(home.catalog, cli_runner(home.root, fake_clock=True), lambda: now, lines.append, metrics,
                    gc_every_s=86400)
    for hour in range(6, 3 * 24 + 1, 3):  # ticks every 3 simulated hours, for 3 days
        now = start + timedelta(hours=hour)
        daemon.tick(wait=True)

    backups = [line for line in lines if line["job"] == "backup"]
    assert [b["outcome"] for b in backups] == ["ok"] * 12, backups
    assert [b["slot"][:16] for b in backups] == [(start + timedelta(hours=6 * k)).isoformat()[:16]
                                                 for k in range(1, 13)]
    assert all(b["missed"] == 0 for b in backups)
    assert [b["type"] for b in backups] == ["full"] + ["incremental"] * 11
    # Taken at 06, 12, 18 and 00 from Nov 1 06:00 to Nov 4 00:00, pruned after each: keep-last
    # 2 keeps Nov 4 00:00 and Nov 3 18:00; keep-daily 2 keeps the newest of each of the two
    # days before (days already kept do not count): Nov 2 18:00 and Nov 1 18:00.
    kept_table = ["2026-11-01T18:00", "2026-11-02T18:00", "2026-11-03T18:00", "2026-11-04T00:00"]
    listed, _ = cli_json(home, "backup", "list", "--instance", vm.name)
    assert [b["created_at"][:16] for b in listed] == kept_table

    # A verify ran once a simulated day, on the backups taken since the last one (the newest
    # among them), never again on those it had verified; every one held.
    verifies = [line for line in lines if line["job"] == "verify"]
    assert len(verifies) == 3
    assert all(v["outcome"] == "ok" and v["held"] for v in verifies), verifies
    seen = [b for v in verifies for b in v["verified"]]
    assert len(seen) == len(set(seen)), "a verify read a backup an earlier one had verified"
    assert all(1 <= len(v["verified"]) <= 4 for v in verifies), verifies
    # Garbage collection ran once a simulated day, beside the backups, and left every kept
    # backup whole.
    collections = [line for line in lines if line["job"] == "gc"]
    assert len(collections) == 2, collections
    assert all(c["outcome"] == "ok" and c["leases_broken"] == [] for c in collections), collections
    assert run_cli(home, "repo", "check", str(repo)).returncode == 0

    # A restore test ran once a simulated day, on the newest backup, and passed.
    tests = [line for line in lines if line["job"] == "restore-test"]
    assert len(tests) == 3
    assert all(t["outcome"] == "ok" and t["result"] == "passed" for t in tests), tests
    # Every kept backup still restores whole after the prunes: a verify reads every chunk of
    # each (the restore tests above checked the file systems of the newest of each day).
    verified, done = cli_json(home, "backup", "verify", "--all", "--repo", str(repo))
    assert done.returncode == 0, verified
    assert set(verified["backups"]) >= {b["id"] for b in listed}, verified

    # The daemon was down for two days: the 8 slots it missed are caught up once, not 8 times.
    now = start + timedelta(days=5, hours=1)
    daemon.tick(wait=True)
    late = [line for line in lines if line["job"] == "backup"][12:]
    assert len(late) == 1
    assert late[0]["missed"] == 7
    assert late[0]["slot"][:16] == "2026-11-06T00:00"

    values = {(sample.name, sample.labels.get("instance")): sample.value
              for family in text_string_to_metric_families(metrics.read_text()) for sample in family.samples}
    assert values[("freezeframe_backup_last_success_timestamp_seconds", vm.name)] == now.timestamp()
    assert values[("freezeframe_backup_last_level", vm.name)] == 2  # filesystem
    assert values[("freezeframe_backup_failed_since_last_success", vm.name)] == 0
    assert run_cli(home, "schedule", "remove", vm.name).returncode == 0  # the session's catalog is shared


def test_the_daemon_runs_on_a_real_clock_one_job_per_instance_and_logs_json(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo, "--lock-lease", "5")
    vm = lab(disks=1)
    assert run_cli(home, "schedule", "add", vm.name, "--every", "2s", "--repo", str(repo)).returncode == 0
    metrics = tmp_path / "m.prom"
    done = subprocess.run([sys.executable, "-m", "freezeframe", "--home", str(home.root), "daemon", "--tick", "0.2",
                           "--run-for", "9", "--metrics-file", str(metrics), "--gc-every", "2s"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["event"] == "daemon started"
    assert lines[-1]["event"] == "daemon stopped"
    jobs = [line for line in lines if line.get("job") == "backup" and line["instance"] == vm.name]
    assert len(jobs) >= 2, lines
    assert all(j["outcome"] == "ok" for j in jobs), [j.get("error") for j in jobs]
    assert all(j["instance"] == vm.name and j["backup"] for j in jobs)
    # One job per instance at a time: each backup started after the one before it ended.
    listed, _ = cli_json(home, "backup", "list", "--instance", vm.name)
    assert len(listed) == len(jobs)
    for before, after in itertools.pairwise(jobs):
        ended = datetime.fromisoformat(before["at"]) + timedelta(seconds=before["duration_s"])
        assert ended <= datetime.fromisoformat(after["at"]) + timedelta(seconds=0.5), (before, after)
    assert f'freezeframe_backup_last_new_bytes{{instance="{vm.name}"}}' in metrics.read_text()
    # Garbage collection ran on its own schedule beside the backups: neither waited.
    collections = [line for line in lines if line.get("job") == "gc"]
    assert collections, lines
    assert all(c["outcome"] == "ok" and c["repository"] == str(repo) for c in collections), collections
    assert run_cli(home, "repo", "check", str(repo)).returncode == 0
