#!/usr/bin/python3
"""freezeframe's guest hook runner: what qemu-ga runs as its fsfreeze hook (``qemu-ga -F``).

A drop-in for qemu-ga's fsfreeze-hook script, with what it lacks:

* ``freeze`` runs the executables in the hook directory in alphabetical order; ``thaw``
  runs, in reverse order, only those whose freeze succeeded.
* Each hook has a timeout; at the timeout its whole process group is killed.
* A hook that fails (or hangs, or is refused) fails the freeze when the policy is
  ``fail``: the hooks already frozen are thawed again and the exit status is non-zero, so
  qemu-ga freezes nothing. With ``continue`` the freeze goes on and the failure is reported.
* Hooks not owned by root, or writable by group or others, are refused and not run.
* The result (each hook's status, duration, bounded output) is written as JSON on tmpfs,
  where the host reads it after the thaw with guest-file-read.
* A deadman: when the freeze goes ahead, a detached process is armed that thaws every
  file system itself (FITHAW) if no thaw comes within the host's deadline (written to
  ``/run/freezeframe-deadman-request.json`` by the host before the freeze; ``deadman_s`` of the config
  otherwise). It covers what no host-side guard can: the host process, its guard and the
  agent socket's peer all gone at once, with qemu-ga waiting for a thaw that never comes
  (it never thaws by itself). What it did goes to ``deadman.log`` and the kernel log.

The thaw always exits 0: qemu-ga runs it after thawing the file systems, and a failing
thaw hook must not make the host believe the guest is still frozen.

Configuration: ``/etc/freezeframe/guest-hooks.json`` (``FREEZEFRAME_HOOK_CONFIG``)::

    {"hook_dir": "/etc/qemu/fsfreeze-hook.d", "timeout": 10, "on_failure": "fail", "deadman_s": 60}

Standard library only, Python 3.8 or newer: it runs inside guests.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from typing import Any

CONFIG = os.environ.get("FREEZEFRAME_HOOK_CONFIG", "/etc/freezeframe/guest-hooks.json")
STATE_DIR = os.environ.get("FREEZEFRAME_HOOK_STATE_DIR", "/run/freezeframe")
RESULT = STATE_DIR + "/hook-result.json"
STATE = STATE_DIR + "/hook-state.json"
DEADMAN_REQUEST = os.environ.get("FREEZEFRAME_DEADMAN_REQUEST", "/run/freezeframe-deadman-request.json")
DEADMAN_STATE = STATE_DIR + "/deadman.json"
DEADMAN_LOG = STATE_DIR + "/deadman.log"
#: The mount table the deadman thaws from (another one only in the runner's own tests).
MOUNTS = os.environ.get("FREEZEFRAME_HOOK_MOUNTS", "/proc/self/mounts")
KMSG = os.environ.get("FREEZEFRAME_HOOK_KMSG", "/dev/kmsg")
FORMAT = "freezeframe-guest-hooks/1"
DEFAULTS: dict[str, Any] = {"hook_dir": "/etc/qemu/fsfreeze-hook.d", "timeout": 10.0, "on_failure": "fail",
                            "deadman_s": 60.0}
OUTPUT_LIMIT = 4096
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
#: Never frozen by FIFREEZE, or not worth the ioctl.
PSEUDO = {"proc", "sysfs", "devtmpfs", "devpts", "tmpfs", "cgroup", "cgroup2", "securityfs", "debugfs",
          "tracefs", "pstore", "bpf", "mqueue", "hugetlbfs", "configfs", "fusectl", "autofs", "rootfs",
          "ramfs", "efivarfs", "binfmt_misc", "nsfs", "rpc_pipefs"}


def load_config() -> dict[str, Any]:
    config = dict(DEFAULTS)
    try:
        with open(CONFIG) as handle:
            loaded = json.load(handle)
        if isinstance(loaded, dict):
            config.update({k: v for k, v in loaded.items() if k in DEFAULTS})
    except (OSError, ValueError):
        pass
    if config["on_failure"] not in ("fail", "continue"):
        config["on_failure"] = "fail"
    for key, least in (("timeout", 0.1), ("deadman_s", 1.0)):
        try:
            config[key] = max(least, float(str(config[key])))
        except (TypeError, ValueError):
            config[key] = DEFAULTS[key]
    return config


def unsafe(path: str) -> str | None:
    """Why ``path`` must not be run as root, or None if it may."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != 0:
        return "not owned by root (uid %d)" % st.st_uid
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by group or others (mode %o)" % stat.S_IMODE(st.st_mode)
    return None


