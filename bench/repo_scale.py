"""What the whole-repository passes cost as a repository grows: wall time and peak memory
of stats, check, garbage collection, verify's passes over the indexes, copying every
backup into another repository (sync) and pruning, on synthetic repositories of growing
size.

    .venv/bin/python bench/repo_scale.py                       # 10 k .. 1 M distinct chunks
    .venv/bin/python bench/repo_scale.py --sizes 100000:100

The chunk objects are empty files (the cost under test is the bookkeeping: listing them,
reading every index, the sets of ids); the indexes and manifests are real, written by the
repository. Each backup names one disk of ``--disk-chunks`` chunks, a window that slides
over the distinct chunks from one backup to the next, so that the backups together name
every chunk and each shares most of its chunks with its neighbours, as daily backups do.
sync copies into a repository that holds every chunk already (hard links): what it
costs is its bookkeeping (the set of chunks named, one listing of the destination, the
lease naming what it found, every index rewritten), not moving data, which
bench/backup_throughput.py measures. prune keeps 30 daily and 12 monthly backups of the
daily ones (Proxmox's rules, jobs/retention.py) and deletes the rest, as ``backup prune``
does in the repository. Each operation runs in a process of its own; its peak RSS is that process's maximum
resident set (``wait4``), the Python interpreter and its imports included (about 60 MB).

Targets (issue 14): peak RSS at most 100 bytes per distinct chunk plus 100 MB, and time
linear in the number of index entries.
"""

from __future__ import annotations

import argparse
import datetime
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from freezeframe.backup.repository import DiskIndex, Repository, chunk_name
from freezeframe.backup.store import LocalStore

CHUNK = 4 << 20

OPS = {
    "stats": "repo.stats()",
    "check": "assert not repo.check().problems",
    "gc": "collect_garbage(repo)",
    # Its passes over the indexes and the listing; it reads back one chunk (an empty one
    # here: found damaged, which brings in the pass that names every backup using it).
    "verify idx": "verify(repo, repo.backup_ids(), subset=0.0001, quarantine=False)",
    "sync": "sync_backups(repo, Repository.open(LocalStore(Path({dst!r}), durable=False)))",
    "prune": ("[repo.delete_backup(b) for b, kept in select(Retention(daily=30, monthly=12), "
              "[(b, repo.manifest(b)['created_at']) for b in repo.backup_ids()]).items() if kept is None]"),
}
PRELUDE = """
import sys
sys.path.insert(0, {root!r})
from freezeframe.backup.gc import collect_garbage
from freezeframe.backup.verify import verify
from freezeframe.jobs.retention import select
from freezeframe.jobs.sync import sync_backups
from freezeframe.model import Retention
from freezeframe.backup.repository import Repository
from freezeframe.backup.store import LocalStore
from pathlib import Path
repo = Repository.open(LocalStore(Path({path!r}), durable=False))
"""


def build(path: Path, distinct: int, backups: int, disk_chunks: int) -> int:
    """The synthetic repository; returns the number of index entries."""
    repo = Repository.init(LocalStore(path, durable=False), chunk_size=CHUNK, lease_s=1)
    ids = [secrets.token_hex(32) for _ in range(distinct)]
    for chunk in ids:
        file = path / chunk_name(chunk)
        try:
            os.close(os.open(file, os.O_CREAT | os.O_WRONLY, 0o600))
        except FileNotFoundError:
            file.parent.mkdir(parents=True)
            os.close(os.open(file, os.O_CREAT | os.O_WRONLY, 0o600))
    disk_chunks = min(disk_chunks, distinct)
    step = (distinct - disk_chunks) / max(1, backups - 1)
    entries = 0
    for number in range(backups):
        backup_id = f"{number:08d}-{secrets.token_hex(4)}"
        day = (datetime.date(2024, 1, 1) + datetime.timedelta(days=number)).isoformat()
        start = round(number * step)
        index = DiskIndex(backup=backup_id, device="vda", virtual_size=disk_chunks * CHUNK, chunk_size=CHUNK,
                          chunks=list(ids[start:start + disk_chunks]))
        name = repo.put_index(index, 0)
        repo.put_manifest(backup_id, {"id": backup_id, "instance": "vm", "type": "incremental",
                                      "created_at": f"{day}T03:00:00Z", "disks": [{"device": "vda",
                                      "virtual_size": index.virtual_size, "index": name}]})
        entries += disk_chunks
    # Some garbage for the collection to find: chunks no index names, made old enough.
    old = time.time() - 3600
    for _ in range(max(1, distinct // 100)):
        file = path / chunk_name(secrets.token_hex(32))
        file.parent.mkdir(parents=True, exist_ok=True)
        file.touch()
        os.utime(file, (old, old))
    return entries


def destination(path: Path) -> Path:
    """An empty repository beside ``path`` holding every chunk of it (hard links)."""
    dst = path.with_name(path.name + "-copy")
    Repository.init(LocalStore(dst, durable=False), chunk_size=CHUNK)
    subprocess.run(["cp", "-al", str(path / "chunks"), str(dst)], check=True)
    return dst


def measure(path: Path, code: str) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of ``code`` in a process of its own."""
    script = PRELUDE.format(root=str(Path(__file__).resolve().parents[1]), path=str(path)) + code
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", script])
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.monotonic() - began
    if status != 0:
        raise SystemExit(f"{code!r} failed on {path}")
    return took, usage.ru_maxrss / 1024


def main() -> None:
    if sys.argv[1:2] == ["--build"]:
        print(build(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000:10,100000:100,1000000:1000",
                        help="DISTINCT:BACKUPS,... (default: %(default)s)")
    parser.add_argument("--disk-chunks", type=int, default=20000, help="chunks per backup (default: %(default)s)")
    parser.add_argument("--ops", default=",".join(OPS), help="which operations (default: %(default)s)")
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: a temporary directory)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ff-repo-scale-", dir=args.dir))
    print(f"{'distinct':>9} {'backups':>7} {'entries':>10} {'op':<11} {'wall s':>8} {'us/entry':>8} "
          f"{'peak MB':>8} {'B/chunk*':>8}")
    try:
        for size in args.sizes.split(","):
            distinct, backups = (int(x) for x in size.split(":"))
            path = base / f"{distinct}-{backups}"
            began = time.monotonic()
            # Built by a process of its own: a child forked from a big parent would count the
            # parent's pages in its peak RSS (ru_maxrss is kept across exec).
            entries = int(subprocess.run([sys.executable, __file__, "--build", str(path), str(distinct),
                                          str(backups), str(args.disk_chunks)], check=True, capture_output=True,
                                         text=True).stdout)
            print(f"# built {distinct} chunks, {backups} backups, {entries} entries in "
                  f"{time.monotonic() - began:.0f} s", flush=True)
            _, idle = measure(path, "pass")
            dst = destination(path)
            for op in args.ops.split(","):
                took, peak = measure(path, OPS[op].format(dst=str(dst)))
                print(f"{distinct:>9} {backups:>7} {entries:>10} {op:<11} {took:>8.2f} "
                      f"{took / entries * 1e6:>8.3f} {peak:>8.0f} {(peak - idle) * (1 << 20) / distinct:>8.1f}",
                      flush=True)
            shutil.rmtree(path)
            shutil.rmtree(dst)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print("* B/chunk: peak RSS above an idle process that opened the repository, per distinct chunk")


if __name__ == "__main__":
    main()
