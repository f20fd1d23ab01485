"""When scheduled jobs are due: pure functions of a schedule and the time.

A schedule's slots are the instants its backups are for: every ``every_s`` seconds from
the schedule's creation, or the times its cron expression names (the host's local time).
At ``now``, the backup is due when at least one slot passed since the last one run; if
several passed (the daemon was down), it runs once, for the latest, and reports how many
it skipped. Verify and restore-test jobs run when their interval has passed since they
last ran (or they never ran), after the backup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from freezeframe.catalog.store import parse_time
from freezeframe.errors import InvalidInput
from freezeframe.model import Schedule

#: Looking for missed cron slots stops here (a schedule down for years reports "at least").
_MAX_SLOTS = 100_000


@dataclass(frozen=True, slots=True)
class Due:
    instance: str
    #: The slot to back up for (None: no backup due), and how many older slots were missed.
    slot: datetime | None
    missed: int
    verify: bool
    test: bool


def check_cron(expression: str) -> str:
    from cronsim import CronSim, CronSimError

    try:
        CronSim(expression, datetime.now().astimezone())
    except CronSimError as err:
        raise InvalidInput(f"--cron {expression!r} is not a cron expression: {err}",
                           hint='five fields: minute hour day-of-month month day-of-week, e.g. "0 3 * * *"') from err
    return expression


def parse_every(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``2d``, ``1w`` (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        value = -1
    if not value > 0 or math.isinf(value):
        raise InvalidInput(f"{text!r} is not an interval", hint="write it as 90s, 15m, 1h, 2d or 1w")
    return value


def slots_between(schedule: Schedule, after: datetime, until: datetime) -> tuple[datetime | None, int]:
    """The latest slot in (after, until], and how many slots that interval holds."""
    if schedule.every_s is not None:
        start = parse_time(schedule.created_at)
        first = max(0, math.floor((after - start).total_seconds() / schedule.every_s) + 1)
        last = math.floor((until - start).total_seconds() / schedule.every_s)
        if last < first:
            return None, 0
        return start + timedelta(seconds=last * schedule.every_s), last - first + 1
    assert schedule.cron is not None
    from cronsim import CronSim

    latest, count = None, 0
    for slot in CronSim(schedule.cron, after):
        if slot > until or count >= _MAX_SLOTS:
            break
        latest, count = slot, count + 1
    return latest, count


def due(schedule: Schedule, now: datetime) -> Due:
    """What is due for ``schedule`` at ``now``."""
    since = parse_time(schedule.last_slot or schedule.created_at)
    slot, count = slots_between(schedule, since, now)

    def interval_passed(last: str | None, every: float | None) -> bool:
        return every is not None and (last is None or (now - parse_time(last)).total_seconds() >= every)

    return Due(instance=schedule.instance, slot=slot, missed=max(0, count - 1),
               verify=interval_passed(schedule.last_verify_at, schedule.verify_every_s),
               test=interval_passed(schedule.last_test_at, schedule.test_every_s))
