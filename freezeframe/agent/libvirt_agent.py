"""The guest agent of a libvirt domain, through libvirt: libvirt owns the agent's channel,
so commands go through its agent command interface (``virDomainQemuAgentCommand``), and the
freeze and thaw through its own API (``virDomainFSFreeze``, ``virDomainFSThaw``), so that
libvirt knows the guest is frozen. Replies are checked exactly as for a direct connection
(``GuestAgent``): the guest is untrusted whoever carries its words.

libvirt's calls block, so each runs in a thread; the connection is thread-safe.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import Any

from freezeframe.agent import vss
from freezeframe.agent.qga import GuestAgent, _count, _parse_reply
from freezeframe.errors import AgentCommandError, AgentTimeout, AgentUnavailable, FreezeNotHeld

_COMMAND_FAILED = re.compile(r"unable to execute QEMU agent command '([^']*)': (.*)", re.DOTALL)


class LibvirtAgent(GuestAgent):
    def __init__(self, domain: Any, *, timeout: float = 10.0) -> None:
        super().__init__(f"libvirt:{domain.name()}", timeout=timeout)
        self.domain = domain

    async def connect(self, timeout: float | None = None) -> None:
        """libvirt keeps the channel; a ping says whether an agent answers on it."""
        await self._call("guest-ping", lambda: self._command("guest-ping", None, timeout or self.timeout))

    async def close(self) -> None:
        return None

    async def _execute(self, command: str, arguments: dict[str, Any] | None, timeout: float | None) -> Any:
        limit = self.timeout if timeout is None else timeout
        reply = await self._call(command, lambda: self._command(command, arguments, limit))
        return reply["return"]

    def _command(self, command: str, arguments: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        import json

        import libvirt_qemu

        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        answer = libvirt_qemu.qemuAgentCommand(self.domain, json.dumps(message), max(1, round(timeout)), 0)
        reply = _parse_reply(str(answer).encode(), command)
        if "return" not in reply:
            raise AgentCommandError(command, "GenericError", f"no return value in {str(answer)[:80]}")
        return reply

    async def _call(self, command: str, call: Any) -> Any:
        import libvirt

        try:
            return await asyncio.to_thread(call)
        except libvirt.libvirtError as err:
            raise _agent_error(command, err) from err

    async def fsfreeze_freeze(self, mountpoints: Sequence[str] | None = None, *,
                              timeout: float | None = None) -> int:
        frozen = await self._call("guest-fsfreeze-freeze",
                                  lambda: self.domain.fsFreeze(list(mountpoints) if mountpoints else None, 0))
        return _count(frozen, "guest-fsfreeze-freeze")

    async def fsfreeze_thaw(self, *, timeout: float | None = None) -> int:
        try:
            thawed = await self._call("guest-fsfreeze-thaw", lambda: self.domain.fsThaw(None, 0))
        except AgentCommandError as err:
            if vss.held_too_long(err.desc):
                raise FreezeNotHeld(f"the guest could not hold the freeze until the thaw: {err.desc}") from err
            raise
        return _count(thawed, "guest-fsfreeze-thaw")


def _agent_error(command: str, err: Any) -> Exception:
    """libvirt's error as the agent error it stands for."""
    import libvirt

    text = str(err.get_error_message() or err)
    failed = _COMMAND_FAILED.search(text)
    if failed:
        return AgentCommandError(failed.group(1) or command, "GenericError", failed.group(2).strip())
    code = err.get_error_code()
    if code == libvirt.VIR_ERR_AGENT_UNRESPONSIVE:
        return AgentTimeout(f"{command}: the guest agent does not answer (libvirt: {text})")
    if code in (libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, libvirt.VIR_ERR_OPERATION_INVALID,
                libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_AGENT_UNSYNCED):
        return AgentUnavailable(f"{command}: no usable guest agent (libvirt: {text})",
                                hint="the domain needs a channel named org.qemu.guest_agent.0 and qemu-ga in the guest")
    return AgentCommandError(command, "libvirt", text)
