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

and a third, the consistent point of an incremental backup (``backup create``): the
same freeze and thaw around one ``transaction`` that starts the fleecing view and the
dirty bitmaps, into a local repository.

Then the same guest as a libvirt domain, alternately with

  * freezeframe through libvirt: overlays made before the freeze, virDomainFSFreeze,
    one atomic disk-only snapshot onto them, virDomainFSThaw;
  * ``virsh snapshot-create-as --disk-only --atomic --quiesce --no-metadata``: libvirt
    freezes, creates the overlay files, switches and thaws in one call;
  * a backup point through libvirt: ``virDomainBackupBegin`` in pull mode with a new
    checkpoint inside the window (libvirt starts the view, the NBD server and the
    exports in that call).

virsh does not say when it froze and thawed, so for it the host column is the whole
command's time (an upper bound of its window); the guest's longest write stall is
measured the same way for both.

Then (``--hooks``) two guests that run the same freeze hook (``checkpoint``: ``sync``, then
a second, as a database checkpoint would), one through qemu-ga's stock fsfreeze-hook script
and one through freezeframe's sh runner, snapshotted alternately at application level: the
window, its hook phase and its frozen phase as the manifest splits them, and the
resolution each runner's evidence allows.

With ``--debian``, the same comparison on the Debian lab guest (systemd, Debian's qemu-ga,
PostgreSQL 15) with the ``10-postgresql`` hook (a CHECKPOINT): one guest, its hook script
switched between the stock one and the runner before each snapshot.

    python bench/freeze_window.py [--count 20] [--keep-home] [--no-libvirt] [--no-backup]
                                  [--hooks|--only-hooks] [--debian]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from freezeframe.agent.qga import GuestAgent
from freezeframe.agent.qmp import Monitor
from freezeframe.backup.repository import Repository
from freezeframe.backup.store import LocalStore
from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.engine.backup import BackupPlan, take_backup
from freezeframe.engine.plan import plan_snapshot
from freezeframe.engine.run import take_snapshot
from freezeframe.lab import libvirt as lab_libvirt
from freezeframe.lab import vm as lab_vm
from freezeframe.model import Instance, Level
from freezeframe.targets.libvirt import LibvirtTarget

STALL_LOG = "/run/ff-workload.stalls"


async def stall_lines(vm: lab_vm.LabVM) -> list[str]:
    if vm.libvirt_uri is not None:
        async with LibvirtTarget(uri=vm.libvirt_uri, domain=vm.name) as target:
            agent = await target.connect_agent(10, 10)
            return (await agent.read_file(STALL_LOG, max_bytes=4 << 20)).decode().splitlines()
    async with GuestAgent(vm.qga_socket) as agent:
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


def virsh_snapshot(vm: lab_vm.LabVM, index: int) -> float:
    """``virsh snapshot-create-as --disk-only --atomic --quiesce --no-metadata``; its time in ms."""
    assert vm.libvirt_uri is not None
    specs = [arg for n, dev in enumerate(("vda", "vdb"))
             for arg in ("--diskspec", f"{dev},file={Path(vm.directory) / f'virsh{index}-{n}.qcow2'}")]
    start = time.perf_counter()
    subprocess.run(["virsh", "-q", "-c", vm.libvirt_uri, "snapshot-create-as", vm.name, f"virsh{index}",
                    "--disk-only", "--atomic", "--quiesce", "--no-metadata", *specs],
                   check=True, capture_output=True, text=True)
    return (time.perf_counter() - start) * 1000


def backup_point(home: Home, instance: Instance, catalog: Catalog, index: int) -> float:
    """An incremental backup (the first one full) into the home's repository; its point's window."""
    store = LocalStore(home.root / f"repo-{instance.name}")
    repo = Repository.open(store) if store.exists("config") else Repository.init(store)
    backup_id = str(uuid.uuid4())
    point = plan_snapshot(instance, now=datetime.now(UTC), level=Level.FILESYSTEM,
                          name=f"bench-backup-{instance.name}-{index}", snapshot_id=backup_id)
    plan = BackupPlan(point=point, type=None, repository=repo, fleecing_dir=home.fleecing, run_dir=home.run)
    made = asyncio.run(take_backup(plan, catalog, lock_dir=home.locks))
    assert made.point is not None
    assert made.point.achieved_level is Level.FILESYSTEM, made.point.fallback_reasons
    assert made.point.freeze_window_ms is not None
    return made.point.freeze_window_ms


