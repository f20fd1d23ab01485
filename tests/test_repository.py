"""The backup repository on real files: content addressing, deduplication, the crash-safe
put, damage and tampering found, encryption, and how a disk is planned into chunks."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import run_cli, unique
from servers import S3Server

from freezeframe.backup import leases
from freezeframe.backup.gc import GcReport, collect_garbage
from freezeframe.backup.leases import Lease
from freezeframe.backup.pipeline import restore_disk
from freezeframe.backup.reader import Need, plan_chunks
from freezeframe.backup.repository import DiskIndex, Repository, chunk_name
from freezeframe.backup.store import LocalStore
from freezeframe.backup.sync import sync
from freezeframe.backup.verify import verify
from freezeframe.catalog import Catalog
from freezeframe.config import Home
from freezeframe.errors import DamagedObject, RepositoryError

CHUNK = 64 << 10


def plain(tmp_path: Path, name: str = "repo") -> Repository:
    return Repository.init(LocalStore(tmp_path / name), chunk_size=CHUNK)


def sealed(tmp_path: Path, name: str = "sealed", passphrase: bytes = b"pass") -> Repository:
    return Repository.init(LocalStore(tmp_path / name), chunk_size=CHUNK, passphrase=passphrase)


def test_a_chunk_is_stored_once_and_read_back_checked(tmp_path: Path) -> None:
    repo = plain(tmp_path)
    data = os.urandom(CHUNK // 2) * 2
    chunk_id, stored = repo.put_chunk(data)
    assert 0 < stored < len(data)  # compressed: the two halves repeat
    again_id, again = repo.put_chunk(data)
    assert (again_id, again) == (chunk_id, 0)
    assert repo.get_chunk(chunk_id, len(data)) == data
    assert len(list(repo.store.list("chunks/"))) == 1


def test_put_never_overwrites_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    assert store.put("a/b", b"first")
    assert not store.put("a/b", b"second")
    assert store.get("a/b") == b"first"
    (tmp_path / "s" / "a" / ".tmp-b-dead").write_bytes(b"left by a crash")
    assert [o.name for o in store.list("a/")] == ["a/b"]
    with pytest.raises(RepositoryError, match="invalid object name"):
        store.put("../escape", b"x")


def test_a_flipped_byte_is_found_and_the_chunk_named(tmp_path: Path) -> None:
    repo = plain(tmp_path)
    data = os.urandom(CHUNK)  # incompressible: stored as is, so the flip lands in the data
    chunk_id, _ = repo.put_chunk(data)
    path = tmp_path / "repo" / chunk_name(chunk_id)
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 0x40
    path.write_bytes(bytes(damaged))
    with pytest.raises(DamagedObject, match=chunk_id) as caught:
        repo.get_chunk(chunk_id, len(data))
    assert caught.value.exit_code == 11


def test_encrypted_chunks_hide_content_and_names_depend_on_the_repository(tmp_path: Path) -> None:
    one, two, bare = sealed(tmp_path, "one"), sealed(tmp_path, "two"), plain(tmp_path)
    data = b"the plaintext nobody may read " * 2000
    id_one, _ = one.put_chunk(data)
    id_two, _ = two.put_chunk(data)
    id_bare, _ = bare.put_chunk(data)
    assert len({id_one, id_two, id_bare}) == 3, "equal content must not get the same name across repositories"
    raw = (tmp_path / "one" / chunk_name(id_one)).read_bytes()
    assert b"plaintext nobody" not in raw
    reopened = Repository.open(LocalStore(tmp_path / "one"), passphrase=b"pass")
    assert reopened.get_chunk(id_one, len(data)) == data


def test_an_encrypted_object_moved_to_another_name_fails_its_check(tmp_path: Path) -> None:
    repo = sealed(tmp_path)
    first, _ = repo.put_chunk(b"a" * CHUNK)
    second, _ = repo.put_chunk(b"b" * CHUNK)
    root = tmp_path / "sealed"
    (root / chunk_name(second)).write_bytes((root / chunk_name(first)).read_bytes())
    with pytest.raises(DamagedObject, match="authentication"):
        repo.get_chunk(second, CHUNK)


def test_wrong_or_missing_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    sealed(tmp_path)
    with pytest.raises(RepositoryError, match="wrong passphrase"):
        Repository.open(LocalStore(tmp_path / "sealed"), passphrase=b"guess")
    with pytest.raises(RepositoryError, match="encrypted and no passphrase"):
        Repository.open(LocalStore(tmp_path / "sealed"))
    with pytest.raises(RepositoryError, match="empty passphrase"):
        sealed(tmp_path, "other", passphrase=b"")


def test_no_repository_and_a_second_init_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="no repository") as caught:
        Repository.open(LocalStore(tmp_path / "nothing"))
    assert "repo init" in (caught.value.hint or "")
    plain(tmp_path)
    with pytest.raises(RepositoryError, match="is a repository already"):
        plain(tmp_path)


def test_stats_and_check_follow_the_indexes(tmp_path: Path) -> None:
    repo = plain(tmp_path)
    a, _ = repo.put_chunk(b"a" * CHUNK)
    b, _ = repo.put_chunk(os.urandom(CHUNK))
    repo.put_chunk(b"orphan" * 100)  # as left by an interrupted backup
    for backup, chunks in (("b1", [a, None, b]), ("b2", [a, a, b])):
        name = repo.put_index(DiskIndex(backup=backup, device="vda", virtual_size=3 * CHUNK, chunk_size=CHUNK,
                                        chunks=chunks), 0)
        repo.put_manifest(backup, {"id": backup, "disks": [{"device": "vda", "index": name}]})
    stats = repo.stats()
    assert (stats.backups, stats.chunks, stats.unreferenced_chunks) == (2, 3, 1)
    assert stats.logical_bytes == 5 * CHUNK
    assert stats.unique_bytes == 2 * CHUNK
    assert stats.dedup_ratio == 2.5
    assert stats.compression_ratio > 1
    assert repo.check().problems == []
    (tmp_path / "repo" / chunk_name(b)).unlink()
    problems = repo.check().problems
    assert len(problems) == 2
    assert all(b in p for p in problems)


def test_verify_reads_back_tampered_sealed_chunks_damaged_indexes_and_subsets(tmp_path: Path) -> None:
    repo = sealed(tmp_path)
    chunks = [repo.put_chunk(os.urandom(CHUNK))[0] for _ in range(20)]
    for backup, mine in (("b1", chunks[:10]), ("b2", chunks[5:]), ("b3", chunks[:1])):
        name = repo.put_index(DiskIndex(backup=backup, device="vda", virtual_size=len(mine) * CHUNK,
                                        chunk_size=CHUNK, chunks=list(mine)), 0)
        repo.put_manifest(backup, {"id": backup, "disks": [{"device": "vda", "index": name}]})
    held = verify(repo, ["b1", "b2", "b3"])
    assert (held.chunks_named, held.chunks_read, held.failed_backups()) == (20, 20, set())

    # One flipped byte in an encrypted chunk fails its authentication tag.
    path = tmp_path / "sealed" / chunk_name(chunks[7])
    flipped = bytearray(path.read_bytes())
    flipped[-1] ^= 0x80
    path.write_bytes(bytes(flipped))
    # An index that no longer opens breaks its backup alone.
    (tmp_path / "sealed" / "indexes" / "b3" / "0").write_bytes(b"garbage")
    report = verify(repo, ["b1"])
    assert report.damaged == {chunks[7]: "its authentication tag does not match (changed or corrupted)"}
    assert report.users[chunks[7]] == ["b1", "b2"], "every backup using the chunk is named, not only b1"
    assert report.failed_backups() == {"b1", "b2"}
    assert verify(repo, ["b3"]).broken.keys() == {"b3"}
    assert verify(repo, ["nope"]).broken == {"nope": ["it is not in the repository (no manifest)"]}

    # A subset reads that share of the chunks, chosen at random (seeded here).
    subset = verify(repo, ["b1", "b2"], subset=25, rng=random.Random(7))
    assert (subset.chunks_named, subset.chunks_read, subset.coverage) == (20, 5, 25)


def test_an_index_that_does_not_fit_its_disk_is_damaged(tmp_path: Path) -> None:
    repo = plain(tmp_path)
    name = repo.put_index(DiskIndex(backup="x", device="vda", virtual_size=5 * CHUNK, chunk_size=CHUNK,
                                    chunks=[None, None]), 0)
    with pytest.raises(DamagedObject, match="does not match the disk size"):
        repo.index(name)


def test_chunk_plan_reads_data_skips_holes_and_keeps_what_did_not_change() -> None:
    size = 4 * CHUNK + 100  # five chunks, the last one short
    allocation = [(0, CHUNK, 0), (CHUNK, 2 * CHUNK, 3), (3 * CHUNK, CHUNK + 100, 0)]
    assert plan_chunks(size, CHUNK, allocation, None) == [Need.READ, Need.ZERO, Need.ZERO, Need.READ, Need.READ]
    dirty = [(0, 3 * CHUNK + 10, 0), (3 * CHUNK + 10, 20, 1), (3 * CHUNK + 30, CHUNK + 70, 0)]
    assert plan_chunks(size, CHUNK, allocation, dirty) == [Need.KEEP, Need.KEEP, Need.KEEP, Need.READ, Need.KEEP]
    # A dirty chunk that is all holes now reads as zeros: stored as nothing.
    assert plan_chunks(size, CHUNK, allocation, [(CHUNK, 1, 1)])[1] is Need.ZERO


def test_bad_input_is_refused_with_the_reason(home: Home, catalog: Catalog, tmp_path: Path) -> None:
    def refused(code: int, text: str, *args: str, env: dict[str, str] | None = None) -> None:
        done = run_cli(home, *args, env=env)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert text in done.stderr, done.stderr
        assert "Traceback" not in done.stderr

    refused(2, "--encryption needs a passphrase", "repo", "init", str(tmp_path / "r1"), "--encryption")
    loose = tmp_path / "loose"
    loose.write_text("secret\n")
    loose.chmod(0o644)
    refused(2, "readable by others", "repo", "init", str(tmp_path / "r2"), "--encryption", "--passphrase-file",
            str(loose))
    refused(10, "no repository at", "repo", "stats", str(tmp_path / "none"))
    refused(3, "no instance named", "backup", "create", "nosuch", "--repo", str(tmp_path / "none"))
    Repository.init(LocalStore(tmp_path / "repo"))
    refused(3, "no backup", "backup", "restore", "abcdef12", "--to", str(tmp_path / "out"), "--repo",
            str(tmp_path / "repo"))
    catalog.add_instance("files-host", kind="host", qmp_socket=None, qga_socket=None, mounts=("/srv",))
    refused(2, "is not a VM: backups are of QEMU VMs and libvirt domains", "backup", "create", "files-host",
            "--repo", str(tmp_path / "repo"))
    refused(2, "is not one of", "backup", "create", "files-host", "--type", "weekly")
    refused(2, "name the backups to verify, or give --all", "backup", "verify")
    refused(2, "name the backups to verify, or give --all", "backup", "verify", "abcdef12", "--all")
    refused(2, "--outdated-after selects among --all", "backup", "verify", "abcdef12", "--outdated-after", "3")
    refused(2, "not in the range", "backup", "verify", "--all", "--subset", "0")
    refused(3, "no backup", "backup", "verify", "abcdef12", "--repo", str(tmp_path / "repo"))
    refused(2, "give at least one --keep-* option", "policy", "set", "files-host")
    refused(2, "not in the range", "policy", "set", "files-host", "--keep-daily", "-1")
    refused(3, "no instance named", "policy", "set", "nosuch", "--keep-last", "1")
    refused(2, "has no retention policy", "backup", "prune", "files-host")
    refused(10, "no repository at", "repo", "gc", str(tmp_path / "none"))
    empty = run_cli(home, "backup", "verify", "--all", "--repo", str(tmp_path / "repo"), "-o", "json")
    assert empty.returncode == 0, empty.stderr
    assert json.loads(empty.stdout)["backups"] == []


def test_restoring_into_a_buffer_checks_size_and_content(tmp_path: Path) -> None:
    repo = plain(tmp_path)
    data = b"compressible " * (CHUNK // 13) + b"x" * (CHUNK % 13)
    chunk_id, _ = repo.put_chunk(data)
    out = bytearray(CHUNK)
    assert bytes(repo.get_chunk_into(chunk_id, CHUNK, out)) == data
    with pytest.raises(DamagedObject, match="more than its chunk"):
        repo.get_chunk_into(chunk_id, CHUNK - 1, out)  # an index that lies about the length
    path = tmp_path / "repo" / chunk_name(chunk_id)
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(DamagedObject, match=chunk_id):
        repo.get_chunk_into(chunk_id, CHUNK, out)


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_restore_writes_every_chunk_in_place_and_leaves_holes(tmp_path: Path, where: str) -> None:
    """O_DIRECT where the file system has it (ext4 here), the page cache where not (tmpfs);
    chunks stored compressed and as is, a zero chunk, and a last chunk of odd length."""
    repo = plain(tmp_path)
    parts = [b"text " * (CHUNK // 5) + b"t" * (CHUNK % 5), os.urandom(CHUNK), None, os.urandom(1000)]
    chunks = [None if p is None else repo.put_chunk(p)[0] for p in parts]
    size = 3 * CHUNK + 1000
    index = DiskIndex(backup="b", device="vda", virtual_size=size, chunk_size=CHUNK, chunks=chunks)
    target = tmp_path / "out"
    target.mkdir()
    if where == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(target)], check=True)
    try:
        written = restore_disk(repo, index, target / "vda.raw", workers=2)
        image = (target / "vda.raw").read_bytes()
        blocks = (target / "vda.raw").stat().st_blocks
    finally:
        if where == "tmpfs":
            subprocess.run(["umount", str(target)], check=True)
    assert written == 2 * CHUNK + 1000
    assert image == parts[0] + parts[1] + bytes(CHUNK) + parts[3]
    assert blocks * 512 < size, "the zero chunk was written instead of left as a hole"


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_restored_images_are_owner_only_whatever_the_umask(tmp_path: Path, fmt: str) -> None:
    repo = plain(tmp_path)
    data = os.urandom(CHUNK)
    index = DiskIndex(backup="b", device="vda", virtual_size=2 * CHUNK, chunk_size=CHUNK,
                      chunks=[repo.put_chunk(data)[0], None])
    old = os.umask(0o022)
    try:
        restore_disk(repo, index, tmp_path / f"vda.{fmt}", fmt=fmt, workers=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / f"vda.{fmt}").stat().st_mode) == 0o600
    out = subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / f"vda.{fmt}"), str(tmp_path / "x.raw")],
                         check=True)
    assert out.returncode == 0
    assert (tmp_path / "x.raw").read_bytes() == data + bytes(CHUNK)
    if fmt == "qcow2":  # written once, in place: the zero chunk was never allocated
        mapped = json.loads(subprocess.run(["qemu-img", "map", "--output=json", str(tmp_path / "vda.qcow2")],
                                           check=True, capture_output=True, text=True).stdout)
        assert [(m["start"], m["length"], m["data"]) for m in mapped] == [(0, CHUNK, True), (CHUNK, CHUNK, False)]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_an_in_place_restore_writes_only_the_chunks_that_differ(home: Home, tmp_path: Path, fmt: str) -> None:
    """Through the CLI, on real qemu-nbd: a restored image changed in two chunks (one
    overwritten, one zero chunk given data) is rolled back by writing those two chunks
    alone; an image a running QEMU holds is refused, untouched."""
    place = tmp_path / "repo"
    assert run_cli(home, "repo", "init", str(place), "--chunk-size", str(CHUNK >> 10)).returncode == 0
    repo = Repository.open(LocalStore(place))
    parts = [os.urandom(CHUNK) for _ in range(6)] + [None, os.urandom(CHUNK // 2)]
    ids = [None if p is None else repo.put_chunk(p)[0] for p in parts]
    size = 7 * CHUNK + CHUNK // 2
    name = repo.put_index(DiskIndex(backup="roll", device="vda", virtual_size=size, chunk_size=CHUNK,
                                    chunks=ids), 0)
    repo.put_manifest("roll", {"id": "roll", "instance": "synthetic", "disks": [
        {"device": "vda", "virtual_size": size, "index": name}]})
    out = tmp_path / "out"
    done = run_cli(home, "backup", "restore", "roll", "--repo", str(place), "--to", str(out), "--format", fmt)
    assert done.returncode == 0, done.stderr
    image = out / f"vda.{fmt}"
    original = b"".join(bytes(CHUNK) if p is None else p for p in parts)
    for offset in (2 * CHUNK + 100, 6 * CHUNK + 5):  # inside a data chunk, and inside the zero chunk
        subprocess.run(["qemu-io", "-f", fmt, "-c", f"write -P 0x5a {offset} 4096", str(image)], check=True,
                       capture_output=True)

    def content() -> bytes:
        raw = tmp_path / "check.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True)
        return raw.read_bytes()

    assert content() != original
    # A QEMU with the image as its disk (paused before the guest: the lock is what counts).
    holder = subprocess.Popen(["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
                               "-qmp", f"unix:{tmp_path / 'held.qmp'},server=on,wait=off",
                               "-blockdev", f"driver=file,filename={image},node-name=f",
                               "-blockdev", f"driver={fmt},file=f,node-name=d", "-device", "virtio-blk-pci,drive=d"],
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if (tmp_path / "held.qmp").exists():
                break
            time.sleep(0.05)
        refused = run_cli(home, "backup", "restore", "roll", "--repo", str(place), "--to", str(out), "--in-place")
        assert refused.returncode == 4, refused.stderr
        assert "in use" in refused.stderr
    finally:
        holder.terminate()
        holder.wait()
    rolled, done = None, run_cli(home, "backup", "restore", "roll", "--repo", str(place), "--to", str(out),
                                 "--in-place", "-o", "json")
    assert done.returncode == 0, done.stderr
    rolled = json.loads(done.stdout)
    assert [(r["chunks_written"], r["bytes_written"], r["chunks_same"]) for r in rolled] == [(2, 2 * CHUNK, 6)]
    assert rolled[0]["bytes_read"] == size
    assert content() == original


def test_sync_renames_chunks_between_keys_sends_only_what_is_missing_and_spreads_no_damage(tmp_path: Path) -> None:
    src, dst = sealed(tmp_path, "src", b"one"), sealed(tmp_path, "dst", b"two")
    chunks = [os.urandom(CHUNK) for _ in range(6)]
    ids = [src.put_chunk(c)[0] for c in chunks]
    for backup, mine in (("b1", ids[:4]), ("b2", ids[2:])):
        name = src.put_index(DiskIndex(backup=backup, device="vda", virtual_size=len(mine) * CHUNK,
                                       chunk_size=CHUNK, chunks=list(mine)), 0)
        src.put_manifest(backup, {"id": backup, "disks": [{"device": "vda", "index": name}]})
    first = sync(src, dst, ["b1"])
    assert (first.backups, first.chunks_sent, first.chunks_skipped) == (["b1"], 4, 0)
    second = sync(src, dst, ["b1", "b2"])
    assert (second.backups, second.present, second.chunks_sent, second.chunks_skipped) == (["b2"], ["b1"], 2, 2)
    copied = dst.index(dst.manifest("b2")["disks"][0]["index"])
    assert not set(copied.chunks) & set(ids), "the copy must name chunks under its own key"
    assert [dst.get_chunk(c, CHUNK) for c in copied.chunks if c] == chunks[2:]

    # A damaged chunk is not spread: the copy fails, naming it, and lists nothing.
    plain_src, plain_dst = plain(tmp_path, "p1"), plain(tmp_path, "p2")
    kept = [plain_src.put_chunk(c)[0] for c in chunks[:2]]
    name = plain_src.put_index(DiskIndex(backup="p", device="vda", virtual_size=2 * CHUNK, chunk_size=CHUNK,
                                         chunks=list(kept)), 0)
    plain_src.put_manifest("p", {"id": "p", "disks": [{"device": "vda", "index": name}]})
    path = tmp_path / "p1" / chunk_name(kept[1])
    flipped = bytearray(path.read_bytes())
    flipped[-1] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(DamagedObject, match=kept[1]):
        sync(plain_src, plain_dst, ["p"])
    assert plain_dst.backup_ids() == []
    path.write_bytes(bytes(flipped[:-1] + bytes([flipped[-1] ^ 1])))  # repaired: the rerun completes
    again = sync(plain_src, plain_dst, ["p"])
    assert again.backups == ["p"]
    assert again.chunks_sent + again.chunks_skipped == 2
    assert again.chunks_sent >= 1, "the damaged chunk was never sent"
    assert plain_dst.get_chunk(kept[1], CHUNK) == chunks[1]


def test_sync_with_the_same_names_lists_the_destination_once_and_resends_what_gc_took_meanwhile(
        tmp_path: Path) -> None:
    """Plain to plain: which chunks dst has comes from one listing, not a request each. A
    collection that runs between that listing and the lease naming the chunks found (the
    race the settle step exists for) deletes them; the copy sees them gone and sends them
    again. The copy keeps a zero chunk and an odd last chunk as they were."""
    src = plain(tmp_path, "src")
    dst = Repository.init(LocalStore(tmp_path / "dst"), chunk_size=CHUNK, lease_s=1)
    parts = [os.urandom(CHUNK), os.urandom(CHUNK), None, os.urandom(777)]
    ids = [None if p is None else src.put_chunk(p)[0] for p in parts]
    name = src.put_index(DiskIndex(backup="b", device="vda", virtual_size=3 * CHUNK + 777, chunk_size=CHUNK,
                                   chunks=list(ids)), 0)
    src.put_manifest("b", {"id": "b", "disks": [{"device": "vda", "index": name}]})
    old = time.time() - 3600
    for part in parts[:2]:
        assert part is not None
        chunk = dst.put_chunk(part)[0]  # garbage in dst: no index names it, and it is old
        os.utime(tmp_path / "dst" / chunk_name(chunk), (old, old))

    class GcFirst(Lease):
        collected: GcReport | None = None

        def name_digests(self, digests: bytes) -> None:
            if self.collected is None:
                self.collected = collect_garbage(dst)
            super().name_digests(digests)

    with GcFirst(dst.store, "sync-race", lease_s=dst.lease_s, kind="sync") as lease:
        report = sync(src, dst, ["b"], lease=lease)
    assert lease.collected is not None
    assert lease.collected.chunks == 2, "gc did not take the found chunks"
    assert (report.backups, report.chunks_sent, report.chunks_skipped) == (["b"], 3, 0)
    copied = dst.index(dst.manifest("b")["disks"][0]["index"])
    assert copied.chunks == ids
    assert [dst.get_chunk(c, copied.chunk_length(i)) for i, c in enumerate(copied.chunks) if c] == [
        p for p in parts if p is not None]
    again = sync(src, dst, ["b"])
    assert (again.backups, again.present) == ([], ["b"])


def test_a_lease_writes_a_big_batch_of_names_as_several_renewals(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    repo = plain(tmp_path)
    monkeypatch.setattr(leases, "_PIECE", 4 * 32)
    digests = [os.urandom(32) for _ in range(10)]
    with Lease.unique(repo.store, "sync", 600) as lease:
        lease.name_digests(b"".join(digests))
        lease.renew()
        renewals = next(s.renewals for s in leases.read_leases(repo.store) if s.name == lease.name)
        listed = [bytes(d) for name in renewals for d in leases.renewal_ids(repo.store, name)]
    assert len(renewals) >= 3
    assert sorted(listed) == sorted(digests)


def test_s3_mistakes_are_named(home: Home, s3: S3Server) -> None:
    where = f"s3://ff/{unique('named')}"
    missing = run_cli(home, "repo", "init", "s3://nosuchbucket/x", "--endpoint", s3.endpoint)
    assert missing.returncode == 10
    assert "nosuchbucket" in missing.stderr
    wrong = run_cli(home, "repo", "init", where, "--endpoint", s3.endpoint,
                    env={"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert wrong.returncode == 10
    assert "privileges" in wrong.stderr
    bare = run_cli(home, "repo", "init", where, "--endpoint", s3.endpoint,
                   env={"AWS_ACCESS_KEY_ID": "", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"})
    assert bare.returncode == 10
    assert "no S3 credentials" in bare.stderr
    bad_endpoint = run_cli(home, "repo", "init", where, "--endpoint", "ftp://x")
    assert bad_endpoint.returncode == 2
    assert "--endpoint 'ftp://x' is not an http(s) URL" in bad_endpoint.stderr
    made = run_cli(home, "repo", "init", where, "--endpoint", s3.endpoint, "-o", "json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["path"] == f"{where}?endpoint={quote(s3.endpoint, safe='')}"
    again = run_cli(home, "repo", "init", where, "--endpoint", s3.endpoint)
    assert again.returncode == 10
    assert "is a repository already" in again.stderr
