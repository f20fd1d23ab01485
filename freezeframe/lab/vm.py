"""Small real VMs for the demo, the tests and anyone trying freezeframe.

Each VM lives in its own directory under the lab root: its qcow2 data disks (formatted
on the host, mounted in the guest at /mnt/ffdataN), a QMP socket, a guest-agent socket,
the serial console log and a ``vm.json`` describing it. QEMU runs daemonized; ``down``
stops exactly the process recorded for that VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from freezeframe.errors import Conflict, LabError, NotFound
from freezeframe.lab import apps, debian, host_tools
from freezeframe.lab import libvirt as lab_libvirt
from freezeframe.lab.image import SAMPLE_HOOKS, GuestImage, ensure_image

READY_MARKER = b"ff-lab: ready"
FILESYSTEMS = ("ext4", "xfs")
#: Who runs the guest's freeze hooks: freezeframe's runner (Python, or POSIX sh), or qemu-ga's
#: stock fsfreeze-hook script.
HOOK_RUNNERS = ("python", "sh", "stock")
#: xfsprogs 6 refuses file systems under 300 MiB; the disks are sparse either way.
DEFAULT_DISK_MIB = 320
AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True, slots=True, kw_only=True)
class LabVM:
    name: str
    directory: str
    qmp_socket: str
    qga_socket: str
    console: str
    pid: int
    disks: list[str]
    fs: str
    agent: bool
    workload: bool
    accel: str
    #: What the guest was booted with, so that ``restart`` boots it the same way.
    cmdline: str = ""
    memory_mib: int = 256
    #: The application the guest runs (sqlite, postgresql, mariadb), and for a database
    #: server the port on 127.0.0.1 that QEMU forwards to it.
    app: str | None = None
    app_port: int | None = None
    #: QEMU arguments attaching disks laid out by the caller (``up_attached``) instead of
    #: the lab's own; ``disks`` then lists their files for information only.
    attach: list[str] = field(default_factory=list)
    #: A transient libvirt domain (named as the VM) at this URI, instead of a QEMU the lab runs.
    libvirt_uri: str | None = None
    #: The guest: the lab's busybox initramfs, or a Debian installation (lab/debian.py).
    distro: str = "busybox"
    smp: int = 1

    @property
    def running(self) -> bool:
        return _is_our_qemu(self.pid, self.directory)



def _is_our_qemu(pid: int, directory: str) -> bool:
    """True if ``pid`` is alive and is the QEMU started for ``directory`` (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"qemu-system" in cmdline and directory.encode() in cmdline


def make_disk(path: Path, *, fs: str, size_mib: int, content: Path | None = None) -> None:
    """A qcow2 disk holding one unmounted-clean file system: empty, or (ext4 only) holding
    a copy of ``content``, owners and modes kept."""
    raw = path.with_suffix(".raw")
    try:
        with open(raw, "wb") as handle:
            handle.truncate(size_mib << 20)
        if fs == "ext4":
            host_tools.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                  *(["-d", str(content)] if content is not None else []), str(raw)],
                 f"format {path.name} as ext4")
        else:
            host_tools.run(["mkfs.xfs", "-q", "-f", str(raw)], f"format {path.name} as xfs")
        host_tools.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
             f"convert {path.name} to qcow2")
    finally:
        raw.unlink(missing_ok=True)


def _qemu_argv(vm_dir: Path, image: GuestImage, disks: list[Path], *, accel: str, cmdline: str,
               memory_mib: int, extra: list[str], smp: int = 1) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-name", vm_dir.name, "-machine", "q35", "-accel", accel,
        "-m", str(memory_mib), "-smp", str(smp), "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
        "-serial", f"file:{vm_dir / 'console.log'}",
        "-qmp", f"unix:{vm_dir / 'qmp.sock'},server=on,wait=off",
        "-chardev", f"socket,path={vm_dir / 'qga.sock'},server=on,wait=off,id=qga0",
        "-device", "virtio-serial-pci",
        "-device", f"virtserialport,chardev=qga0,name={AGENT_CHANNEL}",
        "-pidfile", str(vm_dir / "qemu.pid"), "-daemonize", *extra,
    ]
    if accel == "kvm":
        argv += ["-cpu", "max"]
    for index, disk in enumerate(disks):
        argv += [
            "-blockdev", f"driver=file,filename={disk},node-name=ffdata{index}-file",
            "-blockdev", f"driver=qcow2,file=ffdata{index}-file,node-name=ffdata{index}",
            "-device", f"virtio-blk-pci,drive=ffdata{index},id=ffdata{index},serial=ffdata{index}",
        ]
    return argv


