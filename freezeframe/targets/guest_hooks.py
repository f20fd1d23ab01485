"""Reading what the guest hook runner (``freezeframe/guest/hook.py``) reported.

The report comes from inside the guest, so it is untrusted: its size is bounded by the
read, and every field is checked for type and length before anything is kept. A report
that does not check out is an AgentProtocolError, never a crash or a guess.
"""

from __future__ import annotations

import json
import math
from typing import Any

from freezeframe.errors import AgentProtocolError

FORMAT = "freezeframe-guest-hooks/1"
RESULT_PATH = "/run/freezeframe/hook-result.json"
CONFIG_PATH = "/etc/freezeframe/guest-hooks.json"
#: The host writes the deadline for the runner's deadman here before each freeze (in /run
#: itself: the runner's own folder appears only at its first freeze) ...
DEADMAN_REQUEST_PATH = "/run/freezeframe-deadman-request.json"
#: ... and reads here, at the next probe, what a deadman that fired did.
DEADMAN_LOG_PATH = "/run/freezeframe/deadman.log"
MAX_BYTES = 1 << 20
_MAX_HOOKS = 256
_STATUSES = ("ok", "failed", "refused")


def parse_hook_result(data: bytes) -> dict[str, Any]:
    """Check a report and return it as writer manifests plus a summary:
    ``{"writers": [...], "summary": {...}}``."""
    if len(data) > MAX_BYTES:
        raise AgentProtocolError(f"the guest hook report is {len(data)} bytes, more than {MAX_BYTES}")
    try:
        report = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise AgentProtocolError("the guest hook report is not JSON") from err
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise AgentProtocolError("the guest hook report is not a freezeframe-guest-hooks/1 document")
    freeze = [_entry(e, "freeze") for e in _list(report.get("freeze"), "freeze")]
    thaw = {e["name"]: e for e in (_entry(e, "thaw") for e in _list(report.get("thaw", []), "thaw"))}
    writers = []
    for entry in freeze:
        released = thaw.get(entry["name"])
        if entry["status"] != "ok":
            status, error = entry["status"] if entry["status"] == "refused" else "failed", entry.get("error")
        elif released is None:
            status, error = "released", "no thaw was run for it"
        elif released["status"] != "ok":
            status, error = "failed", f"thaw: {released.get('error')}"
        else:
            status, error = "ok", None
        phases = {"freeze": entry["duration_ms"]}
        if released is not None:
            phases["thaw"] = released["duration_ms"]
        writers.append({
            "name": entry["name"],
            "kind": "guest-hook",
            "where": "guest",
            "status": status,
            "error": error,
            "phases_ms": phases,
            "manifest": {
                "freeze_output": entry.get("output", ""),
                "thaw_output": released.get("output", "") if released else None,
            },
        })
    summary = {
        "runner": f"freezeframe's guest hook runner ({_text(report.get('runner', 'python'), 'runner', 16)})",
        "status": _text(report.get("status", ""), "status", 32),
        "policy": _text(report.get("policy", ""), "policy", 32),
        "freeze_started_at_guest_clock": _number(report.get("freeze_started_at"), "freeze_started_at"),
        "thawed_at_guest_clock": _number(report.get("thawed_at"), "thawed_at"),
    }
    for key in ("freeze_hooks_ms", "thaw_hooks_ms", "clock_resolution_ms"):
        if report.get(key) is not None:
            summary[key] = _number(report.get(key), key)
    deadman = report.get("deadman")
    if deadman is not None:
        if not isinstance(deadman, dict):
            raise AgentProtocolError("the guest hook report's deadman is not an object")
        summary["deadman_armed_s"] = _number(deadman.get("armed_s"), "deadman armed_s")
    return {"writers": writers, "summary": summary}


def _list(value: object, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > _MAX_HOOKS:
        raise AgentProtocolError(f"the guest hook report's {what} is not a list of at most {_MAX_HOOKS}")
    return value


def _entry(value: object, action: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AgentProtocolError(f"a guest hook {action} entry is not an object")
    status = value.get("status")
    if status not in _STATUSES:
        raise AgentProtocolError(f"a guest hook {action} entry has status {str(status)[:20]!r}")
    entry: dict[str, Any] = {
        "name": _text(value.get("name"), "name", 255),
        "status": status,
        "duration_ms": _number(value.get("duration_ms"), "duration_ms") or 0.0,
        "output": _text(value.get("output", ""), "output", 8192),
    }
    if value.get("error") is not None:
        entry["error"] = _text(value["error"], "error", 1024)
    return entry


def _text(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise AgentProtocolError(f"the guest hook report's {what} is not a string")
    return value if len(value) <= limit else value[:limit] + "..."


def _number(value: object, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise AgentProtocolError(f"the guest hook report's {what} is not a non-negative number")
    return float(value)
