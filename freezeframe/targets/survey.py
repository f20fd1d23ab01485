"""What a VM's guest agent offers a snapshot, found without changing anything in the guest.

One survey for both readers: every run's preflight acts on it (``GuestTarget.probe_freeze``:
it thaws a guest found frozen, clears the hook runner's last report, notes where the stock
hook log ends), and ``instance check`` reports it. So the check and the run never disagree
on what the agent allows or which hooks the guest runs.

How the guest's freeze hooks leave evidence, in order of preference:

* **freezeframe's hook runner** (``qemu-ga -F .../freezeframe-guest-hook``): its config
  file exists; it writes a report the host reads after the thaw, and clears before the
  freeze (guest-file open, read, write, close).
* **the stock fsfreeze-hook** (``qemu-ga -F /etc/qemu/fsfreeze-hook``): its log exists; the
  host notes where it ends now and reads what this freeze appended (guest-file open, read,
  seek, close; ``guest-get-time`` too, to match the lines by time).
* neither: no hook evidence, so a snapshot can reach ``application`` only through writers
  on the host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from freezeframe.agent import vss
from freezeframe.agent.qga import AgentInfo, FreezeState, GuestAgent, GuestFilesystem, GuestOS
from freezeframe.errors import AgentCommandError
from freezeframe.targets import guest_hooks, stock_hooks

#: Commands the agent must allow for a filesystem-consistent snapshot.
FREEZE_COMMANDS = ("guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "guest-fsfreeze-status")
#: What reading each kind of hook evidence takes.
RUNNER_COMMANDS = ("guest-file-open", "guest-file-read", "guest-file-write", "guest-file-close")
STOCK_COMMANDS = ("guest-file-open", "guest-file-read", "guest-file-seek", "guest-file-close")
_READ_COMMANDS = ("guest-file-open", "guest-file-read", "guest-file-close")
_CONFIG_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class HookEvidence:
    """Which freeze hooks the guest runs, as far as the agent lets us see."""

    #: "runner" (freezeframe's), "stock" (qemu-ga's fsfreeze-hook with a log), or None.
    kind: str | None
    #: For the check and the manifest: what was found, or what to do to get further.
    detail: str
    #: Why the evidence cannot be read (commands blocked), or None.
    blocked: str | None = None
    #: The stock hook's log: its size now, or None when it does not exist (yet).
    log_size: int | None = None
    #: The stock hook's log can be watched (seek allowed), whether or not it exists yet.
    can_watch_log: bool = False


@dataclass(slots=True)
class Survey:
    info: AgentInfo
    guest_os: GuestOS | None
    state: FreezeState
    #: A Windows guest without its VSS provider: the agent's words.
    no_vss: str | None = None
    #: Freeze commands the agent blocks.
    blocked: list[str] = field(default_factory=list)
    #: None while the guest is frozen: most commands are disabled then, nothing can be judged.
    hooks: HookEvidence | None = None
    filesystems: list[GuestFilesystem] | None = None
    #: The guest's clock now (seconds since the epoch), when the agent tells it.
    guest_time: float | None = None


async def survey(agent: GuestAgent) -> Survey:
    """Read what the agent offers; change nothing. The freeze state comes first: while
    frozen, qemu-ga reports most commands disabled, so the rest can only be judged thawed."""
    no_vss: str | None = None
    try:
        state = await agent.fsfreeze_status()
    except AgentCommandError as err:
        if not vss.provider_missing(err.desc):
            raise
        no_vss, state = err.desc, FreezeState.THAWED  # Windows without its VSS provider
    info = await agent.info()
    guest_os = await agent.osinfo() if info.allows("guest-get-osinfo") else None
    found = Survey(info=info, guest_os=guest_os, state=state, no_vss=no_vss)
    if state is FreezeState.FROZEN or no_vss is not None:
        return found
    found.blocked = [c for c in FREEZE_COMMANDS if not info.allows(c)]
    if found.blocked:
        return found
    if info.allows("guest-get-time"):
        with contextlib.suppress(AgentCommandError):  # the log is then matched by position alone
            found.guest_time = await agent.time_ns() / 1e9
    found.hooks = await _hooks(agent, info)
    if info.allows("guest-get-fsinfo"):
        found.filesystems = await agent.get_fsinfo()
    return found


async def _hooks(agent: GuestAgent, info: AgentInfo) -> HookEvidence:
    closed = [c for c in _READ_COMMANDS if not info.allows(c)]
    if closed:
        return HookEvidence(None, "", blocked=f"the guest agent blocks {', '.join(closed)}: the guest's freeze "
                                              "hooks leave evidence in guest files that cannot be read")
    try:
        await agent.read_file(guest_hooks.CONFIG_PATH, max_bytes=_CONFIG_MAX)
    except AgentCommandError:
        pass  # no runner configured
    else:
        closed = [c for c in RUNNER_COMMANDS if not info.allows(c)]
        detail = f"freezeframe's hook runner is configured ({guest_hooks.CONFIG_PATH})"
        if closed:
            return HookEvidence("runner", detail, blocked=f"the guest agent blocks {', '.join(closed)}: the hook "
                                                          "runner's report cannot be cleared before the freeze")
        return HookEvidence("runner", detail)
    if not info.allows("guest-file-seek"):
        return HookEvidence(None, "", blocked="the guest agent blocks guest-file-seek: the stock fsfreeze-hook's "
                                              f"log ({stock_hooks.LOG_PATH}) cannot be read from where it ends")
    try:
        size = await agent.file_size(stock_hooks.LOG_PATH)
    except AgentCommandError:
        return HookEvidence(None, (
            f"no hook evidence: freezeframe's runner is not configured ({guest_hooks.CONFIG_PATH} absent) and the "
            f"stock fsfreeze-hook has left no log ({stock_hooks.LOG_PATH}). For application-consistent snapshots, "
            f"start qemu-ga with -F{stock_hooks.SCRIPT_PATH} and put executable hooks in {stock_hooks.HOOK_DIR}/ "
            "(their exit status is read from its log), or install freezeframe's runner for timeouts, "
            "reverse-order thaw and a deadman (freezeframe guest install NAME)"), can_watch_log=True)
    return HookEvidence("stock", f"the stock fsfreeze-hook's log {stock_hooks.LOG_PATH} is read after each thaw "
                                 f"({size} bytes now)", log_size=size, can_watch_log=True)

