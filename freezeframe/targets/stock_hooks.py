"""Evidence from qemu-ga's stock fsfreeze hook script: its log, read after the thaw.

Distributions ship ``/etc/qemu/fsfreeze-hook``; operators start qemu-ga with
``-F/etc/qemu/fsfreeze-hook`` and drop application hooks into
``/etc/qemu/fsfreeze-hook.d/``. The script runs each hook with ``freeze`` before the
file systems freeze and with ``thaw`` after they thaw, ignores its exit status, and logs
two lines per hook, with the guest's ``date`` (one-second resolution)::

    Mon Nov 30 03:07:59 UTC 2026: execute /etc/qemu/fsfreeze-hook.d/10-postgresql freeze
    ... whatever the hook printed ...
    Mon Nov 30 03:08:02 UTC 2026: /etc/qemu/fsfreeze-hook.d/10-postgresql finished with status=0

The log is the guest's and untrusted. Only what was appended since the probe is read
(bounded), and of that only lines whose time lies between the guest's clock at the probe
and after the thaw, with a second of slack each side for the log's resolution (times are
compared only when the log is in UTC, as ``date`` prints it on a guest without TZ set).
A hook's outcome is what the log shows: a freeze and a thaw that both finished with
status 0 is ``ok``; anything else is ``failed`` with what was (or was not) seen.
"""

from __future__ import annotations

import calendar
import re
import time
from typing import Any

SCRIPT_PATH = "/etc/qemu/fsfreeze-hook"
LOG_PATH = "/var/log/qga-fsfreeze-hook.log"
HOOK_DIR = "/etc/qemu/fsfreeze-hook.d"
#: What is read of the log after the probe; a freeze's lines are a few hundred bytes.
MAX_BYTES = 256 * 1024
RESOLUTION_S = 1.0
NO_LOG = (f"the stock fsfreeze-hook left no log ({LOG_PATH}): for application-consistent snapshots, start "
          f"qemu-ga with -F{SCRIPT_PATH} and put executable hooks in {HOOK_DIR}/, or install freezeframe's hook "
          "runner (freezeframe guest install NAME)")
NONE_IN_LOG = f"the stock fsfreeze-hook's log ({LOG_PATH}) shows no hook run by this freeze"
_MAX_HOOKS = 256
_OUTPUT_LIMIT = 4096

_DATE = r"(?P<date>[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d (?P<zone>[A-Za-z0-9+-]{1,8}) \d{4})"
_EXECUTE = re.compile(_DATE + r": execute (?P<path>/[^\s]{1,1024}) (?P<action>freeze|thaw)$")
_FINISHED = re.compile(_DATE + r": (?P<path>/[^\s]{1,1024}) finished with status=(?P<status>\d{1,3})$")


