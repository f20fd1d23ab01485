#!/usr/bin/env bash
# Makes Debian's libnbd, libvirt and libguestfs Python modules (python3-libnbd,
# python3-libvirt, python3-guestfs)
# importable in the virtualenv.
#
# Debian builds them for /usr/bin/python3 (3.11), against the libnbd and libvirt it ships.
# The virtualenv's Python may be another 3.11 build (it is on these machines); a C
# extension only needs the same CPython ABI. So exactly these modules' files are linked
# into a folder of the venv that a .pth file names: not all of Debian's dist-packages,
# whose other packages must not mix with the pinned ones.
set -euo pipefail
venv=$(cd "$1" && pwd)
src=/usr/lib/python3/dist-packages
suffix=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
files=(nbd.py "libnbdmod$suffix" libvirt.py "libvirtmod$suffix" libvirt_qemu.py "libvirtmod_qemu$suffix"
       guestfs.py "libguestfsmod$suffix")
rm -rf "$venv/debian-nbd" "$site/debian-nbd.pth"  # the older name of this folder
mkdir -p "$venv/debian-modules"
for file in "${files[@]}"; do
    if [[ ! -e $src/$file ]]; then
        echo "link-debian-modules: $src/$file is missing: install python3-libnbd, python3-libvirt and python3-guestfs (make setup)" >&2
        exit 1
    fi
    ln -sfn "$src/$file" "$venv/debian-modules/"
done
echo "$venv/debian-modules" > "$site/debian-modules.pth"
"$venv/bin/python" -c 'import nbd, libvirt, libvirt_qemu, guestfs' \
    || { echo "link-debian-modules: nbd, libvirt or guestfs does not import in $venv" >&2; exit 1; }