def measure(home: Home, vm: lab_vm.LabVM, instance: Instance, catalog: Catalog, methods: tuple[str, str],
            count: int) -> dict[str, dict[str, list[float]]]:
    """``count`` snapshots per method, interleaved: window (host) and longest stall (guest)."""
    results: dict[str, dict[str, list[float]]] = {m: {"window": [], "stall": []} for m in methods}
    time.sleep(2)  # let the writer get going
    for i in range(count):
        for method in methods:
            before = asyncio.run(stall_lines(vm))
            if method.startswith("backup"):
                window = backup_point(home, instance, catalog, i)
            elif method.startswith("freezeframe"):
                plan = plan_snapshot(instance, now=datetime.now(UTC), level=Level.FILESYSTEM,
                                     name=f"bench-{instance.name}-{i}")
                snap = asyncio.run(take_snapshot(plan, catalog, lock_dir=home.locks))
                assert snap.achieved_level is Level.FILESYSTEM, snap.fallback_reasons
                assert snap.freeze_window_ms is not None
                window = snap.freeze_window_ms
            elif method == "virsh":
                window = virsh_snapshot(vm, i)
            else:
                window = asyncio.run(plain_sequence(vm, i))
            time.sleep(0.3)  # the writer logs a stall once the write returns
            after = asyncio.run(stall_lines(vm))
            results[method]["window"].append(window)
            results[method]["stall"].append(longest_stall_ms(before, after))
        print(f"  {instance.name}: {i + 1}/{count}", file=sys.stderr, end="\r")
    return results


def add_phases(found: dict[str, list[float]], phases: dict[str, float]) -> None:
    """One snapshot's freeze phases, as the manifest splits them, into the columns."""
    for column, key in (("window", "window_ms"), ("hooks", "hooks_freeze_ms"), ("frozen", "frozen_ms"),
                        ("at least", "frozen_at_least_ms"), ("resolution", "resolution_ms")):
        found[column].append(phases[key])


def measure_hooks(home: Home, catalog: Catalog, count: int) -> dict[str, dict[str, list[float]]]:
    """The same hook through the stock script and through the sh runner, interleaved."""
    runners = {"stock fsfreeze-hook": "stock", "freezeframe sh runner": "sh"}
    results: dict[str, dict[str, list[float]]] = {
        label: {"window": [], "hooks": [], "frozen": [], "at least": [], "stall": [], "resolution": []}
        for label in runners}
    vms: dict[str, tuple[lab_vm.LabVM, Instance]] = {}
    try:
        for label, runner in runners.items():
            name = f"bench-{runner}"
            vm = lab_vm.up(home.lab, home.images, name, disks=2, workload=True, hooks=("checkpoint",),
                           hook_runner=runner)
            catalog.add_instance(name, kind="qemu", qmp_socket=vm.qmp_socket, qga_socket=vm.qga_socket, lab=True)
            vms[label] = (vm, catalog.update_instance(name, guest_hooks=("10-checkpoint",)))
        time.sleep(2)  # let the writers get going
        for i in range(count):
            for label, (vm, instance) in vms.items():
                before = asyncio.run(stall_lines(vm))
                plan = plan_snapshot(instance, now=datetime.now(UTC), level=Level.APPLICATION,
                                     name=f"bench-{instance.name}-{i}", freeze_timeout=30)
                snap = asyncio.run(take_snapshot(plan, catalog, lock_dir=home.locks))
                assert snap.achieved_level is Level.APPLICATION, snap.fallback_reasons
                phases = snap.manifest["freeze_phases"]
                time.sleep(0.3)  # the writer logs a stall once the write returns
                after = asyncio.run(stall_lines(vm))
                found = results[label]
                add_phases(found, phases)
                found["stall"].append(longest_stall_ms(before, after))
            print(f"  hooks: {i + 1}/{count}", file=sys.stderr, end="\r")
    finally:
        for vm, _ in vms.values():
            lab_vm.down(home.lab, vm.name)
    return results


