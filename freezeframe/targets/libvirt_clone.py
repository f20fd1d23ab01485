"""A libvirt domain started on a backup: the backed-up domain's definition, run under a
new name on local overlays whose backing is the backup served over NBD (a live restore).

The definition comes from the backed-up domain as this libvirt knows it. What must not be
shared with it is changed: the name, the UUID and the NICs' MAC addresses (libvirt makes
new ones), file-backed consoles (moved into the restore's directory), and every disk. A
disk the backup holds becomes its overlay, backed by its NBD export, with I/O errors
stopping the VM (``error_policy=stop``) rather than reaching the guest; any other writable
disk is left out (the clone must never write to the original's images); read-only media
(a CD-ROM) stay. The clone starts as a transient domain, and is defined (made persistent)
once every disk is local, when its definition no longer names the backup.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freezeframe.errors import HypervisorError, NotFound


@dataclass(frozen=True, slots=True)
class ClonedDisk:
    target: str      # the domain's target dev (vda)
    overlay: str     # the local qcow2
    socket: str      # the NBD server's unix socket
    export: str      # its export for this disk


def clone_xml(source: str, name: str, disks: list[ClonedDisk], directory: Path) -> str:
    """The definition of ``name``: ``source`` (a domain's XML) with the changes above."""
    root = ET.fromstring(source)
    root.attrib.pop("id", None)
    _set(root, "name", name)
    for tag in ("uuid", "seclabel"):
        for element in root.findall(tag):
            root.remove(element)
    devices = root.find("devices")
    if devices is None:
        raise HypervisorError("the backed-up domain's definition has no devices")
    by_target = {d.target: d for d in disks}
    seen = set()
    for disk in list(devices.findall("disk")):
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        wanted = by_target.get(dev)
        if wanted is None:
            if disk.find("readonly") is None and disk.get("device") not in ("cdrom", "floppy"):
                devices.remove(disk)  # never the original's image
            continue
        seen.add(dev)
        _backed_by_export(disk, wanted)
    missing = sorted(set(by_target) - seen)
    if missing:
        raise NotFound(f"the domain has no disk {', '.join(missing)} that the backup holds",
                       hint="was it redefined since the backup? restore the images instead (backup restore --to)")
    for interface in devices.findall("interface"):
        for mac in interface.findall("mac"):
            interface.remove(mac)
        for alias in interface.findall("target"):
            interface.remove(alias)
    for number, chardev in enumerate([*devices.findall("serial"), *devices.findall("console")]):
        source_el = chardev.find("source")
        if chardev.get("type") == "file" and source_el is not None:
            source_el.set("path", str(directory / f"console{number}.log"))
    return ET.tostring(root, encoding="unicode")


def _set(root: ET.Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        element = ET.SubElement(root, tag)
    element.text = text


def _backed_by_export(disk: ET.Element, wanted: ClonedDisk) -> None:
    disk.set("type", "file")
    for child in list(disk):
        if child.tag in ("source", "backingStore", "driver"):
            disk.remove(child)
    driver = ET.Element("driver", name="qemu", type="qcow2", error_policy="stop", rerror_policy="stop")
    source = ET.Element("source", file=wanted.overlay)
    store = ET.Element("backingStore", type="network")
    ET.SubElement(store, "format", type="raw")
    nbd = ET.SubElement(store, "source", protocol="nbd", name=wanted.export)
    ET.SubElement(nbd, "host", transport="unix", socket=wanted.socket)
    ET.SubElement(store, "backingStore")
    for position, element in enumerate((driver, source, store)):
        disk.insert(position, element)


def source_definition(uri: str, domain: str) -> str:
    """The backed-up domain's definition (inactive: what it boots with)."""
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HypervisorError(f"cannot connect to libvirt at {uri}: {err.get_error_message()}") from None
    try:
        return str(conn.lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError as err:
        raise NotFound(f"libvirt at {uri} has no domain {domain} to take the definition from: "
                       f"{err.get_error_message()}",
                       hint="restore the images instead (backup restore --to DIR) and define a domain on them"
                       ) from None
    finally:
        conn.close()


def start(uri: str, xml: str) -> None:
    """Start the clone as a transient domain."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        conn.createXML(xml, 0)
    except libvirt.libvirtError as err:
        raise HypervisorError(f"libvirt could not start the restored domain: {err.get_error_message()}") from None
    finally:
        conn.close()


def make_persistent(uri: str, domain: str) -> None:
    """Define the running clone as it now is (every disk local): it survives a restart."""
    import libvirt

    conn: Any = libvirt.open(uri)
    try:
        xml = conn.lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        conn.defineXML(xml)
    except libvirt.libvirtError as err:
        raise HypervisorError(f"libvirt could not define {domain}: {err.get_error_message()}",
                              hint=f"virsh dumpxml {domain} > {domain}.xml; virsh define {domain}.xml") from None
    finally:
        conn.close()