def hooks(hook_dir: str) -> tuple[list[str], str | None]:
    """The hooks to consider, in order; the directory itself must be safe too."""
    try:
        names = sorted(os.listdir(hook_dir))
    except OSError:
        return [], None
    st = os.stat(hook_dir)
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return [], "hook directory %s is not root-owned or is writable by group or others" % hook_dir
    found = []
    for name in names:
        path = os.path.join(hook_dir, name)
        if name.startswith(".") or name.endswith(("~", ".dpkg-old", ".dpkg-new", ".rpmsave", ".rpmnew")):
            continue
        if os.path.isfile(path) and os.access(path, os.X_OK):
            found.append(path)
    return found, None


def run(path: str, action: str, timeout: float) -> dict[str, Any]:
    start = time.monotonic()
    entry: dict[str, Any] = {"name": os.path.basename(path), "action": action}
    try:
        process = subprocess.Popen([path, action], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as err:
        entry.update(status="failed", error="cannot run: %s" % err.strerror, duration_ms=0.0)
        return entry
    try:
        output, _ = process.communicate(timeout=timeout)
        entry["exit_code"] = process.returncode
        entry["status"] = "ok" if process.returncode == 0 else "failed"
        if process.returncode != 0:
            entry["error"] = "exited with %d" % process.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the hook and everything it started
        output, _ = process.communicate()
        entry.update(status="failed", error="no answer within %gs; killed" % timeout)
    text = output.decode("utf-8", "replace")
    entry["output"] = text if len(text) <= OUTPUT_LIMIT else "..." + text[-OUTPUT_LIMIT:]
    entry["duration_ms"] = round((time.monotonic() - start) * 1000, 1)
    return entry


def write_json(path: str, data: Any) -> None:
    os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as handle:
        json.dump(data, handle)
    os.replace(temporary, path)


def read_json(path: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def age_ms(began: float) -> float:
    """Milliseconds since this process started: qemu-ga's freeze (or thaw) waits for all of
    it, the interpreter's start-up included (seconds under emulation). From the kernel's
    start time of the process (clock ticks); since ``began`` where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as stat_file:
            ticks = int(stat_file.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            now = float(uptime.read().split()[0])
        return round(max(0.0, now - ticks / os.sysconf("SC_CLK_TCK")) * 1000, 1)
    except (OSError, ValueError, IndexError):
        return round((time.monotonic() - began) * 1000, 1)


def freeze(config: dict[str, Any]) -> int:
    began = time.monotonic()
    result: dict[str, Any] = {"format": FORMAT, "runner": "python", "policy": config["on_failure"],
                              "timeout": config["timeout"], "freeze_started_at": time.time(), "freeze": [],
                              "thaw": [], "status": "frozen", "clock_resolution_ms": 10}
    paths, problem = hooks(config["hook_dir"])
    if problem:
        result["freeze"].append({"name": config["hook_dir"], "action": "freeze", "status": "refused",
                                 "error": problem, "duration_ms": 0.0})
    frozen = []
    for path in paths:
        reason = unsafe(path)
        if reason:
            entry = {"name": os.path.basename(path), "action": "freeze", "status": "refused", "error": reason,
                     "duration_ms": 0.0}
        else:
            entry = run(path, "freeze", config["timeout"])
        result["freeze"].append(entry)
        if entry["status"] == "ok":
            frozen.append(path)
        elif config["on_failure"] == "fail":
            break
    failed = any(e["status"] != "ok" for e in result["freeze"])
    if failed and config["on_failure"] == "fail":
        # No thaw will come for a failed freeze: release what already froze, now.
        for path in reversed(frozen):
            result["thaw"].append(run(path, "thaw", config["timeout"]))
        result["status"] = "failed"
        write_json(RESULT, result)
        write_json(STATE, {"frozen": []})
        return 1
    write_json(STATE, {"frozen": frozen})
    result["deadman"] = arm_deadman(config)
    # The hook phase: file systems still writable; qemu-ga freezes them when this exits.
    result["freeze_hooks_ms"] = age_ms(began)
    write_json(RESULT, result)
    return 0


def thaw(config: dict[str, Any]) -> int:
    began = time.monotonic()
    result = read_json(RESULT)
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        result = {"format": FORMAT, "freeze": [], "thaw": []}
    state = read_json(STATE) or {}
    frozen = state.get("frozen", []) if isinstance(state, dict) else []
    for path in reversed([p for p in frozen if isinstance(p, str)]):
        result["thaw"].append(run(path, "thaw", config["timeout"]))
    result["status"] = "thawed"
    result["thawed_at"] = time.time()
    disarm_deadman()
    result["thaw_hooks_ms"] = age_ms(began)  # after qemu-ga's thaw
    write_json(STATE, {"frozen": []})
    write_json(RESULT, result)
    return 0


# -- the deadman -------------------------------------------------------------------------


def arm_deadman(config: dict[str, Any]) -> dict[str, Any]:
    """Start the detached process that thaws the guest if no thaw comes in time."""
    seconds = config["deadman_s"]
    request = read_json(DEADMAN_REQUEST)
    with contextlib.suppress(OSError):
        os.unlink(DEADMAN_REQUEST)  # one request, one freeze
    if isinstance(request, dict):
        with contextlib.suppress(TypeError, ValueError):
            seconds = min(max(1.0, float(str(request.get("thaw_after_s")))), 24 * 3600.0)
    token = secrets.token_hex(8)
    deadline = time.time() + seconds
    write_json(DEADMAN_STATE, {"token": token, "armed": True, "deadline": deadline})
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            deadman(token, deadline)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return {"armed_s": seconds, "token": token}


def deadman(token: str, deadline: float) -> None:
    """Sleep until the deadline; if this freeze is still not thawed, thaw it."""
    while True:
        left = deadline - time.time()
        if left <= 0:
            break
        time.sleep(min(left, 1.0))
        state = read_json(DEADMAN_STATE)
        if not isinstance(state, dict) or state.get("token") != token or not state.get("armed"):
            return  # thawed (or a newer freeze armed its own)
    thawed = thaw_everything()
    write_json(DEADMAN_STATE, {"token": token, "armed": False, "fired_at": time.time(), "thawed": thawed})
    line = ("freezeframe deadman: no thaw came within the deadline; thawed %d file system(s) itself (%s)"
            % (len(thawed), ", ".join(thawed) or "none was frozen"))
    with contextlib.suppress(OSError), open(DEADMAN_LOG, "a") as log:
        log.write("%s %s\n" % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), line))
    with contextlib.suppress(OSError), open(KMSG, "w") as kmsg:
        kmsg.write("<3>%s\n" % line)  # an error (the host side failed): shown even on a quiet console


def thaw_everything() -> list[str]:
    """FITHAW on every mounted file system; the ones that were frozen are returned."""
    thawed: list[str] = []
    try:
        with open(MOUNTS) as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return thawed
    for entry in reversed(entries):  # children before parents, as qemu-ga thaws
        if len(entry) < 3 or entry[2] in PSEUDO:
            continue
        point = entry[1].replace("\\040", " ")
        try:
            fd = os.open(point, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.ioctl(fd, FITHAW, 0)
            thawed.append(point)
        except OSError:
            pass  # not frozen (EINVAL), or cannot be
        finally:
            os.close(fd)
    return thawed


def disarm_deadman() -> None:
    state = read_json(DEADMAN_STATE)
    if isinstance(state, dict) and state.get("armed"):
        state["armed"] = False
        write_json(DEADMAN_STATE, state)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("freeze", "thaw"):
        sys.stderr.write("usage: %s freeze|thaw\n" % argv[0])
        return 2
    config = load_config()
    if argv[1] == "freeze":
        return freeze(config)
    try:
        return thaw(config)
    except Exception as err:  # never fail a thaw: the file systems are thawed already
        sys.stderr.write("thaw hooks: %s\n" % err)
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