_SWITCH = {
    "stock fsfreeze-hook": "cp -p /etc/qemu/fsfreeze-hook.before-freezeframe /etc/qemu/fsfreeze-hook && "
                           "rm -f /etc/freezeframe/guest-hooks.json",
    "freezeframe sh runner": "cp -p /etc/qemu/fsfreeze-hook.freezeframe /etc/qemu/fsfreeze-hook && "
                             "cp -p /etc/freezeframe/guest-hooks.json.kept /etc/freezeframe/guest-hooks.json",
}


def measure_debian(home: Home, catalog: Catalog, count: int) -> dict[str, dict[str, list[float]]]:
    """The Debian guest's CHECKPOINT hook through the stock script and through the sh runner,
    alternately in one guest."""
    from freezeframe.targets import guest_install

    results: dict[str, dict[str, list[float]]] = {
        label: {"window": [], "hooks": [], "frozen": [], "at least": [], "resolution": []} for label in _SWITCH}
    vm = lab_vm.up_debian(home.lab, home.images, "bench-debian", stock_hooks=("postgresql",))
    try:
        instance = catalog.add_instance("bench-debian", kind="qemu", qmp_socket=vm.qmp_socket,
                                        qga_socket=vm.qga_socket, lab=True)

        async def in_guest(script: str) -> None:
            async with GuestAgent(vm.qga_socket, timeout=60) as agent:
                code, out = await agent.run_command("/bin/sh", ["-c", script], timeout=60)
                assert code == 0, out

        async def install() -> None:
            async with GuestAgent(vm.qga_socket, timeout=60) as agent:
                await guest_install.install(agent, timeout=60)

        asyncio.run(install())
        asyncio.run(in_guest("cp -p /etc/qemu/fsfreeze-hook /etc/qemu/fsfreeze-hook.freezeframe && "
                             "cp -p /etc/freezeframe/guest-hooks.json /etc/freezeframe/guest-hooks.json.kept"))
        for i in range(count):
            for label, switch in _SWITCH.items():
                asyncio.run(in_guest(switch))
                plan = plan_snapshot(instance, now=datetime.now(UTC), level=Level.APPLICATION,
                                     name=f"bench-debian-{i}-{len(results[label]['window'])}", freeze_timeout=60)
                snap = asyncio.run(take_snapshot(plan, catalog, lock_dir=home.locks))
                assert snap.achieved_level is Level.APPLICATION, snap.fallback_reasons
                phases = snap.manifest["freeze_phases"]
                found = results[label]
                add_phases(found, phases)
            print(f"  debian: {i + 1}/{count}", file=sys.stderr, end="\r")
    finally:
        lab_vm.down(home.lab, "bench-debian")
    return results


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"{ordered[0]:8.1f} {statistics.median(ordered):8.1f} {p95:8.1f} {ordered[-1]:8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20, help="snapshots per method (default 20)")
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary state directory")
    parser.add_argument("--no-libvirt", action="store_true", help="skip the libvirt domain")
    parser.add_argument("--no-backup", action="store_true", help="skip the backup points")
    parser.add_argument("--hooks", action="store_true", help="also the stock hook script against the sh runner")
    parser.add_argument("--only-hooks", action="store_true", help="only the stock hook script against the sh runner")
    parser.add_argument("--debian", action="store_true",
                        help="with --hooks or --only-hooks: the same on the Debian guest with its PostgreSQL hook")
    args = parser.parse_args()

    home = Home.open(Path(tempfile.mkdtemp(prefix="ff-bench-")))
    daemons: list[int] = []
    rows: list[tuple[str, str, dict[str, list[float]]]] = []
    accel = "?"
    try:
        with Catalog.open(home.catalog) as catalog:
            if args.hooks or args.only_hooks:
                hooks = measure_hooks(home, catalog, args.count)
                debian = measure_debian(home, catalog, args.count) if args.debian else None
            if args.only_hooks:
                print_hooks(hooks, args.count, debian)
                return 0
            vm = lab_vm.up(home.lab, home.images, "bench", disks=2, workload=True)
            accel = vm.accel
            try:
                instance = catalog.add_instance("bench", kind="qemu", qmp_socket=vm.qmp_socket,
                                                qga_socket=vm.qga_socket, lab=True)
                methods = ("freezeframe", "plain") + (() if args.no_backup else ("backup",))
                results = measure(home, vm, instance, catalog, methods, args.count)
            finally:
                lab_vm.down(home.lab, "bench")
            rows += [("QEMU", "freezeframe", results["freezeframe"]), ("QEMU", "plain qemu-ga+sync", results["plain"])]
            if not args.no_backup:
                rows.append(("QEMU", "backup point", results["backup"]))
            if not args.no_libvirt:
                daemons = lab_libvirt.ensure_daemons(lab_libvirt.DEFAULT_URI)
                lv = lab_vm.up(home.lab, home.images, "bench-lv", disks=2, workload=True,
                               libvirt_uri=lab_libvirt.DEFAULT_URI)
                try:
                    domain = catalog.add_instance("bench-lv", kind="libvirt", qmp_socket=None, qga_socket=None,
                                                  lab=True, libvirt_uri=lab_libvirt.DEFAULT_URI,
                                                  libvirt_domain="bench-lv")
                    methods = ("freezeframe-libvirt", "virsh") + (() if args.no_backup else ("backup-libvirt",))
                    results = measure(home, lv, domain, catalog, methods, args.count)
                finally:
                    lab_vm.down(home.lab, "bench-lv")
                rows += [("libvirt", "freezeframe", results["freezeframe-libvirt"]),
                         ("libvirt", "virsh --quiesce", results["virsh"])]
                if not args.no_backup:
                    rows.append(("libvirt", "backup point", results["backup-libvirt"]))
    finally:
        for pid in reversed(daemons):  # only the daemons started here
            lab_libvirt.stop_daemon(pid)
        if not args.keep_home:
            shutil.rmtree(home.root, ignore_errors=True)

    print(f"lab VM: 2 x ext4 data disks, writer appending every 2 ms, accel={accel}, "
          f"{args.count} snapshots per method, interleaved per VM")
    print(f"{'VM':<8} {'method':<19} {'measure':<28} {'min':>8} {'median':>8} {'p95':>8} {'max':>8}  (ms)")
    for where, label, result in rows:
        window = "virsh command (host)" if label.startswith("virsh") else "freeze window (host)"
        print(f"{where:<8} {label:<19} {window:<28} {summary(result['window'])}")
        print(f"{'':<8} {'':<19} {'longest write stall (guest)':<28} {summary(result['stall'])}")
    if args.hooks:
        print_hooks(hooks, args.count, debian)
    return 0


def print_hooks(results: dict[str, dict[str, list[float]]], count: int,
                debian: dict[str, dict[str, list[float]]] | None) -> None:
    labels = {"window": "freeze window (host)", "hooks": "hook phase: apps held, fs writable",
              "frozen": "frozen phase (at most)", "at least": "frozen phase (at least)",
              "stall": "longest write stall (guest)", "resolution": "resolution of the split"}
    tables = [(f"busybox guests, the same freeze hook (sync, then 1 s), application level, {count} snapshots "
               "per runner, interleaved", results)]
    if debian is not None:
        tables.append((f"the Debian guest, its 10-postgresql hook (CHECKPOINT), application level, {count} "
                       "snapshots per runner, alternating in one guest", debian))
    for title, table in tables:
        print(f"\n{title}")
        print(f"{'runner':<22} {'measure':<34} {'min':>8} {'median':>8} {'p95':>8} {'max':>8}  (ms)")
        for runner, result in table.items():
            for key, label in labels.items():
                if key in result:
                    print(f"{runner:<22} {label:<34} {summary(result[key])}")
                    runner = ""


if __name__ == "__main__":
    sys.exit(main())
