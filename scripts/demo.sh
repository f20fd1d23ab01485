#!/usr/bin/env bash
# The demo: a lab VM with a writer running on two disks, one filesystem-consistent
# snapshot of it, the list of snapshots, and the VM stopped again, whatever happens.
set -euo pipefail
ff=.venv/bin/freezeframe
vm=demo

"$ff" lab down "$vm" >/dev/null 2>&1 || true   # left over from an interrupted demo
trap '"$ff" lab down "$vm" >/dev/null 2>&1 || true' EXIT

echo "== starting lab VM '$vm' (2 ext4 data disks, qemu-ga, a writer appending to both)"
"$ff" lab up "$vm" --disks 2 --workload
echo
echo "== snapshot of every disk at one instant, file systems frozen by the guest agent"
"$ff" snapshot create "$vm" --consistency filesystem
echo
echo "== snapshots of '$vm'"
"$ff" snapshot list --instance "$vm"
echo
echo "== stopping the VM"
"$ff" lab down "$vm"
trap - EXIT
