"""Commit latency a PostgreSQL client sees: application-consistent snapshot, filesystem-only
snapshot, and no snapshot, on the same machine in one run.

A private PostgreSQL server keeps its data on a loop-mounted ext4 (its image on XFS, so the
host target clones it in constant time). One client commits single-row inserts as fast as
it can and times each commit. Rounds alternate between the three cases; in each round the
longest commit that overlapped the window (the snapshot call, or an equally long idle
window) is kept, and all commits in the windows feed the percentiles.

    python bench/app_stall.py [--rounds 10]        (as root: it mounts file systems)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hostfs import data_fs
from servers import open_base, pg_init, postgres

from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.engine.plan import plan_snapshot
from freezeframe.engine.run import delete_snapshot, take_snapshot
from freezeframe.model import Level, WriterSpec


class Committer(threading.Thread):
    def __init__(self, dsn: dict[str, object]) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg.connect(**dsn, autocommit=True)  # type: ignore[arg-type]
        self.commits: list[tuple[float, float]] = []  # (start, end), monotonic seconds
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.is_set():
            n += 1
            start = time.monotonic()
            self.conn.execute("INSERT INTO t VALUES (%s, %s)", (n, "x" * 100))
            self.commits.append((start, time.monotonic()))

    def in_window(self, t0: float, t1: float) -> list[float]:
        return [(end - start) * 1000 for start, end in self.commits if end >= t0 and start <= t1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    cases = ("none", "filesystem", "application")
    worst: dict[str, list[float]] = {c: [] for c in cases}
    every: dict[str, list[float]] = {c: [] for c in cases}
    windows: dict[str, list[float]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory(prefix="ff-bench-") as tmp, open_base() as base, \
            data_fs(base, inner="ext4", outer="xfs", size_mib=1024) as fs:
        home = Home.open(Path(tmp))
        datadir = fs.mountpoint / "pgdata"
        pg_init(datadir)
        with postgres(datadir, base / "run") as pg, Catalog.open(home.catalog) as catalog:
            dsn: dict[str, object] = {"host": str(pg.sockdir), "port": pg.port, "user": "postgres",
                                      "dbname": "postgres"}
            with psycopg.connect(**dsn, autocommit=True) as setup:  # type: ignore[arg-type]
                setup.execute("CREATE TABLE t (n bigint PRIMARY KEY, payload text)")
            instance = catalog.add_instance("pg", kind="host", qmp_socket=None, qga_socket=None,
                                            mounts=(str(fs.mountpoint),))
            writer = WriterSpec(name="pg", kind="postgresql", options={"host": str(pg.sockdir), "port": str(pg.port)})
            committer = Committer(dsn)
            committer.start()
            time.sleep(1)
            last_window = 0.3
            for round_ in range(args.rounds):
                for case in cases:
                    t0 = time.monotonic()
                    if case == "none":
                        time.sleep(last_window)
                    else:
                        level = Level.APPLICATION if case == "application" else Level.FILESYSTEM
                        plan = plan_snapshot(instance, now=datetime.now(UTC), level=level,
                                             writers=[writer] if case == "application" else [])
                        snap = asyncio.run(take_snapshot(plan, catalog, lock_dir=home.locks))
                        assert snap.achieved_level is level, snap.fallback_reasons
                    t1 = time.monotonic()
                    if case != "none":
                        last_window = t1 - t0
                        asyncio.run(delete_snapshot(catalog, snap.id, lock_dir=home.locks))
                    latencies = committer.in_window(t0, t1)
                    worst[case].append(max(latencies))
                    every[case].extend(latencies)
                    windows[case].append((t1 - t0) * 1000)
                    time.sleep(0.2)
                print(f"  {round_ + 1}/{args.rounds}", file=sys.stderr, end="\r")
            committer.halt.set()
            committer.join(10)
            committer.conn.close()
    print(f"PostgreSQL 15 on loop-mounted ext4 (image on XFS); one client committing single-row inserts; "
          f"{args.rounds} rounds per case, interleaved")
    print(f"{'case':<13} {'window ms':>10} {'commits':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'worst/round median':>19} {'worst ms':>9}")
    for case in cases:
        print(f"{case:<13} {statistics.median(windows[case]):10.1f} {len(every[case]):8d} "
              f"{pct(every[case], 0.5):8.2f} {pct(every[case], 0.99):8.2f} "
              f"{statistics.median(worst[case]):19.2f} {max(worst[case]):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
