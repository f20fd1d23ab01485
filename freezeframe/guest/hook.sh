#!/bin/sh
# freezeframe's guest hook runner in POSIX sh, for guests without Python: what qemu-ga
# runs as its fsfreeze hook (qemu-ga -F /usr/local/sbin/freezeframe-guest-hook).
#
# The same runner as freezeframe/guest/hook.py, with the same configuration file, report
# and deadman, so the host reads either the same way:
#
# * freeze runs the executables in the hook directory in order (C collation); thaw runs,
#   in reverse order, only those whose freeze succeeded.
# * Each hook has a timeout; at the timeout its whole process group is killed.
# * A hook that fails, hangs or is refused fails the freeze under the policy "fail" (what
#   froze is thawed again, the exit status is 1 so qemu-ga freezes nothing); under
#   "continue" the freeze goes on and the failure is reported.
# * Hooks not owned by root, or writable by group or others, are refused and not run.
# * The report (each hook's status, duration, bounded output) is JSON on tmpfs:
#   /run/freezeframe/hook-result.json, read by the host after the thaw.
# * A deadman: when the freeze goes ahead, a detached process thaws every file system
#   itself (fsfreeze --unfreeze) if no thaw comes within the deadline the host wrote to
#   /run/freezeframe-deadman-request.json before the freeze (deadman_s of the
#   configuration otherwise), and says so in /run/freezeframe/deadman.log and the kernel log.
#
# The thaw always exits 0: qemu-ga runs it after thawing, and a failing thaw hook must not
# make the host believe the guest is still frozen.
#
# Configuration, /etc/freezeframe/guest-hooks.json (flat; other keys are ignored):
#     {"hook_dir": "/etc/qemu/fsfreeze-hook.d", "timeout": 10, "on_failure": "fail", "deadman_s": 60}
#
# Needs: sh, sed, awk, tr, od, stat, setsid, sleep (fractions), fsfreeze, /proc. Busybox
# has them all; so does any distribution with coreutils and util-linux.

set -u
LC_ALL=C
export LC_ALL
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CONFIG=${FREEZEFRAME_HOOK_CONFIG:-/etc/freezeframe/guest-hooks.json}
STATE_DIR=${FREEZEFRAME_HOOK_STATE_DIR:-/run/freezeframe}
REQUEST=${FREEZEFRAME_DEADMAN_REQUEST:-/run/freezeframe-deadman-request.json}
MOUNTS=${FREEZEFRAME_HOOK_MOUNTS:-/proc/self/mounts}
KMSG=${FREEZEFRAME_HOOK_KMSG:-/dev/kmsg}
RESULT=$STATE_DIR/hook-result.json
RUN=$STATE_DIR/hook-run          # this freeze's settings, for the thaw (sourced)
FROZEN=$STATE_DIR/hook-frozen    # hooks whose freeze succeeded, one path a line
FREEZES=$STATE_DIR/hook-freezes  # report entries, one JSON object a line
THAWS=$STATE_DIR/hook-thaws
DEADMAN_STATE=$STATE_DIR/deadman.state
DEADMAN_LOG=$STATE_DIR/deadman.log
OUTPUT_LIMIT=4096
PSEUDO=" proc sysfs devtmpfs devpts tmpfs cgroup cgroup2 securityfs debugfs tracefs pstore bpf mqueue \
hugetlbfs configfs fusectl autofs rootfs ramfs efivarfs binfmt_misc nsfs rpc_pipefs "

