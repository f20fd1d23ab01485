"""The host target's LVM provider, on real LVM. This machine's kernel has no device-mapper,
so the test runs freezeframe's own host-target code inside a lab VM, whose kernel has it:
the package's modules are copied into the guest and driven there with guest-exec."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import LabFactory, guest_sh

import freezeframe
from freezeframe.agent.qga import GuestAgent

pytestmark = pytest.mark.vm

PACKAGE_FILES = ("__init__.py", "errors.py", "model.py", "targets/__init__.py", "targets/base.py", "targets/host.py")

DRIVER = r'''
import asyncio, json, sys
sys.path.insert(0, "/tmp/ffpkg")
from freezeframe.errors import FreezeframeError
from freezeframe.model import SnapshotDisk
from freezeframe.targets.host import HostTarget

def needs_recovery(device):
    with open(device, "rb") as handle:
        handle.seek(1024 + 0x60)
        return bool(int.from_bytes(handle.read(4), "little") & 0x4)

async def main(action, mount, image=None):
    target = HostTarget(mounts=[mount])
    try:
        await target.connect()
        if action == "remove":
            await target.remove([SnapshotDisk(device=mount, node="lvm", image=image, virtual_size=0, allocated_size=0)],
                                lambda old, new: None)
            return {"removed": image}
        probe = await target.probe_freeze(agent_timeout=1, command_timeout=10)
        await target.prepare("0123abcd-0000-0000-0000-000000000000")
        held = await target.freeze(10)
        disks = await target.snapshot()
        thawed = await target.thaw(10)
        return {"probe": probe.details, "held": held, "thawed": thawed,
                "disks": [{"image": d.image, "node": d.node, "virtual_size": d.virtual_size,
                           "allocated_size": d.allocated_size} for d in disks],
                "needs_recovery": needs_recovery(disks[0].image)}
    except FreezeframeError as err:
        return {"error": str(err)}
    finally:
        await target.close()

print(json.dumps(asyncio.run(main(*sys.argv[1:]))))
'''


async def put(agent: GuestAgent, path: str, data: bytes) -> None:
    handle = await agent.file_open(path, "w")
    try:
        await agent.file_write(handle, data)
    finally:
        await agent.file_close(handle)


def run_in_guest(socket: str, steps: Any) -> Any:
    async def go() -> Any:
        async with GuestAgent(socket, timeout=60) as agent:
            return await steps(agent)

    return asyncio.run(go())


def test_lvm_snapshot_in_a_guest_is_point_in_time_clean_and_removable(lab: LabFactory) -> None:
    vm = lab(disks=1)
    package = Path(freezeframe.__file__).parent

    async def steps(agent: GuestAgent) -> dict[str, Any]:
        code, out = await guest_sh(agent, "mkdir -p /tmp/ffpkg/freezeframe/targets /srv")
        assert code == 0, out
        for name in PACKAGE_FILES:
            await put(agent, f"/tmp/ffpkg/freezeframe/{name}", (package / name).read_bytes())
        await put(agent, "/tmp/driver.py", DRIVER.encode())
        # A volume group on the data disk, a logical volume with ext4 on it, some data.
        code, out = await guest_sh(agent, """
            set -e
            export DM_DISABLE_UDEV=1
            umount /mnt/ffdata0
            lvm pvcreate -ff -y /dev/vda
            lvm vgcreate vg0 /dev/vda
            lvm lvcreate -y -L 128m -n data vg0
            /sbin/mke2fs -q -t ext4 /dev/vg0/data
            mount /dev/vg0/data /srv
            echo before > /srv/data.txt
        """)
        assert code == 0, out
        code, out = await guest_sh(agent, "DM_DISABLE_UDEV=1 python3 /tmp/driver.py snapshot /srv")
        assert code == 0, out
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        assert "error" not in result, result
        image = result["disks"][0]["image"]
        # After the snapshot the origin changes; the copy keeps the point in time.
        code, out = await guest_sh(agent, f"""
            set -e
            echo after > /srv/data.txt
            mkdir -p /mnt/copy
            mount -o ro {image} /mnt/copy
            echo "copy: $(cat /mnt/copy/data.txt)"
            echo "origin: $(cat /srv/data.txt)"
            umount /mnt/copy
        """)
        assert code == 0, out
        result["contents"] = out
        code, out = await guest_sh(agent, f"DM_DISABLE_UDEV=1 python3 /tmp/driver.py remove /srv {image}")
        assert code == 0, out
        code, out = await guest_sh(agent, "DM_DISABLE_UDEV=1 lvm lvs --noheadings -o lv_name vg0")
        result["volumes_after_remove"] = out.split()
        code, out = await guest_sh(agent, "echo still > /srv/writable && cat /srv/writable")
        result["writable"] = out.strip()
        return result

    result = run_in_guest(vm.qga_socket, steps)

    assert result["probe"]["filesystems"][0]["provider"] == "lvm"
    assert result["disks"][0]["node"] == "lvm"
    assert result["disks"][0]["image"] == "/dev/vg0/ff-0123abcd"
    assert result["disks"][0]["virtual_size"] == 128 << 20
    assert (result["held"], result["thawed"]) == (1, 1)
    assert result["needs_recovery"] is False  # device-mapper froze the file system for the copy
    assert "copy: before" in result["contents"]
    assert "origin: after" in result["contents"]
    assert result["volumes_after_remove"] == ["data"]
    assert result["writable"] == "still"
