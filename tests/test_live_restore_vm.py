"""Instant recovery on real parts: a lab VM boots at once on overlays backed by its
backup served over NBD (real nbdkit), QEMU's block-stream copies the backup in behind the
running guest, from a local and from an S3 repository; an S3 outage pauses and resumes
it without the guest losing a write; a restore whose freezeframe was killed is finished
by the daemon."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from backups import backup, cli_json, e2fsck_clean, guest, init_repo, restore, write_random
from conftest import RepoPlace, qmp, run_cli, unique, vm_status
from oracles import ext4_read
from servers import S3Server

from freezeframe.config import Home
from freezeframe.jobs import live_restore
from freezeframe.jobs.daemon import Daemon, cli_runner
from freezeframe.lab import libvirt as lab_libvirt
from freezeframe.lab import vm as lab_vm

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def source(home: Home, shared_vm: lab_vm.LabVM, s3: S3Server,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A backup of the shared VM with a known file, in a local and in an S3 repository."""
    local = tmp_path_factory.mktemp("live") / "repo"
    prefix = unique("live")
    remote = RepoPlace(f"s3://ff/{prefix}?endpoint={s3.endpoint}", s3.root / "ff" / prefix)
    digest = write_random(shared_vm, "/mnt/ffdata1/before.bin", 2)
    made = {}
    for where in (local, remote):
        init_repo(home, where)
        made[str(where)] = backup(home, shared_vm, where)["id"]
    return {"local": local, "remote": remote, "digest": digest, "backups": made}


