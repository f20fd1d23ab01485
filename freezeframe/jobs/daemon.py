"""The scheduler daemon: runs due backups, prunes, verifies and restore tests, collects
garbage, and finishes live restores that were interrupted.

Each job is the command a person would run (``freezeframe backup create ...``), in a
process of its own: a job that dies (or is killed) takes nothing else with it, and its
guard and sentinel work exactly as they do by hand. At most one job per instance runs at
a time; instances run side by side. Every job gives one structured log line, and after
every job the metrics file (Prometheus' text format, for a node exporter's textfile
collector) is rewritten from the catalog, atomically.

The clock is injected: ``daemon --clock START --speed N`` runs a simulated clock, and
jobs see it through ``FREEZEFRAME_NOW``, so a test runs weeks of schedule in a minute.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from freezeframe.catalog import Catalog
from freezeframe.catalog.store import parse_time
from freezeframe.jobs.live_restore import interrupted
from freezeframe.jobs.schedule import Due, due
from freezeframe.model import BackupState, Level, Schedule

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
#: argv after ``freezeframe``, and the clock's time -> exit code, stdout, stderr.
Runner = Callable[[list[str], datetime], tuple[int, str, str]]
Log = Callable[[dict[str, Any]], None]

_LEVEL_VALUE = {Level.CRASH: 1, Level.FILESYSTEM: 2, Level.APPLICATION: 3}


def cli_runner(home: Path, *, fake_clock: bool, timeout: float = 6 * 3600) -> Runner:
    """Run ``freezeframe --home HOME ...`` as a process of its own."""

    def run(argv: list[str], now: datetime) -> tuple[int, str, str]:
        env = dict(os.environ)
        if fake_clock:
            env["FREEZEFRAME_NOW"] = now.isoformat()
        try:
            done = subprocess.run([sys.executable, "-m", "freezeframe", "--home", str(home), *argv],
                                  capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return 124, "", f"timed out after {timeout:g}s"
        return done.returncode, done.stdout, done.stderr

    return run


@dataclass
class Daemon:
    catalog_path: Path
    runner: Runner
    clock: Clock
    log: Log
    metrics_path: Path | None = None
    #: Garbage collection of every repository the schedules use, this often (None: never).
    #: It runs beside backups (they do not wait for each other), one at a time per repository.
    gc_every_s: float | None = None
    #: Where live restores keep their state: one that no process is finishing (its
    #: freezeframe was killed, the host rebooted under it) is finished by the daemon.
    live_dir: Path | None = None
    _busy: set[str] = field(default_factory=set)
    _gc_due: dict[str, datetime] = field(default_factory=dict)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def tick(self, *, wait: bool = False) -> list[Due]:
        """Start what is due now; with ``wait``, return once it has run."""
        now = self.clock()
        with Catalog.open(self.catalog_path) as catalog:
            schedules = catalog.schedules()
        started: list[Due] = []
        for schedule in schedules:
            found = due(schedule, now)
            if found.slot is None and not found.verify and not found.test:
                continue
            with self._lock:
                if schedule.instance in self._busy:
                    continue  # its previous job still runs: at most one per instance
                self._busy.add(schedule.instance)
            thread = threading.Thread(target=self._run, args=(schedule, found, now),
                                      name=f"ff-job-{schedule.instance}", daemon=True)
            self._threads.append(thread)
            thread.start()
            started.append(found)
        self._collect(schedules, now)
        self._finish_live(now)
        if wait:
            self.join()
        return started

    def _collect(self, schedules: list[Schedule], now: datetime) -> None:
        """Start garbage collection of each repository whose turn it is (the first one
        ``gc_every_s`` after the daemon started)."""
        if self.gc_every_s is None:
            return
        for repository in sorted({s.repository or "" for s in schedules}):
            key = f"gc:{repository}"
            with self._lock:
                if key in self._busy:
                    continue
                when = self._gc_due.setdefault(key, now + timedelta(seconds=self.gc_every_s))
                if now < when:
                    continue
                self._busy.add(key)
                self._gc_due[key] = now + timedelta(seconds=self.gc_every_s)
            thread = threading.Thread(target=self._gc, args=(repository, key, now), name="ff-job-gc", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _gc(self, repository: str, key: str, now: datetime) -> None:
        try:
            line, out = self._command(["repo", "gc", *([repository] if repository else [])], now,
                                      repository=repository or "default", job="gc")
            result = _json(out)
            if line["outcome"] == "ok" and isinstance(result, dict):
                line |= {k: result.get(k) for k in ("chunks_deleted", "bytes_freed", "leases_honoured",
                                                     "leases_broken")}
            self.log(line)
        finally:
            with self._lock:
                self._busy.discard(key)

    def _command(self, argv: list[str], now: datetime, **who: Any) -> tuple[dict[str, Any], str]:
        """Run one job's command (``-o json``): its log line (who, outcome, exit code,
        duration, the first line of its error) and what it printed."""
        started = time.monotonic()
        log.info("starting: freezeframe %s", " ".join(argv))
        code, out, err = self.runner([*argv, "-o", "json"], now)
        line: dict[str, Any] = {"at": now.isoformat(), **who, "outcome": "ok" if code == 0 else "failed",
                                "exit_code": code, "duration_s": round(time.monotonic() - started, 3)}
        if code != 0:
            line["error"] = (err.strip().splitlines() or ["(no message)"])[0][:500]
            log.warning("failed (exit %d after %.1fs): freezeframe %s: %s", code, line["duration_s"], " ".join(argv),
                        line["error"])
        else:
            log.info("done in %.1fs: freezeframe %s", line["duration_s"], " ".join(argv))
        return line, out

    def _finish_live(self, now: datetime) -> None:
        if self.live_dir is None or not self.live_dir.is_dir():
            return
        for instance in interrupted(self.live_dir):
            key = f"live:{instance}"
            with self._lock:
                if key in self._busy:
                    continue
                self._busy.add(key)
            thread = threading.Thread(target=self._live, args=(instance, key, now), name="ff-job-live", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _live(self, instance: str, key: str, now: datetime) -> None:
        try:
            line, out = self._command(["backup", "restore", "--live", "--resume", instance], now,
                                      instance=instance, job="live-restore")
            result = _json(out)
            done = result.get("live_restore") if isinstance(result, dict) else None
            if line["outcome"] == "ok" and isinstance(done, dict):
                line |= {"bytes_local": done.get("bytes_local"), "bytes_total": done.get("bytes_total")}
            self.log(line)
        finally:
            with self._lock:
                self._busy.discard(key)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads = [t for t in self._threads if t.is_alive()]

    def run_forever(self, *, tick_s: float = 10.0, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        self.write_metrics()
        while not stop.is_set():
            self.tick()
            stop.wait(tick_s)
        self.join()

    # -- one instance's jobs ---------------------------------------------------------------

    def _run(self, schedule: Schedule, found: Due, now: datetime) -> None:
        try:
            if found.slot is not None:
                ok = self._backup(schedule, found, now)
                self._mark(schedule.instance, last_slot=found.slot.isoformat())
                if ok and schedule.prune:
                    self._prune(schedule, now)
            if found.verify:
                self._verify(schedule, now)
                self._mark(schedule.instance, last_verify_at=now.isoformat())
            if found.test:
                self._test(schedule, now)
                self._mark(schedule.instance, last_test_at=now.isoformat())
        finally:
            with self._lock:
                self._busy.discard(schedule.instance)
            self.write_metrics()

    def _job(self, job: str, schedule: Schedule, argv: list[str], now: datetime,
             **extra: Any) -> tuple[bool, Any]:
        line, out = self._command(argv, now, instance=schedule.instance, job=job, **extra)
        result = _json(out)
        self.log(line | self._summary(job, result))
        return line["outcome"] == "ok", result

    @staticmethod
    def _summary(job: str, result: Any) -> dict[str, Any]:
        if job == "backup" and isinstance(result, dict):
            disks = result.get("disks") or []
            return {"backup": result.get("id"), "type": result.get("type"), "level": result.get("consistency"),
                    "fallback_reasons": result.get("fallback_reasons"),
                    "bytes_read": sum(d.get("bytes_read", 0) for d in disks),
                    "bytes_new": sum(d.get("bytes_new", 0) for d in disks)}
        if job == "verify" and isinstance(result, dict):
            return {"held": result.get("held"), "failed_backups": result.get("failed_backups"),
                    "verified": result.get("backups")}
        if job == "prune" and isinstance(result, list):
            return {"deleted": [r["backup"] for r in result if r.get("action") == "deleted"]}
        if job == "restore-test" and isinstance(result, dict):
            return {"backup": result.get("backup"), "result": result.get("outcome")}
        return {}

    def _repo_args(self, schedule: Schedule) -> list[str]:
        return ["--repo", schedule.repository] if schedule.repository else []

    def _backup(self, schedule: Schedule, found: Due, now: datetime) -> bool:
        argv = ["backup", "create", schedule.instance, *self._repo_args(schedule)]
        if schedule.backup_type:
            argv += ["--type", schedule.backup_type]
        if schedule.consistency:
            argv += ["--consistency", schedule.consistency]
        ok, _ = self._job("backup", schedule, argv, now, slot=found.slot.isoformat() if found.slot else None,
                          missed=found.missed)
        return ok

    def _prune(self, schedule: Schedule, now: datetime) -> None:
        with Catalog.open(self.catalog_path) as catalog:
            if catalog.retention(schedule.instance) is None:
                return
        self._job("prune", schedule, ["backup", "prune", schedule.instance], now)

    def _newest(self, schedule: Schedule) -> list[str]:
        with Catalog.open(self.catalog_path) as catalog:
            return [b.id for b in catalog.backups(instance=schedule.instance)]

    def _verify(self, schedule: Schedule, now: datetime) -> None:
        """The newest backup, and any never verified (taken since the last verify): the
        older ones held when they were verified, and a chunk they share with these is read
        again here; re-reading the whole history every time would grow without end."""
        with Catalog.open(self.catalog_path) as catalog:
            found = catalog.backups(instance=schedule.instance)
        ids = [b.id for b in found[:-1] if b.verified_at is None] + [b.id for b in found[-1:]]
        if ids:
            self._job("verify", schedule, ["backup", "verify", *ids], now)

    def _test(self, schedule: Schedule, now: datetime) -> None:
        ids = self._newest(schedule)
        if ids:
            self._job("restore-test", schedule, ["backup", "test", ids[-1]], now)

    def _mark(self, instance: str, **fields: str) -> None:
        with self._lock, Catalog.open(self.catalog_path) as catalog:
            for schedule in catalog.schedules():
                if schedule.instance == instance:
                    for key, value in fields.items():
                        setattr(schedule, key, value)
                    catalog.save_schedule(schedule)

    # -- metrics -----------------------------------------------------------------------------

    def write_metrics(self) -> None:
        """The last successful backup per instance, from the catalog, as a Prometheus text file."""
        if self.metrics_path is None:
            return
        from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

        registry = CollectorRegistry()
        labels = ["instance"]
        last = Gauge("freezeframe_backup_last_success_timestamp_seconds",
                     "When the newest complete backup was taken (Unix time).", labels, registry=registry)
        duration = Gauge("freezeframe_backup_last_duration_seconds", "How long the newest complete backup took.",
                         labels, registry=registry)
        read = Gauge("freezeframe_backup_last_read_bytes", "Bytes the newest complete backup read.", labels,
                     registry=registry)
        new = Gauge("freezeframe_backup_last_new_bytes", "Bytes the newest complete backup stored for the first time.",
                    labels, registry=registry)
        level = Gauge("freezeframe_backup_last_level",
                      "Consistency the newest complete backup achieved: 3 application, 2 filesystem, 1 crash.",
                      labels, registry=registry)
        failed = Gauge("freezeframe_backup_failed_since_last_success",
                       "Backups that failed since the newest complete one.", labels, registry=registry)
        verified = Gauge("freezeframe_backup_verify_failed", "Complete backups whose last verify failed.",
                         labels, registry=registry)
        with Catalog.open(self.catalog_path) as catalog:
            for schedule in catalog.schedules():
                name = schedule.instance
                every = catalog.backups(instance=name, states=tuple(BackupState))
                good = [b for b in every if b.state is BackupState.CREATED]
                verified.labels(name).set(sum(1 for b in good if b.verify_state and b.verify_state.value == "failed"))
                if not good:
                    failed.labels(name).set(sum(1 for b in every if b.state is BackupState.FAILED))
                    continue
                newest = good[-1]
                last.labels(name).set(parse_time(newest.created_at).timestamp())
                duration.labels(name).set(newest.duration_s or 0)
                read.labels(name).set(sum(d.bytes_read for d in newest.disks))
                new.labels(name).set(sum(d.bytes_new for d in newest.disks))
                level.labels(name).set(_LEVEL_VALUE.get(newest.level, 0) if newest.level else 0)
                failed.labels(name).set(sum(1 for b in every if b.state is BackupState.FAILED
                                            and b.created_at > newest.created_at))
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(self.metrics_path), registry)  # a temporary file, then a rename


def _json(out: str) -> Any:
    """What a job printed with ``-o json``; None when it printed nothing, or not JSON."""
    try:
        return json.loads(out) if out.strip() else None
    except ValueError:
        return None
