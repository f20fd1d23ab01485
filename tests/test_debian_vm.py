"""A guest as operators run it: Debian 12 with systemd, Debian's own kernel and
qemu-guest-agent 7.2 started with the stock fsfreeze-hook, PostgreSQL 15 on its second disk,
and a ``10-postgresql`` hook that runs CHECKPOINT. No Python in the guest.

One guest for the module (it boots in about a minute under TCG); the tests run in order:
first with the stock hook, then with freezeframe's sh runner installed through the agent.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backups import cli_json, init_repo, restore
from conftest import agent_call, guest_sh, run_cli, unique
from servers import PG_BIN, open_base
from test_snapshot_vm import created

from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.errors import AgentCommandError, AgentError
from freezeframe.lab import vm as lab_vm
from freezeframe.lab.apps import free_port
from freezeframe.lab.vm import LabVM

pytestmark = pytest.mark.vm

#: The test's own client in the guest: one psql per commit, each acknowledged id logged
#: with the guest's clock only once psql has returned (the commit is acknowledged).
CLIENT = r"""
runuser -u postgres -- psql -qAt -c 'CREATE TABLE IF NOT EXISTS acked (id int PRIMARY KEY, at float8)'
setsid sh -c '
    i=0
    while :; do
        i=$((i + 1))
        runuser -u postgres -- psql -qAt -c "INSERT INTO acked VALUES ($i, extract(epoch from clock_timestamp()))" \
            && echo "$i $(date +%s.%N)" >> /run/ff-acked
    done' < /dev/null > /dev/null 2>&1 &
"""


@pytest.fixture(scope="module")
def debian(home: Home) -> Iterator[LabVM]:
    name = unique("debian")
    vm = lab_vm.up_debian(home.lab, home.images, name, stock_hooks=("postgresql",))
    try:
        with Catalog.open(home.catalog) as catalog:
            catalog.add_instance(name, kind="qemu", qmp_socket=vm.qmp_socket, qga_socket=vm.qga_socket, lab=True)
        yield vm
    finally:
        lab_vm.down(home.lab, name)


def in_guest(vm: LabVM, script: str) -> str:
    code, out = agent_call(vm, lambda agent: guest_sh(agent, script), timeout=120)
    assert code == 0, out
    return str(out)


def acked(vm: LabVM) -> list[tuple[int, float]]:
    """The ids the client saw acknowledged, with the guest's clock; none before its first."""
    try:
        data = agent_call(vm, lambda a: a.read_file("/run/ff-acked", max_bytes=8 << 20)).decode()
    except AgentCommandError:
        return []
    return [(int(n), float(at)) for n, at in (line.split() for line in data.splitlines() if len(line.split()) == 2)]


def committed_ids(raw: Path, base: Path) -> set[int]:
    """Start PostgreSQL on a copy of the data directory in the restored disk image (read out
    with debugfs, never mounted) and list the committed ids."""
    data = base / "data"
    subprocess.run(["debugfs", "-R", f"rdump /15/main {base}", str(raw)], check=True, capture_output=True)
    (base / "main").rename(data)
    # Debian keeps the configuration in /etc/postgresql, on the root disk: a minimal one here.
    (data / "postgresql.conf").write_text("listen_addresses = ''\n")
    (data / "pg_hba.conf").write_text("local all all trust\n")
    (data / "pg_ident.conf").write_text("")
    (data / "postmaster.pid").unlink(missing_ok=True)  # the guest's server's, as after a power cut
    subprocess.run(["chown", "-R", "postgres:postgres", str(data)], check=True)
    data.chmod(0o700)
    sock = base / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    port = free_port()
    start = subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-o",
                            f"-k {sock} -p {port}", "-l", str(sock / "log"), "-w", "-t", "120", "start"],
                           capture_output=True, text=True, check=False)
    log = sock / "log"
    assert start.returncode == 0, start.stdout + start.stderr + (log.read_text() if log.exists() else "")
    try:
        out = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-h", str(sock), "-p", str(port), "-qAt",
                              "-c", "SELECT id FROM acked"], capture_output=True, text=True, check=True).stdout
        return {int(line) for line in out.split()}
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast",
                        "-w", "stop"], capture_output=True, check=False)


def test_the_stock_hook_makes_snapshots_and_backups_application_consistent(
        home: Home, debian: LabVM, tmp_path: Path) -> None:
    in_guest(debian, CLIENT)
    deadline = time.monotonic() + 120
    while len(acked(debian)) < 5:
        assert time.monotonic() < deadline, "the client in the guest commits nothing"
        time.sleep(0.5)

    snap = created(home, debian.name, "--consistency", "application", "--freeze-timeout", "60")
    assert snap["consistency"] == "application", snap["fallback_reasons"]
    assert [(w["name"], w["where"], w["status"]) for w in snap["writers"]] == [("10-postgresql", "guest", "ok")]
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    hook = manifest["writers"][0]["manifest"]
    assert (hook["freeze_exit_status"], hook["thaw_exit_status"]) == (0, 0)
    assert manifest["guest_os"]["id"] == "debian"
    phases = snap["freeze_phases"]
    assert phases["resolution_ms"] == 1000
    assert phases["hooks_freeze_ms"] is not None

    repo = tmp_path / "repo"
    init_repo(home, repo)
    backup, done = cli_json(home, "backup", "create", debian.name, "--repo", str(repo), "--consistency",
                            "application", "--freeze-timeout", "60")
    assert done.returncode == 0, done.stderr
    point = json.loads(run_cli(home, "snapshot", "manifest", backup["id"]).stdout)
    assert point["achieved_level"] == "application", point["fallback_reasons"]
    began = point["guest_hooks"]["freeze_started_at_guest_clock"]
    assert began, point["guest_hooks"]

    # Restored: PostgreSQL starts on it, and every commit the client saw acknowledged before
    # the freeze began is there (the log's whole second: acknowledged before it began, surely).
    disks = restore(home, backup["id"], tmp_path / "restored")
    with open_base() as base:
        present = committed_ids(disks["ffdata1"], base)
    before = {n for n, at in acked(debian) if at < began}
    assert before, "nothing was acknowledged before the freeze"
    assert before <= present, f"lost {len(before - present)} acknowledged commits"


