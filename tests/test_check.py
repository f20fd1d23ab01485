"""instance check: a report of what a snapshot could achieve, made without freezing anything."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LabFactory, agent_call, run_cli, unique
from hostfs import data_fs
from servers import mariadb as mariadb_running
from servers import mariadb_init, open_base, pg_init, redis_server
from servers import postgres as postgres_running
from test_host_apps import add_host, add_writer

from freezeframe.agent.qga import FreezeState, GuestAgent
from freezeframe.config import Home
from freezeframe.lab.vm import LabVM


def check(home: Home, name: str, *args: str) -> tuple[dict[str, Any], int]:
    done = run_cli(home, "instance", "check", name, "-o", "json", *args)
    return json.loads(done.stdout), done.returncode


@pytest.mark.vm
def test_a_vm_with_an_agent_can_be_filesystem_consistent(home: Home, shared_vm: LabVM) -> None:
    report, code = check(home, shared_vm.name)
    assert code == 0
    assert report["verdict"] == "filesystem"
    status = {c["check"]: (c["status"], c["detail"]) for c in report["checks"]}
    assert status["qmp"][0] == status["agent"][0] == status["commands"][0] == "ok"
    assert "/mnt/ffdata0 (ext4)" in status["file systems"][1]
    assert "/mnt/ffdata1 (ext4)" in status["file systems"][1]
    assert status["guest hooks"][0] == "info"
    table = run_cli(home, "instance", "check", shared_vm.name)
    assert "verdict: a snapshot of" in table.stdout


@pytest.mark.vm
def test_a_frozen_guest_is_reported_and_left_alone(home: Home, shared_vm: LabVM) -> None:
    async def freeze(agent: GuestAgent) -> None:
        await agent.fsfreeze_freeze()

    agent_call(shared_vm.qga_socket, freeze)
    try:
        report, _ = check(home, shared_vm.name)
        status = {c["check"]: c["status"] for c in report["checks"]}
        assert status["freeze state"] == "warn"
        # Checking changes nothing: still frozen.
        assert agent_call(shared_vm.qga_socket, lambda a: a.fsfreeze_status()) is FreezeState.FROZEN
    finally:
        agent_call(shared_vm.qga_socket, lambda a: a.fsfreeze_thaw())


@pytest.mark.vm
def test_without_an_agent_the_verdict_is_crash_and_costs_only_the_probe(home: Home, shared_vm: LabVM,
                                                                      tmp_path: Path) -> None:
    name = unique("noagent")
    run_cli(home, "instance", "add", name, "--qmp", shared_vm.qmp_socket, "--qga", str(tmp_path / "none.sock"))
    start = time.monotonic()
    report, code = check(home, name, "--agent-timeout", "1")
    assert time.monotonic() - start < 1 + 5
    assert code == 0
    assert report["verdict"] == "crash"
    assert any(c["check"] == "agent" and c["status"] == "fail" for c in report["checks"])
    run_cli(home, "instance", "remove", name)


@pytest.mark.host
def test_host_mounts_and_writers_are_checked(home: Home, tmp_path: Path) -> None:
    with data_fs(tmp_path) as fs:
        db = fs.mountpoint / "app.db"
        sqlite3.connect(db).close()
        name = unique("check-host")
        add_host(home, name, fs.mountpoint)
        add_writer(home, name, "sqlite", f"path={db}")
        report, code = check(home, name)
        assert (code, report["verdict"]) == (0, "application")
        assert "copied by reflink" in {c["check"]: c["detail"] for c in report["checks"]}[f"mount {fs.mountpoint}"]

        add_writer(home, name, "sqlite", f"path={fs.mountpoint}/missing.db", extra=("--name", "gone"))
        report, code = check(home, name)
        assert report["verdict"] == "filesystem"
        assert {c["check"]: c["status"] for c in report["checks"]}["writer gone"] == "fail"

    root = unique("check-root")
    add_host(home, root, Path("/"))
    report, code = check(home, root)
    assert (code, report["verdict"]) == (6, None)


@contextlib.contextmanager
def held(path: str) -> Iterator[int]:
    """Another client holding a QEMU socket, as a monitoring tool or a forgotten socat
    would: a process of its own, connected, reading nothing. Yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('held', flush=True)\n"
        "sys.stdin.read()\n"), path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        # QEMU accepts a connection in its main loop: wait until it has taken this one.
        deadline = time.monotonic() + 30
        while not any(str(holder.pid) in line and "u_str" in line for line in _ss()):
            assert time.monotonic() < deadline, "the holder's connection never showed"
            time.sleep(0.05)
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def _ss() -> list[str]:
    return subprocess.run(["ss", "-xapH"], capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.vm
def test_a_socket_held_by_another_client_is_named_not_blamed_on_qemu_or_the_guest(
        home: Home, lab: LabFactory) -> None:
    """QEMU serves one client per socket; a second one is queued and never answered. The
    check and the runs say the socket is held, by whom, and how to find it."""
    vm = lab(disks=1)
    with held(vm.qmp_socket) as pid:
        report, _ = check(home, vm.name)
        detail = {c["check"]: c["detail"] for c in report["checks"]}["qmp"]
        assert "held by another client" in detail, detail
        assert f"pid {pid}" in detail, detail
        assert f"ss -xp | grep {vm.qmp_socket}" in detail
        done = run_cli(home, "snapshot", "create", vm.name, "--consistency", "filesystem")
        assert done.returncode == 7
        assert "held by another client" in done.stderr
        assert f"ss -xp | grep {vm.qmp_socket}" in done.stderr

    with held(vm.qga_socket) as pid:
        report, _ = check(home, vm.name)
        detail = {c["check"]: c["detail"] for c in report["checks"]}["agent"]
        assert report["verdict"] == "crash"
        assert "held by another client" in detail, detail
        assert f"pid {pid}" in detail, detail
        assert "qemu-ga running" not in detail
        done = run_cli(home, "snapshot", "create", vm.name, "--consistency", "filesystem", "--agent-timeout", "2",
                       "-o", "json")
        assert done.returncode == 0, done.stderr
        snap = json.loads(done.stdout)
        assert snap["consistency"] == "crash"
        assert any("guest-agent socket" in r and "held by another client" in r for r in snap["fallback_reasons"])

    # Let go, both work again: QEMU accepts the next client.
    report, _ = check(home, vm.name)
    assert report["verdict"] == "filesystem", report


def _statements(detail: str) -> str:
    """What a writer's finding says to run ("...; as a superuser, run: GRANT ...")."""
    assert ", run: " in detail, detail
    return detail.split(", run: ", 1)[1]


@contextlib.contextmanager
def postgres_server(datadir: Path, sockdir: Path) -> Iterator[Any]:
    pg_init(datadir)
    with postgres_running(datadir, sockdir) as pg:
        yield pg


@contextlib.contextmanager
def mariadb_server(datadir: Path, rundir: Path) -> Iterator[Any]:
    mariadb_init(datadir)
    with mariadb_running(datadir, rundir) as my:
        yield my


@pytest.mark.host
def test_writers_name_the_grant_or_acl_they_lack_and_pass_once_it_is_given(home: Home, tmp_path: Path) -> None:
    """Real servers, users with too little: instance check prints the exact statement that
    is missing; run as printed, the next check passes."""
    name = unique("privileges")
    with data_fs(tmp_path) as fs, open_base() as base, \
            postgres_server(base / "pg", base / "pgsock") as pg, \
            mariadb_server(tmp_path / "my", tmp_path / "myrun") as my, \
            redis_server(tmp_path) as rd:
        add_host(home, name, fs.mountpoint)
        psql = ["runuser", "-u", "postgres", "--", "psql", "-h", str(pg.sockdir), "-p", str(pg.port), "-d", "postgres",
                "-v", "ON_ERROR_STOP=1", "-c"]
        mysql = ["mariadb", f"--socket={my.socket}", "-uroot", "-e"]
        redis_cli = ["redis-cli", "-p", str(rd.port)]
        subprocess.run([*psql, "CREATE ROLE app LOGIN"], check=True, capture_output=True)
        subprocess.run([*mysql, "CREATE USER app@localhost; GRANT SELECT ON *.* TO app@localhost"], check=True)
        assert subprocess.run([*redis_cli, "ACL", "SETUSER", "app", "on", ">secret", "+@all", "-bgsave",
                               "-client|pause"], capture_output=True, text=True, check=True).stdout.strip() == "OK"
        add_writer(home, name, "postgresql", f"host={pg.sockdir}", f"port={pg.port}", "user=app")
        add_writer(home, name, "mysql", f"unix_socket={my.socket}", "user=app")
        add_writer(home, name, "redis", f"port={rd.port}", "username=app", "password_env=FF_TEST_REDIS")
        env = {"FF_TEST_REDIS": "secret"}

        done = run_cli(home, "instance", "check", name, "-o", "json", env=env)
        found = {c["check"]: (c["status"], c["detail"]) for c in json.loads(done.stdout)["checks"]}
        assert json.loads(done.stdout)["verdict"] == "filesystem"
        assert found["writer postgresql"][0] == "fail"
        grants = _statements(found["writer postgresql"][1])
        assert grants == "GRANT pg_checkpoint TO app; GRANT pg_read_all_settings TO app;"
        assert found["writer mysql"][0] == "fail"
        grant = _statements(found["writer mysql"][1])
        assert grant == "GRANT RELOAD, BINLOG MONITOR ON *.* TO 'app'@'localhost';"
        assert found["writer redis"][0] == "fail"
        acl = _statements(found["writer redis"][1])
        assert acl == "ACL SETUSER app +client|pause +bgsave"

        subprocess.run([*psql, grants], check=True, capture_output=True)
        subprocess.run([*mysql, grant], check=True)
        subprocess.run([*redis_cli, *acl.split()], check=True, capture_output=True)
        done = run_cli(home, "instance", "check", name, "-o", "json", env=env)
        report = json.loads(done.stdout)
        assert report["verdict"] == "application", report
        assert "may run every command" in {c["check"]: c["detail"] for c in report["checks"]}["writer redis"]
        # And the run agrees: an application-consistent snapshot with all three.
        snap = json.loads(run_cli(home, "snapshot", "create", name, "--consistency", "application", "-o", "json",
                                  env=env).stdout)
        assert snap["consistency"] == "application", snap["fallback_reasons"]
