"""``instance check``: what a snapshot of an instance could achieve now, found out without
freezing or thawing anything. One finding per thing checked, and a verdict."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from freezeframe.agent import vss
from freezeframe.agent.qga import FreezeState, GuestAgent
from freezeframe.agent.qmp import Monitor
from freezeframe.errors import FreezeframeError, InvalidInput
from freezeframe.model import Instance, Level, WriterSpec
from freezeframe.targets.host import HostTarget
from freezeframe.targets.qemu import WINDOWS_FREEZE_BUDGET_S, QemuTarget
from freezeframe.targets.survey import survey
from freezeframe.writers import WriterError, make_writer

#: File systems a guest agent skips or that cannot be frozen meaningfully.
PSEUDO_OR_NETWORK = {"proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "nfs", "nfs4",
                     "cifs", "smb3", "fuse", "fuse.sshfs", "9p", "overlay", "squashfs", "iso9660", "ramfs"}


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    status: str  # ok, warn, fail, info
    detail: str


@dataclass(frozen=True, slots=True)
class Report:
    instance: str
    findings: list[Finding]
    #: The best level a snapshot could reach now; None when none can be taken.
    verdict: Level | None

    def as_json(self) -> dict[str, Any]:
        return {"instance": self.instance, "verdict": self.verdict.value if self.verdict else None,
                "checks": [asdict(f) for f in self.findings]}


async def check_instance(instance: Instance, writers: Sequence[WriterSpec], *, agent_timeout: float = 3.0) -> Report:
    findings: list[Finding] = []
    if instance.kind == "host":
        can_copy, can_freeze, inner = _check_host(instance, findings), True, False
    elif instance.kind == "libvirt":
        can_copy, can_freeze, inner = await _check_libvirt(instance, findings, agent_timeout)
    else:
        can_copy, can_freeze, inner = await _check_qemu(instance, findings, agent_timeout)
    writers_ok = await _check_writers(writers, findings)
    if not can_copy:
        verdict = None
    elif not can_freeze:
        verdict = Level.CRASH
    elif writers_ok and (writers or inner):
        verdict = Level.APPLICATION
    else:
        verdict = Level.FILESYSTEM
    return Report(instance.name, findings, verdict)


def _check_host(instance: Instance, findings: list[Finding]) -> bool:
    ok = True
    for mount in instance.mounts:
        try:
            plan = HostTarget(mounts=[mount]).plan_for(mount)
        except InvalidInput as err:
            findings.append(Finding(f"mount {mount}", "fail", str(err)))
            ok = False
        else:
            detail = f"{plan.mount.fstype} on {plan.mount.source}: copied by {plan.provider}"
            findings.append(Finding(f"mount {mount}", "ok", detail))
    return ok


async def _check_libvirt(instance: Instance, findings: list[Finding],
                         agent_timeout: float) -> tuple[bool, bool, bool]:
    from freezeframe.targets.libvirt import LibvirtTarget  # libvirt loads only for its domains

    assert instance.libvirt_uri is not None
    assert instance.libvirt_domain is not None
    target = LibvirtTarget(uri=instance.libvirt_uri, domain=instance.libvirt_domain)
    try:
        await target.connect()
        findings.append(Finding("libvirt", "ok", f"domain {instance.libvirt_domain} running at {instance.libvirt_uri}"))
        disks = await target.disks()
        findings.append(Finding("disks", "ok", ", ".join(f"{d.device} ({d.filename})" for d in disks)))
    except FreezeframeError as err:
        findings.append(Finding("libvirt", "fail", str(err)))
        await target.close()
        return False, False, False
    try:
        return True, *await _agent_findings(lambda: target.connect_agent(agent_timeout, 10), findings)
    finally:
        await target.close()


async def _check_qemu(instance: Instance, findings: list[Finding], agent_timeout: float) -> tuple[bool, bool, bool]:
    assert instance.qmp_socket is not None
    try:
        async with Monitor(instance.qmp_socket, timeout=10) as monitor:
            version = (await monitor.execute("query-version"))["qemu"]
            findings.append(Finding("qmp", "ok", f"QEMU {version['major']}.{version['minor']}.{version['micro']}"))
        async with QemuTarget(qmp_socket=instance.qmp_socket, qga_socket=None) as target:
            disks = await target.disks()
            findings.append(Finding("disks", "ok", ", ".join(f"{d.device} ({d.filename})" for d in disks)))
    except FreezeframeError as err:
        findings.append(Finding("qmp", "fail", str(err)))
        return False, False, False
    if not instance.qga_socket:
        findings.append(Finding("agent", "fail", "no guest-agent socket configured: crash-consistent only"))
        return True, False, False
    agent = GuestAgent(instance.qga_socket, timeout=10)

    async def connected() -> GuestAgent:
        await agent.connect(agent_timeout)  # an absent agent costs the probe timeout, no more
        return agent

    try:
        return True, *await _agent_findings(connected, findings)
    finally:
        await agent.close()


async def _agent_findings(connect: Callable[[], Awaitable[GuestAgent]],
                          findings: list[Finding]) -> tuple[bool, bool]:
    """Whether the agent ``connect`` reaches can freeze, and runs freezeframe's hook runner."""
    try:
        return await _check_agent(await connect(), findings)
    except FreezeframeError as err:
        findings.append(Finding("agent", "fail", f"{err}: crash-consistent only"))
        return False, False


