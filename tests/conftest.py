"""Shared fixtures: one state directory for the session, real lab VMs that are always stopped."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import S3_KEY, S3_SECRET, CephCluster, S3Server, ceph_cluster, s3_server

from freezeframe.agent.qga import GuestAgent
from freezeframe.agent.qmp import Monitor
from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.lab import libvirt as lab_libvirt
from freezeframe.lab import vm as lab_vm
from freezeframe.targets.libvirt import LibvirtTarget


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``@pytest.mark.combinations(ids)``: of a test crossing independent axes (target and
    repository, target and hook runner), run only the combinations named; each value of
    each axis still runs once, and the suite stays within its time. The others are
    deselected, not skipped (nothing counts as passing that did not run)."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("combinations")
        callspec = getattr(item, "callspec", None)
        if marker is not None and callspec is not None and callspec.id not in marker.args[0]:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """The session's state directory: $FREEZEFRAME_TEST_HOME (kept between runs for its image
    cache, everything else wiped), or a fresh temporary directory."""
    configured = os.environ.get("FREEZEFRAME_TEST_HOME")
    if configured:
        root = Path(configured)
        if root.exists():
            for child in root.iterdir():
                if child.name not in ("images", "lab"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            for vm in lab_vm.list_vms(root / "lab"):  # an earlier run was killed
                lab_vm.down(root / "lab", vm.name)
    else:
        root = tmp_path_factory.mktemp("ffhome")
    return Home.open(root)


@pytest.fixture
def catalog(home: Home) -> Iterator[Catalog]:
    with Catalog.open(home.catalog) as cat:
        yield cat


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


LabFactory = Callable[..., lab_vm.LabVM]


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server for the session, bucket "ff"; its credentials in the environment
    (where freezeframe reads them), never on a command line."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FREEZEFRAME_S3_RETRY_S")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET, FREEZEFRAME_S3_RETRY_S="20")
    try:
        with s3_server(tmp_path_factory.mktemp("s3"), ("ff",)) as server:
            yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def ceph(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    """A real single-node Ceph cluster with its S3 gateway, for the session; the same
    credentials as the rclone server's (set in the environment by ``s3``)."""
    with ceph_cluster(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


class RepoPlace:
    """A repository for a test: ``str()`` is its location for the CLI; ``/`` reaches its
    objects on disk (a local repository, or the folder the S3 server serves)."""

    def __init__(self, location: str, root: Path) -> None:
        self.location = location
        self.root = root

    def __str__(self) -> str:
        return self.location

    def __truediv__(self, name: str) -> Path:
        return self.root / name


@pytest.fixture(params=["local", "s3"])
def any_repo(request: pytest.FixtureRequest, tmp_path: Path) -> RepoPlace:
    """The same test on a local repository and on an S3 one."""
    if request.param == "local":
        return RepoPlace(str(tmp_path / "repo"), tmp_path / "repo")
    server: S3Server = request.getfixturevalue("s3")
    prefix = unique("repo")
    return RepoPlace(f"s3://ff/{prefix}?endpoint={server.endpoint}", server.root / "ff" / prefix)


@pytest.fixture
def lab(home: Home, catalog: Catalog) -> Iterator[LabFactory]:
    """Start real lab VMs, registered as instances; every one is stopped after the test,
    whether it passed or not."""
    yield from _lab_factory(home, catalog, None)


def _lab_factory(home: Home, catalog: Catalog, uri: str | None) -> Iterator[LabFactory]:
    """Lab VMs under plain QEMU, or as libvirt domains at ``uri``; all stopped at the end."""
    started: list[str] = []

    def start(name: str | None = None, **options: Any) -> lab_vm.LabVM:
        name = name or unique("vm")
        started.append(name)
        vm = lab_vm.up(home.lab, home.images, name, libvirt_uri=uri, **options)
        if uri is not None:
            catalog.add_instance(name, kind="libvirt", qmp_socket=None, qga_socket=None, lab=True,
                                 libvirt_uri=uri, libvirt_domain=name)
        else:
            catalog.add_instance(name, kind="qemu", qmp_socket=vm.qmp_socket,
                                 qga_socket=vm.qga_socket if vm.agent else None, lab=True)
        return vm

    yield start
    for name in started:
        try:
            lab_vm.down(home.lab, name)
        except Exception as err:  # keep stopping the others
            print(f"could not stop lab VM {name}: {err}", file=sys.stderr)


def run_cli(home: Home, *args: str, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real command line, as a user would."""
    env = dict(os.environ, FREEZEFRAME_HOME=str(home.root), **(env or {}))
    return subprocess.run([sys.executable, "-m", "freezeframe", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def shared_vm(home: Home) -> Iterator[lab_vm.LabVM]:
    """One running lab VM (2 ext4 disks, qemu-ga, the writer running) for the tests that
    only read it or take snapshots of it, so each does not pay for a boot."""
    name = unique("shared")
    vm = lab_vm.up(home.lab, home.images, name, disks=2, workload=True)
    try:
        with Catalog.open(home.catalog) as cat:
            cat.add_instance(name, kind="qemu", qmp_socket=vm.qmp_socket, qga_socket=vm.qga_socket, lab=True)
        yield vm
    finally:
        lab_vm.down(home.lab, name)


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """A libvirtd to define lab domains on: the one running, or one started here (virtlogd
    and libvirtd), stopped by pid at the end of the session. Yields its URI."""
    started = lab_libvirt.ensure_daemons(lab_libvirt.DEFAULT_URI)
    try:
        yield lab_libvirt.DEFAULT_URI
    finally:
        for pid in reversed(started):
            lab_libvirt.stop_daemon(pid)


@pytest.fixture(scope="session")
def shared_libvirt_vm(home: Home, libvirtd: str) -> Iterator[lab_vm.LabVM]:
    """The shared VM's twin as a transient libvirt domain, registered with --libvirt."""
    name = unique("shared-lv")
    vm = lab_vm.up(home.lab, home.images, name, disks=2, workload=True, libvirt_uri=libvirtd)
    try:
        with Catalog.open(home.catalog) as cat:
            cat.add_instance(name, kind="libvirt", qmp_socket=None, qga_socket=None, lab=True,
                             libvirt_uri=libvirtd, libvirt_domain=name)
        yield vm
    finally:
        lab_vm.down(home.lab, name)


@pytest.fixture(params=["qemu", "libvirt"])
def any_vm(request: pytest.FixtureRequest) -> lab_vm.LabVM:
    """The same test on a VM under plain QEMU and on a libvirt domain."""
    return request.getfixturevalue("shared_vm" if request.param == "qemu" else "shared_libvirt_vm")  # type: ignore[no-any-return]


@pytest.fixture
def libvirt_lab(home: Home, catalog: Catalog, libvirtd: str) -> Iterator[LabFactory]:
    """Like ``lab``, as libvirt domains only (for what only libvirt has: checkpoints)."""
    yield from _lab_factory(home, catalog, libvirtd)


@pytest.fixture(params=["qemu", "libvirt"])
def any_lab(request: pytest.FixtureRequest, home: Home, catalog: Catalog) -> Iterator[LabFactory]:
    """Like ``lab``, under plain QEMU and as a libvirt domain."""
    uri = request.getfixturevalue("libvirtd") if request.param == "libvirt" else None
    yield from _lab_factory(home, catalog, uri)


def agent_call(where: str | lab_vm.LabVM, fn: Callable[[Any], Any], timeout: float = 10.0) -> Any:
    """Run ``await fn(agent)`` on a fresh guest-agent connection: a socket, or a lab VM's
    agent (through libvirt for a libvirt domain)."""

    async def go() -> Any:
        if isinstance(where, lab_vm.LabVM) and where.libvirt_uri is not None:
            async with LibvirtTarget(uri=where.libvirt_uri, domain=where.name) as target:
                return await fn(await target.connect_agent(timeout, timeout))
        socket = where.qga_socket if isinstance(where, lab_vm.LabVM) else where
        async with GuestAgent(socket, timeout=timeout) as agent:
            return await fn(agent)

    return asyncio.run(go())


def vm_status(vm: lab_vm.LabVM) -> str:
    """What the hypervisor says the VM is doing (running, paused, ...)."""
    async def qmp() -> str:
        async with Monitor(vm.qmp_socket) as monitor:
            return str((await monitor.execute("query-status"))["status"])

    if vm.libvirt_uri is None:
        return asyncio.run(qmp())
    import libvirt

    conn = libvirt.open(vm.libvirt_uri)
    try:
        state = conn.lookupByName(vm.name).state()[0]
    finally:
        conn.close()
    return "running" if state == libvirt.VIR_DOMAIN_RUNNING else f"libvirt state {state}"


def qmp(vm: lab_vm.LabVM, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """A QMP command's answer from the VM's QEMU: on its socket, or for a libvirt domain
    through libvirt's monitor pass-through (so what libvirt says is checked against QEMU)."""
    if vm.libvirt_uri is None:
        async def direct() -> Any:
            async with Monitor(vm.qmp_socket) as monitor:
                return await monitor.execute(command, arguments)

        return asyncio.run(direct())
    request = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
    done = subprocess.run(["virsh", "-c", vm.libvirt_uri, "qemu-monitor-command", vm.name, request],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)["return"]


def active_images(vm: lab_vm.LabVM) -> list[str]:
    """The active image of each writable disk, as QEMU has it."""
    blocks = qmp(vm, "query-block")
    return [b["inserted"]["file"] for b in blocks if b.get("inserted") and not b["inserted"].get("ro")]


def checkpoints(vm: lab_vm.LabVM) -> list[str] | None:
    """The libvirt checkpoints of a domain, sorted (None for a VM without libvirt)."""
    if vm.libvirt_uri is None:
        return None
    done = subprocess.run(["virsh", "-c", vm.libvirt_uri, "checkpoint-list", vm.name, "--name"],
                          capture_output=True, text=True, check=True)
    return sorted(line for line in done.stdout.split() if line)


async def guest_sh(agent: GuestAgent, script: str, timeout: float = 120) -> tuple[int, str]:
    started = await agent.execute("guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True})
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        status = await agent.execute("guest-exec-status", {"pid": started["pid"]})
        if status["exited"]:
            out = base64.b64decode(status.get("out-data", "")) + base64.b64decode(status.get("err-data", ""))
            return int(status.get("exitcode", -1)), out.decode(errors="replace")
        await asyncio.sleep(0.2)
    raise TimeoutError(f"guest command did not finish: {script}")
