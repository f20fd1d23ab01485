"""What the backup tests share: the CLI in JSON, a repository, a backup, a restore, and
writes inside the guest."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard
from conftest import RepoPlace, agent_call, guest_sh, run_cli

from freezeframe.backup.repository import Repository
from freezeframe.backup.store import open_store
from freezeframe.config import Home
from freezeframe.lab.vm import LabVM


def cli_json(home: Home, *args: str, env: dict[str, str] | None = None) -> tuple[Any, subprocess.CompletedProcess[str]]:
    done = run_cli(home, *args, "-o", "json", env=env)
    return (json.loads(done.stdout) if done.stdout.strip() else None), done


def init_repo(home: Home, repo: Path | RepoPlace | str, *args: str) -> None:
    done = run_cli(home, "repo", "init", str(repo), *args)
    assert done.returncode == 0, done.stderr


def backup(home: Home, vm: LabVM, repo: Path | RepoPlace, *args: str,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    data, done = cli_json(home, "backup", "create", vm.name, "--repo", str(repo), "--consistency", "filesystem",
                          *args, env=env)
    assert done.returncode == 0, done.stderr
    assert data["state"] == "created"
    return dict(data)


def restore(home: Home, backup_id: str, dest: Path, *args: str,
            env: dict[str, str] | None = None) -> dict[str, Path]:
    data, done = cli_json(home, "backup", "restore", backup_id, "--to", str(dest), "--format", "raw", *args, env=env)
    assert done.returncode == 0, done.stderr
    return {d["device"]: Path(d["image"]) for d in data}


def guest(vm: LabVM, script: str) -> str:
    code, out = agent_call(vm, lambda agent: guest_sh(agent, script), timeout=120)
    assert code == 0, out
    return str(out)


def write_random(vm: LabVM, path: str, mib: int) -> str:
    """Write ``mib`` MiB of random bytes in the guest; returns their SHA-256."""
    script = f"dd if=/dev/urandom of={path} bs=1M count={mib} 2>/dev/null && sync && sha256sum {path}"
    return guest(vm, script).split()[0]


def e2fsck_clean(raw: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, check=False).returncode == 0


def chunks_of(repo: Path | RepoPlace, backup_id: str) -> set[str]:
    """The chunks a backup's indexes name."""
    opened = Repository.open(open_store(str(repo)))
    return {c for disk in opened.manifest(backup_id)["disks"] for c in opened.index(disk["index"]).chunks if c}


def objects(repo: Path | RepoPlace, prefix: str) -> list[str]:
    """The names of the repository's objects under ``prefix`` (through its store)."""
    return [info.name for info in open_store(str(repo)).list(prefix)]


def damage_chunk(path: Path) -> None:
    """Flip one byte of a stored (unencrypted) chunk so that what it holds changes.

    Not every byte of a zstd frame matters: some bits are padding the decoder never looks
    at, and a flip there leaves the chunk's content, and so its hash, as they were (seen
    here: the middle byte of a 5 KB frame). That is no damage to find, so this flips the
    first byte from the middle on whose flip the object no longer decodes to the same
    content."""
    original = path.read_bytes()
    before = _decoded(original)
    for offset in range(len(original) // 2, len(original)):
        flipped = bytearray(original)
        flipped[offset] ^= 0x01
        if _decoded(bytes(flipped)) != before:
            path.write_bytes(bytes(flipped))
            return
    raise AssertionError(f"no byte of {path} changes its content")


def _decoded(sealed: bytes) -> bytes | None:
    """A plain repository's chunk object as it decodes: a kind byte (0 stored as is,
    1 zstd) then the body; None when it does not decode."""
    if sealed[0] == 0:
        return sealed[1:]
    try:
        with zstandard.ZstdDecompressor().stream_reader(sealed[1:]) as reader:
            return reader.read(64 << 20)
    except (zstandard.ZstdError, MemoryError):
        return None


@contextlib.contextmanager
def served(home: Home, backup_id: str, *args: str, env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """``backup serve`` running as a user starts it (its JSON read from its output); it is
    stopped with SIGTERM after the block, and must then exit 0 and leave no socket."""
    proc = subprocess.Popen([sys.executable, "-m", "freezeframe", "backup", "serve", backup_id, *args, "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, FREEZEFRAME_HOME=str(home.root), **(env or {})))
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.rstrip() == "}":
                break
        if not lines:
            proc.wait(timeout=60)
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"backup serve failed ({proc.returncode}): {err}")
        info: dict[str, Any] = json.loads("".join(lines))
        yield info
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert not Path(info["socket"]).exists(), "the socket was left behind"
    assert not Path(f"/proc/{info['pid']}").exists(), "nbdkit outlived backup serve"
