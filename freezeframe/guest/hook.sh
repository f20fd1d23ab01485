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
# Needs: sh, sed, awk, tr, tail, stat, setsid, sleep (fractions), fsfreeze, /proc. Busybox
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

# Every process costs here: under emulation a fork and exec of awk or sed takes tens of
# milliseconds, and all of it is time the applications are held. So arithmetic, the clock
# and the configuration are read by the shell itself, and a hook is waited for, not polled.

# The flat JSON configuration, read once: "key=value" lines for the keys below (strings
# and numbers only, never a structure).
read_config() {
    [ -r "$CONFIG" ] || return 0
    tr '\n' ' ' < "$CONFIG" | sed -n \
        -e 'h;s/.*"hook_dir"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/hook_dir=\1/p' \
        -e 'g;s/.*"on_failure"[[:space:]]*:[[:space:]]*"\([a-z]*\)".*/on_failure=\1/p' \
        -e 'g;s/.*"timeout"[[:space:]]*:[[:space:]]*\([0-9.]*\).*/timeout=\1/p' \
        -e 'g;s/.*"deadman_s"[[:space:]]*:[[:space:]]*\([0-9.]*\).*/deadman_s=\1/p'
}

# Seconds as centiseconds: $1 if it is a plain number (1, 2.5), else $2; at least $3.
to_cs() {
    value=$1
    case $value in '' | *[!0-9.]* | *.*.* | .*) value=$2 ;; esac
    whole=${value%%.*} fraction=${value#"$whole"}
    fraction=${fraction#.}00
    fraction=${fraction%"${fraction#??}"}
    cs=$(($(strip_zeros "${whole:-0}") * 100 + $(strip_zeros "$fraction")))
    [ "$cs" -ge "$3" ] || cs=$3
    echo "$cs"
}

# Centiseconds as seconds, for messages and the report: 250 -> 2.5, 1000 -> 10.
cs_text() {
    whole=$(($1 / 100)) rest=$(($1 % 100))
    if [ "$rest" -eq 0 ]; then echo "$whole"
    elif [ $((rest % 10)) -eq 0 ]; then echo "$whole.$((rest / 10))"
    else printf '%d.%02d\n' "$whole" "$rest"; fi
}

# A decimal number without leading zeros (the shell reads 08 as a bad octal number).
strip_zeros() {
    number=$1
    while :; do
        case $number in 0?*) number=${number#0} ;; *) break ;; esac
    done
    echo "${number:-0}"
}

# Centiseconds since boot, from /proc/uptime ("1234.56 ..."), without a process.
now_cs() {
    read -r uptime _ < /proc/uptime
    strip_zeros "${uptime%.*}${uptime#*.}"
}

# When this process started, in the same centiseconds: its start time in /proc/self/stat
# (the 22nd field, after the command in parentheses) is in clock ticks of USER_HZ, 100 on
# every Linux architecture. qemu-ga waits for all of this process, its start included.
started_cs() {
    read -r stat < "/proc/$$/stat"
    # shellcheck disable=SC2086  # split into fields on purpose
    set -- ${stat##*) }
    shift 19
    echo "$1"
}

load_config() {
    HOOK_DIR=/etc/qemu/fsfreeze-hook.d POLICY=fail timeout="" deadman_s=""
    config=$(read_config)
    while IFS='=' read -r key value; do
        case $key in
            hook_dir) [ -n "$value" ] && HOOK_DIR=$value ;;
            on_failure) [ "$value" = continue ] && POLICY="continue" ;;
            timeout) timeout=$value ;;
            deadman_s) deadman_s=$value ;;
        esac
    done << EOF
$config
EOF
    TIMEOUT_CS=$(to_cs "$timeout" 10 10)
    TIMEOUT=$(cs_text "$TIMEOUT_CS")
    DEADMAN_DEFAULT=$(cs_text "$(to_cs "$deadman_s" 60 100)")
}

# Printable ASCII (tab as a space) as the body of a JSON string, lines joined with \n.
json_text() {
    tr -cd '\11\12\40-\176' | tr '\11' ' ' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' |
        awk 'BEGIN { ORS = "" } { if (NR > 1) print "\\n"; print } END { if (NR > 0) print "\\n" }'
}

