"""Coverage-guided fuzzing of every parser of guest data (atheris).

    make fuzz                      # 60 s
    .venv/bin/python fuzz/fuzz_guest_input.py -max_total_time=600

The input is split into: a raw line as qemu-ga would send it (the reply parser), the same
bytes as a value returned to each typed command (the reply validators), a guest hook
report, and the stock fsfreeze-hook's log (which must never raise at all). Anything but
the package's AgentError subclasses is a finding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from typing import Any

import atheris

with atheris.instrument_imports():
    from freezeframe.agent import qga
    from freezeframe.errors import AgentError
    from freezeframe.targets.guest_hooks import parse_hook_result
    from freezeframe.targets.stock_hooks import parse_log


class _Canned(qga.GuestAgent):
    """The real client with the wire replaced by one canned return value."""

    def __init__(self, value: Any) -> None:
        super().__init__("/nonexistent")
        self.value = value

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        return self.value


async def _validators(value: Any) -> None:
    agent = _Canned(value)
    for call in (agent.info, agent.get_fsinfo, agent.fsfreeze_status, agent.fsfreeze_thaw, agent.ping,
                 lambda: agent.file_read(1, 64), lambda: agent.file_open("/x"), lambda: agent.file_write(1, b"ab"),
                 lambda: agent.file_seek(1, 0, "end"), agent.time_ns,
                 lambda: agent.run_command("/bin/true", timeout=0)):
        with contextlib.suppress(AgentError):
            await call()


def test_one(data: bytes) -> None:
    with contextlib.suppress(AgentError):
        qga._parse_reply(data, "fuzz")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        value = None
    if value is not None:
        asyncio.run(_validators(value))
    with contextlib.suppress(AgentError):
        parse_hook_result(data)
    parse_log(data, not_before=1.7e9, not_after=1.8e9)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