# A value of the flat JSON configuration: a string or a number, never a structure.
config_value() {
    [ -r "$CONFIG" ] || return 0
    tr '\n' ' ' < "$CONFIG" | sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\{0,1\}\([^\",}]*\)\"\{0,1\}.*/\1/p"
}

# A number of seconds, at least $2, else $3 (the default): printed as awk's %g.
seconds() {
    awk -v v="$1" -v least="$2" -v fallback="$3" 'BEGIN {
        if (v !~ /^[0-9]+(\.[0-9]+)?$/) v = fallback
        v = v + 0; if (v < least) v = least; printf "%g", v }'
}

now_cs() { awk '{ printf "%d", $1 * 100 }' /proc/uptime; }

load_config() {
    HOOK_DIR=$(config_value hook_dir)
    HOOK_DIR=${HOOK_DIR:-/etc/qemu/fsfreeze-hook.d}
    POLICY=$(config_value on_failure)
    [ "$POLICY" = continue ] || POLICY=fail
    TIMEOUT=$(seconds "$(config_value timeout)" 0.1 10)
    DEADMAN_DEFAULT=$(seconds "$(config_value deadman_s)" 1 60)
}

# Printable ASCII (tab as a space) as the body of a JSON string, lines joined with \n.
json_text() {
    tr -cd '\11\12\40-\176' | tr '\11' ' ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' |
        awk 'BEGIN { ORS = "" } { if (NR > 1) print "\\n"; print } END { if (NR > 0) print "\\n" }'
}

# One line of printable ASCII as the body of a JSON string.
json_word() { printf '%s' "$1" | tr -cd '\40-\176' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }

# Why $1 must not be run as root, or nothing when it may.
unsafe() {
    if [ -L "$1" ] || [ ! -f "$1" ]; then echo "not a regular file"; return; fi
    owner=$(stat -c %u "$1") mode=$(stat -c %a "$1")
    if [ "$owner" != 0 ]; then echo "not owned by root (uid $owner)"; return; fi
    if [ $((0$mode & 18)) -ne 0 ]; then echo "writable by group or others (mode $mode)"; fi
}

dir_problem() {
    [ -d "$HOOK_DIR" ] || return 0
    owner=$(stat -c %u "$HOOK_DIR") mode=$(stat -c %a "$HOOK_DIR")
    if [ "$owner" != 0 ] || [ $((0$mode & 18)) -ne 0 ]; then
        echo "hook directory $HOOK_DIR is not root-owned or is writable by group or others"
    fi
}

# entry NAME ACTION STATUS EXIT_CODE ERROR OUTPUT_FILE DURATION_MS >> file
entry() {
    printf '{"name": "%s", "action": "%s", "status": "%s"' "$(json_word "$1")" "$2" "$3"
    [ -n "$4" ] && printf ', "exit_code": %s' "$4"
    [ -n "$5" ] && printf ', "error": "%s"' "$(json_word "$5")"
    printf ', "output": "%s", "duration_ms": %s}\n' "$( [ -f "$6" ] && tail -c "$OUTPUT_LIMIT" "$6" | json_text)" "$7"
}

# Run hook $1 with action $2, its entry appended to $3; succeeds when the hook did.
run_hook() {
    out=$STATE_DIR/hook-output
    : > "$out"
    start=$(now_cs)
    limit=$((start + $(awk -v t="$TIMEOUT" 'BEGIN { printf "%d", t * 100 }')))
    # Its own session, so that a timeout kills everything it started.
    setsid "$1" "$2" < /dev/null > "$out" 2>&1 &
    pid=$!
    killed=""
    while :; do
        state=$(sed 's/.*) //' "/proc/$pid/stat" 2> /dev/null | cut -c1)
        [ -z "$state" ] || [ "$state" = Z ] && break
        if [ "$(now_cs)" -ge "$limit" ]; then
            kill -KILL "-$pid" 2> /dev/null || kill -KILL "$pid" 2> /dev/null
            killed=1
            break
        fi
        sleep 0.02 2> /dev/null || sleep 1
    done
    wait "$pid"
    code=$?
    ms=$(awk -v a="$start" -v b="$(now_cs)" 'BEGIN { printf "%.1f", (b - a) * 10 }')
    if [ -n "$killed" ]; then
        entry "${1##*/}" "$2" failed "" "no answer within ${TIMEOUT}s; killed" "$out" "$ms" >> "$3"
        return 1
    fi
    if [ "$code" -eq 0 ]; then
        entry "${1##*/}" "$2" ok 0 "" "$out" "$ms" >> "$3"
        return 0
    fi
    entry "${1##*/}" "$2" failed "$code" "exited with $code" "$out" "$ms" >> "$3"
    return 1
}

# Thaw, in reverse order, the hooks listed in $FROZEN; entries to $THAWS.
thaw_frozen() {
    [ -s "$FROZEN" ] || return 0
    sed '1!G;h;$!d' "$FROZEN" > "$FROZEN.reversed"
    while IFS= read -r hook; do
        run_hook "$hook" thaw "$THAWS" || :
    done < "$FROZEN.reversed"
    rm -f "$FROZEN.reversed"
    : > "$FROZEN"
}

write_report() {
    {
        printf '{"format": "freezeframe-guest-hooks/1", "runner": "sh", "policy": "%s", "timeout": %s' \
            "$POLICY" "$TIMEOUT"
        printf ', "freeze_started_at": %s, "freeze": [' "${STARTED:-0}"
        awk 'BEGIN { ORS = "" } { if (NR > 1) print ", "; print }' "$FREEZES"
        printf '], "thaw": ['
        awk 'BEGIN { ORS = "" } { if (NR > 1) print ", "; print }' "$THAWS"
        printf '], "status": "%s", "clock_resolution_ms": 10' "$1"
        [ -n "${ARMED:-}" ] && printf ', "deadman": {"armed_s": %s}' "$ARMED"
        [ -n "${FREEZE_MS:-}" ] && printf ', "freeze_hooks_ms": %s' "$FREEZE_MS"
        [ -n "${THAW_MS:-}" ] && printf ', "thaw_hooks_ms": %s' "$THAW_MS"
        [ -n "${2:-}" ] && printf ', "thawed_at": %s' "$2"
        printf '}\n'
    } > "$RESULT.tmp" && mv -f "$RESULT.tmp" "$RESULT"
}

arm_deadman() {
    wanted=$DEADMAN_DEFAULT
    if [ -f "$REQUEST" ]; then
        asked=$(tr '\n' ' ' < "$REQUEST" | sed -n 's/.*"thaw_after_s"[[:space:]]*:[[:space:]]*\([0-9.]*\).*/\1/p')
        rm -f "$REQUEST"  # one request, one freeze
        [ -n "$asked" ] && wanted=$asked
    fi
    ARMED=$(awk -v s="$wanted" 'BEGIN { s = s + 0; if (s < 1) s = 1; if (s > 86400) s = 86400; printf "%g", s }')
    token=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    echo "$token armed" > "$DEADMAN_STATE"
    setsid sh "$0" deadman "$token" "$ARMED" < /dev/null > /dev/null 2>&1 &
}

# The detached deadman: sleep to the deadline; if this freeze is still not thawed, thaw.
deadman() {
    end=$(($(now_cs) + $(awk -v s="$2" 'BEGIN { printf "%d", s * 100 }')))
    while [ "$(now_cs)" -lt "$end" ]; do
        sleep 1
        [ "$(cat "$DEADMAN_STATE" 2> /dev/null)" = "$1 armed" ] || return 0
    done
    thawed="" count=0
    sed '1!G;h;$!d' "$MOUNTS" > "$STATE_DIR/deadman.mounts"  # children before parents
    while read -r _device point fstype _rest; do
        case $PSEUDO in *" $fstype "*) continue ;; esac
        point=$(printf '%s' "$point" | sed 's/\\040/ /g')
        if fsfreeze --unfreeze "$point" 2> /dev/null; then
            count=$((count + 1))
            thawed="$thawed${thawed:+, }$point"
        fi
    done < "$STATE_DIR/deadman.mounts"
    echo "$1 fired" > "$DEADMAN_STATE"
    line="freezeframe deadman: no thaw came within the deadline; thawed $count file system(s) itself (${thawed:-none was frozen})"
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $line" >> "$DEADMAN_LOG"
    echo "<3>$line" > "$KMSG" 2> /dev/null || :
}

