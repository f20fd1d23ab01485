"""Never left frozen: the snapshot process killed at each step, a freeze that outlives the
agent timeout, a freeze held past its budget, two runs at once. Real VMs, real file systems;
the kills come from the engine's own fault points (FREEZEFRAME_FAULT)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LabFactory, active_images, agent_call, qmp, run_cli, unique
from hostfs import data_fs
from oracles import backing_chain
from test_host_apps import add_host, add_writer
from test_snapshot_vm import assert_guest_writable, created
from test_writer_failures import assert_writable, sqlite_db

from freezeframe.agent.qga import FreezeState
from freezeframe.config import Home
from freezeframe.engine.run import DEADMAN_MARGIN, GUARD_GRACE
from freezeframe.lab.vm import LabVM


def killed_run(home: Home, instance: str, point: str, *args: str) -> subprocess.CompletedProcess[str]:
    done = run_cli(home, "snapshot", "create", instance, "-o", "json", *args,
                   env={"FREEZEFRAME_FAULT": point})
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)
    return done


def assert_no_orphan_images(vm: LabVM) -> None:
    in_use = {image for top in active_images(vm) for image in backing_chain(top)}
    on_disk = {str(p) for p in Path(vm.directory).glob("*.qcow2")}
    assert on_disk == in_use, f"files no chain uses: {sorted(on_disk - in_use)}"


def record_of_last(home: Home, instance: str) -> dict[str, Any]:
    listed = json.loads(run_cli(home, "snapshot", "list", "--instance", instance, "-o", "json").stdout)
    return dict(listed[-1])


def wait_for_record(home: Home, instance: str, within: float) -> dict[str, Any]:
    """The guard records what it did; give it the time it is allowed."""
    deadline = time.monotonic() + within
    while True:
        record = record_of_last(home, instance)
        if record["state"] == "failed" or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


@pytest.mark.vm
@pytest.mark.parametrize("point", ["after-freeze", "before-snapshot", "during-snapshot", "after-snapshot"])
def test_a_killed_snapshot_process_never_leaves_the_guest_frozen(home: Home, any_vm: LabVM, point: str) -> None:
    start = time.monotonic()
    killed_run(home, any_vm.name, point, "--consistency", "filesystem")

    def thawed_within(seconds: float) -> float:
        while time.monotonic() - start < seconds:
            state = agent_call(any_vm, lambda a: a.fsfreeze_status(), timeout=5)
            if state is FreezeState.THAWED:
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"still frozen {seconds}s after the kill at {point}")

    # The guard acts on the death at once: well within the budget (10 s) + 5 s.
    took = thawed_within(10 + 5)
    assert_guest_writable(any_vm, 2)
    record = wait_for_record(home, any_vm.name, 10)
    assert record["state"] == "failed"
    assert "the snapshot process died" in record["error"], record["error"]
    assert "the guard thawed" in record["error"]
    print(f"{point}: guest thawed {took:.1f}s after the run started", file=sys.stderr)
    # Nothing the dead run made is lost track of: every image file is in the VM's chains...
    assert_no_orphan_images(any_vm)
    if point == "after-snapshot":
        # ...and a snapshot it had taken is in the record, so deleting merges it back.
        assert len(record["disks"]) == 2, record
    if record["disks"]:
        deleted = run_cli(home, "snapshot", "delete", record["id"])
        assert deleted.returncode == 0, deleted.stderr
        assert_no_orphan_images(any_vm)

    snap = created(home, any_vm.name, "--consistency", "filesystem")  # the next one just works
    assert snap["consistency"] == "filesystem"


@pytest.mark.host
def test_a_killed_run_on_the_host_releases_the_file_system_and_the_application(home: Home, tmp_path: Path) -> None:
    with data_fs(tmp_path) as fs:
        db_path = fs.mountpoint / "app.db"
        sqlite_db(db_path)
        name = unique("host-kill")
        add_host(home, name, fs.mountpoint)
        add_writer(home, name, "sqlite", f"path={db_path}")
        for point in ("after-writers-freeze", "after-freeze"):
            killed_run(home, name, point, "--consistency", "application")
            assert_writable(fs.mountpoint, within=5)
            app = sqlite3.connect(db_path, timeout=5, isolation_level=None)
            app.execute("INSERT INTO t VALUES (NULL)")  # the write lock died with the process
            app.close()
            record = wait_for_record(home, name, 10)
            assert record["state"] == "failed"
            assert "the snapshot process died" in record["error"]
        done = run_cli(home, "snapshot", "create", name, "--consistency", "application", "-o", "json")
        assert json.loads(done.stdout)["consistency"] == "application"


@pytest.mark.host
def test_a_freeze_held_past_its_budget_is_cut(home: Home, tmp_path: Path) -> None:
    with data_fs(tmp_path) as fs:
        name = unique("budget")
        add_host(home, name, fs.mountpoint)
        assert run_cli(home, "instance", "update", name, "--freeze-budget", "1").returncode == 0
        result: dict[str, subprocess.CompletedProcess[str]] = {}

        def run() -> None:
            # The snapshot step stalls for 6 s, like a stuck QMP call; the budget is 1 s.
            result["done"] = run_cli(home, "snapshot", "create", name, "--consistency", "filesystem",
                                     "-o", "json", env={"FREEZEFRAME_FAULT": "slow-snapshot:6"})

        thread = threading.Thread(target=run)
        started = time.monotonic()
        thread.start()
        time.sleep(3)
        assert thread.is_alive(), "the run should still be stalled"
        assert_writable(fs.mountpoint, within=1)  # cut at the budget, long before the stall ends
        thread.join(60)
        done = result["done"]
        assert done.returncode == 0, done.stderr
        snap = json.loads(done.stdout)
        assert snap["consistency"] == "crash"  # the copy was taken after the thaw
        assert any("budget of 1s" in r for r in snap["fallback_reasons"]), snap["fallback_reasons"]
        assert time.monotonic() - started > 6


@pytest.mark.vm
def test_a_freeze_that_outlives_the_agent_timeout_is_thawed_when_it_completes(home: Home, lab: LabFactory) -> None:
    vm = lab(disks=1, hooks=("slow",), hook_timeout=30)  # the hook takes 6 s to freeze

    snap = created(home, vm.name, "--consistency", "filesystem", "--freeze-timeout", "2")

    assert snap["consistency"] == "crash"
    assert any("freezing the file systems failed" in r for r in snap["fallback_reasons"])
    # The freeze went on in the guest after we stopped waiting; it must not stay behind.
    assert agent_call(vm.qga_socket, lambda a: a.fsfreeze_status()) is FreezeState.THAWED
    assert_guest_writable(vm, 1)
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    # It found the late freeze and thawed it. qemu-ga runs one command at a time: a thaw
    # sent while the hook still ran waits behind the freeze. When the run's wait for that
    # thaw timed out first (a loaded host), qemu-ga still ran it as soon as the freeze
    # completed, but its count never came back; the next attempt found nothing frozen.
    events = [e["event"] for e in manifest["events"]]
    assert manifest["thawed_filesystems"] == 1 or any(
        e.startswith("thaw attempt") and "failed" in e for e in events), events


@pytest.mark.host
def test_two_runs_on_one_instance_are_refused_and_on_two_instances_run_together(home: Home, tmp_path: Path) -> None:
    with data_fs(tmp_path / "a") as fs_a, data_fs(tmp_path / "b") as fs_b:
        first, second = unique("lock-a"), unique("lock-b")
        add_host(home, first, fs_a.mountpoint)
        add_host(home, second, fs_b.mountpoint)
        slow = {"FREEZEFRAME_FAULT": "slow-snapshot:3"}
        runs: dict[str, subprocess.CompletedProcess[str]] = {}

        def run(key: str, instance: str, env: dict[str, str] | None) -> None:
            runs[key] = run_cli(home, "snapshot", "create", instance, "--consistency", "filesystem", env=env)

        threads = [threading.Thread(target=run, args=("slow", first, slow))]
        threads[0].start()
        time.sleep(1.5)
        run("same", first, None)  # while the first holds the instance
        threads.append(threading.Thread(target=run, args=("other", second, None)))
        threads[1].start()
        for thread in threads:
            thread.join(60)
        assert runs["same"].returncode == 4
        assert "another freezeframe run is working on instance" in runs["same"].stderr
        assert runs["slow"].returncode == 0, runs["slow"].stderr
        assert runs["other"].returncode == 0, runs["other"].stderr


@pytest.mark.vm
def test_an_agent_killed_while_frozen_comes_back_frozen_and_the_next_run_thaws(home: Home, lab: LabFactory) -> None:
    vm = lab(disks=1, hooks=("killagent",), hook_policy="continue")

    async def freeze(agent: Any) -> int:
        return int(await agent.fsfreeze_freeze(timeout=30))

    assert agent_call(vm.qga_socket, freeze, timeout=30) == 1
    time.sleep(3)  # qemu-ga is killed while frozen, and the guest's init starts it again
    # A restarted agent still knows the guest is frozen (its state file says so).
    assert agent_call(vm.qga_socket, lambda a: a.fsfreeze_status(), timeout=10) is FreezeState.FROZEN

    snap = created(home, vm.name, "--consistency", "filesystem", "--freeze-timeout", "30")

    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    assert any("found frozen" in e["event"] for e in manifest["events"]), manifest["events"]
    time.sleep(3)  # this run's freeze killed the agent again; it is back by now
    assert agent_call(vm.qga_socket, lambda a: a.fsfreeze_status(), timeout=10) is FreezeState.THAWED
    assert_guest_writable(vm, 1)


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _guards_of(pid: int) -> list[int]:
    """The freeze guard processes the run ``pid`` started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"freezeframe.engine.guard" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.vm
