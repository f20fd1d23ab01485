"""A lab guest of a real distribution: Debian 12 as operators run it.

systemd, Debian's own kernel (``linux-image-amd64``) and ``qemu-guest-agent``, started by a
systemd drop-in with ``-F/etc/qemu/fsfreeze-hook`` (the stock hook script, which runs
``/etc/qemu/fsfreeze-hook.d/*`` and logs to ``/var/log/qga-fsfreeze-hook.log``), and
PostgreSQL 15 with its data on a second disk. No Python in it, as on a minimal server.

Built once with ``mmdebstrap`` from the Debian archive this machine's apt already uses:
its own sources and settings are handed over, so no mirror is named here. The tree becomes
two ext4 images without mounting anything (``mkfs.ext4 -d``), stored as qcow2 and cached
by recipe; each lab VM boots on qcow2 overlays of them, with the kernel and initramfs the
build installed. A unit prints the lab's ready marker on the serial console once the agent
and PostgreSQL run.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from freezeframe.errors import LabError
from freezeframe.lab import host_tools

#: Bump when the recipe changes, so cached images are rebuilt.
IMAGE_FORMAT = 1
SUITE = "bookworm"
PACKAGES = ("systemd-sysv", "udev", "kmod", "linux-image-amd64", "initramfs-tools", "qemu-guest-agent",
            "postgresql-15", "e2fsprogs", "procps", "iproute2")
ROOT_MIB = 3072
PG_MIB = 1024
MEMORY_MIB = 1024
CMDLINE = "root=/dev/vda rw console=ttyS0 quiet panic=-1 systemd.show_status=0"

#: The stock-style application hooks ``lab up --stock-hook`` can enable (kept in the image
#: under /usr/share/freezeframe/hooks, copied into fsfreeze-hook.d at boot).
STOCK_HOOKS = {
    # What the guides tell operators to write: a checkpoint, so that little WAL is left to replay.
    "postgresql": ("#!/bin/sh\n"
                   "case \"$1\" in\n"
                   "    freeze) exec runuser -u postgres -- psql -qAt -c CHECKPOINT ;;\n"
                   "esac\n"),
}

_CUSTOMIZE = r"""
set -e
root="$1"
cat > "$root/etc/fstab" <<'EOF'
/dev/vda / ext4 rw,errors=remount-ro 0 1
/dev/vdb /var/lib/postgresql ext4 defaults 0 2
EOF
echo ff-debian > "$root/etc/hostname"
mkdir -p "$root/etc/systemd/system/qemu-guest-agent.service.d"
cat > "$root/etc/systemd/system/qemu-guest-agent.service.d/fsfreeze-hook.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/usr/sbin/qemu-ga -F/etc/qemu/fsfreeze-hook
EOF
cat > "$root/etc/systemd/system/ff-lab-ready.service" <<'EOF'
[Unit]
Description=freezeframe lab: ready marker on the serial console
After=qemu-guest-agent.service postgresql.service
Wants=qemu-guest-agent.service postgresql.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/ff-lab-ready

[Install]
WantedBy=multi-user.target
EOF
cat > "$root/usr/local/sbin/ff-lab-ready" <<'EOF'
#!/bin/sh
until systemctl is-active -q qemu-guest-agent postgresql@15-main; do sleep 0.5; done
echo "ff-lab: ready" > /dev/ttyS0
EOF
chmod 0755 "$root/usr/local/sbin/ff-lab-ready"
chroot "$root" systemctl enable ff-lab-ready.service
cat > "$root/etc/systemd/system/ff-lab-hooks.service" <<'EOF'
[Unit]
Description=freezeframe lab: the stock-style freeze hooks asked for on the kernel command line
Before=qemu-guest-agent.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/ff-lab-hooks

