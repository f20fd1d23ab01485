#!/usr/bin/env bash
# The demo: a lab VM with a writer running on two disks; an application-consistent and a
# crash-consistent snapshot; then backups: a full and an incremental one into a fresh
# repository, its stats, and the incremental restored as a new lab VM that boots.
# Every VM is stopped again, whatever happens.
set -euo pipefail
ff=.venv/bin/freezeframe
py=.venv/bin/python
vm=demo
restored=demo-restored
repo=""

cleanup() {
    "$ff" lab down "$restored" >/dev/null 2>&1 || true
    "$ff" lab down "$vm" >/dev/null 2>&1 || true
    # The demo's backups go with its repository.
    # Nothing to list (no repository yet, on a first run) is nothing to delete.
    for id in $("$ff" backup list --instance "$vm" -o json 2>/dev/null \
                | "$py" -c 'import json, sys; text = sys.stdin.read().strip()
print(" ".join(b["id"] for b in json.loads(text)) if text else "")'); do
        "$ff" backup delete "$id" >/dev/null 2>&1 || true
    done
    if [[ -n $repo ]]; then rm -rf "$repo"; fi
}
cleanup   # left over from an interrupted demo
repo=$(mktemp -d /var/tmp/ff-demo-repo.XXXXXX)
trap cleanup EXIT

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
echo "== backups into a new repository ($repo): the same consistent point, but copied out of the VM"
"$ff" repo init "$repo"
echo "-- full"
"$ff" backup create "$vm" --repo "$repo" --consistency filesystem
echo "-- incremental: only the chunks the dirty bitmap marks as changed are read"
inc=$("$ff" backup create "$vm" --repo "$repo" --consistency filesystem -o json)
echo "$inc" | "$py" -c 'import json, sys
b = json.load(sys.stdin)
short, parent = b["id"][:8], b["parent"][:8]
print("backup %s: %s, %s-consistent, incremental to %s" % (short, b["type"], b["consistency"], parent))
for d in b["disks"]:
    print("  %s: read %d MiB of %d MiB; %d MiB unchanged (referenced, not read); %d MiB new" % (
        d["device"], d["bytes_read"] >> 20, d["virtual_size"] >> 20, d["bytes_unchanged"] >> 20,
        d["bytes_new"] >> 20))'
id=$(echo "$inc" | "$py" -c 'import json, sys; print(json.load(sys.stdin)["id"])')
echo
"$ff" backup list --instance "$vm"
"$ff" repo stats "$repo"
echo
echo "== verify: every chunk read back and checked; then a restore test of the incremental"
"$ff" backup verify --all --repo "$repo"
"$ff" backup test "$id" --repo "$repo"
echo
echo "== restore the incremental backup as a new lab VM, and boot it"
"$ff" lab up "$restored" --from-backup "$id" --repo "$repo" -o json | grep -E '"(name|running)"' || true
"$ff" lab list
echo
echo "== stopping the VMs, deleting the demo's backups and repository"
"$ff" lab down "$restored"
"$ff" lab down "$vm"
trap - EXIT
cleanup
