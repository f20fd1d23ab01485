"""Backup throughput: freezeframe against restic, borg and qemu-img, on the same bytes, in one run.

Builds an ext4 image filled with real files from this machine's /usr (default 2 GiB, 80%
full), boots a lab VM on it, and measures in turn:

  * full backup: ``freezeframe backup create --type full`` of the VM (freeze, fleecing,
    NBD read, hash, zstd, store: the whole command), ``restic backup --stdin`` and
    ``borg create -C zstd,1`` of the same disk as a raw image, ``qemu-img convert`` to
    qcow2 plain and with zstd compression (``-c``); MB/s over the disk's size, stored size;
  * incremental after changing 1% and 10% of the disk inside the guest: the whole
    ``freezeframe backup create`` command, against restic's and borg's second backup of
    the changed raw image (they re-read all of it);
  * restore: ``freezeframe backup restore --format raw`` against ``qemu-img convert`` of
    the VM's qcow2 to raw;
  * CPU seconds per GB (user + system of each command's processes; QEMU's NBD serving is
    not counted for freezeframe) and, for freezeframe, thread-seconds per step.

Every tool reads files in the page cache (warm), so the numbers compare work, not the
disk; every measurement starts after a ``sync``, and ends when what it wrote is on disk
(``qemu-img``'s output is synced inside its measurement).

    python bench/backup_throughput.py [--size-gib 2] [--fill 0.9] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from freezeframe.agent.qga import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.lab import vm as lab_vm

FF = [sys.executable, "-m", "freezeframe"]
MB = 1e6


def run(argv: list[str], *, env: dict[str, str] | None = None, stdin: Path | None = None,
        durable: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (children, user + system), stdout.

    Every measurement starts with nothing left to write back (``sync`` first, not timed),
    so no tool pays for the one before it. ``durable``: a file the command wrote without
    syncing it (qemu-img): its ``sync`` is timed too, as freezeframe, restic and borg sync
    what they write themselves."""
    subprocess.run(["sync"], check=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as source:
        done = subprocess.run(argv, stdin=source, capture_output=True, text=True, env={**os.environ, **(env or {})},
                              check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed ({done.returncode}): {done.stderr[-2000:]}")
    if durable is not None:
        subprocess.run(["sync", str(durable)], check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def usr_files() -> Iterator[Path]:
    for root, dirs, files in os.walk("/usr"):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            if path.is_file() and not path.is_symlink():
                yield path


def build_image(raw: Path, size: int, fill: float, mountpoint: Path) -> int:
    """An ext4 image holding files from /usr up to ``fill`` of its size; returns bytes copied."""
    with open(raw, "wb") as handle:
        handle.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(raw)], check=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(raw), str(mountpoint)], check=True)
    copied = 0
    try:
        for source in usr_files():
            target = mountpoint / source.relative_to("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, target)
            except OSError:
                continue
            copied += source.stat().st_size
            if shutil.disk_usage(mountpoint).used >= fill * size:
                break
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
    return copied


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def guest_change(vm: lab_vm.LabVM, mib: int, name: str, *, in_place: bool = False) -> None:
    """Overwrite ``mib`` MiB of the disk inside the guest: a new file of random bytes, or
    (``in_place``) the same blocks of that file again."""
    import asyncio
    import base64

    async def go() -> None:
        async with GuestAgent(vm.qga_socket, timeout=600) as agent:
            keep = " conv=notrunc" if in_place else ""
            script = f"dd if=/dev/urandom of=/mnt/ffdata0/{name} bs=1M count={mib}{keep} 2>/dev/null && sync"
            started = await agent.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", script]})
            while True:
                status = await agent.execute("guest-exec-status", {"pid": started["pid"]})
                if status["exited"]:
                    if status.get("exitcode") != 0:
                        raise SystemExit(f"guest change failed: {base64.b64decode(status.get('err-data', ''))!r}")
                    return
                await asyncio.sleep(0.2)

    asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--fill", type=float, default=0.8, help="how full of /usr files (the 10%% change needs room)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the full backups (restores: 4+)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    for tool in ("restic", "borg", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run make bench (it installs restic and borgbackup)")
    # freezeframe runs as installed: pip compiles a package's bytecode at install, but this
    # checkout is an editable install, and PYTHONDONTWRITEBYTECODE may keep Python from
    # caching it (then every command would compile its modules anew, about 60 ms).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).parents[1] / "freezeframe")],
                   check=True, stdout=subprocess.DEVNULL)
    size = int(args.size_gib * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="ff-bench-backup-", dir="/var/tmp"))
    home = Home.open(work / "home")
    env = {"FREEZEFRAME_HOME": str(home.root), "RESTIC_PASSWORD": "bench", "BORG_PASSPHRASE": "",
           "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
    rows: list[dict[str, Any]] = []
    vm_name = "bench-backup"

    def record(case: str, tool: str, wall: float, cpu: float, covered: int, **extra: Any) -> None:
        rows.append({"case": case, "tool": tool, "seconds": round(wall, 2), "MB/s": round(covered / MB / wall, 1),
                     "cpu_s_per_GB": round(cpu / (covered / 1e9), 2), **extra})
        print(f"  {case}: {tool}: {wall:.2f} s", flush=True)

    try:
        raw = work / "disk.raw"
        print(f"building a {args.size_gib:g} GiB ext4 image of /usr files...", flush=True)
        copied = build_image(raw, size, args.fill, work / "mnt")
        print(f"  {copied / MB:.0f} MB of files", flush=True)
        qcow = work / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
        vm = lab_vm.up(home.lab, home.images, vm_name, disk_images=[qcow], memory_mib=512)
        with Catalog.open(home.catalog) as catalog:
            catalog.add_instance(vm_name, kind="qemu", qmp_socket=vm.qmp_socket, qga_socket=vm.qga_socket, lab=True)
        disk = Path(vm.disks[0])
        for path in (raw, disk):  # warm the page cache for every tool alike
            subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)

        # -- full: interleaved rounds, fresh repositories each, medians reported -------------------
        # The order of the tools is reversed every other round: on this machine, the command
        # that runs right after a large file is freed pays for memory the host took back.
        ff_repo, restic_repo, borg_repo = work / "ff-repo", work / "restic-repo", work / "borg-repo"
        full: dict[str, Any] = {}

        def full_freezeframe() -> None:
            nonlocal full
            run([*FF, "repo", "init", str(ff_repo)], env=env)
            wall, cpu, out = run([*FF, "backup", "create", vm_name, "--repo", str(ff_repo), "--type", "full",
                                  "--consistency", "filesystem", "-o", "json"], env=env)
            full = json.loads(out)
            record("full", "freezeframe", wall, cpu, size, stored_MB=round(du(ff_repo / "chunks") / MB, 1),
                   where=full["timings_s"])

        def full_restic() -> None:
            run(["restic", "init", "-r", str(restic_repo)], env=env)
            wall, cpu, _ = run(["restic", "-r", str(restic_repo), "backup", "--stdin", "--stdin-filename",
                                "disk.raw"], env=env, stdin=raw)
            record("full", "restic backup --stdin", wall, cpu, size, stored_MB=round(du(restic_repo) / MB, 1))

        def full_borg() -> None:
            run(["borg", "init", "-e", "none", str(borg_repo)], env=env)
            wall, cpu, _ = run(["borg", "create", "-C", "zstd,1", f"{borg_repo}::full", "-"], env=env, stdin=raw)
            record("full", "borg create -C zstd,1", wall, cpu, size, stored_MB=round(du(borg_repo) / MB, 1))

        def full_qemu_img(label: str, extra: list[str]) -> None:
            out_file = work / "converted.qcow2"
            wall, cpu, _ = run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", *extra, str(raw), str(out_file)],
                               durable=out_file)
            record("full", label, wall, cpu, size, stored_MB=round(out_file.stat().st_size / MB, 1))
            out_file.unlink()

        tools = [full_freezeframe, full_restic, full_borg, lambda: full_qemu_img("qemu-img convert", []),
                 lambda: full_qemu_img("qemu-img convert -c (zstd)", ["-c", "-o", "compression_type=zstd"])]
        for round_ in range(args.rounds):
            for path in work.glob("*-repo"):
                shutil.rmtree(path)
            for tool in tools if round_ % 2 == 0 else reversed(tools):
                tool()

        # -- incremental at 1% (several rounds: one run is mostly start-up and guest latency,
        # which vary) and 10% (once: the disk has room for one) -----------------------------------
        for round_, percent in [*((r, 1) for r in range(args.rounds)), (0, 10)]:
            guest_change(vm, int(size * percent / 100) >> 20, f"change-{percent}-{round_}.bin")
            wall, cpu, out = run([*FF, "backup", "create", vm_name, "--repo", str(ff_repo),
                                  "--consistency", "filesystem", "-o", "json"], env=env)
            inc = json.loads(out)
            read = sum(d["bytes_read"] for d in inc["disks"])
            record(f"incremental {percent}%", "freezeframe", wall, cpu, size, bytes_read_MB=round(read / MB, 1),
                   new_MB=round(sum(d["bytes_new"] for d in inc["disks"]) / MB, 1), where=inc["timings_s"])
            changed = work / "changed.raw"
            changed.unlink(missing_ok=True)
            subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(changed)], check=True)
            subprocess.run(["cat", str(changed)], stdout=subprocess.DEVNULL, check=True)
            wall, cpu, _ = run(["restic", "-r", str(restic_repo), "backup", "--stdin", "--stdin-filename",
                                "disk.raw"], env=env, stdin=changed)
            record(f"incremental {percent}%", "restic (second run)", wall, cpu, size, bytes_read_MB=round(size / MB))
            wall, cpu, _ = run(["borg", "create", "-C", "zstd,1", f"{borg_repo}::inc{percent}-{round_}", "-"], env=env,
                               stdin=changed)
            record(f"incremental {percent}%", "borg (second run)", wall, cpu, size, bytes_read_MB=round(size / MB))

        # -- restore: interleaved rounds, the order reversed every other round ------------------------
        def restore_freezeframe() -> None:
            out_dir = work / "restored"
            wall, cpu, _ = run([*FF, "backup", "restore", full["id"], "--to", str(out_dir), "--format", "raw",
                                "-o", "json"], env=env)
            record("restore", "freezeframe restore --format raw", wall, cpu, size)
            shutil.rmtree(out_dir)

        def restore_qemu_img() -> None:
            target = work / "converted.raw"
            wall, cpu, _ = run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(target)], durable=target)
            record("restore", "qemu-img convert qcow2 -> raw", wall, cpu, size)
            target.unlink()

        for round_ in range(max(4, args.rounds)):
            pair = [restore_freezeframe, restore_qemu_img]
            for tool in pair if round_ % 4 in (0, 3) else reversed(pair):
                tool()
    finally:
        try:
            lab_vm.down(home.lab, vm_name)
        except Exception as err:  # still clean up the rest
            print(f"could not stop the VM: {err}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("All runs:")
    for row in rows:
        print("  " + json.dumps(row))
    print()
    print("Medians (MB/s over the disk's size; every run above):")
    print(f"{'case':<16} {'tool':<34} {'s':>7} {'MB/s':>8} {'cpu s/GB':>9}  other")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["tool"]), []).append(row)
    for (case, tool), runs in groups.items():
        mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        other = {k: v for k, v in mid.items() if k not in ("case", "tool", "seconds", "MB/s", "cpu_s_per_GB", "where")}
        print(f"{case:<16} {tool:<34} {mid['seconds']:>7} {mid['MB/s']:>8} {mid['cpu_s_per_GB']:>9}  "
              f"{json.dumps(other)}  (runs: {', '.join(str(r['seconds']) for r in runs)} s)")


if __name__ == "__main__":
    main()
