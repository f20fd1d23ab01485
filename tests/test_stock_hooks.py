"""Reading the stock fsfreeze-hook's log: this freeze's lines only, every hook's outcome,
and nothing a hostile guest writes there taken for more than it shows."""

from __future__ import annotations

import calendar
import time

from freezeframe.targets.stock_hooks import parse_log


def at(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S")))


LOG = b"""Mon Nov 30 03:07:50 UTC 2026: execute /etc/qemu/fsfreeze-hook.d/10-postgresql freeze
Mon Nov 30 03:07:51 UTC 2026: /etc/qemu/fsfreeze-hook.d/10-postgresql finished with status=0
Mon Nov 30 03:07:59 UTC 2026: execute /etc/qemu/fsfreeze-hook.d/10-postgresql freeze
CHECKPOINT
Mon Nov 30 03:08:02 UTC 2026: /etc/qemu/fsfreeze-hook.d/10-postgresql finished with status=0
Mon Nov 30 03:08:02 UTC 2026: execute /etc/qemu/fsfreeze-hook.d/20-app freeze
Mon Nov 30 03:08:02 UTC 2026: /etc/qemu/fsfreeze-hook.d/20-app finished with status=3
Mon Nov 30 03:08:03 UTC 2026: execute /etc/qemu/fsfreeze-hook.d/10-postgresql thaw
Mon Nov 30 03:08:03 UTC 2026: /etc/qemu/fsfreeze-hook.d/10-postgresql finished with status=0
Mon Nov 30 03:08:03 UTC 2026: execute /etc/qemu/fsfreeze-hook.d/20-app thaw
Mon Nov 30 03:08:03 UTC 2026: /etc/qemu/fsfreeze-hook.d/20-app finished with status=0
"""


def test_only_this_freezes_lines_count_and_each_hook_gets_its_status() -> None:
    report = parse_log(LOG, not_before=at("2026-11-30 03:07:58"), not_after=at("2026-11-30 03:08:04"))
    writers = {w["name"]: w for w in report["writers"]}
    assert list(writers) == ["10-postgresql", "20-app"]
    pg = writers["10-postgresql"]
    assert (pg["status"], pg["error"]) == ("ok", None)
    assert pg["manifest"]["freeze_exit_status"] == pg["manifest"]["thaw_exit_status"] == 0
    assert pg["manifest"]["freeze_output"] == "CHECKPOINT\n"
    assert pg["phases_ms"]["freeze"] == 3000.0
    assert writers["20-app"]["status"] == "failed"
    assert writers["20-app"]["error"] == "freeze exited with status 3"
    assert report["summary"]["lines_outside_this_freeze"] == 2
    assert report["summary"]["freeze_hooks_s"] == 3.0
    assert report["summary"]["resolution_s"] == 1.0


def test_a_hook_without_a_status_or_a_thaw_is_not_ok() -> None:
    log = (b"Mon Nov 30 03:07:59 UTC 2026: execute /etc/qemu/fsfreeze-hook.d/10-slow freeze\n"
           b"Mon Nov 30 03:07:59 UTC 2026: execute /etc/qemu/fsfreeze-hook.d/20-once freeze\n"
           b"Mon Nov 30 03:07:59 UTC 2026: /etc/qemu/fsfreeze-hook.d/20-once finished with status=0\n")
    writers = {w["name"]: w for w in parse_log(log)["writers"]}
    assert writers["10-slow"]["error"] == "its freeze has no exit status in the log (killed, or still running?)"
    assert writers["20-once"]["error"] == "the log shows no thaw for it"


def test_garbage_and_lookalike_lines_are_output_not_evidence() -> None:
    log = (b"\xff\xfe garbage\n"
           b"Mon Nov 30 03:07:59 UTC 2026: execute relative/path freeze\n"
           b"Mon Nov 30 03:07:59 UTC 2026: execute /x/" + b"a" * 5000 + b" freeze\n"
           b"Mon Nov 30 03:07:59 UTC 2026: /x/never-started finished with status=0\n")
    report = parse_log(log)
    assert [w["name"] for w in report["writers"]] == ["never-started"]
    assert report["writers"][0]["error"] == "the log shows no freeze for it"
