"""A fleet on one machine: two hosts back their VMs up into one S3 repository and one local
repository while a third collects garbage in a loop. The two hosts are separate homes
running in their own UTS, PID and mount namespaces, with different machine ids and the
same host name (as two clones of a hypervisor would be). One backup is stopped (SIGSTOP)
mid-read for longer than the lease and then continued; one host's backup is killed
mid-read. Afterwards every published backup verifies and restores with clean file
systems, the continued backup either failed or verifies, and every collection finished
while backups ran, without waiting for them."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backups import cli_json, e2fsck_clean, init_repo, restore, write_random
from conftest import LabFactory, run_cli, unique
from servers import CephCluster, S3Server
from test_backup_vm import vm_state

from freezeframe.config import Home
from freezeframe.lab.vm import LabVM

pytestmark = pytest.mark.vm

LEASE_S = 6
TWIN = "fleet-twin"


class Host:
    """A home whose commands run in namespaces of their own, with their own machine id."""

    def __init__(self, root: Path, machine_id: str) -> None:
        self.home = Home.open(root)
        self.machine_id = root / "machine-id"
        self.machine_id.write_text(machine_id + "\n")

    def argv(self, *args: str) -> list[str]:
        # sh stays the namespace's init (no exec): freezeframe is an ordinary process there,
        # one that a signal, its own fault injection's included, can stop or kill. When a
        # namespace's init exits, the kernel kills everything in it, so sh waits for the
        # backup's sentinel too (the work it does after a killed backup is under test).
        script = (f'mount --bind {self.machine_id} /etc/machine-id && hostname {TWIN} && "$@"; status=$?; '
                  # (the brackets keep the pattern from matching this very script's command line)
                  "while pgrep -f 'freezeframe[.]engine[.]sentinel' > /dev/null; do sleep 0.2; done; exit $status")
        return ["unshare", "--uts", "--pid", "--mount", "--mount-proc", "--fork", "--kill-child", "sh", "-c", script,
                "host", sys.executable, "-m", "freezeframe", *args]

    def run(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, check=False,
                              env=dict(os.environ, FREEZEFRAME_HOME=str(self.home.root), **(env or {})))

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, FREEZEFRAME_HOME=str(self.home.root), **(env or {})))


def stopped_backups(instance: str) -> list[int]:
    """Host pids of stopped ``backup create INSTANCE`` processes (they run in PID namespaces
    of their own: their own pids mean nothing here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if state == "T" and b"create" in argv and instance.encode() in argv and b"freezeframe" in argv:
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def collector(home: Home, repos: list[str]) -> Iterator[list[dict[str, Any]]]:
    """``repo gc`` on each repository in a loop, from a third home, until the block ends."""
    runs: list[dict[str, Any]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            for repo in repos:
                began = time.monotonic()
                done = run_cli(home, "repo", "gc", repo, "-o", "json")
                runs.append({"repo": repo, "code": done.returncode, "took": time.monotonic() - began,
                             "stderr": done.stderr, **(json.loads(done.stdout) if done.returncode == 0 else {})})
            stop.wait(random.uniform(0.2, 1.5))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield runs
    finally:
        stop.set()
        thread.join(timeout=300)


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("store", ["rclone", "ceph"])
def test_two_hosts_and_a_collector_share_one_s3_and_one_local_repository(
        home: Home, lab: LabFactory, tmp_path: Path, s3: S3Server, store: str,
        request: pytest.FixtureRequest) -> None:
    """On each S3 server: rclone serve s3 (which ignores If-None-Match: no conditional
    writes at all) and Ceph's RADOS gateway (what large fleets store on)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"random timing seed {seed}")
    if store == "ceph":
        cluster: CephCluster = request.getfixturevalue("ceph")
        remote = f"s3://{cluster.BUCKET}/{unique('fleet')}?endpoint={cluster.endpoint}"
    else:
        remote = f"s3://ff/{unique('fleet')}?endpoint={s3.endpoint}"
    repos = [remote, str(tmp_path / "local")]
    for repo in repos:
        init_repo(home, repo, "--lock-lease", str(LEASE_S))
    hosts = [Host(tmp_path / "a", "a" * 32), Host(tmp_path / "b", "b" * 32)]
    vms: list[LabVM] = [lab(disks=1), lab(disks=1)]
    for host, vm in zip(hosts, vms, strict=True):
        added = host.run("instance", "add", vm.name, "--qmp", vm.qmp_socket, "--qga", vm.qga_socket)
        assert added.returncode == 0, added.stderr
        assert host.run("policy", "set", vm.name, "--keep-last", "2").returncode == 0

    outcomes: list[tuple[str, str, subprocess.CompletedProcess[str]]] = []

    def rounds(host: Host, vm: LabVM, special: str | None) -> None:
        for round_ in range(3):
            for repo in repos:
                write_random(vm, f"/mnt/ffdata0/r{round_}.bin", rng.randint(1, 6))
                time.sleep(rng.uniform(0, 1.0))
                env = None
                if special == "stop" and round_ == 1 and repo == repos[0]:
                    env = {"FREEZEFRAME_FAULT": "stop-mid-read:1"}
                if special == "kill" and round_ == 1 and repo == repos[1]:
                    env = {"FREEZEFRAME_FAULT": "mid-read:1"}
                if env and "stop" in env["FREEZEFRAME_FAULT"]:
                    proc = host.start("backup", "create", vm.name, "--repo", repo, "--consistency", "filesystem",
                                      "-o", "json", env=env)
                    # Stopped mid-read: held for longer than the lease, until a collection has
                    # broken it; then continued.
                    pids = _wait(lambda: stopped_backups(vm.name), "the backup never stopped", proc)
                    lease = _wait(lambda where=repo: next((held["name"] for held in _locks(home, where)
                                                            if held["instance"] == vm.name), None),
                                  "the stopped backup holds no lease", None)
                    _wait(lambda where=repo, name=lease: name not in [held["name"] for held in _locks(home, where)],
                          "no collection broke the stopped backup's lease", None, timeout=LEASE_S * 20)
                    for pid in pids:
                        os.kill(pid, signal.SIGCONT)
                    out, err = proc.communicate(timeout=600)
                    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
                    outcomes.append(("stopped", repo, done))
                else:
                    done = host.run("backup", "create", vm.name, "--repo", repo, "--consistency", "filesystem",
                                    "-o", "json", env=env)
                    outcomes.append(("killed" if env else "plain", repo, done))
                    if env:  # the sentinel takes the killed backup's view down; the next waits for it
                        _wait(lambda: (lambda state: not state["jobs"] and not state["exports"])(vm_state(vm)),
                              "the killed backup's view was never taken down", None, timeout=120)
                if rng.random() < 0.5:
                    pruned = host.run("backup", "prune", vm.name, "-o", "json")
                    assert pruned.returncode == 0, pruned.stderr

    failures: list[BaseException] = []

    def host_rounds(host: Host, vm: LabVM, special: str) -> None:
        try:
            rounds(host, vm, special)
        except BaseException as err:  # raised again on the test's thread
            failures.append(err)

    with collector(Home.open(tmp_path / "collector"), repos) as runs:
        workers = [threading.Thread(target=host_rounds, args=(hosts[0], vms[0], "stop")),
                   threading.Thread(target=host_rounds, args=(hosts[1], vms[1], "kill"))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=1800)
        assert not any(w.is_alive() for w in workers), "a host's backups never ended"
    if failures:
        raise failures[0]

    plain = [done for kind, _, done in outcomes if kind == "plain"]
    assert all(done.returncode == 0 for done in plain), [d.stderr for d in plain if d.returncode]
    killed = [done for kind, _, done in outcomes if kind == "killed"]
    assert len(killed) == 1
    assert killed[0].returncode != 0, killed
    [(_, _, stopped)] = [o for o in outcomes if o[0] == "stopped"]
    if stopped.returncode != 0:
        assert "without renewal" in stopped.stderr or "was broken" in stopped.stderr, stopped.stderr

    # Every collection finished, none failed, none waited for a backup; some ran while
    # leases were held, and one broke the stopped backup's.
    assert runs, "no collection ran"
    assert all(r["code"] == 0 for r in runs), [r["stderr"] for r in runs if r["code"]]
    assert any(r["leases_honoured"] for r in runs), "no collection overlapped a running backup"
    assert any(b["why"].startswith("not renewed") for r in runs for b in r["leases_broken"])

    for repo in repos:
        checked, done = cli_json(home, "backup", "verify", "--all", "--repo", repo)
        assert done.returncode == 0, checked
        listed, done = cli_json(home, "backup", "list", "--repo", repo)
        assert done.returncode == 0, done.stderr
        hosts_seen = {(b["host"], b["instance"]) for b in listed}
        assert hosts_seen == {(TWIN, vm.name) for vm in vms}, hosts_seen
        if stopped.returncode == 0 and repo == repos[0]:
            assert json.loads(stopped.stdout)["id"] in [b["id"] for b in listed]
        for entry in listed:
            raw = restore(home, entry["id"], tmp_path / "restored" / entry["id"][:8], "--repo", repo)["ffdata0"]
            assert e2fsck_clean(raw), f"backup {entry['id']} restored with a damaged file system"
            raw.unlink()


def _locks(home: Home, repo: str) -> list[dict[str, Any]]:
    found, done = cli_json(home, "repo", "locks", repo)
    assert done.returncode == 0, done.stderr
    return list(found)


def _wait(condition: Any, what: str, proc: subprocess.Popen[str] | None, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: it ended with {proc.returncode}: {proc.communicate()}")
        assert time.monotonic() < deadline, what
        time.sleep(0.3)
    return found
