#!/usr/bin/python3
"""The lab guest's application: commits numbered rows to a SQLite database, and notes each
acknowledged commit (number and guest time) on tmpfs, so a test can check that a restored
copy holds every commit acknowledged before the freeze began.

Usage: sqlite_app.py DATABASE ACK_LOG [INTERVAL_SECONDS]
Standard library only, Python 3.8 or newer.
"""

from __future__ import annotations

import sqlite3
import sys
import time


def main(argv: list[str]) -> int:
    database, ack_log = argv[1], argv[2]
    interval = float(argv[3]) if len(argv) > 3 else 0.005
    db = sqlite3.connect(database, isolation_level=None, timeout=120)
    db.execute("PRAGMA journal_mode = wal")
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, payload TEXT)")
    n = db.execute("SELECT coalesce(max(n), 0) FROM t").fetchone()[0]
    with open(ack_log, "a", buffering=1) as acks:
        while True:
            n += 1
            db.execute("INSERT INTO t VALUES (?, ?)", (n, "x" * 100))
            acks.write("%d %.6f\n" % (n, time.time()))
            time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
