"""Instant recovery: a VM runs on its backup at once while the backup is copied in behind it.

Each disk becomes a local qcow2 overlay, empty at first, whose backing is the disk's NBD
export (``jobs/serve.py``, straight from the repository). QEMU starts on the overlays;
the guest's writes land in them, its reads of what is not local yet go to the backup. A
``block-stream`` job per disk then pulls every block into the overlay while the guest
runs; QEMU's stream reads through a copy-on-read filter, so what the guest reads first
is made local first. When a job ends, QEMU drops the overlay's backing itself, and the
NBD node is removed: the VM runs on local images alone.

A bad day, and what it costs:

- **The repository is unreachable** (an S3 outage). The server waits for it (``wait_s``)
  before it answers a read with an error, so a short outage is a slow disk. A longer one
  makes the guest's read fail inside QEMU, which, with ``rerror=stop``/``werror=stop`` on
  every disk, pauses the VM instead of passing the error on; the stream job, started
  with ``on-error=stop``, pauses too. The job here resumes both (``cont``,
  ``block-job-resume``) as soon as a read works again. The guest never sees an I/O error;
  what it wrote is in the overlays, never lost.
- **freezeframe is killed.** The server goes with it (it is a child that exits with its
  parent), QEMU's NBD client keeps trying to reconnect (``reconnect-delay``), and the VM
  keeps running on what is local, pausing if it needs what is not. ``--resume`` serves
  the backup again on the same socket (from the state file this job keeps), QEMU
  reconnects, and the job carries on where QEMU left it. The daemon does the same by
  itself for every restore that no process is finishing (the finishing process holds a
  lock on the state; the kernel drops it when that process dies).

Progress (bytes local, rate, time left) comes from ``query-block-jobs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freezeframe.agent.qmp import Monitor
from freezeframe.backup.repository import RepoIdentity, Repository
from freezeframe.errors import Conflict, FreezeframeError, HypervisorError, MonitorCommandError, NotFound
from freezeframe.jobs.serve import ServeRequest, serve
from freezeframe.lab import host_tools
from freezeframe.targets import libvirt_clone

log = logging.getLogger(__name__)

#: Seconds QEMU's NBD client holds a guest read while it reconnects to a restarted server.
RECONNECT_DELAY_S = 60
#: Seconds the server waits for an unreachable repository before a read fails (and the VM
#: pauses, to be resumed here).
SERVE_WAIT_S = 30.0
STATE_FORMAT = 1


class LiveRestoreError(FreezeframeError):
    exit_code = 10


@dataclass(slots=True)
class LiveDisk:
    device: str        # the backup's name for the disk, and its NBD export
    overlay: str       # the local qcow2
    node: str          # QEMU's node for the overlay (what the guest's device uses)
    source: str        # QEMU's node for the NBD export
    size: int
    target: str = ""   # a libvirt domain's target dev for it (else found by the serial, the node name)


@dataclass(slots=True)
class LiveState:
    """What a live restore needs to go on after the process that began it is gone."""

    instance: str
    backup: str
    location: str
    identity: dict[str, Any]
    socket: str
    log: str
    disks: list[LiveDisk]
    qmp_socket: str = ""
    #: A libvirt domain (named as the instance) at this URI, instead of a QEMU of our own.
    libvirt_uri: str = ""
    #: Define the libvirt domain (make it persistent) once every disk is local.
    persist: bool = False
    rate: int = 0  # bytes/s per disk, 0: unlimited
    wait_s: float = SERVE_WAIT_S  # how long a read waits for the repository before the VM pauses
    started_at: float = field(default_factory=time.time)
    format: int = STATE_FORMAT

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> LiveState:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            data["disks"] = [LiveDisk(**d) for d in data["disks"]]
            return cls(**data)
        except FileNotFoundError:
            raise NotFound(f"no live restore in progress for {path.stem}",
                           hint="see: freezeframe lab list, freezeframe backup list") from None
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise LiveRestoreError(f"the live restore state {path} is damaged: {err}") from None

    def request(self, passphrase: bytes | None) -> ServeRequest:
        return ServeRequest(location=self.location, backup=self.backup, devices=[d.device for d in self.disks],
                            identity=RepoIdentity(**self.identity), passphrase=passphrase, wait_s=self.wait_s)


def plan(repo: Repository, backup_id: str, instance: str, directory: Path, socket: Path, log_file: Path,
         *, rate: int = 0, wait_s: float = SERVE_WAIT_S, libvirt_uri: str = "") -> LiveState:
    """The live restore of ``backup_id`` as ``instance``, its overlays in ``directory``."""
    disks = []
    for number, disk in enumerate(repo.manifest(backup_id)["disks"]):
        disks.append(LiveDisk(device=str(disk["device"]), overlay=str(directory / f"disk{number}.qcow2"),
                              node=f"ffdata{number}", source=f"ffsrc{number}",
                              size=repo.index(str(disk["index"])).virtual_size))
    return LiveState(instance=instance, backup=backup_id, location=repo.location, identity=asdict(repo.identity),
                     socket=str(socket), log=str(log_file), disks=disks, rate=rate, wait_s=wait_s,
                     libvirt_uri=libvirt_uri)


def plan_clone(repo: Repository, backup_id: str, instance: str, directory: Path, socket: Path, log_file: Path,
               *, libvirt_uri: str, rate: int = 0) -> LiveState:
    """The live restore of a libvirt domain's backup as a new domain ``instance``: its disks
    found by target dev (as a libvirt backup names them), defined once every disk is local."""
    state = plan(repo, backup_id, instance, directory, socket, log_file, rate=rate, libvirt_uri=libvirt_uri)
    state.persist = True
    for disk in state.disks:
        disk.target = disk.device
    return state


def start_clone(state: LiveState, definition: str, directory: Path) -> None:
    """Create the overlays and start the new domain: ``definition`` (the backed-up
    domain's) with its disks on them, backed by the backup (``targets/libvirt_clone.py``)."""
    create_overlays(state)
    xml = libvirt_clone.clone_xml(definition, state.instance, [
        libvirt_clone.ClonedDisk(target=d.target, overlay=d.overlay, socket=state.socket, export=d.device)
        for d in state.disks], directory)
    libvirt_clone.start(state.libvirt_uri, xml)


def create_overlays(state: LiveState) -> None:
    """The empty overlays, owner-only: what the guest writes lands there."""
    old = os.umask(0o077)
    try:
        for disk in state.disks:
            host_tools.run(["qemu-img", "create", "-q", "-f", "qcow2", disk.overlay, str(disk.size)],
                           f"create the overlay of disk {disk.device}")
    finally:
        os.umask(old)


def qemu_args(state: LiveState, *, backing: bool = True) -> list[str]:
    """QEMU arguments attaching the overlays (with the backup as backing, or alone once
    streamed); every disk pauses the VM on an error instead of failing the guest."""
    args: list[str] = []
    for disk in state.disks:
        if backing:
            args += ["-blockdev", f"driver=nbd,node-name={disk.source},server.type=unix,"
                                  f"server.path={state.socket},export={disk.device},read-only=on,"
                                  f"reconnect-delay={RECONNECT_DELAY_S}"]
        args += ["-blockdev", f"driver=file,filename={disk.overlay},node-name={disk.node}-file",
                 "-blockdev", f"driver=qcow2,file={disk.node}-file,node-name={disk.node}"
                              + (f",backing={disk.source}" if backing else ""),
                 "-device", f"virtio-blk-pci,drive={disk.node},id={disk.node},serial={disk.node},"
                            "rerror=stop,werror=stop"]
    return args


@dataclass(frozen=True, slots=True)
class Progress:
    done: int        # bytes local
    total: int
    rate: float      # bytes/s over the last few seconds
    paused: bool     # the VM or a job waits for the repository

    @property
    def eta_s(self) -> float | None:
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {"bytes_local": self.done, "bytes_total": self.total, "rate": round(self.rate),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1), "paused": self.paused}