@pytest.mark.parametrize("runner", ["python", "sh"])
def test_the_guest_thaws_itself_when_the_whole_host_side_is_gone(home: Home, lab: LabFactory, runner: str) -> None:
    """The run stopped while the guest is frozen, its guard killed, then the run killed (and
    with it the agent socket's peer): nothing on the host will ever thaw. The guest hook
    runner's deadman does, by the deadline the run gave it (freeze timeout + budget + grace
    + margin)."""
    vm = lab(disks=1, hooks=("ok",), workload=True, workload_sync=True, hook_runner=runner)
    # The freeze timeout leaves the runner's start-up (seconds under a loaded TCG) time to
    # finish: a freeze that timed out would go on in the guest after the run stopped.
    budget, freeze_timeout = 2.0, 20.0

    def writes() -> int:
        """What the guest has written so far, as QEMU counts it (its one disk: the root is in memory)."""
        return sum(int(s["stats"]["wr_operations"]) for s in qmp(vm, "query-blockstats"))

    assert writes() > 0, "the workload writes nothing"
    run = subprocess.Popen(
        [sys.executable, "-m", "freezeframe", "snapshot", "create", vm.name, "--consistency", "filesystem",
         "--freeze-budget", str(budget), "--freeze-timeout", str(freeze_timeout)],
        env=dict(os.environ, FREEZEFRAME_HOME=str(home.root), FREEZEFRAME_FAULT="stop-after-freeze"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _stopped(run.pid):
            assert run.poll() is None, "the run ended before it froze the guest"
            assert time.monotonic() < deadline, "the run never reached the freeze"
            time.sleep(0.05)
        guards = _guards_of(run.pid)
        assert guards, "no freeze guard was armed"
        for pid in guards:
            os.kill(pid, signal.SIGKILL)
    finally:
        run.kill()
        run.wait()
    gone = time.monotonic()

    # Frozen, the workload's writes stop; they go on once the guest has thawed itself.
    allowed = freeze_timeout + budget + GUARD_GRACE + DEADMAN_MARGIN
    frozen_at = writes()
    time.sleep(1)  # the workload writes every few ms: a second without a write means frozen
    assert writes() == frozen_at, "the guest was not frozen when the host side went"
    while writes() == frozen_at:
        assert time.monotonic() - gone < allowed + 60, "the guest never thawed itself"
        time.sleep(0.2)
    took = time.monotonic() - gone
    # Counted from the freeze, which came before the kill; a loaded TCG guest gets slack.
    assert took <= allowed + 30, f"the guest wrote again {took:.1f}s after the host side was gone"

    # qemu-ga still believes the guest is frozen (it never thaws by itself), and its own
    # thaw finds nothing frozen: the deadman had thawed it, and says so.
    assert agent_call(vm.qga_socket, lambda a: a.fsfreeze_status()) is FreezeState.FROZEN
    assert agent_call(vm.qga_socket, lambda a: a.fsfreeze_thaw()) == 0
    log = agent_call(vm.qga_socket, lambda a: a.read_file("/run/freezeframe/deadman.log")).decode()
    assert "thawed 1 file system(s) itself (/mnt/ffdata0)" in log, log
    assert_guest_writable(vm, 1)
    # The next run reports what happened.
    snap = created(home, vm.name, "--consistency", "filesystem")
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    assert any("deadman acted" in e["event"] for e in manifest["events"]), manifest["events"]
