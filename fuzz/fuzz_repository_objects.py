"""Coverage-guided fuzzing of every parser of repository objects (atheris): whoever can
write to the bucket can put any bytes there.

    make fuzz                                  # both targets, 60 s each
    .venv/bin/python fuzz/fuzz_repository_objects.py -max_total_time=600

The input is tried as: the config, the key object (against a config it might vouch for),
an index (both formats: JSON, and binary digests) and a manifest of a plain repository
(stored as such, then read back through the repository, so the object encoding and zstd
are in the path), a lease's holder and renewal, and a manifest as ``repo import`` turns
it into catalog records. A repository
error (RepositoryError and its subclasses) is the answer to bad bytes; anything else is a
finding. Memory is bounded by atheris' -rss_limit_mb (2 GB by default), time by -timeout.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from freezeframe.backup import leases
    from freezeframe.backup.crypto import open_key_object
    from freezeframe.backup.repository import Repository, parse_config
    from freezeframe.backup.store import LocalStore
    from freezeframe.errors import FreezeframeError, RepositoryError
    from freezeframe.jobs.repo_import import backup_from_manifest

_ROOT = Path(tempfile.mkdtemp(prefix="ff-fuzz-repo-"))
_REPO = Repository.init(LocalStore(_ROOT / "plain", durable=False), chunk_size=64 << 10)
_CONFIG = _REPO.config
_N = 0


def _fresh() -> str:
    """A backup id not used before: objects are immutable."""
    global _N
    _N += 1
    return f"b{_N}"


def _stored(name: str, raw: bytes) -> Iterator[str]:
    _REPO.store.put(name, raw)
    try:
        yield name
    finally:
        _REPO.store.delete(name)


def test_one(data: bytes) -> None:
    with contextlib.suppress(RepositoryError):
        parse_config(data, "fuzz")
    with contextlib.suppress(RepositoryError):
        open_key_object(data, b"passphrase", "fuzz", _CONFIG)

    # As stored (the object's own encoding byte first), and as a writer would encode it.
    for encode in (False, True):
        backup = _fresh()
        index, manifest = f"indexes/{backup}/0", f"backups/{backup}"
        for name, read in ((index, lambda n=index: (_REPO.index(n), _REPO.index_digests(n))),
                           (manifest, lambda b=backup: _REPO.manifest(b))):
            with contextlib.contextmanager(_stored)(name, _REPO._encode(name, data) if encode else data), \
                    contextlib.suppress(RepositoryError):
                read()

    lease = f"backup-{_fresh()}"
    for seq in (0, 1):
        _REPO.store.put(f"{leases.LOCKS}{lease}/{seq:08d}", data)
    with contextlib.suppress(RepositoryError):
        leases.renewal_ids(_REPO.store, f"{leases.LOCKS}{lease}/00000001")
    with contextlib.suppress(RepositoryError):
        for found in leases.read_leases(_REPO.store):
            found.dead(0.0, 600)
            found.describe(0.0)
            leases.break_lease(_REPO.store, found)

    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return
    if isinstance(value, dict):
        with contextlib.suppress(FreezeframeError, ValueError, KeyError, TypeError):
            backup_from_manifest(value, "fuzz")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
