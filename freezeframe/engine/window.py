"""The freeze window, split into its two phases, as precisely as the evidence allows.

The guest agent's freeze command first runs the guest's freeze hooks (applications
quiesce; the file systems still take writes), then freezes the file systems; its thaw
command thaws them first, then runs the thaw hooks. So of the window the host measures,
from sending the freeze to the thaw's reply, only the middle froze the file systems:

    freeze sent ─ hooks (freeze) ─ FIFREEZE ─ freeze returned ... thaw sent ─ FITHAW ─ hooks (thaw) ─ thaw returned
                  └ apps held ─┘     └──────────────── file systems frozen ───────────────┘

The host's own instants bound the frozen phase: it surely covers *freeze returned* to *thaw
sent*, and at most the window less the hooks' time. The hooks' time comes from the guest:
freezeframe's runner measures it (1 ms for the Python one, 10 ms for the sh one: the
resolution of its clock); the stock hook's log has whole seconds, so its figure may be off
by a second either way. Without hook evidence the hooks' time is unknown and the frozen
phase is given as the window itself, its upper bound. Every figure says its resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Instants:
    """Host monotonic instants in nanoseconds; None where the run did not get there."""

    freeze_sent: int | None = None
    freeze_returned: int | None = None
    thaw_sent: int | None = None
    thaw_returned: int | None = None


def split(instants: Instants, hooks: dict[str, Any]) -> dict[str, Any] | None:
    """The phases for the manifest; None when the window was never opened and closed.
    ``hooks``: the guest hook evidence's summary (``manifest["guest_hooks"]``)."""
    sent, returned, thaw_sent, thawed = (instants.freeze_sent, instants.freeze_returned, instants.thaw_sent,
                                         instants.thaw_returned)
    if sent is None or thawed is None:
        return None
    window = _ms(thawed - sent)
    freeze_call = _ms(returned - sent) if returned is not None else None
    thaw_call = _ms(thawed - thaw_sent) if thaw_sent is not None else None
    at_least = _ms(thaw_sent - returned) if returned is not None and thaw_sent is not None else 0.0
    hooks_freeze, hooks_thaw, resolution, evidence = _hook_times(hooks)
    # The guest's figures cannot exceed the calls that contain them (its clock, not ours).
    if hooks_freeze is not None and freeze_call is not None:
        hooks_freeze = min(hooks_freeze, freeze_call)
    if hooks_thaw is not None and thaw_call is not None:
        hooks_thaw = min(hooks_thaw, thaw_call)
    frozen = window - (hooks_freeze or 0.0) - (hooks_thaw or 0.0)
    frozen = round(max(frozen, max(at_least, 0.0)), 3)
    return {
        "window_ms": window,
        "hooks_freeze_ms": hooks_freeze,
        "hooks_thaw_ms": hooks_thaw,
        "frozen_ms": frozen,
        "frozen_at_least_ms": max(at_least, 0.0),
        "freeze_call_ms": freeze_call,
        "thaw_call_ms": thaw_call,
        "resolution_ms": resolution,
        "evidence": evidence,
    }


def _hook_times(hooks: dict[str, Any]) -> tuple[float | None, float | None, float, str]:
    if hooks.get("freeze_hooks_ms") is not None:
        resolution = float(hooks.get("clock_resolution_ms") or 1.0)
        return (float(hooks["freeze_hooks_ms"]), _float(hooks.get("thaw_hooks_ms")), resolution,
                f"{hooks.get('runner', 'the guest hook runner')} timed its hooks")
    if hooks.get("freeze_hooks_s") is not None:
        return (float(hooks["freeze_hooks_s"]) * 1000, _seconds(hooks.get("thaw_hooks_s")), 1000.0,
                "the stock fsfreeze-hook's log (whole seconds)")
    if "runner" in hooks or "log" in hooks:
        return 0.0, 0.0, 1.0, "no guest hook ran: the freeze call is the file systems' freeze"
    return None, None, 1.0, "no hook evidence: the frozen phase is given as the whole window (its upper bound)"


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _seconds(value: object) -> float | None:
    return float(value) * 1000 if isinstance(value, int | float) else None


def _ms(nanoseconds: int) -> float:
    return round(nanoseconds / 1e6, 3)