def _wait_ready(vm_dir: Path, pid: int, timeout: float) -> bool:
    console = vm_dir / "console.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if READY_MARKER in console.read_bytes():
                return True
        if not _is_our_qemu(pid, str(vm_dir)):
            return False
        time.sleep(0.1)
    return False


def _console_tail(vm_dir: Path) -> str:
    try:
        text = (vm_dir / "console.log").read_text(errors="replace")
    except OSError:
        return "(no console output)"
    return "\n".join(text.strip().splitlines()[-15:]) or "(no console output)"


def _stop_pid(pid: int, directory: str, timeout: float = 10.0) -> None:
    if not _is_our_qemu(pid, directory):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _is_our_qemu(pid, directory):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _boot(vm_dir: Path, image: GuestImage, disks: list[Path], *, accel: str, cmdline: str,
          memory_mib: int, timeout: float, extra: list[str] | None = None, smp: int = 1) -> int | None:
    """Start QEMU and wait for the guest; returns its pid, or None if it did not come up."""
    (vm_dir / "console.log").unlink(missing_ok=True)
    argv = _qemu_argv(vm_dir, image, disks, accel=accel, cmdline=cmdline, memory_mib=memory_mib,
                      extra=extra or [], smp=smp)
    host_tools.run(argv, f"start QEMU ({accel})")
    pid = int((vm_dir / "qemu.pid").read_text().strip())
    if _wait_ready(vm_dir, pid, timeout):
        return pid
    _stop_pid(pid, str(vm_dir))
    return None


def choose_accel(lab_root: Path, image: GuestImage) -> str:
    """KVM when it really runs a guest here, else TCG.

    /dev/kvm may exist and still not work (QEMU aborts, or the guest spins), so the
    answer comes from booting the lab guest once with KVM, with a short timeout. It is
    cached per host boot. FREEZEFRAME_LAB_ACCEL=kvm|tcg overrides the probe.
    """
    forced = os.environ.get("FREEZEFRAME_LAB_ACCEL", "auto")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    cache = lab_root / ".accel"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
        if cached.get("boot_id") == boot_id:
            return str(cached["accel"])
    probe_dir = lab_root / ".kvm-probe"
    shutil.rmtree(probe_dir, ignore_errors=True)
    probe_dir.mkdir(parents=True)
    accel = "tcg"
    try:
        with contextlib.suppress(LabError, OSError, ValueError):
            if _boot(probe_dir, image, [], accel="kvm", cmdline="console=ttyS0 quiet panic=-1 ff.agent=0",
                     memory_mib=256, timeout=10) is not None:
                accel = "kvm"
    finally:
        with contextlib.suppress(OSError, ValueError):
            _stop_pid(int((probe_dir / "qemu.pid").read_text()), str(probe_dir))
        shutil.rmtree(probe_dir, ignore_errors=True)
    cache.write_text(json.dumps({"boot_id": boot_id, "accel": accel}))
    return accel