def restart_agent(vm: LabVM, extra: str) -> None:
    """qemu-ga restarted by systemd with ``extra`` arguments (a drop-in), a second after
    this command returns (a restart now would cut the guest-exec that asks for it); back
    when another qemu-ga process answers."""
    before = in_guest(vm, "pidof qemu-ga").strip()
    in_guest(vm, f"""
cat > /etc/systemd/system/qemu-guest-agent.service.d/zz-test.conf <<'EOF'
[Service]
ExecStart=
ExecStart=/usr/sbin/qemu-ga -F/etc/qemu/fsfreeze-hook {extra}
EOF
systemctl daemon-reload
systemd-run --on-active=1 systemctl restart qemu-guest-agent
""")
    # Each probe gets a short timeout: one sent while the old agent stops is never answered.
    deadline = time.monotonic() + 180
    while True:
        with contextlib.suppress(AgentError, TimeoutError):
            code, out = agent_call(vm, lambda agent: guest_sh(agent, "pidof qemu-ga", timeout=10), timeout=10)
            if code == 0 and out.strip() not in ("", before):
                return
        assert time.monotonic() < deadline, "qemu-ga did not come back"
        time.sleep(0.5)


def test_a_failing_stock_hook_and_blocked_file_reads_step_down_with_their_reason(
        home: Home, debian: LabVM) -> None:
    in_guest(debian, "printf '#!/bin/sh\\n[ \"$1\" = freeze ] && exit 4\\nexit 0\\n' "
                     "> /etc/qemu/fsfreeze-hook.d/20-fail && chmod 0755 /etc/qemu/fsfreeze-hook.d/20-fail")
    try:
        snap = created(home, debian.name, "--consistency", "application", "--freeze-timeout", "60")
    finally:
        in_guest(debian, "rm -f /etc/qemu/fsfreeze-hook.d/20-fail")
    assert snap["consistency"] == "filesystem"  # the stock script ignores the status: the file systems froze
    assert snap["fallback_reasons"] == ["guest hook 20-fail failed: freeze exited with status 4"]

    try:
        restart_agent(debian, "--block-rpcs=guest-file-open")
        snap = created(home, debian.name, "--consistency", "application", "--freeze-timeout", "60")
        assert snap["consistency"] == "filesystem"
        assert len(snap["fallback_reasons"]) == 1
        assert "the guest agent blocks guest-file-open" in snap["fallback_reasons"][0]
    finally:
        restart_agent(debian, "")  # as it was


def test_the_sh_runner_installed_on_debian_thaws_in_reverse_and_kills_a_hook_at_its_timeout(
        home: Home, debian: LabVM) -> None:
    in_guest(debian, "printf '#!/bin/sh\\n[ \"$1\" = freeze ] && sleep 600\\nexit 0\\n' "
                     "> /etc/qemu/fsfreeze-hook.d/30-hang && chmod 0755 /etc/qemu/fsfreeze-hook.d/30-hang && "
                     "install -m 0755 /etc/qemu/fsfreeze-hook.d/10-postgresql /etc/qemu/fsfreeze-hook.d/20-again")
    # A timeout that a CHECKPOINT through runuser and psql meets on a loaded TCG host.
    done = run_cli(home, "guest", "install", debian.name, "--timeout", "20", "--on-failure", "continue",
                   "-o", "json")
    assert done.returncode == 0, done.stderr
    installed = json.loads(done.stdout)
    assert installed["path"] == "/etc/qemu/fsfreeze-hook"
    assert "command line" in installed["found_by"]
    assert in_guest(debian, "command -v python3 || echo none").strip() == "none"  # the runner needs none

    snap = created(home, debian.name, "--consistency", "application", "--freeze-timeout", "120")
    statuses = {w["name"]: (w["status"], w["error"]) for w in snap["writers"]}
    assert statuses == {"10-postgresql": ("ok", None), "20-again": ("ok", None),
                        "30-hang": ("failed", "no answer within 20s; killed")}
    assert snap["consistency"] == "filesystem"  # under "continue" the freeze went on without it
    result = json.loads(agent_call(debian, lambda a: a.read_file("/run/freezeframe/hook-result.json")))
    assert [e["name"] for e in result["thaw"]] == ["20-again", "10-postgresql"]
    assert snap["freeze_phases"]["resolution_ms"] == 10
    assert snap["freeze_phases"]["hooks_freeze_ms"] >= 20000

    # Without the hanging hook: application, through the runner.
    in_guest(debian, "rm /etc/qemu/fsfreeze-hook.d/30-hang")
    snap = created(home, debian.name, "--consistency", "application", "--freeze-timeout", "60")
    assert snap["consistency"] == "application", snap["fallback_reasons"]
