#!/usr/bin/python3
"""A guest freeze hook for SQLite: hold the write lock from ``freeze`` until ``thaw``.

A hook is a process that must exit before qemu-ga freezes, so the lock is held by a
detached holder it starts: the holder checkpoints the WAL, takes ``BEGIN IMMEDIATE`` on
each database, reports what it holds, and waits. ``thaw`` ends the holder, which rolls
back. The holder lets go by itself after ``hold_timeout`` seconds, so no thaw that never
comes can lock the application out for good.

Configuration: ``/etc/freezeframe/sqlite-hold.json``::

    {"databases": ["/srv/app/app.db"], "hold_timeout": 60}

Standard library only, Python 3.8 or newer.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sqlite3
import sys
import time
from typing import Any

CONFIG = os.environ.get("FREEZEFRAME_SQLITE_HOLD_CONFIG", "/etc/freezeframe/sqlite-hold.json")
PIDFILE = "/run/freezeframe/sqlite-hold.pid"
READY_TIMEOUT = 30.0


def load_config() -> tuple[list[str], float]:
    with open(CONFIG) as handle:
        config = json.load(handle)
    databases = config.get("databases")
    if not isinstance(databases, list) or not all(isinstance(d, str) for d in databases):
        raise ValueError("databases must be a list of paths")
    return databases, float(config.get("hold_timeout", 60))


def hold(databases: list[str], hold_timeout: float, ready_fd: int) -> None:
    """The holder: lock every database, say so on ``ready_fd``, wait to be told to stop."""
    released: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: released.append(True))
    report: dict[str, Any] = {"databases": []}
    connections: list[sqlite3.Connection] = []
    try:
        for path in databases:
            db = sqlite3.connect("file:%s?mode=rw" % path, uri=True, isolation_level=None, timeout=20)
            mode = db.execute("PRAGMA journal_mode").fetchone()[0]
            if mode == "wal":
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("BEGIN IMMEDIATE")
            connections.append(db)
            report["databases"].append({"path": path, "journal_mode": mode,
                                        "page_count": db.execute("PRAGMA page_count").fetchone()[0]})
        report["locked_at"] = time.time()
        report["status"] = "held"
    except sqlite3.Error as err:
        report["status"] = "failed"
        report["error"] = str(err)
    os.write(ready_fd, (json.dumps(report) + "\n").encode())
    os.close(ready_fd)
    deadline = time.monotonic() + hold_timeout
    while not released and time.monotonic() < deadline and report["status"] == "held":
        time.sleep(0.05)
    for db in connections:
        try:
            db.execute("ROLLBACK")
        finally:
            db.close()


def freeze() -> int:
    databases, hold_timeout = load_config()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        # The holder outlives this hook: its own session, and nothing of the runner's
        # pipes, which the runner reads to the end.
        os.close(read_fd)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        try:
            hold(databases, hold_timeout, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    line = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        line += chunk
    os.close(read_fd)
    try:
        report = json.loads(line.decode())
    except ValueError:
        os.kill(pid, signal.SIGTERM)
        print("the SQLite holder did not report in time")
        return 1
    os.makedirs(os.path.dirname(PIDFILE), exist_ok=True)
    with open(PIDFILE, "w") as handle:
        handle.write(str(pid))
    print(json.dumps(report))
    return 0 if report.get("status") == "held" else 1


def thaw() -> int:
    try:
        with open(PIDFILE) as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        print("no holder to release")
        return 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not os.path.exists("/proc/%d" % pid):
            break
        time.sleep(0.05)
    os.unlink(PIDFILE)
    print("released")
    return 0


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    sys.exit(freeze() if action == "freeze" else thaw() if action == "thaw" else 2)