# One line of printable ASCII as the body of a JSON string (a plain name costs no process).
json_word() {
    case $1 in
        *[!A-Za-z0-9._+:/\ \(\)-]*) printf '%s' "$1" | tr -cd '\40-\176' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' ;;
        *) printf '%s' "$1" ;;
    esac
}

# Why $1 must not be run as root, or nothing when it may.
unsafe() {
    if [ -L "$1" ] || [ ! -f "$1" ]; then echo "not a regular file"; return; fi
    set -- "$(stat -c '%u %a' "$1")"
    owner=${1% *} mode=${1#* }
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
    output=""
    [ -s "$6" ] && output=$(tail -c "$OUTPUT_LIMIT" "$6" | json_text)
    printf ', "output": "%s", "duration_ms": %s}\n' "$output" "$7"
}

# Run hook $1 with action $2, its entry appended to $3; succeeds when the hook did.
run_hook() {
    out=$STATE_DIR/hook-output
    expired=$STATE_DIR/hook-expired
    : > "$out"
    [ ! -e "$expired" ] || rm -f "$expired"
    start=$(now_cs)
    # Its own session, so that a timeout kills everything it started.
    setsid "$1" "$2" < /dev/null > "$out" 2>&1 &
    pid=$!
    # A watchdog in a session of its own: at the timeout it notes it and kills the hook's
    # group; if the hook ends first, the watchdog's group (its sleep too) is killed.
    # shellcheck disable=SC2016  # expanded by the watchdog's shell, from its arguments
    setsid sh -c 'sleep "$1"; : > "$2"; kill -KILL "-$3" 2> /dev/null || kill -KILL "$3"' \
        watchdog "$TIMEOUT" "$expired" "$pid" < /dev/null > /dev/null 2>&1 &
    watchdog=$!
    wait "$pid"
    code=$?
    kill -KILL "-$watchdog" 2> /dev/null || kill -KILL "$watchdog" 2> /dev/null
    wait "$watchdog" 2> /dev/null
    ms=$((($(now_cs) - start) * 10))
    if [ -e "$expired" ] && [ "$code" -ne 0 ]; then
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

# The lines of file $1 joined with ", ".
join_lines() {
    separator=""
    while IFS= read -r line; do
        printf '%s%s' "$separator" "$line"
        separator=", "
    done < "$1"
}

write_report() {
    {
        printf '{"format": "freezeframe-guest-hooks/1", "runner": "sh", "policy": "%s", "timeout": %s' \
            "$POLICY" "$TIMEOUT"
        printf ', "freeze_started_at": %s, "freeze": [' "${STARTED:-0}"
        join_lines "$FREEZES"
        printf '], "thaw": ['
        join_lines "$THAWS"
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
    armed_cs=$(to_cs "$wanted" "$DEADMAN_DEFAULT" 100)
    [ "$armed_cs" -le 8640000 ] || armed_cs=8640000
    ARMED=$(cs_text "$armed_cs")
    token="$$-$(now_cs)"  # this process, this instant: no other freeze has both
    echo "$token armed" > "$DEADMAN_STATE"
    setsid sh "$0" deadman "$token" "$armed_cs" < /dev/null > /dev/null 2>&1 &
}

# The detached deadman: sleep to the deadline; if this freeze is still not thawed, thaw.
deadman() {
    end=$(($(now_cs) + $2))
    while [ "$(now_cs)" -lt "$end" ]; do
        sleep 1
        state=""
        [ -r "$DEADMAN_STATE" ] && read -r state < "$DEADMAN_STATE"
        [ "$state" = "$1 armed" ] || return 0
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

# Milliseconds since $1 (centiseconds).
ms_since() { echo $((($(now_cs) - $1) * 10)); }

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
    state=""
    [ -r "$DEADMAN_STATE" ] && read -r state < "$DEADMAN_STATE"
    case $state in *" armed") echo "${state% armed} disarmed" > "$DEADMAN_STATE" ;; esac
    THAW_MS=$(ms_since "$began")  # after qemu-ga's thaw
    write_report thawed "$(date +%s)"
    return 0
}

case ${1:-} in
    freeze | thaw)
        load_config
        [ -d "$STATE_DIR" ] || { mkdir -p "$STATE_DIR" && chmod 700 "$STATE_DIR"; }
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