def up(
    lab_root: Path,
    image_cache: Path,
    name: str,
    *,
    disks: int = 2,
    fs: str = "ext4",
    agent: bool = True,
    workload: bool = False,
    workload_sync: bool = False,
    workload_interval_us: int = 2000,
    agent_args: tuple[str, ...] = (),
    hooks: tuple[str, ...] = (),
    hook_policy: str = "fail",
    hook_timeout: float = 10.0,
    hook_runner: str = "python",
    app: str | None = None,
    disk_mib: int = DEFAULT_DISK_MIB,
    memory_mib: int = 256,
    boot_timeout: float = 90.0,
    disk_images: list[Path] | None = None,
    libvirt_uri: str | None = None,
    iothread: bool = False,
    setup: Callable[[Path], None] | None = None,
    libvirt_backing: list[tuple[str, str]] | None = None,
) -> LabVM:
    """Build (or reuse) the guest image, create the disks and boot the VM; returns once the
    guest has mounted its disks and started its agent. ``disk_images``: qcow2 files to
    boot on instead of new disks (moved into the VM's directory), such as a restored backup.
    ``iothread`` (libvirt only; plain QEMU layouts come from ``up_attached``): every disk
    in one iothread, ``cache=none``, as production domains often run. ``setup``: called
    with the VM's new directory to create its disks (``disk0.qcow2``...) instead of new
    ones; ``libvirt_backing``: the NBD export each disk reads through to (a live restore)."""
    if disk_images is not None:
        disks = len(disk_images)
    if fs not in FILESYSTEMS:
        raise LabError(f"unknown file system {fs!r}", hint=f"use one of: {', '.join(FILESYSTEMS)}")
    if not 1 <= disks <= 8:
        raise LabError(f"a lab VM has 1 to 8 data disks, not {disks}")
    unknown = [h for h in hooks if h not in SAMPLE_HOOKS]
    if unknown:
        raise LabError(f"no sample hook named {', '.join(unknown)}", hint=f"hooks: {', '.join(SAMPLE_HOOKS)}")
    if hook_policy not in ("fail", "continue"):
        raise LabError(f"hook policy is fail or continue, not {hook_policy!r}")
    if hook_runner not in HOOK_RUNNERS:
        raise LabError(f"the hook runner is {' or '.join(HOOK_RUNNERS)}, not {hook_runner!r}")
    if app not in (None, "sqlite", *apps.DATABASES):
        raise LabError(f"unknown lab application {app!r}", hint=f"the lab has: sqlite, {', '.join(apps.DATABASES)}")
    if app in apps.DATABASES and (fs != "ext4" or disk_images is not None):
        raise LabError(f"the lab's {app} runs on a new ext4 first disk", hint="use --fs ext4, without --from-backup")
    if any(c in arg for arg in agent_args for c in " +"):
        raise LabError("guest-agent arguments cannot contain spaces or '+' (they travel on the kernel command line)")
    if libvirt_uri is not None and app in apps.DATABASES:
        raise LabError("the lab's database applications run under plain QEMU only")
    if iothread and libvirt_uri is None:
        raise LabError("iothread is a libvirt lab option", hint="for plain QEMU, use lab.vm.up_attached")
    vm_dir, image, accel = _claim(lab_root, image_cache, name)
    try:
        disk_paths = [vm_dir / f"disk{i}.qcow2" for i in range(disks)]
        if setup is not None:
            setup(vm_dir)
        for index, path in enumerate(disk_paths if setup is None else []):
            if disk_images is not None:
                shutil.move(disk_images[index], path)
            elif index == 0 and app in apps.DATABASES:
                # Under /tmp: initdb runs as postgres, who may not reach into the home.
                with tempfile.TemporaryDirectory(prefix="ff-lab-app-") as content:
                    apps.populate(app, Path(content))
                    make_disk(path, fs=fs, size_mib=disk_mib, content=Path(content))
            else:
                make_disk(path, fs=fs, size_mib=disk_mib)
        app_port = apps.free_port() if app in apps.DATABASES else None
        if app in apps.DATABASES:
            memory_mib = max(memory_mib, 512)  # the server, beside the initramfs the guest runs from
        cmdline = _cmdline(agent=agent, workload=workload, workload_sync=workload_sync,
                           workload_interval_us=workload_interval_us, agent_args=agent_args, hooks=hooks,
                           hook_policy=hook_policy, hook_timeout=hook_timeout, hook_runner=hook_runner, app=app)
        if libvirt_uri is not None:
            pid = _boot_libvirt(libvirt_uri, name, vm_dir, image, disk_paths, accel=accel, cmdline=cmdline,
                                memory_mib=memory_mib, timeout=boot_timeout, iothread=iothread,
                                backing=libvirt_backing, agent=agent)
        else:
            pid = _boot(vm_dir, image, disk_paths, accel=accel, cmdline=cmdline, memory_mib=memory_mib,
                        timeout=boot_timeout, extra=_app_args(app, app_port))
        if pid is None:
            raise LabError(f"lab VM {name} did not boot within {boot_timeout:g}s; console:\n{_console_tail(vm_dir)}")
        vm = LabVM(
            name=name, directory=str(vm_dir), qmp_socket=str(vm_dir / "qmp.sock"),
            qga_socket=str(vm_dir / "qga.sock"), console=str(vm_dir / "console.log"), pid=pid,
            disks=[str(p) for p in disk_paths], fs=fs, agent=agent, workload=workload, accel=accel,
            cmdline=cmdline, memory_mib=memory_mib, app=app, app_port=app_port, libvirt_uri=libvirt_uri,
        )
        if libvirt_uri is not None:  # libvirt owns both channels
            vm = LabVM(**{**asdict(vm), "qmp_socket": "", "qga_socket": ""})
        (vm_dir / "vm.json").write_text(json.dumps(asdict(vm), indent=2))
        return vm
    except BaseException:
        _abandon(vm_dir, name, libvirt_uri)
        raise