async def _has_backing(monitor: Monitor, node: str) -> bool:
    """Whether the overlay still reads through to the backup (its backing is set on the
    command line, not in the image, so QEMU names it in ``backing_file`` only)."""
    for entry in await monitor.execute("query-named-block-nodes", {"flat": True}):
        if entry.get("node-name") == node:
            return bool(entry.get("backing_file"))
    raise LiveRestoreError(f"QEMU has no block node {node}: is this the VM the live restore started?")


def nbd_backing(state: LiveState) -> list[tuple[str, str]]:
    """Per disk, the NBD export its overlay reads through to: (unix socket, export name)."""
    return [(state.socket, disk.device) for disk in state.disks]


class _Rate:
    """Bytes per second over the last few seconds."""

    def __init__(self) -> None:
        self.history: list[tuple[float, int]] = []

    def __call__(self, done: int) -> float:
        now = time.monotonic()
        self.history = [h for h in self.history if now - h[0] <= 5] + [(now, done)]
        first = self.history[0]
        return (done - first[1]) / (now - first[0]) if now > first[0] else 0.0


def _stream_libvirt(state: LiveState, on_progress: Callable[[Progress], None] | None, poll_s: float) -> Progress:
    """The same for a libvirt domain, through libvirt's own block pull (``block-stream``):
    libvirt then drops the backing and the NBD nodes itself, and its view of the disks
    stays true. libvirt 9.0 cannot give the NBD client a reconnect delay, so a read the
    server cannot answer pauses the VM (``error_policy=stop``) until it is resumed here,
    and a pull that failed is started again; what was copied stays copied."""
    import libvirt

    try:
        conn = libvirt.open(state.libvirt_uri)
    except libvirt.libvirtError as err:
        raise LiveRestoreError(f"cannot connect to libvirt at {state.libvirt_uri}: {err.get_error_message()}") from None
    try:
        dom = conn.lookupByName(state.instance)
        targets = _libvirt_targets(dom, state)
        total = sum(d.size for d in state.disks)
        rate = _Rate()
        restarts: dict[str, int] = {}
        started: set[str] = set()
        last_resume = 0.0
        while True:
            backed = _libvirt_backed(dom)
            done, paused = 0, False
            for disk in state.disks:
                target = targets[disk.node]
                info = dom.blockJobInfo(target, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
                if not info:
                    if target not in backed:
                        done += disk.size
                        continue
                    if target in started:
                        restarts[target] = restarts.get(target, 0) + 1
                        if restarts[target] > 20:
                            raise LiveRestoreError(f"the copy of disk {disk.device} keeps failing",
                                                   hint=f"see {state.log}; resume with --resume {state.instance}")
                        log.warning("the copy of disk %s stopped early; starting it again", disk.device)
                    dom.blockPull(target, state.rate, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
                    started.add(target)
                    log.info("pulling disk %s of backup %s into %s", disk.device, state.backup[:8], disk.overlay)
                    continue
                if target not in started:  # a pull left by an interrupted run goes on, at the speed asked now
                    dom.blockJobSetSpeed(target, state.rate, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
                    started.add(target)
                done += int(info["cur"]) * disk.size // max(int(info["end"]), 1)
            status, reason = dom.state()
            if status == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR:
                paused = True
                if time.monotonic() - last_resume >= 2:
                    last_resume = time.monotonic()
                    log.warning("the VM paused on a read the repository could not answer; resuming it")
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.resume()
            progress = Progress(done=done, total=total, rate=rate(done), paused=paused)
            if on_progress is not None:
                on_progress(progress)
            if done >= total:
                log.info("live restore of %s done: every disk is local", state.instance)
                return progress
            time.sleep(poll_s)
    except libvirt.libvirtError as err:
        raise LiveRestoreError(f"libvirt failed during the live restore of {state.instance}: "
                               f"{err.get_error_message()}", hint=f"resume with --resume {state.instance}") from None
    finally:
        conn.close()


def _libvirt_targets(dom: Any, state: LiveState) -> dict[str, str]:
    """Each disk's target (vda...) in the domain, found by its serial (the overlay's node name)."""
    found = {}
    for disk in ET.fromstring(dom.XMLDesc()).iterfind("devices/disk"):
        serial, target = disk.findtext("serial"), disk.find("target")
        if target is not None:
            found[serial or target.get("dev", "")] = target.get("dev", "")
    targets = set(found.values())
    chosen = {d.node: d.target if d.target in targets else found.get(d.node, "") for d in state.disks}
    missing = [d.target or d.node for d in state.disks if not chosen[d.node]]
    if missing:
        raise LiveRestoreError(f"the domain {state.instance} has no disk {', '.join(missing)}: "
                               "is this the domain the live restore started?")
    return chosen


def _libvirt_backed(dom: Any) -> set[str]:
    """The targets whose image still reads through to a network (NBD) backing."""
    backed = set()
    for disk in ET.fromstring(dom.XMLDesc()).iterfind("devices/disk"):
        store, target = disk.find("backingStore"), disk.find("target")
        if store is not None and store.get("type") == "network" and target is not None:
            backed.add(target.get("dev", ""))
    return backed


async def stream(state: LiveState, *, on_progress: Callable[[Progress], None] | None = None,
                 poll_s: float = 0.5) -> Progress:
    """Stream every disk until it is local; resumes jobs and the VM paused by errors.
    Returns the last progress once every overlay stands alone.

    QMP is connected for each look and let go in between: QEMU serves one monitor client
    at a time, and snapshots, backups and people need it while the copy runs."""
    if state.libvirt_uri:
        return await asyncio.to_thread(_stream_libvirt, state, on_progress, poll_s)
    jobs = {f"ff-stream-{d.node}": d for d in state.disks}
    total = sum(d.size for d in state.disks)
    rate = _Rate()
    restarts: dict[str, int] = {}
    last_resume = 0.0
    started = False
    while True:
        async with Monitor(state.qmp_socket, timeout=60) as monitor:
            if not started:
                await _start(monitor, state, jobs)
                started = True
            listed = {j["device"]: j for j in await monitor.execute("query-block-jobs")}
            done, paused = 0, False
            for job, disk in jobs.items():
                info = listed.get(job)
                if info is None:
                    if not await _has_backing(monitor, disk.node):
                        done += disk.size
                        continue
                    # Gone while the overlay still needs its backing: the job failed at its
                    # start (a read error after that pauses it). Start it again.
                    restarts[job] = restarts.get(job, 0) + 1
                    if restarts[job] > 20:
                        raise LiveRestoreError(f"the stream of disk {disk.device} keeps failing",
                                               hint=f"see {state.log}; resume with --resume {state.instance}")
                    log.warning("the stream of disk %s ended early; starting it again", disk.device)
                    await _start(monitor, state, {job: disk})
                    continue
                done += int(info["offset"]) * disk.size // max(int(info["len"]), 1)
                if info.get("paused") or info.get("io-status") not in (None, "ok"):
                    paused = True
            status = (await monitor.execute("query-status"))["status"]
            paused = paused or status == "io-error"
            now = time.monotonic()
            if paused and now - last_resume >= 2:
                last_resume = now
                await _resume(monitor, listed, status)
            progress = Progress(done=done, total=total, rate=rate(done), paused=paused)
            if on_progress is not None:
                on_progress(progress)
            if done >= total and not listed:
                await _finish(monitor, state)
                return progress
        await asyncio.sleep(poll_s)


async def _start(monitor: Monitor, state: LiveState, jobs: dict[str, LiveDisk]) -> None:
    running = {j["device"] for j in await monitor.execute("query-block-jobs")}
    for job, disk in jobs.items():
        if job in running:
            # A job left by an interrupted run goes on, at the speed asked for now.
            await monitor.execute("block-job-set-speed", {"device": job, "speed": state.rate})
            continue
        if not await _has_backing(monitor, disk.node):
            continue
        arguments: dict[str, Any] = {"job-id": job, "device": disk.node, "on-error": "stop"}
        if state.rate:
            arguments["speed"] = state.rate
        await monitor.execute("block-stream", arguments)
        log.info("streaming disk %s of backup %s into %s", disk.device, state.backup[:8], disk.overlay)


async def _finish(monitor: Monitor, state: LiveState) -> None:
    """Every overlay stands alone: the NBD nodes go (QEMU lets go of the server)."""
    for disk in state.disks:
        try:
            await monitor.execute("blockdev-del", {"node-name": disk.source})
        except MonitorCommandError as err:
            log.warning("could not remove the NBD node %s: %s", disk.source, err)
    if (await monitor.execute("query-status"))["status"] == "io-error":
        await monitor.execute("cont")
    log.info("live restore of %s done: every disk is local", state.instance)


async def _resume(monitor: Monitor, jobs: dict[str, dict[str, Any]], status: str) -> None:
    """Resume what an error paused: the jobs, then the VM. If the repository is still
    away, QEMU pauses them again at the next failed read."""
    for name, info in jobs.items():
        if info.get("paused") or info.get("status") == "paused":
            try:
                await monitor.execute("block-job-resume", {"device": name})
                log.info("resumed the stream job %s", name)
            except (MonitorCommandError, HypervisorError) as err:
                log.debug("could not resume %s yet: %s", name, err)
    if status == "io-error":
        log.warning("the VM paused on a read the repository could not answer; resuming it")
        await monitor.execute("cont")


@contextlib.contextmanager
def finisher(state_path: Path, instance: str) -> Iterator[None]:
    """The one process finishing ``instance``'s live restore holds this lock (``flock``,
    released by the kernel when the process ends however it ends): a second ``--resume``
    is refused, and the daemon knows which restores nobody is finishing."""
    state_path.parent.mkdir(parents=True, exist_ok=True)
    with open(state_path.with_suffix(".lock"), "a") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"the live restore of {instance} is being finished by another process already",
                           hint="wait for it; see: freezeframe lab list") from None
        yield


def interrupted(live_dir: Path) -> list[str]:
    """The instances whose live restore began and that no process is finishing now."""
    found = []
    for state_path in sorted(live_dir.glob("*.json")):
        with contextlib.suppress(Conflict, OSError), finisher(state_path, state_path.stem):
            if state_path.exists():  # not finished while this looked
                found.append(state_path.stem)
    return found


def run(state: LiveState, state_path: Path, passphrase: bytes | None, *,
        boot: Callable[[LiveState], str] | None = None,
        on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """Serve the backup, boot the VM on the overlays (``boot``: returns its QMP socket;
    None when resuming one that runs), and stream until every disk is local. The state
    file says what to resume until then."""
    with finisher(state_path, state.instance), serve(state.request(passphrase), Path(state.socket),
                                                       Path(state.log)):
        if boot is not None:
            state.save(state_path)  # an interrupted boot is resumable or removable
            state.qmp_socket = boot(state)
        state.save(state_path)
        done = asyncio.run(stream(state, on_progress=on_progress))
        if state.persist:
            libvirt_clone.make_persistent(state.libvirt_uri, state.instance)
        state_path.unlink(missing_ok=True)
    state_path.with_suffix(".lock").unlink(missing_ok=True)
    return done
