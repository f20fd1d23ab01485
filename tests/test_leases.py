"""Leases and garbage collection on a shared repository, with real writer processes (in
their own PID, UTS and mount namespaces where a test says so) against a local repository
and a real S3 server. The backups of real VMs under the same protocol are in
test_fleet_vm.py; here each step of the argument in backup/gc.py is shown on its own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from backups import cli_json, init_repo
from conftest import RepoPlace, run_cli

from freezeframe.backup.gc import collect_garbage
from freezeframe.backup.leases import Lease
from freezeframe.backup.repository import Repository
from freezeframe.backup.store import open_store
from freezeframe.config import Home

HOLDER = Path(__file__).with_name("lease_holder.py")
#: Short enough for a test to outlast, long enough for a renewal every 0.6 s on a loaded host.
LEASE_S = "3"


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return found


@contextlib.contextmanager
def holder(repo: RepoPlace, name: str, *chunks: str, wrap: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[str]]:
    """A writer process holding ``backup-NAME``; killed at the end whatever happened."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([*wrap, sys.executable, str(HOLDER), str(repo), name, *chunks], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "held\n", line + (proc.stderr.read() if proc.stderr else "")
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait()


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate("go\n", timeout=60)
    return proc.returncode, out


def locks(home: Home, repo: RepoPlace) -> dict[str, dict[str, Any]]:
    found, done = cli_json(home, "repo", "locks", str(repo))
    assert done.returncode == 0, done.stderr
    return {lease["name"]: lease for lease in found}


def store_garbage(repo: RepoPlace, *contents: bytes) -> list[str]:
    """Chunks that no backup names (as a pruned backup leaves them)."""
    opened = Repository.open(open_store(str(repo)))
    ids = [opened.put_chunk(data)[0] for data in contents]
    opened.store.flush()
    return ids


def exists(repo: RepoPlace, chunk: str) -> bool:
    return open_store(str(repo)).exists(f"chunks/{chunk[:2]}/{chunk}")


def gc(home: Home, repo: RepoPlace) -> dict[str, Any]:
    collected, done = cli_json(home, "repo", "gc", str(repo))
    assert done.returncode == 0, done.stderr
    return dict(collected)


def test_a_stopped_writer_loses_its_lease_to_gc_and_publishes_nothing(
        home: Home, any_repo: RepoPlace) -> None:
    init_repo(home, any_repo, "--lock-lease", LEASE_S)
    with holder(any_repo, "stopped") as proc:
        shown = locks(home, any_repo)["backup-stopped"]
        assert (shown["pid"], shown["dead"], shown["instance"]) == (proc.pid, None, "lease-holder")
        assert shown["machine_id"] == Path("/etc/machine-id").read_text().strip()
        os.kill(proc.pid, signal.SIGSTOP)
        # Alive on this machine and in our PID namespace: only the missed renewals kill it.
        dead = wait_for(lambda: locks(home, any_repo)["backup-stopped"]["dead"], "the stopped lease never died")
        assert "not renewed" in dead
        collected = gc(home, any_repo)
        assert [(b["name"], "not renewed" in b["why"]) for b in collected["leases_broken"]] == [
            ("backup-stopped", True)]
        assert locks(home, any_repo) == {}
        os.kill(proc.pid, signal.SIGCONT)
        code, out = finish(proc)
    assert code == 3, out
    assert "without renewal" in out or "was broken" in out


def test_a_writer_in_its_own_pid_namespace_killed_is_judged_by_its_renewals(
        home: Home, any_repo: RepoPlace) -> None:
    """Its lease says pid 1, which is alive for ever in our namespace: a pid is not enough."""
    init_repo(home, any_repo, "--lock-lease", LEASE_S)
    with holder(any_repo, "contained", wrap=("unshare", "--pid", "--fork", "--kill-child")) as proc:
        shown = locks(home, any_repo)["backup-contained"]
        assert shown["pid"] == 1
        assert shown["dead"] is None
        proc.kill()
        proc.wait()
        dead = wait_for(lambda: locks(home, any_repo)["backup-contained"]["dead"], "the killed lease never died")
        assert "not renewed" in dead
    assert [b["name"] for b in gc(home, any_repo)["leases_broken"]] == ["backup-contained"]


