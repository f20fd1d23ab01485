"""Builds the lab guest: the host's Debian kernel and an initramfs made from host packages.

The initramfs holds busybox, qemu-ga with the shared libraries it links, the virtio and
file-system modules in dependency order, and ff-workload (compiled static from
``workload.c``). There is no udev in it, so ``/init`` makes the ``/dev/virtio-ports``
links itself. The result is cached under the home, keyed by everything that goes in.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from freezeframe.errors import LabError
from freezeframe.lab import host_tools

#: Bump when the image layout or /init changes, so cached images are rebuilt.
IMAGE_FORMAT = 11

#: Modules the guest needs; their dependencies are added from modules.dep.
#: crc32c_generic comes first: ext4 (metadata_csum) and xfs ask the crypto API for
#: crc32c, which would otherwise need modprobe.
WANTED_MODULES = (
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",  # disks on a virtio-scsi controller (sd*)
    "sd_mod",
    "virtio_console",
    "ext4",
    "xfs",
    "dm_snapshot",  # LVM snapshots, tested in the guest since some hosts have no device-mapper
    # The database applications: the host's /usr over 9p, and a network for their port.
    "9pnet_virtio",
    "9p",
    "virtio_net",
)

GUEST_AGENT = Path("/usr/sbin/qemu-ga")
BUSYBOX = Path("/bin/busybox")
#: qemu-ga's stock fsfreeze hook script, as Debian's qemu-guest-agent ships it.
STOCK_HOOK = Path("/etc/qemu/fsfreeze-hook")
HOST_BINARIES = (GUEST_AGENT, BUSYBOX, Path("/usr/bin/python3.11"), Path("/sbin/lvm"), Path("/sbin/mke2fs"),
                 STOCK_HOOK)


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    initrd: Path


INIT_SCRIPT = r"""#!/bin/busybox sh
# freezeframe lab guest init. Everything here runs as PID 1; see freezeframe/lab/image.py.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/local/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=0755 run /run
ln -sfn /run /var/run
echo 1 > /proc/sys/kernel/printk

for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko || echo "ff-lab: insmod $m failed"; done

arg() { for w in $(cat /proc/cmdline); do case $w in "$1="*) echo "${w#*=}"; return;; esac; done; }

# No udev: name the virtio serial ports the way udev rules would.
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && ln -sfn "../${p##*/}" "/dev/virtio-ports/$(cat $p/name)"
done

