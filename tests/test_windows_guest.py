"""Windows guests, through a fake qemu-ga for Windows at the socket seam (this machine
cannot run Windows; see fake_windows_agent.py for where each answer comes from), next to a
real QEMU: the instance's QMP is a real lab VM's, so the snapshot itself is real."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, unique
from fake_windows_agent import FakeWindowsAgent

from freezeframe.config import Home
from freezeframe.lab import vm as lab_vm
from freezeframe.lab.vm import LabVM

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def windows_host_vm(home: Home) -> Iterator[LabVM]:
    """A real VM whose QMP the Windows instances use (its own Linux agent is not used)."""
    name = unique("winqmp")
    vm = lab_vm.up(home.lab, home.images, name, disks=1)
    try:
        yield vm
    finally:
        lab_vm.down(home.lab, name)


def windows_instance(home: Home, vm: LabVM, agent: FakeWindowsAgent) -> str:
    name = unique("win")
    done = run_cli(home, "instance", "add", name, "--qmp", vm.qmp_socket, "--qga", str(agent.socket_path))
    assert done.returncode == 0, done.stderr
    return name


def snapshot(home: Home, instance: str, *args: str) -> tuple[dict[str, Any], dict[str, Any], int]:
    done = run_cli(home, "snapshot", "create", instance, "--consistency", "filesystem", "-o", "json", *args)
    assert done.stdout, done.stderr
    snap = json.loads(done.stdout)
    manifest = json.loads(run_cli(home, "snapshot", "manifest", snap["id"]).stdout)
    if snap["state"] == "created":
        assert run_cli(home, "snapshot", "delete", snap["id"]).returncode == 0  # keep the VM's chain short
    return snap, manifest, done.returncode


def test_a_normal_vss_freeze_gives_filesystem_level_within_the_vss_limit(
        home: Home, windows_host_vm: LabVM, tmp_path: Path) -> None:
    with FakeWindowsAgent(tmp_path / "qga.sock") as agent:
        name = windows_instance(home, windows_host_vm, agent)
        snap, manifest, code = snapshot(home, name)
        assert code == 0
        assert snap["consistency"] == "filesystem", snap["fallback_reasons"]
        assert manifest["guest_os"]["id"] == "mswindows"
        assert manifest["guest_os"]["pretty_name"] == "Windows Server 2022 Standard"
        # The freeze budget is held under VSS's 10 s, and the record says why.
        assert manifest["policy"]["freeze_budget_s"] == 9
        assert any("freeze budget lowered from 10s to 9s: Windows VSS holds writes for at most 10 s"
                   in e["event"] for e in manifest["events"])
        assert agent.log.count("guest-fsfreeze-freeze") == 1
        assert agent.log.count("guest-fsfreeze-thaw") == 1
        assert not agent.frozen

        # instance check names the guest's OS and the VSS rule.
        done = run_cli(home, "instance", "check", name, "-o", "json")
        findings = {f["check"]: f for f in json.loads(done.stdout)["checks"]}
        assert "Windows Server 2022 Standard" in findings["guest os"]["detail"]
        assert "VSS" in findings["guest os"]["detail"]


def test_a_freeze_vss_could_not_hold_for_11_s_is_recorded_at_crash_level(
        home: Home, windows_host_vm: LabVM, tmp_path: Path) -> None:
    with FakeWindowsAgent(tmp_path / "qga.sock", guest_seconds=11) as agent:
        name = windows_instance(home, windows_host_vm, agent)
        snap, manifest, code = snapshot(home, name)
        assert code == 0
        assert snap["consistency"] == "crash"
        [reason] = snap["fallback_reasons"]
        assert "fsfreeze is limited up to 10 seconds" in reason
        assert "Windows VSS holds writes for at most 10 s" in reason
        assert "not file-system consistent" in reason
        assert not agent.frozen  # the thaw answered with an error, and the guest is thawed all the same
        assert manifest["window"]["thawed_at"]

        # Asked to fail instead: no snapshot, and the record says why.
        failed, _, code = snapshot(home, name, "--on-failure", "fail")
        assert code != 0
        assert failed["state"] == "failed"
        assert "fsfreeze is limited up to 10 seconds" in (failed["error"] or "")
        assert not agent.frozen


@pytest.mark.parametrize(("mode", "says"), [
    ("no-provider", "the guest has no usable VSS provider (qemu-ga answers: this feature or command is not "
                    "currently supported)"),
    ("service-disabled", "VSS could not freeze the guest (qemu-ga: failed to initialize for backup: The service "
                         "cannot be started"),
    ("not-registered", "VSS could not freeze the guest: the QEMU guest agent's VSS provider is not registered "
                       "with VSS (VSS_E_PROVIDER_NOT_REGISTERED)"),
])
def test_a_missing_or_stopped_vss_gives_a_clear_reason_and_the_fallback(
        home: Home, windows_host_vm: LabVM, tmp_path: Path, mode: str, says: str) -> None:
    with FakeWindowsAgent(tmp_path / "qga.sock", mode=mode) as agent:
        name = windows_instance(home, windows_host_vm, agent)
        snap, manifest, code = snapshot(home, name)
        assert code == 0
        assert snap["consistency"] == "crash"
        assert any(says in reason for reason in snap["fallback_reasons"]), snap["fallback_reasons"]
        assert any("reinstall the QEMU guest agent with its VSS provider" in r for r in snap["fallback_reasons"])
        assert manifest["guest_os"]["id"] == "mswindows"
        assert not agent.frozen
        if mode == "no-provider":
            assert "guest-fsfreeze-freeze" not in agent.log  # known unusable in preflight
            done = run_cli(home, "instance", "check", name, "-o", "json")
            findings = {f["check"]: f for f in json.loads(done.stdout)["checks"]}
            assert findings["freeze"]["status"] == "fail"
            assert "no usable VSS provider" in findings["freeze"]["detail"]