async def _check_agent(agent: GuestAgent, findings: list[Finding]) -> tuple[bool, bool]:
    """The run's own survey (targets/survey.py), reported: what it allows, what it runs."""
    found = await survey(agent)
    findings.append(Finding("agent", "ok", f"qemu-ga {found.info.version}"))
    if found.guest_os is not None:
        guest_os = found.guest_os
        findings.append(Finding("guest os", "ok", guest_os.describe() + (
            f"; freezes through VSS, which holds writes for at most {vss.HOLD_LIMIT_S:g} s: the freeze budget "
            f"is {WINDOWS_FREEZE_BUDGET_S:g} s at most" if guest_os.windows else "")))
    if found.no_vss is not None:
        findings.append(Finding("freeze", "fail", f"{vss.explain(found.no_vss)}: crash-consistent only"))
        return False, False
    if found.state is FreezeState.FROZEN:
        findings.append(Finding("freeze state", "warn", "frozen now (a run died?); the next snapshot thaws it first"))
        findings.append(Finding("commands", "info", "cannot be judged while frozen"))
        return True, False
    findings.append(Finding("freeze state", "ok", "thawed"))
    if found.blocked:
        findings.append(Finding("commands", "fail", f"blocked: {', '.join(found.blocked)}: crash-consistent only"))
        return False, False
    hooks = found.hooks
    assert hooks is not None  # surveyed thawed, with the freeze commands allowed
    findings.append(Finding("commands", "ok" if hooks.blocked is None else "warn",
                            "freeze, thaw and status allowed" + (f"; {hooks.blocked}" if hooks.blocked else "")))
    if found.filesystems is not None:
        frozen = [f"{fs.mountpoint} ({fs.type})" for fs in found.filesystems if fs.type not in PSEUDO_OR_NETWORK]
        skipped = [f"{fs.mountpoint} ({fs.type})" for fs in found.filesystems if fs.type in PSEUDO_OR_NETWORK]
        findings.append(Finding("file systems", "ok" if frozen else "warn",
                                f"freezable: {', '.join(frozen) or 'none'}"
                                + (f"; skipped: {', '.join(skipped)}" if skipped else "")))
    if hooks.blocked is not None:
        findings.append(Finding("guest hooks", "warn", hooks.blocked))
        return True, False
    if hooks.kind is None:
        findings.append(Finding("guest hooks", "info", hooks.detail))
        return True, False
    findings.append(Finding("guest hooks", "ok", hooks.detail))
    return True, True


async def _check_writers(writers: Sequence[WriterSpec], findings: list[Finding]) -> bool:
    ok = True
    for spec in writers:
        writer = make_writer(spec)
        try:
            detail = await writer.check()
        except (WriterError, FreezeframeError) as err:
            findings.append(Finding(f"writer {spec.name}", "fail", f"{spec.kind}: {err}"))
            ok = False
        else:
            findings.append(Finding(f"writer {spec.name}", "ok", f"{spec.kind}: {detail}"))
    return ok