# Milliseconds since $1 (centiseconds of /proc/uptime).
ms_since() { awk -v a="$1" -v b="$(now_cs)" 'BEGIN { printf "%d", (b - a) * 10 }'; }

# When this process started, in centiseconds of /proc/uptime: qemu-ga waits for all of it.
started_cs() {
    ticks=$(getconf CLK_TCK 2> /dev/null) || ticks=100
    sed 's/.*) //' /proc/$$/stat | awk -v hz="${ticks:-100}" '{ printf "%d", $20 * 100 / hz }'
}

freeze() {
    began=$(started_cs)
    STARTED=$(date +%s)
    ARMED="" FREEZE_MS="" THAW_MS=""
    : > "$FREEZES"
    : > "$THAWS"
    : > "$FROZEN"
    failed=""
    problem=$(dir_problem)
    if [ -n "$problem" ]; then
        entry "$HOOK_DIR" freeze refused "" "$problem" "" 0.0 >> "$FREEZES"
        failed=1
    elif [ -d "$HOOK_DIR" ]; then
        for hook in "$HOOK_DIR"/*; do
            case ${hook##*/} in .* | *~ | *.dpkg-old | *.dpkg-new | *.rpmsave | *.rpmnew) continue ;; esac
            if [ ! -f "$hook" ] || [ ! -x "$hook" ]; then continue; fi
            why=$(unsafe "$hook")
            if [ -n "$why" ]; then
                entry "${hook##*/}" freeze refused "" "$why" "" 0.0 >> "$FREEZES"
                failed=1
            elif run_hook "$hook" freeze "$FREEZES"; then
                echo "$hook" >> "$FROZEN"
            else
                failed=1
            fi
            [ -n "$failed" ] && [ "$POLICY" = fail ] && break
        done
    fi
    if [ -n "$failed" ] && [ "$POLICY" = fail ]; then
        # No thaw will come for a failed freeze: release what froze, now.
        thaw_frozen
        write_report failed
        printf 'STARTED=%s\nARMED=\n' "$STARTED" > "$RUN"
        return 1
    fi
    arm_deadman
    # The hook phase: file systems still writable; qemu-ga freezes them when this exits.
    FREEZE_MS=$(ms_since "$began")
    printf 'STARTED=%s\nARMED=%s\nFREEZE_MS=%s\n' "$STARTED" "$ARMED" "$FREEZE_MS" > "$RUN"
    write_report frozen
    return 0
}

thaw() {
    began=$(started_cs)
    STARTED=0 ARMED="" FREEZE_MS="" THAW_MS=""
    # shellcheck source=/dev/null  # this runner's own file, written at the freeze
    [ -f "$RUN" ] && . "$RUN"
    [ -f "$FREEZES" ] || : > "$FREEZES"
    [ -f "$THAWS" ] || : > "$THAWS"
    [ -f "$FROZEN" ] && thaw_frozen
    state=$(cat "$DEADMAN_STATE" 2> /dev/null)
    case $state in *" armed") echo "${state% armed} disarmed" > "$DEADMAN_STATE" ;; esac
    THAW_MS=$(ms_since "$began")  # after qemu-ga's thaw
    write_report thawed "$(date +%s)"
    return 0
}

case ${1:-} in
    freeze | thaw)
        load_config
        mkdir -p "$STATE_DIR" && chmod 700 "$STATE_DIR"
        if [ "$1" = freeze ]; then
            freeze
            exit $?
        fi
        thaw || :
        exit 0
        ;;
    deadman)
        deadman "$2" "$3"
        exit 0
        ;;
    *)
        echo "usage: $0 freeze|thaw" >&2
        exit 2
        ;;
esac
