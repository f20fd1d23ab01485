"""Freeze window and guest write stall: freezeframe versus the plain sequence.

Boots a lab VM with two ext4 data disks and the writer running, then takes snapshots
alternately with

  * freezeframe: overlays prepared before the freeze, one ``transaction`` of
    ``blockdev-snapshot`` inside it;
  * the plain sequence many scripts use: qemu-ga freeze, a ``transaction`` of
    ``blockdev-snapshot-sync`` (which creates the overlay files inside the window), thaw;

and prints, for each, the freeze window (first freeze call to end of thaw, host clock)
and the longest single write the guest's writer saw stall (guest clock), as min,
median, p95 and max. Alternating the two keeps machine noise from favouring either.

    python bench/freeze_window.py [--count 20] [--keep-home]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from freezeframe.agent.qga import GuestAgent
from freezeframe.agent.qmp import Monitor
from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.engine.plan import plan_snapshot
from freezeframe.engine.run import take_snapshot
from freezeframe.lab import vm as lab_vm
from freezeframe.model import Level

STALL_LOG = "/run/ff-workload.stalls"


async def stall_lines(qga: str) -> list[str]:
    async with GuestAgent(qga) as agent:
        return (await agent.read_file(STALL_LOG, max_bytes=4 << 20)).decode().splitlines()


def longest_stall_ms(before: list[str], after: list[str]) -> float:
    """The longest write logged between two reads of the stall log (0 if none over 5 ms)."""
    new = after[len(before):]
    return max((int(line.split()[1]) / 1000 for line in new if len(line.split()) == 2), default=0.0)


async def plain_sequence(vm: lab_vm.LabVM, index: int) -> float:
    """qemu-ga freeze -> blockdev-snapshot-sync (files created inside the window) -> thaw."""
    async with Monitor(vm.qmp_socket) as monitor, GuestAgent(vm.qga_socket) as agent:
        disks = [b["inserted"] for b in await monitor.execute("query-block") if b.get("inserted")]
        actions = [
            {"type": "blockdev-snapshot-sync",
             "data": {"node-name": d["node-name"],
                      "snapshot-file": str(Path(vm.directory) / f"plain{index}-{n}.qcow2"),
                      "snapshot-node-name": f"plain{index}-{n}", "format": "qcow2"}}
            for n, d in enumerate(disks)
        ]
        start = time.perf_counter()
        await agent.fsfreeze_freeze()
        try:
            await monitor.execute("transaction", {"actions": actions})
        finally:
            await agent.fsfreeze_thaw()
        return (time.perf_counter() - start) * 1000


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"{ordered[0]:8.1f} {statistics.median(ordered):8.1f} {p95:8.1f} {ordered[-1]:8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20, help="snapshots per method (default 20)")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary state directory")
    args = parser.parse_args()

    home = Home.open(Path(tempfile.mkdtemp(prefix="ff-bench-")))
    vm = lab_vm.up(home.lab, home.images, "bench", disks=2, workload=True)
    results: dict[str, dict[str, list[float]]] = {
        "freezeframe": {"window": [], "stall": []},
        "plain": {"window": [], "stall": []},
    }
    try:
        with Catalog.open(home.catalog) as catalog:
            instance = catalog.add_instance("bench", kind="qemu", qmp_socket=vm.qmp_socket,
                                            qga_socket=vm.qga_socket, lab=True)
            time.sleep(2)  # let the writer get going
            for i in range(args.count):
                for method in ("freezeframe", "plain"):
                    before = asyncio.run(stall_lines(vm.qga_socket))
                    if method == "freezeframe":
                        plan = plan_snapshot(instance, now=datetime.now(UTC), level=Level.FILESYSTEM,
                                             name=f"bench-{i}")
                        snap = asyncio.run(take_snapshot(plan, catalog, lock_dir=home.locks))
                        assert snap.achieved_level is Level.FILESYSTEM, snap.fallback_reasons
                        assert snap.freeze_window_ms is not None
                        window = snap.freeze_window_ms
                    else:
                        window = asyncio.run(plain_sequence(vm, i))
                    time.sleep(0.3)  # the writer logs a stall once the write returns
                    after = asyncio.run(stall_lines(vm.qga_socket))
                    results[method]["window"].append(window)
                    results[method]["stall"].append(longest_stall_ms(before, after))
                print(f"  {i + 1}/{args.count}", file=sys.stderr, end="\r")
    finally:
        lab_vm.down(home.lab, "bench")
        if not args.keep_home:
            shutil.rmtree(home.root, ignore_errors=True)

    print(f"lab VM: 2 x ext4 data disks, writer appending every 2 ms, accel={vm.accel}, "
          f"{args.count} snapshots per method, interleaved")
    print(f"{'method':<13} {'measure':<26} {'min':>8} {'median':>8} {'p95':>8} {'max':>8}  (ms)")
    for method, label in (("freezeframe", "freezeframe"), ("plain", "plain qemu-ga+sync")):
        print(f"{label:<13} {'freeze window (host)':<26} {summary(results[method]['window'])}")
        print(f"{'':<13} {'longest write stall (guest)':<26} {summary(results[method]['stall'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
