"""The ways back, timed side by side in one run: instant recovery against restore-then-boot,
a served backup against a restored image, one file out of a backup against restoring the
whole disk, on lab VMs whose data disk grows (default 2, 8 and 32 GiB, sparse, holding
about 1 GiB of real files: /usr's, and one 100 MiB file of random bytes).

For each size it builds the disk on the host (``mkfs.ext4 -d``: no mount), boots a lab VM
on it, takes a full backup into a local repository, then measures:

  * seconds from the command to the guest agent answering: ``lab up --from-backup
    --live`` against ``lab up --from-backup`` (which restores every disk as qcow2 first),
    and the seconds until the live restore's copy has finished;
  * sequential read of the whole disk, MB/s over the data it holds: ``nbdcopy`` from
    ``backup serve`` against ``nbdcopy`` from the restored raw image (both skip holes);
  * seconds to the first ``backup files`` listing and to ``backup extract`` of the
    100 MiB file, against ``backup restore --format raw`` of the whole disk followed by
    ``debugfs -R dump`` of the file (reading it without a mount, as freezeframe never
    mounts a guest's file system here);
  * in-place restore after 1% of the disk changed (1 MiB blocks spread over the restored
    image): ``backup restore --in-place``, seconds and bytes written, against the full
    restore.

    .venv/bin/python bench/recovery.py [--sizes 2,8,32] [--content-mib 1024] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backup_throughput import usr_files  # this folder's: the same /usr files

from freezeframe.agent.qga import GuestAgent
from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.lab import vm as lab_vm

FF = [sys.executable, "-m", "freezeframe"]
MB = 1e6


def ff(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run([*FF, *args, "-o", "json"], capture_output=True, text=True, check=False,
                          env={**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"freezeframe {' '.join(args[:3])} failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout)) if done.stdout.strip().startswith("{") else {"list": json.loads(done.stdout)}


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    subprocess.run(["sync"], check=True)
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - began


def agent_answers(socket: str, timeout: float = 300) -> None:
    async def ping() -> None:
        async with GuestAgent(socket, timeout=10) as agent:
            await agent.execute("guest-ping")

    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(ping())
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def build_disk(work: Path, size_gib: int, content_mib: int) -> Path:
    """A sparse ext4 image of ``size_gib`` holding ``content_mib`` of files, as qcow2."""
    content = work / "content"
    shutil.rmtree(content, ignore_errors=True)
    (content / "usr").mkdir(parents=True)
    with open(content / "big.bin", "wb") as out:
        out.write(os.urandom(100 << 20))
    budget = (content_mib - 100) << 20
    for source in usr_files():
        if budget <= 0:
            break
        target = content / source.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(source, target)
        except OSError:
            continue
        budget -= source.stat().st_size
    raw = work / "disk.raw"
    with open(raw, "wb") as handle:
        handle.truncate(size_gib << 30)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", str(content),
                    str(raw)], check=True)
    qcow = work / f"disk-{size_gib}.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
    raw.unlink()
    shutil.rmtree(content)
    return qcow


def live_until_agent(env: dict[str, str], name: str, backup_id: str, repo: Path) -> tuple[float, float]:
    """Seconds until the guest agent answers, and until the copy is done."""
    began = time.perf_counter()
    proc = subprocess.Popen([*FF, "lab", "up", name, "--from-backup", backup_id, "--live", "--repo", str(repo),
                             "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{") and json.loads(line).get("event") == "booted":
            agent_answers(json.loads(line)["qga_socket"])
            break
    agent = time.perf_counter() - began
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"live restore failed: {err[-2000:]}")
    return agent, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,8,32", help="data disk sizes in GiB (default: %(default)s)")
    parser.add_argument("--content-mib", type=int, default=1024, help="real data on each disk (default: %(default)s)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    for tool in ("nbdcopy", "debugfs", "nbdkit"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: run make setup")
    work = Path(tempfile.mkdtemp(prefix="ff-bench-recovery-", dir="/var/tmp"))
    home = Home.open(work / "home")
    env = {"FREEZEFRAME_HOME": str(home.root)}
    rows: list[tuple[str, ...]] = []
    started: list[str] = []
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            print(f"# {size} GiB disk, {args.content_mib} MiB of files", flush=True)
            qcow = build_disk(work, size, args.content_mib)
            source = f"src-{size}"
            vm = lab_vm.up(home.lab, home.images, source, disk_images=[qcow], memory_mib=512)
            started.append(source)
            with Catalog.open(home.catalog) as catalog:
                catalog.add_instance(source, kind="qemu", qmp_socket=vm.qmp_socket, qga_socket=vm.qga_socket,
                                     lab=True)
            repo = work / f"repo-{size}"
            ff(env, "repo", "init", str(repo))
            made = ff(env, "backup", "create", source, "--repo", str(repo), "--type", "full",
                      "--consistency", "filesystem")
            backup_id, device = made["id"], made["disks"][0]["device"]
            lab_vm.down(home.lab, source)
            started.remove(source)

            live = f"live-{size}"
            started.append(live)
            to_agent, to_local = live_until_agent(env, live, backup_id, repo)
            lab_vm.down(home.lab, live)
            started.remove(live)
            full = f"full-{size}"
            started.append(full)
            began = time.perf_counter()
            up = ff(env, "lab", "up", full, "--from-backup", backup_id, "--repo", str(repo))
            agent_answers(up["qga_socket"])
            restore_boot = time.perf_counter() - began
            lab_vm.down(home.lab, full)
            started.remove(full)
            rows.append((f"{size} GiB", "to guest agent: live", f"{to_agent:.1f} s"))
            rows.append((f"{size} GiB", "to guest agent: restore, then boot", f"{restore_boot:.1f} s"))
            rows.append((f"{size} GiB", "live: copy finished", f"{to_local:.1f} s"))

            # Sequential read: served backup vs restored image.
            restored = work / f"restored-{size}"
            restore_s = timed([*FF, "backup", "restore", backup_id, "--to", str(restored), "--format", "raw"], env)
            image = next(restored.glob("*.raw"))
            data = int(subprocess.run(["du", "-B1", str(image)], capture_output=True, text=True,
                                      check=True).stdout.split()[0])
            socket = work / "serve.sock"
            serve = subprocess.Popen([*FF, "backup", "serve", backup_id, "--socket", str(socket), "-o", "json"],
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **env})
            try:
                while not socket.exists():
                    time.sleep(0.05)
                time.sleep(0.5)
                served_s = timed(["nbdcopy", f"nbd+unix:///{device}?socket={socket}", "null:"])
            finally:
                serve.terminate()
                serve.wait()
            image_s = timed(["nbdcopy", str(image), "null:"])
            rows.append((f"{size} GiB", "read all: backup serve | nbdcopy", f"{data / MB / served_s:.0f} MB/s"))
            rows.append((f"{size} GiB", "read all: restored image | nbdcopy", f"{data / MB / image_s:.0f} MB/s"))

            # One file: the sandbox against restoring the disk and reading it with debugfs.
            listing_s = timed([*FF, "backup", "files", backup_id, device], env)
            extract_s = timed([*FF, "backup", "extract", backup_id, f"{device}/big.bin", "--to",
                               str(work / f"x-{size}")], env)
            dump_s = timed(["debugfs", "-R", f"dump /big.bin {work / f'dump-{size}.bin'}", str(image)])
            rows.append((f"{size} GiB", "first listing: backup files", f"{listing_s:.1f} s"))
            rows.append((f"{size} GiB", "100 MiB file: backup extract", f"{extract_s:.1f} s"))
            rows.append((f"{size} GiB", "100 MiB file: restore disk + debugfs dump", f"{restore_s + dump_s:.1f} s"))
            rows.append((f"{size} GiB", "full restore (raw)", f"{restore_s:.1f} s, {data / MB:.0f} MB written"))
            blocks = max(1, (size << 30) // 100 >> 20)
            step = (size << 30) // blocks
            with open(image, "r+b") as disk:
                for number in range(blocks):
                    disk.seek(number * step)
                    disk.write(os.urandom(1 << 20))
            began = time.perf_counter()
            done = subprocess.run([*FF, "backup", "restore", backup_id, "--to", str(restored), "--in-place",
                                   "-o", "json"], capture_output=True, text=True, check=True, env={**os.environ, **env})
            in_place_s = time.perf_counter() - began
            written = sum(r["bytes_written"] for r in json.loads(done.stdout))
            rows.append((f"{size} GiB", "in-place restore after 1% change",
                         f"{in_place_s:.1f} s, {written / MB:.0f} MB written"))
            shutil.rmtree(restored)
            for row in rows[-10:]:
                print("  " + " | ".join(row), flush=True)
    finally:
        for name in started:
            try:
                lab_vm.down(home.lab, name)
            except Exception as err:  # still clean up the rest
                print(f"could not stop {name}: {err}", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    width = max(len(r[1]) for r in rows)
    print(f"\n{'disk':<7} {'measure':<{width}} value")
    for disk, what, value in rows:
        print(f"{disk:<7} {what:<{width}} {value}")


if __name__ == "__main__":
    main()
