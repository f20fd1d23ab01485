"""Retention: which backups a policy keeps, with Proxmox Backup Server's rules.

The options are applied in the order last, hourly, daily, weekly, monthly, yearly, over
an instance's complete backups in one repository, newest first:

* ``keep_last N`` keeps the N newest backups.
* ``keep_hourly N`` (and daily, weekly, monthly, yearly) keeps the newest backup of each
  of the N most recent hours (days, ISO weeks, months, years) that have a backup. A
  period already holding a backup kept by an earlier option does not count again, and
  only backups no earlier option kept are considered.

Periods are in the host's local time, as in Proxmox. With no option set, everything is
kept. Nothing else keeps a backup: every index is complete, so a kept incremental does not
need its parent (its unchanged chunks are shared, and garbage collection keeps a chunk as
long as any kept backup names it).

restic applies each option on its own, counting periods already covered by another
option: with ``--keep-last 1 --keep-daily 2`` and one backup a day, restic keeps 2 and
these rules keep 3 (the newest by keep-last, then the two days before by keep-daily).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from freezeframe.catalog.store import parse_time
from freezeframe.model import Retention

_PERIOD: dict[str, Callable[[datetime], str]] = {
    "hourly": lambda t: t.strftime("%Y-%m-%d %H"),
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: "{}-W{:02d}".format(*t.isocalendar()[:2]),
    "monthly": lambda t: t.strftime("%Y-%m"),
    "yearly": lambda t: t.strftime("%Y"),
}


def select(policy: Retention, backups: list[tuple[str, str]]) -> dict[str, str | None]:
    """For each (id, created_at): the rule that keeps it ("keep-last", "keep-daily", ...),
    or None when the policy lets it go."""
    ordered = sorted(backups, key=lambda b: (b[1], b[0]), reverse=True)
    if policy.keeps_everything:
        return {backup_id: "no retention rule" for backup_id, _ in ordered}
    kept: dict[str, str] = {}
    count = policy.last or 0
    for backup_id, _ in ordered[:count]:
        kept[backup_id] = "keep-last"
    for rule, period in _PERIOD.items():
        wanted = getattr(policy, rule) or 0
        if not wanted:
            continue
        covered = {period(parse_time(at)) for backup_id, at in ordered if backup_id in kept}
        chosen: set[str] = set()
        for backup_id, at in ordered:
            if backup_id in kept:
                continue
            key = period(parse_time(at))
            if key in covered or key in chosen:
                continue
            if len(chosen) >= wanted:
                break
            chosen.add(key)
            kept[backup_id] = f"keep-{rule}"
    return {backup_id: kept.get(backup_id) for backup_id, _ in ordered}
