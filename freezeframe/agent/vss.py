"""What qemu-ga for Windows answers, and what it means for a snapshot.

On Windows qemu-ga freezes through the Volume Shadow Copy Service (VSS), with its own VSS
provider (``qga-vss.dll``, installed with the agent). Its sources say how it behaves:

* VSS holds writes for at most 10 seconds (``VSS_TIMEOUT_FREEZE_MSEC`` in
  ``qga/vss-win32/requester.cpp``). Past that VSS gives up the hold and the thaw reports
  ``couldn't hold writes: fsfreeze is limited up to 10 seconds`` (``requester_thaw``, on
  ``VSS_E_HOLD_WRITES_TIMEOUT``): the volumes are thawed, but a copy taken after the hold
  ended is not file-system consistent.
* Without a usable VSS provider (the DLL missing or not registered) ``vss_init`` fails and
  every freeze command answers ``QERR_UNSUPPORTED``, "this feature or command is not
  currently supported" (``qga/commands-win32.c``).
* With the provider present but VSS unable to run (its service disabled or stopped, the
  provider not registered with VSS) the freeze fails in ``requester_freeze`` with the step
  that failed and the Windows error: "failed to initialize for backup: ...", "failed to
  add C:\\ to snapshot set: unknown Windows error 0x80042304", and so on. qemu-ga thaws
  and aborts the VSS backup itself before it answers.
* A freeze covers every fixed volume (``guest-fsfreeze-freeze``) or the listed volume
  paths ("C:\\", ``guest-fsfreeze-freeze-list``), not mount points as on Linux.
"""

from __future__ import annotations

import re

#: VSS's own limit on holding writes, in seconds.
HOLD_LIMIT_S = 10.0

_HOLD_LIMIT = "fsfreeze is limited up to 10 seconds"
_UNSUPPORTED = "this feature or command is not currently supported"

#: VSS errors qemu-ga reports by number ("unknown Windows error 0x...") and what to do.
_VSS_ERRORS = {
    0x80042304: "the QEMU guest agent's VSS provider is not registered with VSS (VSS_E_PROVIDER_NOT_REGISTERED)",
    0x8004230F: "the VSS provider failed (VSS_E_UNEXPECTED_PROVIDER_ERROR)",
    0x8004230E: "the volume is not supported by the VSS provider (VSS_E_VOLUME_NOT_SUPPORTED_BY_PROVIDER)",
    0x80042302: "a VSS service component failed (VSS_E_UNEXPECTED); see the guest's event log",
    0x80070422: "the Volume Shadow Copy service is disabled (ERROR_SERVICE_DISABLED)",
    0x80070005: "qemu-ga may not use VSS (E_ACCESSDENIED); it must run as LocalSystem",
}
_ADVICE = ("in the guest: reinstall the QEMU guest agent with its VSS provider (qemu-ga-x86_64.msi), and "
           "set the 'Volume Shadow Copy' and 'QEMU Guest Agent VSS Provider' services to start manually")


def is_windows(os_id: str | None) -> bool:
    """qemu-ga reports ``mswindows`` as the id of every Windows (guest-get-osinfo)."""
    return os_id == "mswindows"


def held_too_long(desc: str) -> bool:
    """The thaw's answer when VSS gave up holding writes before the thaw."""
    return _HOLD_LIMIT in desc


def provider_missing(desc: str) -> bool:
    return _UNSUPPORTED in desc


def explain(desc: str) -> str:
    """What a Windows guest's freeze error means and what to do about it."""
    if provider_missing(desc):
        return f"the guest has no usable VSS provider (qemu-ga answers: {desc}); {_ADVICE}"
    codes = [int(found, 16) for found in re.findall(r"0x([0-9a-fA-F]{8})\b", desc)]
    known = [_VSS_ERRORS[code] for code in codes if code in _VSS_ERRORS]
    if known:
        return f"VSS could not freeze the guest: {known[0]} (qemu-ga: {desc}); {_ADVICE}"
    if codes or "service" in desc.lower():
        return f"VSS could not freeze the guest (qemu-ga: {desc}); {_ADVICE}"
    return f"VSS could not freeze the guest (qemu-ga: {desc})"
