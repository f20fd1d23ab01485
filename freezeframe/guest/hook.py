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

The thaw always exits 0: qemu-ga runs it after thawing the file systems, and a failing
thaw hook must not make the host believe the guest is still frozen.

Configuration: ``/etc/freezeframe/guest-hooks.json`` (``FREEZEFRAME_HOOK_CONFIG``)::

    {"hook_dir": "/etc/qemu/fsfreeze-hook.d", "timeout": 10, "on_failure": "fail"}

Standard library only, Python 3.8 or newer: it runs inside guests.
"""

from __future__ import annotations

import contextlib
import json
import os
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
FORMAT = "freezeframe-guest-hooks/1"
DEFAULTS: dict[str, Any] = {"hook_dir": "/etc/qemu/fsfreeze-hook.d", "timeout": 10.0, "on_failure": "fail"}
OUTPUT_LIMIT = 4096


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
    try:
        config["timeout"] = max(0.1, float(str(config["timeout"])))
    except (TypeError, ValueError):
        config["timeout"] = DEFAULTS["timeout"]
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


def freeze(config: dict[str, Any]) -> int:
    result: dict[str, Any] = {"format": FORMAT, "policy": config["on_failure"], "timeout": config["timeout"],
              "freeze_started_at": time.time(), "freeze": [], "thaw": [], "status": "frozen"}
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
    write_json(RESULT, result)
    return 0


def thaw(config: dict[str, Any]) -> int:
    result = read_json(RESULT)
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        result = {"format": FORMAT, "freeze": [], "thaw": []}
    state = read_json(STATE) or {}
    frozen = state.get("frozen", []) if isinstance(state, dict) else []
    for path in reversed([p for p in frozen if isinstance(p, str)]):
        result["thaw"].append(run(path, "thaw", config["timeout"]))
    result["status"] = "thawed"
    result["thawed_at"] = time.time()
    write_json(STATE, {"frozen": []})
    write_json(RESULT, result)
    return 0


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
