#!/usr/bin/env bash
# Installs the Debian 12 packages freezeframe and its lab VMs need, if any is missing.
# Idempotent and quick when everything is there already.
set -euo pipefail

packages=(
    qemu-system-x86 qemu-utils qemu-guest-agent   # the hypervisor, qemu-img, the agent copied into the guest
    linux-image-amd64 busybox-static              # the lab guest's kernel, modules and userland
    e2fsprogs xfsprogs                            # formatting lab disks; dumpe2fs / xfs_repair as oracles
    gcc libc6-dev                                 # the static guest workload
    btrfs-progs util-linux lvm2 procps            # host snapshots: btrfs, loop mounts; LVM (in lab guests); pgrep
    postgresql mariadb-server redis-server sqlite3  # real servers the writer tests quiesce
    python3 python3-venv
    shellcheck                                    # the guest hook runner in POSIX sh
    mmdebstrap                                    # the Debian lab guest (lab build --distro debian)
    python3-libnbd                                # reading backups over NBD (linked into the venv)
    nbdkit nbdkit-plugin-python libnbd-bin        # serving a backup over NBD (backup serve); nbdcopy, nbdinfo
    libguestfs-tools libguestfs-xfs python3-guestfs  # file restore and restore tests in an appliance VM, never a host mount
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients python3-libvirt  # libvirt domains
    ceph-mon ceph-mgr ceph-osd radosgw ceph-common uuid-runtime  # a one-node Ceph cluster's S3 gateway (fleet tests)
)
# `setup-system.sh bench`: the peers the benchmarks compare with, too.
if [[ ${1:-} == bench ]]; then
    packages+=(restic borgbackup)
fi

missing=()
for pkg in "${packages[@]}"; do
    [[ $pkg == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "setup: need root to install packages (run as root, or install them yourself)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirt without libvirt-daemon-system (whose systemd units, sockets and users a machine
# without systemd cannot use): the account and group its QEMU driver resolves at start,
# its log folder, and, only where no qemu.conf exists, one that runs QEMU as root
# without a security driver, as the lab's own QEMU runs.
if ! getent group libvirt-qemu >/dev/null; then groupadd --system libvirt-qemu; fi
if ! getent passwd libvirt-qemu >/dev/null; then
    useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
        --shell /usr/sbin/nologin libvirt-qemu
fi
mkdir -p /var/log/libvirt /var/lib/libvirt
if [[ ! -e /etc/libvirt/qemu.conf ]]; then
    printf 'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nsecurity_driver = "none"\n' \
        > /etc/libvirt/qemu.conf
fi
