#!/usr/bin/env bash
# Makes Debian's libnbd Python module (python3-libnbd) importable in the virtualenv.
#
# Debian builds it for /usr/bin/python3 (3.11). The virtualenv's Python may be another
# 3.11 build (it is on these machines); the C extension only needs the same CPython ABI.
# So exactly its two files are linked into a folder of the venv that a .pth file names:
# not all of Debian's dist-packages, whose other packages must not mix with the pinned ones.
set -euo pipefail
venv=$(cd "$1" && pwd)
src=/usr/lib/python3/dist-packages
suffix=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
module="$src/libnbdmod$suffix"
if [[ ! -e $module ]]; then
    echo "link-libnbd: $module is missing: python3-libnbd is not installed, or not built for this Python" >&2
    exit 1
fi
mkdir -p "$venv/debian-nbd"
ln -sfn "$src/nbd.py" "$module" "$venv/debian-nbd/"
echo "$venv/debian-nbd" > "$site/debian-nbd.pth"
"$venv/bin/python" -c 'import nbd' || { echo "link-libnbd: nbd does not import in $venv" >&2; exit 1; }
