"""Prune and garbage collection on backups of a real lab VM: the policy's backups kept,
the others deleted, the chunks only they held freed, and a garbage collection started
while a backup runs waits for nothing and keeps what the backup names, so the backup
completes, restores and verifies."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backups import backup, chunks_of, cli_json, e2fsck_clean, guest, init_repo, objects, restore, write_random
from conftest import LabFactory, run_cli, unique
from oracles import ext4_read
from servers import S3Server

from freezeframe.config import Home

pytestmark = pytest.mark.vm


def test_prune_keeps_the_policy_and_gc_during_a_backup_frees_only_the_unused(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo, "--lock-lease", "10")
    vm = lab(disks=1)
    write_random(vm, "/mnt/ffdata0/churn.bin", 8)
    first = backup(home, vm, repo)["id"]
    # Rewritten in place: the first backup alone holds the old content of these blocks.
    guest(vm, "dd if=/dev/urandom of=/mnt/ffdata0/churn.bin bs=1M count=8 conv=notrunc 2>/dev/null && sync")
    second = backup(home, vm, repo)["id"]
    third = backup(home, vm, repo)["id"]
    only_first = chunks_of(repo, first) - chunks_of(repo, second) - chunks_of(repo, third)
    assert len(only_first) >= 2, "the rewrite left the first backup no chunk of its own: the test proves nothing"

    refused = run_cli(home, "backup", "prune", vm.name)
    assert refused.returncode == 2
    assert "no retention policy" in refused.stderr
    assert run_cli(home, "policy", "set", vm.name, "--keep-last", "2").returncode == 0
    shown, _ = cli_json(home, "policy", "show", vm.name)
    assert shown == [{"instance": vm.name, "keep_last": 2, "keep_hourly": None, "keep_daily": None,
                      "keep_weekly": None, "keep_monthly": None, "keep_yearly": None}]

    planned, done = cli_json(home, "backup", "prune", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert [(p["backup"], p["action"], p["rule"]) for p in planned] == [
        (third, "keep", "keep-last"), (second, "keep", "keep-last"), (first, "would delete", None)]
    listed, _ = cli_json(home, "backup", "list", "--instance", vm.name)
    assert len(listed) == 3, "a dry run deleted something"

    pruned, done = cli_json(home, "backup", "prune", vm.name)
    assert done.returncode == 0, done.stderr
    assert [p["backup"] for p in pruned if p["action"] == "deleted"] == [first]
    listed, _ = cli_json(home, "backup", "list", "--instance", vm.name)
    assert [b["id"] for b in listed] == [second, third]
    for chunk in only_first:  # deleting a backup frees nothing by itself
        assert (repo / "chunks" / chunk[:2] / chunk).exists()

    # A backup that runs long (its point stalls 15 s) holds a lease on the repository; gc
    # started meanwhile waits for nothing and keeps what the backup will name.
    digest = write_random(vm, "/mnt/ffdata0/during.bin", 4)
    env = dict(os.environ, FREEZEFRAME_HOME=str(home.root), FREEZEFRAME_FAULT="slow-snapshot:15")
    running = subprocess.Popen([sys.executable, "-m", "freezeframe", "backup", "create", vm.name, "--repo", str(repo),
                                "--consistency", "crash", "-o", "json"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (leases := sorted({n.split("/")[1] for n in objects(repo, "locks/")})):
            assert running.poll() is None, running.communicate()
            assert time.monotonic() < deadline, "the backup never took its lease"
            time.sleep(0.05)
        collected, done = cli_json(home, "repo", "gc", str(repo))
        assert done.returncode == 0, done.stderr
        assert running.poll() is None, "the backup ended before gc did: gc waited for it, or the test proves nothing"
        assert collected["leases_honoured"] == leases, collected
        assert collected["leases_broken"] == []
        out, err = running.communicate(timeout=180)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.returncode == 0, err
    during = json.loads(out)["id"]
    assert objects(repo, "locks/") == [], "a lease was left behind"

    # The chunks only the pruned backup held are freed once they are older than the lease
    # (10 s here) before the oldest running writer: gc again until they are.
    deadline = time.monotonic() + 120
    while any((repo / "chunks" / c[:2] / c).exists() for c in only_first):
        assert time.monotonic() < deadline, "gc never freed the chunks only the pruned backup held"
        collected, done = cli_json(home, "repo", "gc", str(repo))
        assert done.returncode == 0, done.stderr
        time.sleep(1)
    stats, _ = cli_json(home, "repo", "stats", str(repo))
    assert stats["unreferenced_chunks"] == 0

    checked, done = cli_json(home, "backup", "verify", "--all", "--repo", str(repo))
    assert done.returncode == 0, checked
    assert sorted(checked["backups"]) == sorted([second, third, during])
    raw = restore(home, during, tmp_path / "during")["ffdata0"]
    assert e2fsck_clean(raw)
    assert hashlib.sha256(ext4_read(raw, "/during.bin")).hexdigest() == digest


def test_sync_to_s3_sends_only_what_the_copy_lacks_and_the_copy_restores(
        home: Home, lab: LabFactory, tmp_path: Path, s3: S3Server) -> None:
    local = tmp_path / "repo"
    init_repo(home, local)
    offsite = f"s3://ff/{unique('offsite')}?endpoint={s3.endpoint}"
    init_repo(home, offsite)
    vm = lab(disks=1)
    write_random(vm, "/mnt/ffdata0/base.bin", 16)
    full = backup(home, vm, local)["id"]

    first, done = cli_json(home, "repo", "sync", str(local), offsite)
    assert done.returncode == 0, done.stderr
    assert first["copied"] == [full]
    assert first["chunks_sent"] == len(chunks_of(local, full))
    again, _ = cli_json(home, "repo", "sync", str(local), offsite)
    assert (again["copied"], again["already_there"], again["chunks_sent"]) == ([], [full], 0)

    digest = write_random(vm, "/mnt/ffdata0/later.bin", 4)
    inc = backup(home, vm, local)["id"]
    new_here = chunks_of(local, inc) - chunks_of(local, full)
    third, _ = cli_json(home, "repo", "sync", str(local), offsite, "--backup", inc[:8])
    assert third["copied"] == [inc]
    assert third["chunks_sent"] == len(new_here), "only the chunks the copy lacked are sent"

    checked, done = cli_json(home, "backup", "verify", "--all", "--repo", offsite)
    assert done.returncode == 0, checked
    assert sorted(checked["backups"]) == sorted([full, inc])
    raw = restore(home, inc, tmp_path / "from-offsite", "--repo", offsite)["ffdata0"]
    assert e2fsck_clean(raw)
    assert hashlib.sha256(ext4_read(raw, "/later.bin")).hexdigest() == digest