#: Under TCG a Debian guest's agent answers 31-62 s after start, PostgreSQL 34-75 s (DESIGN
#: section 3), more on a loaded machine.
DEBIAN_BOOT_TIMEOUT = 420.0


def _debian_boot_image(image_cache: Path) -> GuestImage:
    built = debian.ensure_image(image_cache)
    return GuestImage(kernel=built.kernel, initrd=built.initrd)


def up_debian(lab_root: Path, image_cache: Path, name: str, *, stock_hooks: tuple[str, ...] = (),
              boot_timeout: float = DEBIAN_BOOT_TIMEOUT) -> LabVM:
    """Boot the Debian lab guest (built first if need be) on overlays of its two disks: the
    root, and PostgreSQL's data. ``stock_hooks``: hooks (``debian.STOCK_HOOKS``) put in
    /etc/qemu/fsfreeze-hook.d before qemu-ga starts, run by the stock hook script."""
    unknown = [h for h in stock_hooks if h not in debian.STOCK_HOOKS]
    if unknown:
        raise LabError(f"no stock hook named {', '.join(unknown)}", hint=f"hooks: {', '.join(debian.STOCK_HOOKS)}")
    built = debian.ensure_image(image_cache)
    vm_dir, _, accel = _claim(lab_root, image_cache, name)
    try:
        disk_paths = [vm_dir / "root.qcow2", vm_dir / "pgdata.qcow2"]
        for path, base in zip(disk_paths, (built.root, built.pgdata), strict=True):
            host_tools.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(path)],
                           "create a disk of the Debian guest")
        cmdline = debian.CMDLINE + (f" ff.stock_hooks={','.join(stock_hooks)}" if stock_hooks else "")
        image = GuestImage(kernel=built.kernel, initrd=built.initrd)
        pid = _boot(vm_dir, image, disk_paths, accel=accel, cmdline=cmdline, memory_mib=debian.MEMORY_MIB,
                    timeout=boot_timeout, smp=2)
        if pid is None:
            raise LabError(f"lab VM {name} (Debian) did not boot within {boot_timeout:g}s; console:\n"
                           f"{_console_tail(vm_dir)}")
        vm = LabVM(name=name, directory=str(vm_dir), qmp_socket=str(vm_dir / "qmp.sock"),
                   qga_socket=str(vm_dir / "qga.sock"), console=str(vm_dir / "console.log"), pid=pid,
                   disks=[str(p) for p in disk_paths], fs="ext4", agent=True, workload=False, accel=accel,
                   cmdline=cmdline, memory_mib=debian.MEMORY_MIB, app="postgresql", distro="debian", smp=2)
        (vm_dir / "vm.json").write_text(json.dumps(asdict(vm), indent=2))
        return vm
    except BaseException:
        _abandon(vm_dir, name, None)
        raise


def _claim(lab_root: Path, image_cache: Path, name: str) -> tuple[Path, GuestImage, str]:
    """A new VM directory for ``name``, the guest image and the accelerator to boot it with."""
    vm_dir = (lab_root / name).resolve()
    if vm_dir.exists():
        raise Conflict(f"a lab VM named {name!r} exists already", hint=f"stop it with: freezeframe lab down {name}")
    image = ensure_image(image_cache)
    lab_root.mkdir(parents=True, exist_ok=True)
    accel = choose_accel(lab_root, image)
    vm_dir.mkdir(parents=True)
    return vm_dir, image, accel


