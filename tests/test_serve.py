"""A backup served over NBD by real nbdkit with freezeframe's plugin, read by real NBD
clients (qemu-img, libnbd): the same bytes as a restore, holes where the backup has
zeros, and an I/O error, named in the log, where a chunk is damaged; from a local and an
S3 repository, encrypted or not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import nbd
import pytest
from backups import damage_chunk, served
from conftest import RepoPlace, run_cli
from servers import S3Server

from freezeframe.backup.repository import DiskIndex, Repository, chunk_name
from freezeframe.backup.store import open_store
from freezeframe.config import Home

CHUNK = 1 << 20
PASS = {"FF_PASS": "served secret"}


def make_backup(home: Home, place: RepoPlace, encrypted: bool) -> tuple[str, bytes, list[str | None]]:
    """A backup of one disk written through the repository: two data chunks, a chunk of
    zeros, and a short last chunk. Returns its id, the disk's bytes and its chunk ids."""
    args = ["--passphrase-env", "FF_PASS"] if encrypted else []
    done = run_cli(home, "repo", "init", str(place), "--chunk-size", str(CHUNK >> 10), *args, env=PASS)
    assert done.returncode == 0, done.stderr
    repo = Repository.open(open_store(place.location), passphrase=PASS["FF_PASS"].encode() if encrypted else None)
    parts = [os.urandom(CHUNK), os.urandom(CHUNK), None, os.urandom(CHUNK // 2 + 512)]
    ids = [None if p is None else repo.put_chunk(p)[0] for p in parts]
    size = sum(CHUNK if p is None else len(p) for p in parts)
    backup_id = f"served-{os.urandom(4).hex()}"
    name = repo.put_index(DiskIndex(backup=backup_id, device="vdb", virtual_size=size, chunk_size=CHUNK,
                                    chunks=ids), 0)
    repo.put_manifest(backup_id, {"id": backup_id, "instance": "synthetic", "disks": [
        {"device": "vdb", "virtual_size": size, "index": name}]})
    return backup_id, b"".join(bytes(CHUNK) if p is None else p for p in parts), ids


def nbd_read(uri: str, offset: int, length: int) -> bytes:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        return bytes(handle.pread(length, offset))
    finally:
        handle.shutdown()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_served_backup_reads_as_the_disk_and_a_damaged_chunk_is_an_io_error_named_in_the_log(
        home: Home, any_repo: RepoPlace, tmp_path: Path, encrypted: bool) -> None:
    backup_id, disk, ids = make_backup(home, any_repo, encrypted)
    repo_args = ["--repo", str(any_repo), *(["--passphrase-env", "FF_PASS"] if encrypted else [])]
    with served(home, backup_id, *repo_args, "--cache", "2", env=PASS) as info:
        uri = info["exports"]["vdb"]
        info_out = subprocess.run(["qemu-img", "info", "--output=json", uri], capture_output=True, text=True,
                                  check=True).stdout
        assert f'"virtual-size": {len(disk)}' in info_out
        copy = tmp_path / "copy.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(copy)], check=True)
        assert copy.read_bytes() == disk
        # Block status says where the zeros are, from the index: clients skip them.
        mapped = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri], capture_output=True,
                                text=True, check=True).stdout
        assert f'"start": {2 * CHUNK}, "length": {CHUNK}, "depth": 0, "present": true, "zero": true' in mapped
        # A read across a chunk boundary, and one inside the short last chunk.
        assert nbd_read(uri, CHUNK - 100, 200) == disk[CHUNK - 100:CHUNK + 100]
        assert nbd_read(uri, len(disk) - 700, 700) == disk[-700:]

    # Damage the second chunk (not read yet by a new server: nothing cached).
    victim = any_repo / chunk_name(str(ids[1]))
    if encrypted:
        sealed = bytearray(victim.read_bytes())
        sealed[len(sealed) // 2] ^= 1
        victim.write_bytes(bytes(sealed))
    else:
        damage_chunk(victim)
    with served(home, backup_id, *repo_args, "--read-ahead", "0", env=PASS) as info:
        uri = info["exports"]["vdb"]
        with pytest.raises(nbd.Error) as failed:
            nbd_read(uri, CHUNK + 4096, 4096)
        assert failed.value.errno == "EIO", failed.value  # never other bytes
        assert nbd_read(uri, 0, CHUNK) == disk[:CHUNK], "the chunk next to the damaged one no longer reads"
        assert nbd_read(uri, 3 * CHUNK, 4096) == disk[3 * CHUNK:3 * CHUNK + 4096]
        log = Path(info["log"]).read_text()
        assert str(ids[1]) in log
        assert f"bytes {CHUNK}-{2 * CHUNK - 1}" in log
        assert "unreadable chunk" in log


def test_serve_refuses_a_disk_the_backup_lacks_and_a_socket_in_use(home: Home, tmp_path: Path) -> None:
    place = RepoPlace(str(tmp_path / "repo"), tmp_path / "repo")
    backup_id, _, _ = make_backup(home, place, encrypted=False)
    wrong = run_cli(home, "backup", "serve", backup_id, "--repo", str(place), "--disk", "vdz")
    assert wrong.returncode == 3
    assert "has no disk vdz" in wrong.stderr
    assert "vdb" in wrong.stderr
    socket = tmp_path / "one.sock"
    with served(home, backup_id, "--repo", str(place), "--socket", str(socket)):
        clash = run_cli(home, "backup", "serve", backup_id, "--repo", str(place), "--socket", str(socket))
        assert clash.returncode == 10
        assert "in use" in clash.stderr


def test_serve_from_s3_waits_out_an_outage_instead_of_failing_a_read(home: Home, s3: S3Server,
                                                                     tmp_path: Path) -> None:
    """A read while the S3 server is down is slow, not an error: it completes when the
    server is back (within --wait)."""
    prefix = f"served-outage-{os.urandom(3).hex()}"
    place = RepoPlace(f"s3://ff/{prefix}?endpoint={s3.endpoint}", s3.root / "ff" / prefix)
    backup_id, disk, _ = make_backup(home, place, encrypted=False)
    with served(home, backup_id, "--repo", str(place), "--cache", "0", "--read-ahead", "0",
                "--wait", "120") as info:
        uri = info["exports"]["vdb"]
        assert nbd_read(uri, 0, 4096) == disk[:4096]
        with s3.stopped():
            handle = nbd.NBD()
            handle.connect_uri(uri)
            buf = nbd.Buffer(4096)
            cookie = handle.aio_pread(buf, CHUNK)
            for _ in range(20):  # two seconds without the server: the read is still waiting
                handle.poll(100)
            assert not handle.aio_command_completed(cookie), "the read did not wait for the repository"
        while not handle.aio_command_completed(cookie):
            handle.poll(1000)
        assert buf.to_bytearray() == disk[CHUNK:CHUNK + 4096]
        handle.shutdown()
        assert f"reading bytes {CHUNK}-{2 * CHUNK - 1} of disk vdb took" in Path(info["log"]).read_text()