# Data disks carry a serial (ffdata0, ffdata1, ...) and are mounted at /mnt/<serial>.
# A SCSI disk's serial is in its unit serial number page (VPD 0x80), after a 4-byte header.
# The writer gets its files in serial order, not in the kernel's: SCSI disks are scanned
# asynchronously, so sda may well be ffdata1.
serials=""
for b in /sys/block/vd* /sys/block/sd*; do
    [ -e "$b" ] || continue
    dev=/dev/${b##*/}
    serial=$(cat $b/serial 2>/dev/null)
    [ -n "$serial" ] || serial=$(tail -c +5 $b/device/vpd_pg80 2>/dev/null | tr -cd 'A-Za-z0-9_-')
    [ -n "$serial" ] || continue
    mkdir -p /mnt/$serial
    if mount "$dev" /mnt/$serial; then
        serials="$serials $serial"
    else
        echo "ff-lab: cannot mount $dev"
    fi
done
files=""
for serial in $(echo $serials | tr ' ' '\n' | sort); do files="$files /mnt/$serial/workload.log"; done

# Freeze hooks (ff.hooks=sqlite,ok,fail,hang,badowner) run by freezeframe's hook runner,
# its POSIX sh twin (ff.hook_runner=sh), or (ff.hook_runner=stock) by qemu-ga's stock
# fsfreeze-hook script, which logs to /var/log.
hook_flag=""
hooks="$(arg ff.hooks | tr ',' ' ')"
runner="$(arg ff.hook_runner)"
if [ -n "$hooks" ] || [ "$runner" = stock ]; then
    mkdir -p /etc/qemu/fsfreeze-hook.d /etc/freezeframe /var/log
    chmod 755 /etc/qemu/fsfreeze-hook.d
    i=10
    for h in $hooks; do
        cp /usr/share/freezeframe/hooks/$h /etc/qemu/fsfreeze-hook.d/$i-$h
        chmod 755 /etc/qemu/fsfreeze-hook.d/$i-$h
        [ "$h" = badowner ] && chmod 777 /etc/qemu/fsfreeze-hook.d/$i-$h
        i=$((i + 10))
    done
    if [ "$runner" = stock ]; then
        hook_flag="-F/etc/qemu/fsfreeze-hook"
    else
        policy="$(arg ff.hook_policy)"; timeout="$(arg ff.hook_timeout)"
        echo "{\"on_failure\": \"${policy:-fail}\", \"timeout\": ${timeout:-10}}" > /etc/freezeframe/guest-hooks.json
        hook_flag="-F/usr/local/bin/freezeframe-guest-hook"
        [ "$runner" = sh ] && hook_flag="-F/usr/local/bin/freezeframe-guest-hook-sh"
    fi
fi

# The SQLite application (ff.app=sqlite) on the first data disk.
if [ "$(arg ff.app)" = sqlite ] && [ -d /mnt/ffdata0 ]; then
    mkdir -p /etc/freezeframe
    echo '{"databases": ["/mnt/ffdata0/app.db"], "hold_timeout": 60}' > /etc/freezeframe/sqlite-hold.json
    python3 /usr/local/lib/freezeframe/sqlite_app.py /mnt/ffdata0/app.db /run/ff-sqlite-app.acked &
    n=0
    while [ ! -s /run/ff-sqlite-app.acked ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
    [ -s /run/ff-sqlite-app.acked ] || echo "ff-lab: the sqlite application did not start"
fi

# A database server (ff.app=postgresql|mariadb, see freezeframe/lab/apps.py): the host's
# binaries from its /usr over 9p, the data directory the lab made on the first data disk,
# and the user-mode network the host forwards a port to.
app="$(arg ff.app)"
if [ "$app" = postgresql ] || [ "$app" = mariadb ]; then
    mkdir -p /host/usr /dev/shm /usr/share
    mount -t tmpfs -o mode=1777 shm /dev/shm
    mount -t 9p -o trans=virtio,version=9p2000.L,ro hostusr /host/usr || echo "ff-lab: cannot mount the host's /usr"
    ln -sfn /host/usr/share/zoneinfo /usr/share/zoneinfo
    ip link set lo up
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
    libs=/host/usr/lib/x86_64-linux-gnu
    if [ "$app" = postgresql ]; then
        data=/mnt/ffdata0/pg
        owner=$(stat -c %u:%g $data)
        echo "postgres:x:${owner%:*}:${owner#*:}:postgres:/run/postgresql:/bin/sh" >> /etc/passwd
        mkdir -p /run/postgresql && chown $owner /run/postgresql
        bin=/host/usr/lib/postgresql/$(cat $data/PG_VERSION)/bin
        su -s /bin/sh postgres -c "LD_LIBRARY_PATH=$libs $bin/postgres -D $data >/run/postgresql/log 2>&1 &"
        ready=/run/postgresql/.s.PGSQL.5432
    else
        LD_LIBRARY_PATH=$libs /host/usr/sbin/mariadbd --no-defaults --user=root --datadir=/mnt/ffdata0/mysql \
            --basedir=/host/usr --lc-messages-dir=/host/usr/share/mysql --plugin-dir=/host/usr/lib/mysql/plugin \
            --socket=/run/mysqld.sock --pid-file=/run/mysqld.pid --log-error=/run/mariadb.err --port=3306 \
            --bind-address=0.0.0.0 --skip-name-resolve --innodb-buffer-pool-size=16M --log-bin=binlog \
            --server-id=1 --init-file=/mnt/ffdata0/ff-lab-init.sql </dev/null >/dev/null 2>&1 &
        ready=/run/mysqld.sock
    fi
    n=0
    while [ ! -S $ready ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n + 1)); done
    [ -S $ready ] || echo "ff-lab: the $app server did not start"
    # PostgreSQL makes its socket before it takes connections ("the database system is
    # starting up", for seconds on a loaded host): ready is when it answers.
    if [ "$app" = postgresql ]; then
        n=0
        until LD_LIBRARY_PATH=$libs $bin/pg_isready -q -h /run/postgresql || [ $n -ge 1200 ]; do
            sleep 0.1; n=$((n + 1))
        done
    fi
fi

if [ "$(arg ff.agent)" != 0 ]; then
    # qemu-ga never thaws by itself, and tests kill it on purpose: keep it running.
    ( while :; do
        qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run $hook_flag \
            $(arg ff.agent_args | tr '+' ' ')
        sleep 0.2
    done ) &
fi

if [ "$(arg ff.workload)" = 1 ] && [ -n "$files" ]; then
    sync_flag=""
    [ "$(arg ff.workload_sync)" = 1 ] && sync_flag=-s
    ff-workload $sync_flag -i "$(arg ff.workload_interval_us)" /run/ff-workload.stalls $files &
fi

echo "ff-lab: ready" > /dev/ttyS0
while :; do sleep 3600; done
"""



def host_kernel() -> tuple[Path, Path]:
    """The newest Debian kernel in /boot that has its modules installed."""

    def version_key(path: Path) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", path.name)]

    for kernel in sorted(Path("/boot").glob("vmlinuz-*"), key=version_key, reverse=True):
        modules = Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-")
        if (modules / "modules.dep").exists():
            return kernel, modules
    raise LabError(
        "no kernel with modules found in /boot and /lib/modules",
        hint="install linux-image-amd64 (make setup does)",
    )


def module_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files to load, each after the modules it depends on (from modules.dep)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        by_name[_module_name(target)] = target
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise LabError(f"kernel module {name} not found in {modules_dir}")
        visit(by_name[name])
    return [modules_dir / p for p in order]


def _module_name(path: str) -> str:
    base = Path(path).name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return base


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries the dynamic loader would map for ``binary``, loader included."""
    out = host_tools.run(["ldd", str(binary)], f"list the libraries of {binary}")
    libs = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _image_key(kernel: Path) -> str:
    digest = hashlib.sha256()
    # Everything that goes into the image: a change to any of it makes a new one.
    digest.update(f"{IMAGE_FORMAT}\n{INIT_SCRIPT}\n{_LIST_MODULES}\n{SAMPLE_HOOKS!r}\n{WANTED_MODULES!r}".encode())
    digest.update(resources.files("freezeframe.lab").joinpath("workload.c").read_bytes())
    for program in ("hook.py", "hook.sh", "sqlite_hold.py", "sqlite_app.py"):
        digest.update(resources.files("freezeframe.guest").joinpath(program).read_bytes())
    for path in (kernel, *HOST_BINARIES, *GUEST_TOOLS):
        st = path.stat()
        digest.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def ensure_image(cache: Path) -> GuestImage:
    """The cached guest image, built first if it is missing or out of date."""
    kernel, modules_dir = host_kernel()
    for binary in HOST_BINARIES:
        if not binary.exists():
            raise LabError(f"{binary} is missing", hint="run make setup to install the lab packages")
    target = cache / _image_key(kernel)
    image = GuestImage(kernel=target / "vmlinuz", initrd=target / "initrd.gz")
    if image.kernel.exists() and image.initrd.exists():
        return image
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix="build-"))
    try:
        shutil.copyfile(kernel, work / "vmlinuz")
        with tempfile.TemporaryDirectory() as scratch:
            _write_initrd(work / "initrd.gz", modules_dir, Path(scratch))
        # Renaming a whole directory means nobody ever sees half an image. If another
        # builder got there first, its image is as good as ours.
        try:
            work.rename(target)
        except OSError:
            if not image.initrd.exists():
                raise
    except OSError as err:
        raise LabError(f"cannot build the lab guest image in {cache}: {err}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image


def _compile_workload(out: Path) -> None:
    source = out.with_suffix(".c")
    source.write_bytes(resources.files("freezeframe.lab").joinpath("workload.c").read_bytes())
    host_tools.run(["cc", "-O2", "-static", "-o", str(out), str(source)], "compile the guest workload")


def _write_initrd(dest: Path, modules_dir: Path, work: Path) -> None:
    archive = _Cpio()
    for directory in ("bin", "dev", "proc", "sys", "run", "var", "mnt", "tmp", "etc",
                      "lib/modules", "usr/sbin", "usr/local/bin"):
        archive.directory(directory)
    archive.file("init", INIT_SCRIPT.encode(), 0o755)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("usr/sbin/qemu-ga", GUEST_AGENT.read_bytes(), 0o755)
    archive.directory("etc/qemu")
    archive.file("etc/qemu/fsfreeze-hook", STOCK_HOOK.read_bytes(), 0o755)
    archive.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n", 0o644)
    seen: set[str] = set()
    for lib in shared_libraries(GUEST_AGENT):
        # Keep the path the binary asks for (/lib64/ld-linux..., /lib/x86_64-linux-gnu/...).
        _add_file(archive, seen, lib, 0o755)
    _guest_python(archive, seen)
    for tool in GUEST_TOOLS:
        for lib in shared_libraries(tool):
            _add_file(archive, seen, lib, 0o755)
        _add_file(archive, seen, tool, 0o755)
    order = []
    for module in module_order(modules_dir, WANTED_MODULES):
        name = _module_name(module.name)
        archive.file(f"lib/modules/{name}.ko", _module_bytes(module), 0o644)
        order.append(name)
    archive.file("lib/modules/order", ("\n".join(order) + "\n").encode(), 0o644)
    workload = work / "ff-workload"
    _compile_workload(workload)
    archive.file("usr/local/bin/ff-workload", workload.read_bytes(), 0o755)
    with gzip.open(dest, "wb", compresslevel=6) as out:
        out.write(archive.finish())


#: What the guest's Python programs import, found by importing them on the host (with
#: site, as a script run by its shebang would) and listing every module that got loaded.
_LIST_MODULES = r"""
import json, sys, importlib.util
sys.path.insert(0, sys.argv[1])
import hook, sqlite_hold, sqlite_app
# What freezeframe's host target needs, so its LVM provider can be tried in a guest.
import asyncio, asyncio.subprocess, dataclasses, enum, fcntl, errno, contextlib, typing, uuid, pathlib, collections.abc
import encodings.utf_8, encodings.latin_1, encodings.ascii, encodings.aliases
files = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None)
    if path and path.startswith(sys.argv[2]):
        files.add(path)
        if path.endswith(".py"):
            cached = importlib.util.cache_from_source(path)
            files.add(cached)
print(json.dumps(sorted(files)))
"""

GUEST_PYTHON = Path("/usr/bin/python3.11")
GUEST_STDLIB = "/usr/lib/python3.11"
GUEST_PROGRAMS = ("hook.py", "sqlite_hold.py", "sqlite_app.py")
#: Storage tools in the guest: LVM (lvm pvcreate, lvcreate, ...) and mke2fs to format its volumes.
GUEST_TOOLS = (Path("/sbin/lvm"), Path("/sbin/mke2fs"))

#: Sample hooks the lab can install (ff.hooks=ok,fail,...): names and /bin/sh bodies.
SAMPLE_HOOKS = {
    "ok": "#!/bin/sh\necho \"$1: nothing to do\"\n",
    "fail": "#!/bin/sh\nif [ \"$1\" = freeze ]; then echo 'refusing to quiesce' >&2; exit 3; fi\n",
    "hang": "#!/bin/sh\nif [ \"$1\" = freeze ]; then sleep 600; fi\n",
    "slow": "#!/bin/sh\nif [ \"$1\" = freeze ]; then sleep 6; fi\necho \"$1: done\"\n",
    # Quiesces like a database CHECKPOINT would: writes its dirty data out, for a second.
    "checkpoint": "#!/bin/sh\nif [ \"$1\" = freeze ]; then sync; sleep 1; fi\necho \"$1: done\"\n",
    # Kills qemu-ga a second after the freeze, as a crash would; the lab's init restarts it.
    "killagent": "#!/bin/sh\nif [ \"$1\" = freeze ]; then (sleep 1; killall qemu-ga) </dev/null >/dev/null 2>&1 & fi\n",
    "badowner": "#!/bin/sh\necho \"$1: should never run\"\n",
    "sqlite": "#!/bin/sh\nexec /usr/bin/python3 /usr/local/lib/freezeframe/sqlite_hold.py \"$@\"\n",
}


def _guest_python(archive: _Cpio, seen: set[str]) -> None:
    """Python for the guest: the interpreter, its libraries, and just the stdlib modules
    the guest programs load (the whole stdlib would triple the image)."""
    guest_dir = resources.files("freezeframe.guest")
    with resources.as_file(guest_dir) as directory:
        listing = host_tools.run([str(GUEST_PYTHON), "-I", "-c", _LIST_MODULES, str(directory), GUEST_STDLIB],
                       "list the modules the guest programs need")
    files = json.loads(listing)
    for binary in [GUEST_PYTHON, *(Path(f) for f in files if f.endswith(".so"))]:
        for lib in shared_libraries(binary):
            _add_file(archive, seen, lib, 0o755)
    _add_file(archive, seen, GUEST_PYTHON, 0o755)
    archive.symlink("usr/bin/python3", GUEST_PYTHON.name)
    for name in files:
        path = Path(name)
        if path.exists():
            _add_file(archive, seen, path, 0o644)
    # The interpreter finds its prefix by this landmark, and wants lib-dynload to exist.
    _add_file(archive, seen, Path(GUEST_STDLIB) / "os.py", 0o644)
    archive.directory(f"{GUEST_STDLIB.lstrip('/')}/lib-dynload")
    for folder in ("usr/local/lib/freezeframe", "usr/share/freezeframe/hooks"):
        archive.directory(folder)
    archive.file("usr/local/bin/freezeframe-guest-hook", guest_dir.joinpath("hook.py").read_bytes(), 0o755)
    archive.file("usr/local/bin/freezeframe-guest-hook-sh", guest_dir.joinpath("hook.sh").read_bytes(), 0o755)
    for program in ("sqlite_hold.py", "sqlite_app.py"):
        archive.file(f"usr/local/lib/freezeframe/{program}", guest_dir.joinpath(program).read_bytes(), 0o755)
    for name, body in SAMPLE_HOOKS.items():
        archive.file(f"usr/share/freezeframe/hooks/{name}", body.encode(), 0o755)


def _add_file(archive: _Cpio, seen: set[str], path: Path, mode: int) -> None:
    name = str(path).lstrip("/")
    if name in seen:
        return
    seen.add(name)
    archive.directory(str(Path(name).parent))
    archive.file(name, path.resolve().read_bytes(), mode)


def _module_bytes(module: Path) -> bytes:
    data = module.read_bytes()
    if module.name.endswith(".ko"):
        return data
    if module.name.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(data)
    if module.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    raise LabError(f"cannot unpack kernel module {module}: unknown compression")


class _Cpio:
    """A "newc" cpio archive, the format the kernel unpacks as initramfs.

    Written here rather than with cpio(1) so ownership and modes are exact
    without fakeroot, and the build needs one tool less.
    """

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._ino += 1
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str) -> None:
        parts = Path(name).parts
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in self._dirs:
                self._dirs.add(sub)
                self._entry(sub, stat.S_IFDIR | 0o755, b"")

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return self._out.getvalue()