def _abandon(vm_dir: Path, name: str, libvirt_uri: str | None) -> None:
    """Undo a VM that did not come up: stop what was started, remove its directory."""
    if libvirt_uri is not None:
        lab_libvirt.destroy_domain(libvirt_uri, name)
    with contextlib.suppress(OSError, ValueError):
        _stop_pid(int((vm_dir / "qemu.pid").read_text()), str(vm_dir))
    shutil.rmtree(vm_dir, ignore_errors=True)


def _cmdline(*, agent: bool = True, workload: bool = False, workload_sync: bool = False,
             workload_interval_us: int = 2000, agent_args: tuple[str, ...] = (), hooks: tuple[str, ...] = (),
             hook_policy: str = "fail", hook_timeout: float = 10.0, hook_runner: str = "python",
             app: str | None = None) -> str:
    """The guest's kernel command line: what its init reads to set itself up."""
    return " ".join([
        "console=ttyS0", "quiet", "panic=-1",
        f"ff.agent={int(agent)}", f"ff.workload={int(workload)}",
        f"ff.workload_sync={int(workload_sync)}", f"ff.workload_interval_us={workload_interval_us}",
        # The kernel splits its command line at spaces, so the guest's init turns '+' back into them.
        f"ff.agent_args={'+'.join(agent_args)}" if agent_args else "",
        f"ff.hooks={','.join(hooks)} ff.hook_policy={hook_policy} ff.hook_timeout={hook_timeout:g}"
        if hooks else "",
        f"ff.hook_runner={hook_runner}" if hook_runner != "python" else "",
        f"ff.app={app}" if app else "",
    ]).strip()


def _boot_libvirt(uri: str, name: str, vm_dir: Path, image: GuestImage, disks: list[Path], *, accel: str,
                  cmdline: str, memory_mib: int, timeout: float, iothread: bool = False,
                  backing: list[tuple[str, str]] | None = None, agent: bool = True) -> int | None:
    lab_libvirt.ensure_daemons(uri)
    xml = lab_libvirt.domain_xml(name, kernel=image.kernel, initrd=image.initrd, cmdline=cmdline, disks=disks,
                                 console=vm_dir / "console.log", memory_mib=memory_mib, accel=accel,
                                 iothread=iothread, backing=backing)
    pid = lab_libvirt.start_domain(uri, xml)
    deadline = time.monotonic() + timeout
    if _wait_ready(vm_dir, pid, timeout):
        # The guest is up; libvirt connects its agent channel a moment later.
        while agent and not lab_libvirt.agent_connected(uri, name):
            if time.monotonic() > deadline:
                raise LabError(f"libvirt never connected the guest agent of {name} within {timeout:g}s")
            time.sleep(0.1)
        return pid
    lab_libvirt.destroy_domain(uri, name)
    return None


def up_attached(lab_root: Path, image_cache: Path, name: str, *, attach: list[str], disks: list[str],
                workload: bool = False, memory_mib: int = 256, boot_timeout: float = 90.0,
                setup: Callable[[Path], None] | None = None) -> LabVM:
    """Boot the lab guest on disks attached the caller's way (``attach``: ``-drive``,
    ``-device``, ``-object`` arguments, as a VM started by hand or by another tool has
    them). The guest mounts every disk that has a serial (a SCSI disk's from its VPD page
    0x80) at /mnt/<serial>. ``setup`` is called with the VM's new directory before QEMU
    starts (to create the files ``attach`` names there)."""
    vm_dir, image, accel = _claim(lab_root, image_cache, name)
    cmdline = _cmdline(workload=workload)
    try:
        if setup is not None:
            setup(vm_dir)
        pid = _boot(vm_dir, image, [], accel=accel, cmdline=cmdline, memory_mib=memory_mib, timeout=boot_timeout,
                    extra=attach)
        if pid is None:
            raise LabError(f"lab VM {name} did not boot within {boot_timeout:g}s; console:\n{_console_tail(vm_dir)}")
        vm = LabVM(name=name, directory=str(vm_dir), qmp_socket=str(vm_dir / "qmp.sock"),
                   qga_socket=str(vm_dir / "qga.sock"), console=str(vm_dir / "console.log"), pid=pid, disks=disks,
                   fs="ext4", agent=True, workload=workload, accel=accel, cmdline=cmdline, memory_mib=memory_mib,
                   attach=attach)
        (vm_dir / "vm.json").write_text(json.dumps(asdict(vm), indent=2))
        return vm
    except BaseException:
        _abandon(vm_dir, name, None)
        raise


