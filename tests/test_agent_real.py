"""The guest-agent client against a real qemu-ga in a real guest."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess

import pytest
from conftest import agent_call

from freezeframe.agent.qga import FreezeState, GuestAgent
from freezeframe.errors import AgentCommandError, AgentProtocolError
from freezeframe.lab.vm import LabVM

pytestmark = pytest.mark.vm


def test_handshake_info_and_filesystems(shared_vm: LabVM) -> None:
    async def look(agent: GuestAgent) -> tuple[str, bool, list[tuple[str, str]]]:
        info = await agent.info()
        filesystems = await agent.get_fsinfo()
        return info.version, info.allows("guest-fsfreeze-freeze"), sorted(
            (fs.mountpoint, fs.type) for fs in filesystems
        )

    version, can_freeze, filesystems = agent_call(shared_vm.qga_socket, look)
    host = subprocess.run(["qemu-ga", "--version"], capture_output=True, text=True, check=True).stdout
    assert version in host  # the guest runs the host's own qemu-ga package
    assert can_freeze
    assert filesystems == [("/mnt/ffdata0", "ext4"), ("/mnt/ffdata1", "ext4")]


def test_freeze_and_thaw_count_file_systems_and_frozen_agent_disables_commands(shared_vm: LabVM) -> None:
    async def cycle(agent: GuestAgent) -> tuple[int, FreezeState, bool, int, FreezeState]:
        frozen = await agent.fsfreeze_freeze()
        try:
            state = await agent.fsfreeze_status()
            # A fact DESIGN.md relies on: a frozen qemu-ga refuses most commands.
            refused = False
            try:
                await agent.get_fsinfo()
            except AgentCommandError:
                refused = True
        finally:
            thawed = await agent.fsfreeze_thaw()
        return frozen, state, refused, thawed, await agent.fsfreeze_status()

    frozen, state, refused, thawed, after = agent_call(shared_vm.qga_socket, cycle)
    assert (frozen, state, refused, thawed, after) == (2, FreezeState.FROZEN, True, 2, FreezeState.THAWED)


def test_replies_left_by_an_earlier_client_are_discarded(shared_vm: LabVM) -> None:
    # An earlier client asks and leaves without reading the answers.
    with socket.socket(socket.AF_UNIX) as earlier:
        earlier.connect(shared_vm.qga_socket)
        for _ in range(3):
            earlier.sendall(json.dumps({"execute": "guest-info"}).encode() + b"\n")
        earlier.sendall(b'{"execute": "guest-fsfreeze-status"}\n{"half": ')
    assert agent_call(shared_vm.qga_socket, lambda a: a.fsfreeze_status()) is FreezeState.THAWED


def test_reading_guest_files_is_bounded(shared_vm: LabVM) -> None:
    version = agent_call(shared_vm.qga_socket, lambda a: a.read_file("/proc/version"))
    assert version.startswith(b"Linux version 6.")

    async def too_big(agent: GuestAgent) -> None:
        await agent.read_file("/bin/busybox", max_bytes=100_000)

    with pytest.raises(AgentProtocolError, match="larger than 100000 bytes"):
        agent_call(shared_vm.qga_socket, too_big)


def test_two_agents_in_a_row_each_synchronise(shared_vm: LabVM) -> None:
    async def both() -> list[FreezeState]:
        states = []
        for _ in range(2):
            async with GuestAgent(shared_vm.qga_socket, timeout=5) as agent:
                states.append(await agent.fsfreeze_status())
        return states

    assert asyncio.run(both()) == [FreezeState.THAWED, FreezeState.THAWED]
