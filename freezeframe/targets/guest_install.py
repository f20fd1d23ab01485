"""Installing freezeframe's guest hook runner (the POSIX sh one) into a running guest.

The runner takes the place of the script qemu-ga already runs as its fsfreeze hook (its
``-F`` path, ``/etc/qemu/fsfreeze-hook`` unless it names another): it runs the same
``fsfreeze-hook.d`` hooks, and adds timeouts, reverse-order thaw, a report and the
deadman. qemu-ga starts the hook afresh at every freeze, so nothing needs a restart. The
script it replaces is kept beside it (``PATH.before-freezeframe``), once.

Everything goes through the guest agent: the files with ``guest-file-*``, and the few
steps files alone cannot do (make a folder, set the mode, move into place, find qemu-ga's
command line) with ``guest-exec``. An agent that blocks those gets an error naming them
and the way to install by hand (``freezeframe guest runner`` prints the script).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from importlib import resources

from freezeframe.agent.qga import GuestAgent
from freezeframe.errors import AgentError, InvalidInput
from freezeframe.targets import guest_hooks, stock_hooks

NEEDED = ("guest-file-open", "guest-file-write", "guest-file-close", "guest-exec", "guest-exec-status")
KEEP_SUFFIX = ".before-freezeframe"
_FIND_HOOK = r"""
for pid in $(pidof qemu-ga qemu-guest-agent 2>/dev/null); do
    tr '\000' '\n' < /proc/$pid/cmdline; echo --end--
done
[ -r /etc/qemu/qemu-ga.conf ] && sed -n 's/^[[:space:]]*fsfreeze-hook[[:space:]]*=[[:space:]]*/config=/p' \
    /etc/qemu/qemu-ga.conf
exit 0
"""


def runner_script() -> bytes:
    """The POSIX sh runner, as shipped in the package."""
    return resources.files("freezeframe.guest").joinpath("hook.sh").read_bytes()


def manual_steps(path: str = stock_hooks.SCRIPT_PATH) -> str:
    return (f"copy the output of 'freezeframe guest runner' to {path} in the guest (root-owned, mode 0755), "
            f"and start qemu-ga with -F{path}; settings go in {guest_hooks.CONFIG_PATH}, e.g. "
            '{"timeout": 10, "on_failure": "fail"}')


@dataclass(frozen=True, slots=True)
class Installed:
    path: str
    #: Where the script it replaced was kept, or None when there was none (or it was ours).
    kept: str | None
    config: str
    #: The configuration was written now (False: the guest's own was kept).
    config_written: bool
    #: How the path was found: qemu-ga's command line, its configuration file, or given.
    found_by: str


def hook_path(lines: list[str]) -> tuple[str | None, str]:
    """The fsfreeze hook qemu-ga runs, from its command line(s) and configuration as
    ``_FIND_HOOK`` prints them; (None, why) when it runs none."""
    seen_agent = False
    for line in lines:
        if line.startswith("config="):
            value = line.removeprefix("config=").strip()
            return (value or stock_hooks.SCRIPT_PATH), "qemu-ga's configuration (/etc/qemu/qemu-ga.conf)"
    argv: list[str] = []
    for line in [*lines, "--end--"]:
        if line != "--end--":
            argv.append(line)
            continue
        if argv:
            seen_agent = True
        for arg in argv[1:]:
            if arg in ("-F", "--fsfreeze-hook"):
                # getopt's optional argument is attached: a bare -F means the default path.
                return stock_hooks.SCRIPT_PATH, "qemu-ga's command line (-F, the default path)"
            if arg.startswith("--fsfreeze-hook="):
                return arg.split("=", 1)[1], "qemu-ga's command line"
            if arg.startswith("-F"):
                return arg[2:], "qemu-ga's command line"
        argv = []
    if not seen_agent:
        return None, "no qemu-ga process was found in the guest"
    return None, "qemu-ga runs without a fsfreeze hook (no -F on its command line, none in /etc/qemu/qemu-ga.conf)"


async def install(agent: GuestAgent, *, path: str | None = None, timeout: float = 10.0,
                  on_failure: str = "fail") -> Installed:
    """Put the runner where qemu-ga runs its hook (or at ``path``), with a configuration
    if the guest has none. Raises InvalidInput when the agent does not allow it."""
    info = await agent.info()
    blocked = [c for c in NEEDED if not info.allows(c)]
    if blocked:
        raise InvalidInput(f"the guest agent blocks {', '.join(blocked)}: the runner cannot be installed through it",
                           hint=f"install it by hand: {manual_steps(path or stock_hooks.SCRIPT_PATH)}")
    found_by = "given"
    if path is None:
        code, output = await agent.run_command("/bin/sh", ["-c", _FIND_HOOK], timeout=30)
        path, found_by = hook_path(output.decode("utf-8", "replace").splitlines())
        if path is None:
            raise InvalidInput(f"cannot tell where to install the runner: {found_by}",
                               hint="start qemu-ga with -F/etc/qemu/fsfreeze-hook (a systemd drop-in for "
                                    "qemu-guest-agent.service, say) and run this again, or give --path")
    if not path.startswith("/") or any(c in path for c in "\n\0"):
        raise InvalidInput(f"{path!r} is not an absolute path for the hook")
    staged = f"{path}.freezeframe-new"
    config_staged = "/run/freezeframe-guest-hooks.json.new"
    await _write(agent, staged, runner_script())
    await _write(agent, config_staged, json.dumps({"timeout": timeout, "on_failure": on_failure}).encode() + b"\n")
    q = shlex.quote
    script = f"""
set -e
new={q(staged)} path={q(path)} keep={q(path + KEEP_SUFFIX)} config={q(guest_hooks.CONFIG_PATH)}
sh -n "$new"
kept=""
if [ -e "$path" ] && [ ! -e "$keep" ] && ! grep -q 'freezeframe.s guest hook runner' "$path"; then
    cp -p "$path" "$keep"; kept="$keep"
fi
chown 0:0 "$new"; chmod 0755 "$new"; mv -f "$new" "$path"
written=no
if [ ! -e "$config" ]; then
    mkdir -p "$(dirname "$config")"; chmod 0755 "$(dirname "$config")"
    mv -f {q(config_staged)} "$config"; chmod 0644 "$config"; written=yes
else
    rm -f {q(config_staged)}
fi
echo "kept=$kept"; echo "written=$written"
"""
    code, output = await agent.run_command("/bin/sh", ["-c", script], timeout=60)
    text = output.decode("utf-8", "replace")
    if code != 0:
        raise AgentError(f"installing the runner at {path} failed in the guest (exit {code}): {text.strip()[-500:]}")
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return Installed(path=path, kept=values.get("kept") or None, config=guest_hooks.CONFIG_PATH,
                     config_written=values.get("written") == "yes", found_by=found_by)


async def _write(agent: GuestAgent, path: str, data: bytes) -> None:
    handle = await agent.file_open(path, "w")
    try:
        for start in range(0, len(data), 48 * 1024):
            chunk = data[start:start + 48 * 1024]
            if await agent.file_write(handle, chunk) != len(chunk):
                raise AgentError(f"a short write to {path} in the guest")
    finally:
        await agent.file_close(handle)