@contextmanager
def live_up(home: Home, name: str, backup_id: str, repo: Path | RepoPlace, *args: str,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``lab up NAME --from-backup ID --live`` running; the VM is stopped after the block."""
    proc = subprocess.Popen([sys.executable, "-m", "freezeframe", "lab", "up", name, "--from-backup", backup_id,
                             "--live", "--repo", str(repo), *args, "-o", "json"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, FREEZEFRAME_HOME=str(home.root), **(env or {})))
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        subprocess.run([sys.executable, "-m", "freezeframe", "lab", "down", name], capture_output=True,
                       env=dict(os.environ, FREEZEFRAME_HOME=str(home.root)))


def events_until(proc: subprocess.Popen[str], wanted: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Read the JSON progress lines on stderr until one of kind ``wanted``."""
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            event = json.loads(line)
            seen.append(event)
            if event.get("event") == wanted:
                return event
    proc.wait(10)
    raise AssertionError(f"no {wanted} event; exit {proc.returncode}; saw {seen}")


def finish(proc: subprocess.Popen[str], seen: list[dict[str, Any]], timeout: float = 600) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    seen += [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, err
    return dict(json.loads(out))


def streaming(vm: lab_vm.LabVM) -> bool:
    return any(j["type"] == "stream" for j in qmp(vm, "query-block-jobs"))


def file_digest(vm: lab_vm.LabVM, path: str) -> str:
    return guest(vm, f"sha256sum {path}").split()[0]


@pytest.mark.parametrize(("where", "runner"), [("local", "qemu"), ("remote", "qemu"), ("remote", "libvirt")])
def test_a_vm_runs_on_its_backup_at_once_and_stands_alone_after_the_copy(
        home: Home, source: dict[str, Any], tmp_path: Path, where: str, runner: str,
        request: pytest.FixtureRequest) -> None:
    if runner == "libvirt":
        request.getfixturevalue("libvirtd")  # the session's daemons, stopped at its end
    repo = source[where]
    name = unique("live")
    seen: list[dict[str, Any]] = []
    extra = ("--libvirt",) if runner == "libvirt" else ()
    with live_up(home, name, source["backups"][str(repo)], repo, "--rate-limit", "24", *extra) as proc:
        events_until(proc, "booted", seen)
        vm = lab_vm.get(home.lab, name)
        # The guest runs on the backup: its agent answers and the file reads back, while
        # the copy is still going.
        assert file_digest(vm, "/mnt/ffdata1/before.bin") == source["digest"]
        assert streaming(vm), "the copy had finished before the guest was checked: nothing shown"
        record = finish(proc, seen)
        assert record["live_restore"]["bytes_local"] == record["live_restore"]["bytes_total"]
        progress = [e for e in seen if e.get("event") == "progress"]
        assert progress
        assert progress[0]["bytes_local"] < progress[0]["bytes_total"]
        assert any(p["rate"] > 0 for p in progress)

        vm = lab_vm.get(home.lab, name)
        assert not streaming(vm)
        nodes = qmp(vm, "query-named-block-nodes", {"flat": True})
        assert not [n["node-name"] for n in nodes if n["drv"] == "nbd"], "the NBD nodes are still attached"
        assert not [n["node-name"] for n in nodes if n.get("backing_file")], "an overlay still has a backing"
        # The repository gone: every block of every disk still reads, from the local images.
        moved = repo.root if isinstance(repo, RepoPlace) else repo
        moved.rename(moved.with_name(moved.name + "-away"))
        try:
            guest(vm, "dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null && dd if=/dev/vdb of=/dev/null bs=1M 2>/dev/null")
            assert vm_status(vm) == "running"
            assert file_digest(vm, "/mnt/ffdata1/before.bin") == source["digest"]
        finally:
            moved.with_name(moved.name + "-away").rename(moved)
        # It is an instance like any other: a snapshot and a backup of it work.
        snap, done = cli_json(home, "snapshot", "create", name, "--consistency", "filesystem")
        assert done.returncode == 0, done.stderr
        assert snap["consistency"] == "filesystem"
        again = tmp_path / "again"
        init_repo(home, again)
        second = backup(home, vm, again)
        images = restore(home, second["id"], tmp_path / "restored")
        raw = list(images.values())[1]
        assert e2fsck_clean(raw)
        assert hashlib.sha256(ext4_read(raw, "/before.bin")).hexdigest() == source["digest"]


#: A writer in the guest: each number is acknowledged (in tmpfs) only once sync returned.
WRITER = ("setsid sh -c 'i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo $i >> /mnt/ffdata0/acks.log; sync; "
          "echo $i > /tmp/acked; sleep 0.2; done' </dev/null >/dev/null 2>&1 &")


def test_an_s3_outage_pauses_the_restored_vm_and_loses_nothing_it_wrote(
        home: Home, source: dict[str, Any], s3: S3Server, tmp_path: Path) -> None:
    repo = source["remote"]
    name = unique("live-outage")
    seen: list[dict[str, Any]] = []
    env = {"FREEZEFRAME_S3_RETRY_S": "3"}
    with live_up(home, name, source["backups"][str(repo)], repo, "--rate-limit", "8", "--repo-wait", "2",
                 env=env) as proc:
        events_until(proc, "booted", seen)
        vm = lab_vm.get(home.lab, name)
        guest(vm, WRITER)
        deadline = time.monotonic() + 60
        while int(guest(vm, "cat /tmp/acked 2>/dev/null || echo 0")) < 5:
            assert time.monotonic() < deadline, "the writer in the guest did not start"
            time.sleep(0.2)
        statuses = set()
        assert streaming(vm), "the copy ended before the outage: it would show nothing"
        with s3.stopped():
            ends = time.monotonic() + 30  # the outage: 30 s without the S3 server
            while time.monotonic() < ends:
                statuses.add(vm_status(vm))
                time.sleep(0.5)
        record = finish(proc, seen)
        assert "paused" in statuses or any(e.get("paused") for e in seen), (statuses, seen[-3:])
        assert vm_status(vm) == "running"
        acked = int(guest(vm, "touch /tmp/stop; sleep 1; cat /tmp/acked"))
        lines = guest(vm, "cat /mnt/ffdata0/acks.log").split()
    assert record["live_restore"]["bytes_local"] == record["live_restore"]["bytes_total"]
    assert [int(n) for n in lines[:acked]] == list(range(1, acked + 1)), "an acknowledged write was lost"
    assert acked > 5


def test_a_killed_live_restore_is_finished_by_the_daemon_and_the_vm_never_stopped(
        home: Home, source: dict[str, Any]) -> None:
    """freezeframe killed mid-copy: the VM runs on; a second finisher is refused while one
    holds the restore; the daemon finds the restore nobody finishes and finishes it (with
    the rate the operator gave)."""
    repo = source["local"]
    name = unique("live-killed")
    seen: list[dict[str, Any]] = []
    with live_up(home, name, source["backups"][str(repo)], repo, "--rate-limit", "32") as proc:
        events_until(proc, "booted", seen)
        events_until(proc, "progress", seen)  # the copy has begun
        vm = lab_vm.get(home.lab, name)
        assert streaming(vm)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert vm.running, "QEMU died with the live restore"

        state = home.live / f"{name}.json"
        with live_restore.finisher(state, name):  # as a finisher holds it
            assert live_restore.interrupted(home.live) == []
            refused = run_cli(home, "backup", "restore", "--live", "--resume", name)
            assert refused.returncode == 4, refused.stderr
            assert "being finished by another process" in refused.stderr
        assert live_restore.interrupted(home.live) == [name]

        lines: list[dict[str, Any]] = []
        daemon = Daemon(home.catalog, cli_runner(home.root, fake_clock=False), lambda: datetime.now(UTC),
                        lines.append, live_dir=home.live)
        daemon.tick(wait=True)
        [line] = [entry for entry in lines if entry["job"] == "live-restore"]
        assert (line["instance"], line["outcome"]) == (name, "ok"), line
        assert line["bytes_local"] == line["bytes_total"] > 0, line
        assert vm_status(vm) == "running"
        assert not streaming(vm)
        guest(vm, "dd if=/dev/vda of=/dev/null bs=1M 2>/dev/null && dd if=/dev/vdb of=/dev/null bs=1M 2>/dev/null")
        assert file_digest(vm, "/mnt/ffdata1/before.bin") == source["digest"]
        assert not (home.live / f"{name}.json").exists()


def test_a_libvirt_domain_runs_on_its_backup_under_a_new_name_and_is_defined_once_local(
        home: Home, shared_libvirt_vm: lab_vm.LabVM, tmp_path: Path) -> None:
    """``backup restore ID --live --to DIR --to-instance NEW`` for a backup of a libvirt
    domain: NEW is the backed-up domain's definition on overlays backed by the backup; the
    guest answers while libvirt pulls the blocks; freezeframe killed, --resume finishes;
    then NEW is defined, stands alone, and snapshots like any instance, and the original's
    disks were never touched."""
    import libvirt

    source_vm = shared_libvirt_vm
    assert source_vm.libvirt_uri is not None
    repo = tmp_path / "repo"
    init_repo(home, repo)
    digest = write_random(source_vm, "/mnt/ffdata1/live.bin", 2)
    made = backup(home, source_vm, repo)
    name = unique("live-clone")
    clone = dataclasses.replace(source_vm, name=name)
    seen: list[dict[str, Any]] = []
    proc = subprocess.Popen([sys.executable, "-m", "freezeframe", "backup", "restore", made["id"], "--live",
                             "--to", str(tmp_path / "clone"), "--to-instance", name, "--rate-limit", "1", "-o",
                             "json"], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, FREEZEFRAME_HOME=str(home.root)))
    conn = libvirt.open(source_vm.libvirt_uri)
    try:
        events_until(proc, "booted", seen)
        deadline = time.monotonic() + 120
        while not lab_libvirt.agent_connected(source_vm.libvirt_uri, name):
            assert time.monotonic() < deadline, "the restored domain's agent never connected"
            time.sleep(0.2)
        assert file_digest(clone, "/mnt/ffdata1/live.bin") == digest
        assert streaming(clone), "the copy had finished before the guest was checked: nothing shown"
        # The copy crawls (1 MiB/s): freezeframe killed, it is finished at full speed.
        proc.kill()
        proc.communicate()
        resumed, done = cli_json(home, "backup", "restore", "--live", "--resume", name, "--rate-limit", "0")
        assert done.returncode == 0, done.stderr
        assert resumed["live_restore"]["bytes_local"] == resumed["live_restore"]["bytes_total"]

        dom = conn.lookupByName(name)
        assert dom.isPersistent(), "the restored domain was not defined"
        defined = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert "nbd" not in defined, defined
        assert str(tmp_path / "clone") in defined, defined
        nodes = qmp(clone, "query-named-block-nodes", {"flat": True})
        assert not [n["node-name"] for n in nodes if n["drv"] == "nbd" or n.get("backing_file")]
        assert file_digest(clone, "/mnt/ffdata1/live.bin") == digest
        snap, done = cli_json(home, "snapshot", "create", name, "--consistency", "filesystem")
        assert done.returncode == 0, done.stderr
        assert snap["consistency"] == "filesystem"
        original = conn.lookupByName(source_vm.name).XMLDesc()
        assert str(tmp_path / "clone") not in original, "the original domain's disks changed"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        conn.close()