[Install]
WantedBy=multi-user.target
EOF
cat > "$root/usr/local/sbin/ff-lab-hooks" <<'EOF'
#!/bin/sh
# ff.stock_hooks=postgresql,... : each becomes /etc/qemu/fsfreeze-hook.d/NN-NAME, in order.
n=10
for word in $(cat /proc/cmdline); do
    case $word in ff.stock_hooks=*) hooks=${word#ff.stock_hooks=} ;; esac
done
for hook in $(echo "${hooks:-}" | tr ',' ' '); do
    install -m 0755 "/usr/share/freezeframe/hooks/$hook" "/etc/qemu/fsfreeze-hook.d/$n-$hook"
    n=$((n + 10))
done
EOF
chmod 0755 "$root/usr/local/sbin/ff-lab-hooks"
chroot "$root" systemctl enable ff-lab-hooks.service
chroot "$root" systemctl mask getty@tty1.service serial-getty@ttyS0.service
mkdir -p "$root/etc/qemu/fsfreeze-hook.d" "$root/usr/share/freezeframe/hooks"
printf 'virtio_pci\nvirtio_blk\nvirtio_console\next4\n' >> "$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all
"""


@dataclass(frozen=True, slots=True)
class DebianImage:
    kernel: Path
    initrd: Path
    root: Path  # qcow2
    pgdata: Path  # qcow2


def _key() -> str:
    digest = hashlib.sha256(f"{IMAGE_FORMAT}\n{SUITE}\n{PACKAGES!r}\n{_CUSTOMIZE}\n{STOCK_HOOKS!r}\n"
                            f"{ROOT_MIB} {PG_MIB}".encode())
    return digest.hexdigest()[:16]


def ensure_image(cache: Path) -> DebianImage:
    """The cached Debian guest, built first if missing (a few minutes: downloads and all)."""
    target = cache / f"debian-{_key()}"
    image = DebianImage(kernel=target / "vmlinuz", initrd=target / "initrd.img", root=target / "root.qcow2",
                        pgdata=target / "pgdata.qcow2")
    if all(p.exists() for p in (image.kernel, image.initrd, image.root, image.pgdata)):
        return image
    if shutil.which("mmdebstrap") is None:
        raise LabError("mmdebstrap is missing", hint="run make setup (it installs the lab packages)")
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix="build-debian-"))
    try:
        _build(work)
        try:
            work.rename(target)  # all or nothing: nobody sees half an image
        except OSError:
            if not image.root.exists():
                raise
    except OSError as err:
        raise LabError(f"cannot build the Debian lab guest in {cache}: {err}") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return image


def _build(work: Path) -> None:
    tree = work / "tree"
    hooks = "".join(
        f"cat > \"$1/usr/share/freezeframe/hooks/{name}\" <<'FFHOOK'\n{body}FFHOOK\n"
        f"chmod 0755 \"$1/usr/share/freezeframe/hooks/{name}\"\n"
        for name, body in STOCK_HOOKS.items())
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--quiet", f"--include={','.join(PACKAGES)}",
            *[f"--aptopt={option}" for option in host_apt_options()],
            f"--customize-hook={_CUSTOMIZE}{hooks}", SUITE, str(tree), *host_apt_sources()]
    host_tools.run(argv, "build the Debian tree with mmdebstrap", timeout=1800)
    boot = tree / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    initrds = sorted(boot.glob("initrd.img-*"))
    if not kernels or not initrds:
        raise LabError("the Debian tree has no kernel or initramfs in /boot")
    shutil.copyfile(kernels[-1], work / "vmlinuz")
    shutil.copyfile(initrds[-1], work / "initrd.img")
    # PostgreSQL's data goes on its own disk, as on a real server; its mount point stays.
    pgdata = work / "pgdata"
    (tree / "var/lib/postgresql").rename(pgdata)
    (tree / "var/lib/postgresql").mkdir(mode=0o755)
    shutil.copystat(pgdata, tree / "var/lib/postgresql")
    for name, source, mib in (("root", tree, ROOT_MIB), ("pgdata", pgdata, PG_MIB)):
        raw = work / f"{name}.raw"
        host_tools.run(["mkfs.ext4", "-q", "-F", "-d", str(source), "-L", f"ff{name}", str(raw), f"{mib}M"],
                       f"make the {name} file system")
        host_tools.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                        str(work / f"{name}.qcow2")], f"store the {name} image")
        raw.unlink()
    shutil.rmtree(tree)
    shutil.rmtree(pgdata)


def host_apt_sources() -> list[str]:
    """This machine's apt sources files, handed to mmdebstrap as they are (deb822 or one-line)."""
    found = [str(p) for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    found += [str(p) for p in sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    listing = Path("/etc/apt/sources.list")
    if listing.exists() and any(line.strip().startswith("deb ") for line in listing.read_text().splitlines()):
        found.insert(0, str(listing))
    if not found:
        raise LabError("this machine's apt has no sources: the Debian guest is built from them")
    return found


def host_apt_options() -> list[str]:
    """This machine's apt settings (proxies, validity checks), as files mmdebstrap copies in."""
    return [str(p) for p in sorted(Path("/etc/apt/apt.conf.d").glob("*")) if p.is_file()]
