"""The guest hook runners themselves (freezeframe/guest/hook.py, and hook.sh for guests
without Python), run as qemu-ga would run them: a separate process, ``freeze`` then
``thaw``, with real hook executables. Every test runs on both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hostfs import data_fs, thaw_quietly

import freezeframe.guest

RUNNERS = {"python": [sys.executable, str(Path(freezeframe.guest.__file__).parent / "hook.py")],
           "sh": ["sh", str(Path(freezeframe.guest.__file__).parent / "hook.sh")]}


@pytest.fixture(params=sorted(RUNNERS))
def runner(request: pytest.FixtureRequest) -> list[str]:
    return RUNNERS[request.param]


class Hooks:
    def __init__(self, runner: list[str], root: Path, policy: str = "fail", timeout: float = 5) -> None:
        self.runner = runner
        self.dir = root / "hook.d"
        self.dir.mkdir(mode=0o755)
        self.state = root / "state"
        self.log = root / "calls.log"
        self.config = root / "config.json"
        self.config.write_text(json.dumps({"hook_dir": str(self.dir), "on_failure": policy, "timeout": timeout}))
        # The deadman thaws only what this table lists: file systems a test made itself.
        self.mounts = root / "mounts"
        self.mounts.write_text("")
        self.request = root / "deadman-request.json"

    def add(self, name: str, body: str = "", mode: int = 0o755) -> Path:
        path = self.dir / name
        path.write_text(f'#!/bin/sh\necho "{name} $1" >> {self.log}\n{body}\n')
        path.chmod(mode)
        return path

    def run(self, action: str) -> int:
        env = dict(os.environ, FREEZEFRAME_HOOK_CONFIG=str(self.config), FREEZEFRAME_HOOK_STATE_DIR=str(self.state),
                   FREEZEFRAME_HOOK_MOUNTS=str(self.mounts), FREEZEFRAME_DEADMAN_REQUEST=str(self.request),
                   FREEZEFRAME_HOOK_KMSG=os.devnull)
        return subprocess.run([*self.runner, action], env=env, capture_output=True,
                              timeout=60, check=False).returncode

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def report(self) -> dict[str, Any]:
        return dict(json.loads((self.state / "hook-result.json").read_text()))


def test_freeze_in_order_thaw_in_reverse(runner: list[str], tmp_path: Path) -> None:
    hooks = Hooks(runner, tmp_path)
    for name in ("10-a", "20-b", "30-c"):
        hooks.add(name)
    assert hooks.run("freeze") == 0
    assert hooks.run("thaw") == 0
    assert hooks.calls() == ["10-a freeze", "20-b freeze", "30-c freeze", "30-c thaw", "20-b thaw", "10-a thaw"]
    report = hooks.report()
    assert report["status"] == "thawed"
    assert [e["status"] for e in report["freeze"] + report["thaw"]] == ["ok"] * 6


def test_under_continue_only_hooks_that_froze_are_thawed(runner: list[str], tmp_path: Path) -> None:
    hooks = Hooks(runner, tmp_path, policy="continue")
    hooks.add("10-a")
    hooks.add("20-b", 'if [ "$1" = freeze ]; then exit 4; fi')
    hooks.add("30-c")
    assert hooks.run("freeze") == 0  # the freeze goes on; the failure is reported
    assert hooks.run("thaw") == 0
    assert hooks.calls() == ["10-a freeze", "20-b freeze", "30-c freeze", "30-c thaw", "10-a thaw"]
    failed = [e for e in hooks.report()["freeze"] if e["status"] != "ok"]
    assert [(e["name"], e["error"]) for e in failed] == [("20-b", "exited with 4")]


def test_under_fail_a_failure_stops_the_freeze_and_releases_what_froze(runner: list[str], tmp_path: Path) -> None:
    hooks = Hooks(runner, tmp_path, policy="fail")
    hooks.add("10-a")
    hooks.add("20-b", 'if [ "$1" = freeze ]; then exit 4; fi')
    hooks.add("30-c")
    assert hooks.run("freeze") == 1  # qemu-ga will not freeze
    assert hooks.calls() == ["10-a freeze", "20-b freeze", "10-a thaw"]
    assert hooks.report()["status"] == "failed"
    assert hooks.run("thaw") == 0  # a thaw after that finds nothing to release
    assert hooks.calls()[-1] == "10-a thaw"


def test_a_hung_hook_is_killed_with_its_children_at_its_timeout(runner: list[str], tmp_path: Path) -> None:
    hooks = Hooks(runner, tmp_path, policy="fail", timeout=1)
    marker = f"{4000 + os.getpid() % 1000}.{time.monotonic_ns() % 1000:03d}"
    hooks.add("10-hang", f'if [ "$1" = freeze ]; then sleep {marker} & sleep {marker}; fi')
    start = time.monotonic()
    assert hooks.run("freeze") == 1
    assert time.monotonic() - start < 10
    entry = hooks.report()["freeze"][0]
    assert entry["error"] == "no answer within 1s; killed"
    time.sleep(0.3)
    left = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True, check=False).stdout
    assert left == ""


@pytest.mark.parametrize(("owner", "mode", "reason"), [
    (0, 0o775, "writable by group or others"),
    (0, 0o757, "writable by group or others"),
    (65534, 0o755, "not owned by root"),
])
def test_unsafe_hooks_are_refused_and_not_run(runner: list[str], tmp_path: Path, owner: int, mode: int,
                                              reason: str) -> None:
    hooks = Hooks(runner, tmp_path, policy="continue")
    hooks.add("10-ok")
    bad = hooks.add("20-bad", mode=mode)
    os.chown(bad, owner, 0)
    assert hooks.run("freeze") == 0
    assert hooks.calls() == ["10-ok freeze"]  # never ran
    refused = hooks.report()["freeze"][1]
    assert refused["status"] == "refused"
    assert reason in refused["error"]


def test_the_deadman_thaws_a_freeze_no_thaw_came_for_and_a_thaw_disarms_it(runner: list[str], tmp_path: Path) -> None:
    """A real file system frozen with FIFREEZE (a loop mount made here), then the runner's
    freeze with a one-second deadline and no thaw: the deadman thaws it and says so."""
    with data_fs(tmp_path) as fs:
        (tmp_path / "runner").mkdir()
        hooks = Hooks(runner, tmp_path / "runner")
        hooks.add("10-a")
        hooks.mounts.write_text(f"/dev/loop-test {fs.mountpoint} ext4 rw 0 0\n")
        hooks.request.write_text(json.dumps({"thaw_after_s": 1}))
        try:
            subprocess.run(["fsfreeze", "--freeze", str(fs.mountpoint)], check=True)
            assert hooks.run("freeze") == 0
            assert hooks.report()["deadman"]["armed_s"] == 1
            assert not hooks.request.exists(), "a deadline request serves one freeze"
            log = hooks.state / "deadman.log"
            deadline = time.monotonic() + 30
            while not log.exists():
                assert time.monotonic() < deadline, "the deadman never fired"
                time.sleep(0.1)
            assert f"thawed 1 file system(s) itself ({fs.mountpoint})" in log.read_text()
            (fs.mountpoint / "written-after").write_text("the file system takes writes again\n")
        finally:
            thaw_quietly(fs.mountpoint)

        # A thaw in time disarms it: no second line, even well past its deadline.
        hooks.request.write_text(json.dumps({"thaw_after_s": 1}))
        assert hooks.run("freeze") == 0
        assert hooks.run("thaw") == 0
        time.sleep(2.5)  # the deadman polls every second: past its deadline by then
        assert len(log.read_text().splitlines()) == 1