def _app_args(app: str | None, port: int | None) -> list[str]:
    return apps.qemu_args(app, port) if app in apps.DATABASES and port is not None else []


def _halt(vm: LabVM) -> None:
    if vm.libvirt_uri is not None:
        lab_libvirt.destroy_domain(vm.libvirt_uri, vm.name)
        deadline = time.monotonic() + 10
        while vm.running and time.monotonic() < deadline:
            time.sleep(0.05)
    _stop_pid(vm.pid, vm.directory)


def stop(lab_root: Path, name: str) -> None:
    """Shut QEMU down cleanly (SIGTERM: it writes persistent bitmaps back), keeping the VM's files."""
    vm = get(lab_root, name)
    _halt(vm)
    if vm.running:
        raise LabError(f"lab VM {name} (pid {vm.pid}) did not stop")


def restart(lab_root: Path, image_cache: Path, name: str, *, boot_timeout: float = 90.0) -> LabVM:
    """Boot a lab VM whose QEMU is gone (stopped, killed, crashed) again, on the same disks."""
    vm = get(lab_root, name)
    if vm.running:
        raise Conflict(f"lab VM {name} is running (pid {vm.pid})")
    if not vm.cmdline:
        raise LabError(f"lab VM {name} was made by an older freezeframe and cannot be restarted")
    if vm.libvirt_uri is not None:
        raise LabError(f"lab VM {name} was a transient libvirt domain: it cannot be restarted")
    vm_dir = Path(vm.directory)
    image = ensure_image(image_cache) if vm.distro == "busybox" else _debian_boot_image(image_cache)
    if vm.distro != "busybox":
        boot_timeout = max(boot_timeout, DEBIAN_BOOT_TIMEOUT)
    pid = _boot(vm_dir, image, [] if vm.attach else [Path(d) for d in vm.disks],
                accel=vm.accel, cmdline=vm.cmdline, memory_mib=vm.memory_mib, timeout=boot_timeout,
                extra=_app_args(vm.app, vm.app_port) + vm.attach, smp=vm.smp)
    if pid is None:
        raise LabError(f"lab VM {name} did not boot again within {boot_timeout:g}s; console:\n{_console_tail(vm_dir)}")
    restarted = LabVM(**{**asdict(vm), "pid": pid})
    (vm_dir / "vm.json").write_text(json.dumps(asdict(restarted), indent=2))
    return restarted


def get(lab_root: Path, name: str) -> LabVM:
    try:
        data = json.loads((lab_root / name / "vm.json").read_text())
        return LabVM(**data)
    except FileNotFoundError:
        raise NotFound(f"no lab VM named {name!r}", hint="see: freezeframe lab list") from None
    except (OSError, ValueError, TypeError) as err:
        raise LabError(f"the lab VM {name} has a damaged vm.json: {err}") from err


def set_attach(lab_root: Path, name: str, attach: list[str]) -> LabVM:
    """Record how the VM's disks are attached now (after a live restore dropped their
    backing), so that a restart boots it the same way."""
    vm = get(lab_root, name)
    changed = LabVM(**{**asdict(vm), "attach": list(attach)})
    (Path(vm.directory) / "vm.json").write_text(json.dumps(asdict(changed), indent=2))
    return changed


def list_vms(lab_root: Path) -> list[LabVM]:
    if not lab_root.is_dir():
        return []
    return [get(lab_root, p.parent.name) for p in sorted(lab_root.glob("*/vm.json"))]


def down(lab_root: Path, name: str) -> None:
    """Stop the VM (only the QEMU process started for it) and remove its files."""
    vm = get(lab_root, name)
    _halt(vm)
    if vm.running:
        raise LabError(f"lab VM {name} (pid {vm.pid}) did not stop")
    shutil.rmtree(vm.directory, ignore_errors=True)
