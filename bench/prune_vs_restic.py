"""Pruning side by side: ``backup prune`` + ``repo gc`` against ``restic forget --prune``, on
the same data, in one run.

A lab VM on a 2 GiB ext4 image of /usr files; 20 backups, with about 5% of the disk
rewritten in place between two (a 100 MiB file overwritten inside the guest). Each
backup's point is restored as a raw image and given to ``restic backup`` too, so both
repositories hold the same 20 disk images. Then both keep the last 5: wall time of the
whole pruning and the bytes it freed (repository size before and after).

    python bench/prune_vs_restic.py [--backups 20] [--change-mib 100]

freezeframe's repository is made with ``--lock-lease 5``: garbage collection keeps what is
younger than the lease (before the oldest running writer), and the default lease (10
minutes) would keep this run's garbage; restic has no such rule.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from backup_throughput import FF, build_image, du, guest_change, run

from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.lab import vm as lab_vm

MB = 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--backups", type=int, default=20)
    parser.add_argument("--keep-last", type=int, default=5)
    parser.add_argument("--change-mib", type=int, default=100)
    args = parser.parse_args()
    if shutil.which("restic") is None:
        raise SystemExit("restic is missing: run make bench (it installs restic and borgbackup)")
    size = int(args.size_gib * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="ff-bench-prune-", dir="/var/tmp"))
    home = Home.open(work / "home")
    env = {"FREEZEFRAME_HOME": str(home.root), "RESTIC_PASSWORD": "bench"}
    vm_name = "bench-prune"
    ff_repo, restic_repo = work / "ff-repo", work / "restic-repo"
    try:
        raw = work / "disk.raw"
        print(f"building a {args.size_gib:g} GiB ext4 image of /usr files...", flush=True)
        build_image(raw, size, 0.8, work / "mnt")
        qcow = work / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
        raw.unlink()
        vm = lab_vm.up(home.lab, home.images, vm_name, disk_images=[qcow], memory_mib=512)
        with Catalog.open(home.catalog) as catalog:
            catalog.add_instance(vm_name, kind="qemu", qmp_socket=vm.qmp_socket, qga_socket=vm.qga_socket, lab=True)
        run([*FF, "repo", "init", str(ff_repo), "--lock-lease", "5"], env=env)
        run(["restic", "init", "-r", str(restic_repo)], env=env)
        for number in range(args.backups):
            if number:
                guest_change(vm, args.change_mib, "churn.bin", in_place=True)
            _, _, out = run([*FF, "backup", "create", vm_name, "--repo", str(ff_repo), "--consistency", "filesystem",
                             "-o", "json"], env=env)
            backup_id = json.loads(out)["id"]
            image = work / "point"
            run([*FF, "backup", "restore", backup_id, "--to", str(image), "--format", "raw"], env=env)
            [disk] = list(image.iterdir())
            run(["restic", "-r", str(restic_repo), "backup", "--quiet", str(disk)], env=env)
            shutil.rmtree(image)
            print(f"  backup {number + 1}/{args.backups}", flush=True)

        run([*FF, "policy", "set", vm_name, "--keep-last", str(args.keep_last)], env=env)
        before = du(ff_repo)
        pruned, _, _ = run([*FF, "backup", "prune", vm_name], env=env)
        collected, _, out = run([*FF, "repo", "gc", str(ff_repo), "-o", "json"], env=env)
        ff_freed, ff_wall = before - du(ff_repo), pruned + collected
        before = du(restic_repo)
        restic_wall, _, _ = run(["restic", "-r", str(restic_repo), "forget", "--keep-last", str(args.keep_last),
                                 "--prune"], env=env)
        restic_freed = before - du(restic_repo)
        _, _, checked = run([*FF, "backup", "verify", "--all", "--repo", str(ff_repo), "-o", "json"], env=env)
        print()
        print(f"{args.backups} backups of a {args.size_gib:g} GiB disk, {args.change_mib} MiB rewritten between two; "
              f"keep the last {args.keep_last}")
        print(f"{'tool':<40} {'wall s':>8} {'freed MB':>9} {'left MB':>9}")
        print(f"{'freezeframe backup prune + repo gc':<40} {ff_wall:>8.2f} {ff_freed / MB:>9.0f} "
              f"{du(ff_repo) / MB:>9.0f}   (prune {pruned:.2f} s, gc {collected:.2f} s; "
              f"{json.loads(out)['chunks_deleted']} chunks)")
        print(f"{'restic forget --prune':<40} {restic_wall:>8.2f} {restic_freed / MB:>9.0f} "
              f"{du(restic_repo) / MB:>9.0f}")
        print(f"freezeframe verify after: held={json.loads(checked)['held']}")
    finally:
        lab_vm.down(home.lab, vm_name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
