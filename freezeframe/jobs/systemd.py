"""systemd units for the schedules: the alternative to running the daemon.

Per schedule, a oneshot service that runs the backup (and the prune after it) and a timer:
``OnCalendar=`` translated from the cron expression, with ``Persistent=true`` so a run
missed while the host was down happens once at boot (as the daemon catches up once); or
``OnUnitActiveSec=`` for ``--every``. Verify and restore-test intervals get a service and
timer of their own. Cron expressions that systemd's calendar syntax cannot say are
refused with the reason (the daemon runs them).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from freezeframe.errors import InvalidInput
from freezeframe.model import Schedule

#: Where Debian's prometheus-node-exporter reads text files from.
METRICS_FILE = "/var/lib/prometheus/node-exporter/freezeframe.prom"
_DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
_DAY_NAMES = {name.lower(): i for i, name in enumerate(_DAYS)}
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]


def _field(text: str, *, first: int, names: dict[str, int] | None = None, days: bool = False) -> str:
    """One cron field in systemd's calendar syntax."""
    if text == "*":
        return "*"
    out = []
    for part in text.split(","):
        if names:
            part = re.sub(r"[a-z]{3}", lambda m: str(names[m.group(0)]) if m.group(0) in names else m.group(0),
                          part.lower())
        step = re.fullmatch(r"\*/(\d+)", part)
        span = re.fullmatch(r"(\d+)-(\d+)", part)
        if step:
            out.append(f"{first}/{step.group(1)}")
        elif span:
            low, high = int(span.group(1)), int(span.group(2))
            out.append(f"{_DAYS[low % 7]}..{_DAYS[high % 7]}" if days else f"{low}..{high}")
        elif part.isdigit():
            out.append(_DAYS[int(part) % 7] if days else part)
        else:
            raise InvalidInput(f"the cron field {text!r} has no systemd calendar equivalent here",
                               hint="run the daemon for this schedule instead")
    return ",".join(out)


def on_calendar(cron: str) -> str:
    """``OnCalendar=`` for a five-field cron expression."""
    fields = cron.split()
    if len(fields) != 5:
        raise InvalidInput(f"{cron!r}: only five-field cron expressions become systemd timers")
    minute, hour, dom, month, dow = fields
    if dom != "*" and dow != "*":
        raise InvalidInput(f"{cron!r}: cron runs when day-of-month OR day-of-week matches; systemd needs both",
                           hint="run the daemon for this schedule instead")
    months = {name: i + 1 for i, name in enumerate(_MONTHS)}
    when = (f"*-{_field(month, first=1, names=months)}-{_field(dom, first=1)} "
            f"{_field(hour, first=0)}:{_field(minute, first=0)}:00")
    return when if dow == "*" else f"{_field(dow, first=0, names=_DAY_NAMES, days=True)} {when}"


def _service(description: str, commands: list[list[str]]) -> str:
    lines = ["[Unit]", f"Description={description}", "After=network-online.target", "", "[Service]",
             "Type=oneshot"]
    lines += [f"{'ExecStart' if i == 0 else 'ExecStartPost'}={shlex.join(c)}" for i, c in enumerate(commands)]
    return "\n".join(lines) + "\n"


def _timer(description: str, when: list[str]) -> str:
    return "\n".join(["[Unit]", f"Description={description}", "", "[Timer]", *when, "", "[Install]",
                      "WantedBy=timers.target"]) + "\n"


def unit_files(schedules: list[Schedule], *, home: Path, executable: str) -> dict[str, str]:
    """File name -> content, for every schedule, and the daemon's own service."""
    base = [executable, "-m", "freezeframe", "--home", str(home)]
    files = {"freezeframe-daemon.service": "\n".join([
        "[Unit]", "Description=freezeframe scheduler daemon", "After=network-online.target", "",
        "[Service]", f"ExecStart={shlex.join([*base, 'daemon', '--metrics-file', METRICS_FILE])}",
        # Only the daemon gets the stop signal: a job's guard and sentinel must finish their work.
        "Restart=on-failure", "KillMode=process", "", "[Install]", "WantedBy=multi-user.target"]) + "\n"}
    for s in schedules:
        repo = ["--repo", s.repository] if s.repository else []
        backup = [*base, "backup", "create", s.instance, *repo]
        backup += ["--type", s.backup_type] if s.backup_type else []
        backup += ["--consistency", s.consistency] if s.consistency else []
        commands = [backup] + ([[*base, "backup", "prune", s.instance]] if s.prune else [])
        name = f"freezeframe-backup-{s.instance}"
        files[f"{name}.service"] = _service(f"freezeframe backup of {s.instance}", commands)
        if s.cron:
            when = [f"OnCalendar={on_calendar(s.cron)}", "Persistent=true"]
        else:
            when = [f"OnActiveSec={s.every_s:g}s", f"OnUnitActiveSec={s.every_s:g}s"]
        files[f"{name}.timer"] = _timer(f"freezeframe backups of {s.instance}", when)
        if s.verify_every_s is not None:
            # Restore tests need the newest backup's id at run time: only the daemon runs those.
            every = s.verify_every_s
            files[f"freezeframe-verify-{s.instance}.service"] = _service(
                f"freezeframe verify of {s.instance}'s repository", [[*base, "backup", "verify", "--all", *repo]])
            files[f"freezeframe-verify-{s.instance}.timer"] = _timer(
                f"freezeframe verify of {s.instance}'s repository",
                [f"OnActiveSec={every:g}s", f"OnUnitActiveSec={every:g}s"])
    return files