def test_a_live_writer_on_another_machine_with_our_host_name_keeps_its_lease(
        home: Home, any_repo: RepoPlace, tmp_path: Path) -> None:
    """Another machine id, the same host name, its own PID namespace, and a pid that does not
    run here: the old host-and-pid rule swept its chunks; a lease is broken only unrenewed."""
    init_repo(home, any_repo, "--lock-lease", LEASE_S)
    fake = tmp_path / "machine-id"
    fake.write_text("0123456789abcdef0123456789abcdef\n")
    here = os.uname().nodename
    wrap = ("unshare", "--uts", "--pid", "--mount", "--fork", "--kill-child", "sh", "-c",
            f'mount --bind {fake} /etc/machine-id && hostname {here} && exec "$@"', "holder")
    [garbage] = store_garbage(any_repo, os.urandom(5000))
    with holder(any_repo, "twin", garbage, wrap=wrap) as proc:
        shown = locks(home, any_repo)["backup-twin"]
        assert (shown["host"], shown["machine_id"]) == (here, "0123456789abcdef0123456789abcdef")
        # Several collections, for longer than the lease: the lease holds, and so does the
        # chunk the writer named.
        deadline = time.monotonic() + 2 * float(LEASE_S) + 1
        while time.monotonic() < deadline:
            collected = gc(home, any_repo)
            assert collected["leases_broken"] == []
            assert "backup-twin" in collected["leases_honoured"]
            assert exists(any_repo, garbage)
        code, out = finish(proc)
    assert (code, out) == (0, "held to the end\n")


def test_gc_keeps_what_a_running_writer_names_and_frees_the_rest_without_waiting(
        home: Home, any_repo: RepoPlace) -> None:
    init_repo(home, any_repo, "--lock-lease", LEASE_S)
    named, unnamed = store_garbage(any_repo, os.urandom(5000), os.urandom(5000))
    # Garbage is judged once it is older than the lease before the oldest running writer
    # began: the time this test waits for is that age, nothing else.
    time.sleep(float(LEASE_S) + 1)
    with holder(any_repo, "running", named) as proc:
        # The unnamed chunk goes once it is older than the lease before the writer began;
        # the named one stays as long as the lease lives.
        def freed() -> bool:
            collected = gc(home, any_repo)
            assert collected["leases_honoured"] == ["backup-running"]
            assert exists(any_repo, named)
            return not exists(any_repo, unnamed)

        wait_for(freed, "gc never freed the chunk nobody names")
        code, out = finish(proc)
    assert (code, out) == (0, "held to the end\n")
    assert locks(home, any_repo) == {}, "the lease was not released"
    wait_for(lambda: gc(home, any_repo) and not exists(any_repo, named),
             "gc never freed the chunk once its writer was gone")


def test_a_chunk_gc_deleted_before_the_writer_listed_it_is_found_missing_before_publishing(
        home: Home, tmp_path: Path) -> None:
    """The race the settle step exists for: a writer found a chunk stored, gc deleted it
    before the writer's renewal listed it. After settling, the writer's one listing sees it
    gone (a backup then reads it again), and publishes no index naming it."""
    place = RepoPlace(str(tmp_path / "repo"), tmp_path / "repo")
    init_repo(home, place, "--lock-lease", "1")
    repo = Repository.open(open_store(place.location))
    [found] = store_garbage(place, os.urandom(5000))
    os.utime(place / "chunks" / found[:2] / found, (time.time() - 3600, time.time() - 3600))
    with Lease.for_backup(repo.store, "racing", repo.lease_s, None) as lease:
        assert repo.has_chunk(found)  # what the writer saw
        report = collect_garbage(repo)  # before the writer's renewal: the chunk is not protected
        assert report.chunks == 1
        assert not repo.has_chunk(found)
        lease.name_chunks([found])
        lease.settle()
        assert repo.missing_chunks({found}) == {found}


def test_break_lock_warns_and_the_holder_publishes_nothing(home: Home, any_repo: RepoPlace) -> None:
    init_repo(home, any_repo)
    with holder(any_repo, "broken") as proc:
        missing = run_cli(home, "repo", "break-lock", "backup-none", "--repo", str(any_repo))
        assert missing.returncode == 3
        assert "no lease 'backup-none'" in missing.stderr
        done = run_cli(home, "repo", "break-lock", "backup-broken", "--repo", str(any_repo))
        assert done.returncode == 0, done.stderr
        assert "warning: broke the lease backup-broken" in done.stderr
        code, out = finish(proc)
    assert code == 3
    assert "was broken" in out


def test_gc_removes_leftovers_of_crashed_writes_once_old(home: Home, tmp_path: Path) -> None:
    place = RepoPlace(str(tmp_path / "repo"), tmp_path / "repo")
    init_repo(home, place, "--lock-lease", "1")
    [kept] = store_garbage(place, os.urandom(100))
    old, fresh = place / "chunks" / kept[:2] / ".tmp-old-1", place / "chunks" / kept[:2] / ".tmp-fresh-1"
    old.write_bytes(b"torn")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    os.utime(fresh, (time.time() + 3600, time.time() + 3600))  # "now", whatever the test's pace
    collected = gc(home, place)
    assert collected["leftovers_removed"] == 1
    assert not old.exists()
    assert fresh.exists()


@pytest.mark.parametrize("lease", ["0.5", "100000"])
def test_a_lease_time_out_of_bounds_is_refused(home: Home, tmp_path: Path, lease: str) -> None:
    done = run_cli(home, "repo", "init", str(tmp_path / "repo"), "--lock-lease", lease)
    assert done.returncode == 2
    assert "--lock-lease" in done.stderr
    assert not (tmp_path / "repo").exists()
