#!/usr/bin/env bash
# The demo: a lab VM with a writer running on two disks, one filesystem-consistent
# snapshot of it, the list of snapshots, and the VM stopped again, whatever happens.
set -euo pipefail
ff=.venv/bin/freezeframe
vm=demo

"$ff" lab down "$vm" >/dev/null 2>&1 || true   # left over from an interrupted demo
trap '"$ff" lab down "$vm" >/dev/null 2>&1 || true' EXIT

echo "== starting lab VM '$vm': 2 ext4 data disks, qemu-ga with freezeframe's hook runner,"
echo "   a writer appending to both disks, and a SQLite application with its freeze hook"
"$ff" lab up "$vm" --disks 2 --workload --app sqlite --hook sqlite
echo
echo "== application-consistent snapshot: SQLite held by its hook, file systems frozen by qemu-ga,"
echo "   every disk switched to a new overlay in one QMP transaction"
"$ff" snapshot create "$vm" --consistency application --freeze-timeout 60
echo
echo "== a crash-consistent one, for comparison"
"$ff" snapshot create "$vm" --consistency crash -o json | grep -E '"(name|consistency)"' 
echo
echo "== snapshots of '$vm'"
"$ff" snapshot list --instance "$vm"
echo
echo "== stopping the VM"
"$ff" lab down "$vm"
trap - EXIT
