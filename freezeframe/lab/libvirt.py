"""Lab VMs as transient libvirt domains: the same guest, disks and kernel command line as a
lab VM under plain QEMU, but libvirt starts QEMU and owns its monitor and agent channel.

When no libvirtd answers, ``ensure_daemons`` starts one (``virtlogd -d``, then ``libvirtd
-d``) and leaves it running, as a host would have it; the tests start their own and stop
them by pid. ``make setup`` prepares libvirt for a machine without systemd (see
scripts/setup-system.sh).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from freezeframe.errors import LabError

DEFAULT_URI = "qemu:///system"
AGENT_CHANNEL = "org.qemu.guest_agent.0"


def _connect(uri: str) -> Any:
    import libvirt

    # libvirt prints failed connection attempts to stderr unless a handler takes them.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


def answering(uri: str = DEFAULT_URI) -> bool:
    import libvirt

    try:
        _connect(uri).close()
    except libvirt.libvirtError:
        return False
    return True


def ensure_daemons(uri: str = DEFAULT_URI, timeout: float = 30.0) -> list[int]:
    """Start virtlogd and libvirtd when no libvirtd answers at ``uri``; returns the pids of
    the daemons started here (none when one was running)."""
    if answering(uri):
        return []
    started = []
    for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        if daemon == "virtlogd" and Path("/run/libvirt/virtlogd-sock").exists() and _alive_pid(pidfile):
            continue
        try:
            done = subprocess.run([daemon, "-d"], capture_output=True, text=True, timeout=60, check=False)
        except OSError as err:
            raise LabError(f"cannot start {daemon}: {err.strerror}",
                           hint="run make setup (it installs libvirt)") from err
        if done.returncode != 0:
            raise LabError(f"{daemon} -d failed: {(done.stderr or done.stdout).strip()}")
        deadline = time.monotonic() + timeout
        while (pid := _alive_pid(pidfile)) is None:
            if time.monotonic() > deadline:
                raise LabError(f"{daemon} did not write {pidfile} within {timeout:g}s")
            time.sleep(0.05)
        started.append(pid)
    deadline = time.monotonic() + timeout
    while not answering(uri):
        if time.monotonic() > deadline:
            raise LabError(f"libvirtd does not answer at {uri} within {timeout:g}s; see /var/log/libvirt/libvirtd.log")
        time.sleep(0.1)
    return started


def stop_daemon(pid: int, timeout: float = 10.0) -> None:
    """Stop a daemon ``ensure_daemons`` started (SIGTERM), and reap it if it is our child."""
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not our child: its parent reaps it
            if not Path(f"/proc/{pid}").exists():
                return
        time.sleep(0.05)


def _alive_pid(pidfile: str) -> int | None:
    try:
        pid = int(Path(pidfile).read_text().strip())
        Path(f"/proc/{pid}").stat()
    except (OSError, ValueError):
        return None
    return pid


def domain_xml(name: str, *, kernel: Path, initrd: Path, cmdline: str, disks: list[Path], console: Path,
               memory_mib: int, accel: str, iothread: bool = False,
               backing: list[tuple[str, str]] | None = None) -> str:
    """The lab VM as libvirt describes it: the lab's q35 machine, its kernel and initramfs,
    a virtio disk per data disk (serials ffdataN), a serial console to a file and the agent
    channel. ``iothread``: the disks in one iothread with ``cache=none`` and native AIO.
    ``backing``: per disk, the NBD export (unix socket, export name) its overlay reads
    through to (a live restore), with errors stopping the VM rather than reaching the guest."""
    domain = ET.Element("domain", type="kvm" if accel == "kvm" else "qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(domain, "vcpu").text = "1"
    if iothread:
        ET.SubElement(domain, "iothreads").text = "1"
    os_ = ET.SubElement(domain, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(kernel)
    ET.SubElement(os_, "initrd").text = str(initrd)
    ET.SubElement(os_, "cmdline").text = cmdline
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(domain, event).text = "destroy"
    devices = ET.SubElement(domain, "devices")
    ET.SubElement(devices, "emulator").text = "/usr/bin/qemu-system-x86_64"
    for index, path in enumerate(disks):
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        driver = ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        if iothread:
            driver.attrib.update(cache="none", io="native", iothread="1")
        ET.SubElement(disk, "source", file=str(path))
        if backing is not None:
            driver.attrib.update(error_policy="stop", rerror_policy="stop")
            socket, export = backing[index]
            store = ET.SubElement(disk, "backingStore", type="network")
            ET.SubElement(store, "format", type="raw")
            source = ET.SubElement(store, "source", protocol="nbd", name=export)
            ET.SubElement(source, "host", transport="unix", socket=socket)
            ET.SubElement(store, "backingStore")
        ET.SubElement(disk, "target", dev=f"vd{chr(ord('a') + index)}", bus="virtio")
        ET.SubElement(disk, "serial").text = f"ffdata{index}"
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console))
    ET.SubElement(serial, "target", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def start_domain(uri: str, xml: str) -> int:
    """Create the transient domain; returns its QEMU's pid."""
    import libvirt

    try:
        conn = _connect(uri)
    except libvirt.libvirtError as err:
        raise LabError(f"cannot connect to libvirt at {uri}: {err.get_error_message()}") from err
    try:
        dom = conn.createXML(xml, 0)
        name = dom.name()
    except libvirt.libvirtError as err:
        raise LabError(f"libvirt could not start the lab domain: {err.get_error_message()}") from err
    finally:
        conn.close()
    pidfile = Path(f"/run/libvirt/qemu/{name}.pid")
    deadline = time.monotonic() + 30
    while (pid := _alive_pid(str(pidfile))) is None:
        if time.monotonic() > deadline:
            raise LabError(f"libvirt started {name} but wrote no {pidfile}")
        time.sleep(0.05)
    return pid


def agent_connected(uri: str, name: str) -> bool:
    """Whether libvirt has the guest agent's channel connected (it answers "not connected"
    at once, without waiting, until the agent in the guest opened its end)."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        conn = _connect(uri)
        try:
            for channel in ET.fromstring(conn.lookupByName(name).XMLDesc()).iterfind("devices/channel/target"):
                if channel.get("name") == AGENT_CHANNEL:
                    return channel.get("state") == "connected"
        finally:
            conn.close()
    return False


def destroy_domain(uri: str, name: str) -> None:
    """Stop the transient domain (it disappears); nothing when it is gone already."""
    import libvirt

    with contextlib.suppress(libvirt.libvirtError):
        conn = _connect(uri)
        try:
            conn.lookupByName(name).destroy()
        finally:
            conn.close()
