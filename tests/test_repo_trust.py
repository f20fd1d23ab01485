"""Trust nothing the repository says about itself: a swapped config, a swapped key object,
a manifest or index moved between backups, each refused with a clear error and nothing
written; the key exported and its passphrase changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from backups import backup, cli_json, init_repo
from conftest import run_cli

from freezeframe.config import Home
from freezeframe.lab.vm import LabVM


def every_object(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


def secret(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_an_encrypted_repositorys_config_swapped_for_a_plain_one_is_refused_and_nothing_written(
        home: Home, shared_vm: LabVM, tmp_path: Path) -> None:
    key = secret(tmp_path, "pass", "a long passphrase")
    sealed, plain = tmp_path / "sealed", tmp_path / "plain"
    init_repo(home, sealed, "--encryption", "--passphrase-file", str(key))
    init_repo(home, plain)
    first = backup(home, shared_vm, sealed, "--passphrase-file", str(key), "--consistency", "crash")
    # The attacker, with write access to the bucket but not the passphrase, puts a plain
    # repository's config in place: a backup would no longer need the passphrase, and
    # would write plaintext.
    shutil.copy(plain / "config", sealed / "config")
    before = every_object(sealed)

    done = run_cli(home, "backup", "create", shared_vm.name, "--repo", str(sealed), "--consistency", "crash")
    assert done.returncode == 10, done.stderr
    assert "not the one this host knew there" in done.stderr
    assert "it was encrypted (aes-256-gcm), its config now says none" in done.stderr
    assert every_object(sealed) == before, "an object was written into the swapped repository"

    # A host that never saw it: a plain repository has no key object.
    other = Home(tmp_path / "other-home")
    done = run_cli(other, "repo", "check", str(sealed))
    assert done.returncode == 10, done.stderr
    assert "has a key object but its config says it is not encrypted" in done.stderr
    assert every_object(sealed) == before, "an object was written into the swapped repository"
    # With the encrypted config back and only its id changed, the key object tells.
    config = json.loads((plain / "config").read_text())
    original = json.loads(before["config"]) | {"encryption": "aes-256-gcm", "hash": "blake3-keyed"}
    (sealed / "config").write_text(json.dumps(original | {"id": config["id"]}))
    done = run_cli(other, "repo", "check", str(sealed), "--passphrase-file", str(key))
    assert done.returncode == 10, done.stderr
    assert "belongs to another repository" in done.stderr or "is not the one its key vouches for" in done.stderr
    listed, _ = cli_json(home, "backup", "list", "--instance", shared_vm.name)
    assert first["id"] in [b["id"] for b in listed]


def test_a_key_object_swapped_for_another_repositorys_is_refused(home: Home, tmp_path: Path) -> None:
    key = secret(tmp_path, "pass", "the same passphrase for both")
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    init_repo(home, mine, "--encryption", "--passphrase-file", str(key))
    init_repo(home, theirs, "--encryption", "--passphrase-file", str(key))
    shutil.copy(theirs / "keys" / "repokey", mine / "keys" / "repokey")
    done = run_cli(home, "repo", "check", str(mine), "--passphrase-file", str(key))
    assert done.returncode == 10
    assert "belongs to another repository" in done.stderr


def test_a_manifest_or_index_moved_to_another_backup_is_found(
        home: Home, shared_vm: LabVM, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    one = backup(home, shared_vm, repo, "--consistency", "crash")["id"]
    two = backup(home, shared_vm, repo, "--consistency", "crash")["id"]
    shutil.copy(repo / "indexes" / one / "0", repo / "indexes" / two / "0")
    done = run_cli(home, "backup", "restore", two, "--to", str(tmp_path / "out"), "--repo", str(repo))
    assert done.returncode == 11, done.stderr
    assert f"it is the index of backup {one}" in done.stderr
    shutil.copy(repo / "backups" / one, repo / "backups" / two)
    checked = run_cli(home, "repo", "check", str(repo))
    assert checked.returncode == 11
    assert f"it is the manifest of backup {one}" in checked.stdout


def test_the_key_exports_and_its_passphrase_changes(home: Home, tmp_path: Path) -> None:
    old, new = secret(tmp_path, "old", "first passphrase"), secret(tmp_path, "new", "second passphrase")
    repo = tmp_path / "repo"
    init_repo(home, repo, "--encryption", "--passphrase-file", str(old))
    exported = tmp_path / "key.json"
    done = run_cli(home, "repo", "key", "export", str(exported), "--repo", str(repo), "--passphrase-file", str(old))
    assert done.returncode == 0, done.stderr
    assert exported.read_bytes() == (repo / "keys" / "repokey").read_bytes()
    assert exported.stat().st_mode & 0o777 == 0o600
    done = run_cli(home, "repo", "key", "passphrase", "--repo", str(repo), "--passphrase-file", str(old),
                   "--new-passphrase-file", str(new))
    assert done.returncode == 0, done.stderr
    refused = run_cli(home, "repo", "check", str(repo), "--passphrase-file", str(old))
    assert refused.returncode == 10
    assert "wrong passphrase" in refused.stderr
    assert run_cli(home, "repo", "check", str(repo), "--passphrase-file", str(new)).returncode == 0
    # The exported key still opens with the old passphrase: put back, it is the old key again.
    shutil.copy(exported, repo / "keys" / "repokey")
    assert run_cli(home, "repo", "check", str(repo), "--passphrase-file", str(old)).returncode == 0


def test_a_repository_re_created_in_place_is_refused_until_forgotten(home: Home, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(home, repo)
    shutil.rmtree(repo)
    other = Home(tmp_path / "elsewhere")
    init_repo(other, repo)  # made by another host: this one's pin still says the old id
    done = run_cli(home, "repo", "stats", str(repo))
    assert done.returncode == 10
    assert "its id was" in done.stderr
    assert "freezeframe repo forget" in done.stderr
    assert run_cli(home, "repo", "forget", str(repo)).returncode == 0
    assert run_cli(home, "repo", "stats", str(repo)).returncode == 0
