"""Verifying backups of a real lab VM: every chunk read back, damage and loss named with
exactly the backups they break, the outcome recorded, and what holds still restores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from backups import backup, chunks_of, cli_json, damage_chunk, e2fsck_clean, init_repo, restore, write_random
from conftest import LabFactory

from freezeframe.backup.repository import chunk_name
from freezeframe.config import Home

pytestmark = pytest.mark.vm


def verify(home: Home, *args: str) -> tuple[dict[str, Any], int]:
    data, done = cli_json(home, "backup", "verify", *args)
    assert data is not None, done.stderr
    return data, done.returncode


def test_verify_names_exactly_the_backups_a_damaged_or_missing_chunk_breaks(
        home: Home, lab: LabFactory, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    vm = lab(disks=1)
    first = backup(home, vm, repo)["id"]
    write_random(vm, "/mnt/ffdata0/kept.bin", 12)
    second = backup(home, vm, repo)["id"]
    write_random(vm, "/mnt/ffdata0/late.bin", 12)
    third = backup(home, vm, repo)["id"]

    clean, code = verify(home, "--all", "--repo", str(repo))
    assert code == 0, clean
    assert clean["held"]
    assert clean["failed_backups"] == []
    assert sorted(clean["backups"]) == sorted([first, second, third])
    assert clean["chunks_read"] == clean["chunks_named"] == len(chunks_of(repo, first) | chunks_of(repo, second)
                                                                | chunks_of(repo, third))
    for ref in (first, second, third):
        shown, _ = cli_json(home, "backup", "show", ref)
        assert shown["verify_state"] == "ok", shown
        assert shown["verified_at"], shown

    # A chunk that only the second and third use (kept.bin), damaged by one flipped byte;
    # a chunk that only the third uses (late.bin), deleted.
    shared = sorted(chunks_of(repo, second) & chunks_of(repo, third) - chunks_of(repo, first))[0]
    alone = sorted(chunks_of(repo, third) - chunks_of(repo, second) - chunks_of(repo, first))[0]
    path = repo / chunk_name(shared)
    damage_chunk(path)
    (repo / chunk_name(alone)).unlink()

    found, code = verify(home, "--all", "--repo", str(repo))
    assert code == 11, found
    assert not found["held"]
    assert [(d["chunk"], d["backups"]) for d in found["damaged"]] == [(shared, sorted([second, third]))]
    assert [(m["chunk"], m["backups"]) for m in found["missing"]] == [(alone, [third])]
    assert found["failed_backups"] == sorted([second, third])
    # The damaged object is moved aside, so that no backup reuses it by deduplication.
    assert found["quarantined"] == [shared]
    assert not path.exists()
    assert [p.name.split("-")[0] for p in (repo / "quarantine").iterdir()] == [shared]
    states = {ref: cli_json(home, "backup", "show", ref)[0] for ref in (first, second, third)}
    assert states[first]["verify_state"] == "ok"
    assert states[second]["verify_state"] == "failed"
    assert any(shared in p for p in states[second]["verify_problems"])
    assert states[third]["verify_state"] == "failed"
    problems = "\n".join(states[third]["verify_problems"])
    assert shared in problems
    assert alone in problems
    assert "missing" in problems

    # Verifying only the first backup holds, and it still restores whole.
    alone_ok, code = verify(home, first[:8])
    assert code == 0
    assert alone_ok["backups"] == [first]
    raw = restore(home, first, tmp_path / "first")["ffdata0"]
    assert e2fsck_clean(raw)
    tested, done = cli_json(home, "backup", "test", first, "--scratch", str(tmp_path / "scratch"))
    assert done.returncode == 0, tested
    assert tested["outcome"] == "passed"

    # Only what is due: the first was verified just now; the broken ones always are due.
    due, code = verify(home, "--all", "--outdated-after", "1", "--repo", str(repo))
    assert code == 11
    assert sorted(due["backups"]) == sorted([second, third])

    # The restore of a broken backup fails loudly, naming the chunk.
    broken = cli_json(home, "backup", "restore", second, "--to", str(tmp_path / "second"))[1]
    assert broken.returncode == 11
    assert shared in broken.stderr
