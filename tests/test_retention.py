"""Retention rules against tables of dates written out by hand (Proxmox Backup Server's
meaning, and where restic differs)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from freezeframe.errors import InvalidInput
from freezeframe.jobs.retention import select
from freezeframe.model import Retention


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    """Periods are local time: pin it, so the tables mean what they say."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def kept(policy: Retention, dates: list[str]) -> dict[str, str | None]:
    """date -> the rule that keeps the backup taken then (ids are the dates)."""
    return select(policy, [(d, d) for d in dates])


def test_keep_last_and_daily_skip_days_already_kept() -> None:
    dates = ["2026-11-01T10:00:00Z", "2026-11-02T10:00:00Z", "2026-11-03T09:00:00Z", "2026-11-03T21:00:00Z",
             "2026-11-04T08:00:00Z", "2026-11-04T20:00:00Z"]
    assert kept(Retention(last=1, daily=2), dates) == {
        "2026-11-04T20:00:00Z": "keep-last",
        "2026-11-04T08:00:00Z": None,  # its day is already kept by keep-last
        "2026-11-03T21:00:00Z": "keep-daily",  # the newest of 11-03
        "2026-11-03T09:00:00Z": None,
        "2026-11-02T10:00:00Z": "keep-daily",
        "2026-11-01T10:00:00Z": None,  # two days are kept already
    }


def test_restic_differs_where_documented() -> None:
    # One backup a day, --keep-last 1 --keep-daily 2: restic keeps 2 (the newest day counts
    # for both rules); these rules keep 3.
    dates = ["2026-11-01T03:00:00Z", "2026-11-02T03:00:00Z", "2026-11-03T03:00:00Z", "2026-11-04T03:00:00Z"]
    assert [d for d, rule in kept(Retention(last=1, daily=2), dates).items() if rule] == [
        "2026-11-04T03:00:00Z", "2026-11-03T03:00:00Z", "2026-11-02T03:00:00Z"]


def test_weekly_monthly_yearly_over_a_year_of_sundays() -> None:
    # Every Sunday of 2025 and the first two of 2026 (ISO weeks: Sunday ends its week).
    dates = [f"{d}T02:00:00Z" for d in (
        "2025-01-05", "2025-01-12", "2025-01-19", "2025-01-26", "2025-02-02", "2025-02-09", "2025-02-16",
        "2025-02-23", "2025-03-02", "2025-03-30", "2025-06-29", "2025-09-28", "2025-12-28", "2026-01-04",
        "2026-01-11")]
    assert {d[:10]: rule for d, rule in kept(Retention(weekly=2, monthly=3, yearly=2), dates).items()
            if rule} == {
        "2026-01-11": "keep-weekly", "2026-01-04": "keep-weekly",  # January 2026 is kept by them
        "2025-12-28": "keep-monthly", "2025-09-28": "keep-monthly", "2025-06-29": "keep-monthly",
        # 2025 is kept by its December backup; 2026 by the weekly ones: no year is left to fill
    }
    assert [d[:10] for d, rule in kept(Retention(yearly=5), dates).items() if rule] == ["2026-01-11", "2025-12-28"]


def test_hourly_takes_the_newest_of_each_hour_and_no_rule_keeps_everything() -> None:
    dates = ["2026-11-22T10:05:00Z", "2026-11-22T10:55:00Z", "2026-11-22T11:10:00Z", "2026-11-22T13:00:00Z"]
    assert kept(Retention(hourly=2), dates) == {
        "2026-11-22T13:00:00Z": "keep-hourly", "2026-11-22T11:10:00Z": "keep-hourly",
        "2026-11-22T10:55:00Z": None, "2026-11-22T10:05:00Z": None}
    assert all(kept(Retention(), dates).values())
    assert not any(kept(Retention(last=0), dates).values()), "keep-last 0 alone keeps nothing"


def test_a_negative_count_is_refused() -> None:
    with pytest.raises(InvalidInput, match="--keep-daily must be 0 or more"):
        Retention(daily=-1)