def parse_log(data: bytes, *, not_before: float | None = None, not_after: float | None = None,
              truncated: bool = False) -> dict[str, Any]:
    """This freeze's hooks from the log's new lines: ``{"writers": [...], "summary": {...}}``
    in the shape the guest hook runner's report has. ``not_before``/``not_after``: the
    guest's clock (seconds since the epoch) at the probe and after the thaw."""
    hooks: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    current: dict[str, Any] | None = None  # the run whose output the next lines are
    ignored = 0
    for raw in data.decode("utf-8", "replace").splitlines():
        line = raw.rstrip("\r")
        match = _EXECUTE.match(line) or _FINISHED.match(line)
        if match is None:
            if current is not None and len(current["output"]) < _OUTPUT_LIMIT:
                current["output"] += line[:_OUTPUT_LIMIT] + "\n"
            continue
        at = _when(match["date"], match["zone"])
        if not _within(at, not_before, not_after):
            ignored += 1
            current = None
            continue
        name = match["path"].rsplit("/", 1)[-1][:255]
        if name not in hooks:
            if len(hooks) >= _MAX_HOOKS:
                continue
            hooks[name] = {}
            order.append(name)
        if match.re is _EXECUTE:
            current = {"started": at, "finished": None, "status": None, "output": ""}
            hooks[name][match["action"]] = current
        else:
            run = next((r for r in (hooks[name].get("thaw"), hooks[name].get("freeze"))
                        if r is not None and r["status"] is None), None)
            if run is not None:
                run["finished"], run["status"] = at, int(match["status"])
            current = None
    writers = [_writer(name, hooks[name]) for name in order]
    freeze_runs = [hooks[n]["freeze"] for n in order if "freeze" in hooks[n]]
    thaw_runs = [hooks[n]["thaw"] for n in order if "thaw" in hooks[n]]
    summary: dict[str, Any] = {
        "runner": f"stock fsfreeze-hook ({SCRIPT_PATH})",
        "log": LOG_PATH,
        "resolution_s": RESOLUTION_S,
        "freeze_hooks_s": _span(freeze_runs),
        "thaw_hooks_s": _span(thaw_runs),
        "lines_outside_this_freeze": ignored,
        "freeze_started_at_guest_clock": min((r["started"] for r in freeze_runs if r["started"] is not None),
                                             default=None),
    }
    if not writers:
        summary["no_hook_because"] = NONE_IN_LOG
    if truncated:
        summary["truncated"] = f"more than {MAX_BYTES} bytes were appended to the log; only the first were read"
    return {"writers": writers, "summary": summary}


def _writer(name: str, runs: dict[str, Any]) -> dict[str, Any]:
    freeze, thaw = runs.get("freeze"), runs.get("thaw")
    error = None
    if freeze is None:
        error = "the log shows no freeze for it"
    elif freeze["status"] is None:
        error = "its freeze has no exit status in the log (killed, or still running?)"
    elif freeze["status"] != 0:
        error = f"freeze exited with status {freeze['status']}"
    elif thaw is None:
        error = "the log shows no thaw for it"
    elif thaw["status"] is None:
        error = "its thaw has no exit status in the log"
    elif thaw["status"] != 0:
        error = f"thaw exited with status {thaw['status']}"
    phases = {action: _ms(run) for action, run in (("freeze", freeze), ("thaw", thaw)) if run is not None}
    return {
        "name": name,
        "kind": "guest-hook",
        "where": "guest",
        "status": "ok" if error is None else "failed",
        "error": error,
        "phases_ms": {k: v for k, v in phases.items() if v is not None},
        "manifest": {
            "evidence": f"{LOG_PATH} (stock fsfreeze-hook), {RESOLUTION_S:g} s timestamps",
            "freeze_exit_status": freeze["status"] if freeze else None,
            "thaw_exit_status": thaw["status"] if thaw else None,
            "freeze_output": freeze["output"] if freeze else "",
            "thaw_output": thaw["output"] if thaw else None,
        },
    }


def _when(date: str, zone: str) -> float | None:
    """Seconds since the epoch, for a date in UTC; None for another zone (not compared)."""
    if zone not in ("UTC", "GMT"):
        return None
    try:
        return float(calendar.timegm(time.strptime(" ".join(date.split()[:4] + date.split()[5:]),
                                                   "%a %b %d %H:%M:%S %Y")))
    except ValueError:
        return None


def _within(at: float | None, not_before: float | None, not_after: float | None) -> bool:
    if at is None:
        return True
    if not_before is not None and at < int(not_before) - RESOLUTION_S:
        return False
    return not (not_after is not None and at > not_after + RESOLUTION_S)


def _ms(run: dict[str, Any] | None) -> float | None:
    if run is None or run["started"] is None or run["finished"] is None:
        return None
    return round(float(run["finished"] - run["started"]) * 1000, 1)


def _span(runs: list[dict[str, Any]]) -> float | None:
    """From the first freeze hook's start to the last one's end, in the log's seconds."""
    starts = [r["started"] for r in runs if r["started"] is not None]
    ends = [r["finished"] for r in runs if r["finished"] is not None]
    if not starts or not ends:
        return None
    return float(max(ends) - min(starts))
