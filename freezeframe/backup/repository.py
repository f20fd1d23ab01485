"""The backup repository: content-addressed chunks, one index per disk per backup, and a
manifest per backup, all immutable objects in an ObjectStore.

Layout (object names)::

    config                     plain JSON: format, chunk size, compression, encryption
    keys/repokey               the wrapped keys (encrypted repositories only)
    chunks/<id[:2]>/<id>       one fixed-size piece of a disk; id = BLAKE3 (keyed, when encrypted)
    indexes/<backup>/<n>       disk n of a backup: the id of every chunk, null for all-zero
    backups/<backup>           the manifest; written last, so only complete backups have one
    locks/<name>/<n>           a writer's lease: who holds it, and what it will name (leases.py)

Every index is complete (unchanged chunks of an incremental are referenced, not left
out), so a restore reads one index and never replays a chain, and deleting a backup
never breaks another. An object is ``[1 byte encoding][data]``: 0 stored as is, 1 a zstd
frame; in an encrypted repository that whole object is sealed (see ``crypto.py``).
"""

from __future__ import annotations

import json
import mmap
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import zstandard

from freezeframe.backup.crypto import Sealer, Tampered, key_object, new_keys, open_key_object
from freezeframe.backup.digests import ZERO, Digests, DigestSet, as_array, as_array_all, bytes_of
from freezeframe.backup.leases import DEFAULT_LEASE_S
from freezeframe.backup.store import ObjectStore
from freezeframe.errors import DamagedObject, InvalidInput, NotFound, RepositoryError

FORMAT = "freezeframe-repository/1"
#: Indexes were JSON lists of hex ids (format 1, still read); they are written binary
#: (format 2): ``INDEX_MAGIC``, a 4-byte big-endian header length, a JSON header (format,
#: backup, device, sizes), then one 32-byte digest per chunk, all zero for a chunk of zeros.
#: A third of the size, and read as one blob, never an object per chunk.
INDEX_FORMAT = "freezeframe-index/1"
INDEX_FORMAT_2 = "freezeframe-index/2"
INDEX_MAGIC = b"FFIX\x02"
_MAX_INDEX_HEADER = 4096
MANIFEST_FORMAT = "freezeframe-backup/1"
DEFAULT_CHUNK_SIZE = 4 << 20
#: 32 M chunk ids: 128 TiB of 4 MiB chunks in one disk.
MAX_INDEX_BYTES = 1 << 30
#: zstd level 1: on disk images it stores within a few percent of level 3 at about twice the speed.
DEFAULT_ZSTD_LEVEL = 1
_RAW, _ZSTD = 0, 1
CONFIG = "config"
KEY = "keys/repokey"
#: Bounds of a repository's lease time: seconds are for tests; a day is beyond any stall.
MIN_LEASE_S, MAX_LEASE_S = 1.0, 86400.0


def chunk_name(chunk_id: str) -> str:
    return f"chunks/{chunk_id[:2]}/{chunk_id}"


def index_name(backup_id: str, position: int) -> str:
    return f"indexes/{backup_id}/{position}"


def manifest_name(backup_id: str) -> str:
    return f"backups/{backup_id}"


@dataclass(slots=True, kw_only=True)
class DiskIndex:
    """The chunks of one disk at one backup, in order; None for a chunk of zeros."""

    backup: str
    device: str
    virtual_size: int
    chunk_size: int
    chunks: list[str | None]

    def chunk_length(self, position: int) -> int:
        return min(self.chunk_size, self.virtual_size - position * self.chunk_size)

    def to_json(self) -> dict[str, Any]:
        return {"format": INDEX_FORMAT, "backup": self.backup, "device": self.device,
                "virtual_size": self.virtual_size, "chunk_size": self.chunk_size, "chunks": self.chunks}

    def to_binary(self) -> bytes:
        return self.binary_with(b"".join(bytes.fromhex(c) if c is not None else ZERO for c in self.chunks))

    def binary_with(self, digests: bytes | memoryview) -> bytes:
        """The format 2 object: this index's header, then ``digests`` (32 bytes a chunk)."""
        header = json.dumps({"format": INDEX_FORMAT_2, "backup": self.backup, "device": self.device,
                             "virtual_size": self.virtual_size, "chunk_size": self.chunk_size}).encode()
        return b"".join([INDEX_MAGIC, len(header).to_bytes(4, "big"), header, digests])

    @classmethod
    def header_of(cls, raw: bytes | memoryview, name: str) -> tuple[DiskIndex, memoryview]:
        """A binary index's header (as an index with no chunks) and its digests, checked
        against each other; DamagedObject when the bytes are not one."""
        view = memoryview(raw)
        try:
            if bytes(view[:len(INDEX_MAGIC)]) != INDEX_MAGIC or len(view) < len(INDEX_MAGIC) + 4:
                raise ValueError("no index header")
            size = int.from_bytes(view[len(INDEX_MAGIC):len(INDEX_MAGIC) + 4], "big")
            start = len(INDEX_MAGIC) + 4
            if size > _MAX_INDEX_HEADER or start + size > len(view):
                raise ValueError(f"a header of {size} bytes")
            data = json.loads(bytes(view[start:start + size]))
            if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT_2:
                raise ValueError("not a format 2 index header")
            header = cls(backup=_bounded_text(data["backup"]), device=_bounded_text(data["device"]),
                         virtual_size=_count(data["virtual_size"]), chunk_size=_count(data["chunk_size"]), chunks=[])
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
            raise DamagedObject(name, f"not a valid index: {err}") from err
        digests = view[start + size:]
        expected = -(-header.virtual_size // header.chunk_size) if header.chunk_size > 0 else -1
        if expected < 0 or len(digests) != 32 * expected:
            raise DamagedObject(name, "its chunk list does not match the disk size")
        return header, digests

    @classmethod
    def from_json(cls, data: dict[str, Any], name: str) -> DiskIndex:
        try:
            if data["format"] != INDEX_FORMAT:
                raise ValueError(f"format {data['format']!r}")
            index = cls(backup=str(data["backup"]), device=str(data["device"]),
                        virtual_size=int(data["virtual_size"]), chunk_size=int(data["chunk_size"]),
                        chunks=list(data["chunks"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedObject(name, f"not a valid index: {err}") from err
        expected = -(-index.virtual_size // index.chunk_size) if index.chunk_size > 0 else -1
        if len(index.chunks) != expected or not all(c is None or _is_id(c) for c in index.chunks):
            raise DamagedObject(name, "its chunk list does not match the disk size or holds invalid ids")
        return index


@dataclass(slots=True)
class RepoStats:
    backups: int = 0
    #: Bytes of data the backups describe (all-zero chunks left out), counted per backup.
    logical_bytes: int = 0
    #: Bytes of the distinct chunks, before compression.
    unique_bytes: int = 0
    #: Bytes the chunk objects take in the store.
    stored_bytes: int = 0
    chunks: int = 0
    #: Chunks that no backup names (left by interrupted backups; garbage collection frees them).
    unreferenced_chunks: int = 0

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass(slots=True)
class CheckReport:
    backups: int = 0
    indexes: int = 0
    chunks_named: int = 0
    problems: list[str] = field(default_factory=list)


def _bounded_text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise ValueError("a name that is not a short string")
    return value


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value > 1 << 56:
        raise ValueError(f"{value!r} is not a size")
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def is_repository(store: ObjectStore) -> bool:
    return store.exists(CONFIG)


#: A config is a few hundred bytes: anything much larger is not one.
MAX_CONFIG_BYTES = 64 << 10


def parse_config(raw: bytes, where: str) -> dict[str, Any]:
    """The config, strictly checked: it is read before anything can be authenticated."""
    try:
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"{len(raw)} bytes")
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        if config.get("format") != FORMAT:
            raise ValueError(f"unknown format {config.get('format')!r}")
        if config.get("hash") not in ("blake3", "blake3-keyed"):
            raise ValueError(f"unknown chunk hash {config.get('hash')!r}")
        if config.get("encryption", "none") not in ("none", "aes-256-gcm"):
            raise ValueError(f"unknown encryption {config.get('encryption')!r}")
        if (config["hash"] == "blake3-keyed") != (config.get("encryption", "none") != "none"):
            raise ValueError("its chunk hash and its encryption do not go together")
        if not isinstance(config.get("id"), str) or len(config["id"]) > 64:
            raise ValueError("no valid id")
        size = config["chunk_size"]
        if not isinstance(size, int) or size < 64 << 10 or size > 64 << 20 or size & (size - 1):
            raise ValueError(f"chunk size {size!r}")
        level = config.get("zstd_level", DEFAULT_ZSTD_LEVEL)
        if not isinstance(level, int) or not -7 <= level <= 22:
            raise ValueError(f"zstd level {level!r}")
        lease = config.get("lock_lease_s", DEFAULT_LEASE_S)
        if not isinstance(lease, int | float) or not MIN_LEASE_S <= lease <= MAX_LEASE_S:
            raise ValueError(f"lock lease {lease!r} out of range")
    except (ValueError, KeyError, TypeError) as err:
        raise RepositoryError(f"the repository config at {where} is unreadable: {err}") from err
    return config


@dataclass(frozen=True, slots=True)
class RepoIdentity:
    """What a host pins about a repository on first use: what must never change."""

    id: str
    chunk_hash: str
    encryption: str
    chunk_size: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> RepoIdentity:
        return cls(id=str(config["id"]), chunk_hash=str(config["hash"]),
                   encryption=str(config.get("encryption", "none")), chunk_size=int(config["chunk_size"]))

    def differences(self, found: RepoIdentity) -> list[str]:
        said = []
        if found.encryption != self.encryption:
            said.append(f"it was {'encrypted' if self.encryption != 'none' else 'not encrypted'} "
                        f"({self.encryption}), its config now says {found.encryption}")
        if found.id != self.id:
            said.append(f"its id was {self.id}, its config now says {found.id}")
        if found.chunk_hash != self.chunk_hash:
            said.append(f"its chunks were named by {self.chunk_hash}, its config now says {found.chunk_hash}")
        if found.chunk_size != self.chunk_size:
            said.append(f"its chunk size was {self.chunk_size}, its config now says {found.chunk_size}")
        return said


class Repository:
    """A repository opened for reading and writing. Thread-safe for chunk I/O."""

    def __init__(self, store: ObjectStore, config: dict[str, Any], sealer: Sealer) -> None:
        self.store = store
        self.config = config
        self.sealer = sealer
        self.chunk_size = int(config["chunk_size"])
        #: How long a writer's lease lasts unrenewed (see leases.py).
        self.lease_s = float(config.get("lock_lease_s", DEFAULT_LEASE_S))
        self.level = int(config.get("zstd_level", DEFAULT_ZSTD_LEVEL))
        self._local = threading.local()

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def encrypted(self) -> bool:
        return self.sealer.encrypted

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def init(cls, store: ObjectStore, *, passphrase: bytes | None = None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, lease_s: float = DEFAULT_LEASE_S) -> Repository:
        if store.exists(CONFIG):
            raise RepositoryError(f"{store.location} is a repository already")
        if chunk_size < 64 << 10 or chunk_size > 64 << 20 or chunk_size & (chunk_size - 1):
            raise InvalidInput(f"chunk size must be a power of two from 64 KiB to 64 MiB, not {chunk_size}")
        if not MIN_LEASE_S <= lease_s <= MAX_LEASE_S:
            raise InvalidInput(f"the lock lease must be from {MIN_LEASE_S:g} s to {MAX_LEASE_S:g} s, not {lease_s:g}")
        keys = new_keys() if passphrase is not None else None
        config = {"format": FORMAT, "id": str(uuid.uuid4()), "chunk_size": chunk_size, "compression": "zstd",
                  "zstd_level": DEFAULT_ZSTD_LEVEL, "hash": "blake3-keyed" if keys else "blake3",
                  "encryption": "aes-256-gcm" if keys else "none", "lock_lease_s": lease_s}
        if keys is not None:
            assert passphrase is not None
            store.put(KEY, key_object(keys, passphrase, config))
        # The config goes last: a directory without it is not a repository yet.
        store.flush()
        store.put(CONFIG, json.dumps(config, indent=1).encode())
        store.flush()
        return cls(store, config, Sealer(keys))

    @classmethod
    def open(cls, store: ObjectStore, *, passphrase: bytes | None = None,
             expect: RepoIdentity | None = None) -> Repository:
        """Open the repository; with ``expect`` (what this host pinned on first use), refuse
        one whose config says otherwise before anything is read or written."""
        if not store.exists(CONFIG):
            raise RepositoryError(f"no repository at {store.location}",
                                  hint=f"create one with: freezeframe repo init {store.location}")
        config = parse_config(store.get(CONFIG), store.location)
        found = RepoIdentity.of(config)
        if expect is not None and found != expect:
            raise RepositoryError(
                f"the repository at {store.location} is not the one this host knew there: "
                + "; ".join(expect.differences(found)) + ". Refused, and nothing was written: its config may have "
                "been replaced", hint="if it was re-created on purpose: freezeframe repo forget " + store.location)
        keys = None
        if config.get("encryption", "none") == "none" and store.exists(KEY):
            # Only an encrypted repository has a key object: a host that never saw this one
            # still tells a plain config put over an encrypted repository's.
            raise RepositoryError(
                f"the repository at {store.location} has a key object but its config says it is not encrypted: "
                "refused, and nothing was written: its config may have been replaced",
                hint="restore the config object from a copy")
        if config.get("encryption", "none") != "none":
            if passphrase is None:
                raise RepositoryError(
                    f"the repository {store.location} is encrypted and no passphrase was given",
                    hint="give it with --passphrase-file PATH, --passphrase-env VAR, or FREEZEFRAME_PASSPHRASE")
            keys = open_key_object(store.get(KEY), passphrase, store.location, config)
        return cls(store, config, Sealer(keys))

    @property
    def identity(self) -> RepoIdentity:
        return RepoIdentity.of(self.config)

    def change_passphrase(self, passphrase: bytes, new: bytes) -> None:
        """Wrap the keys under a new passphrase (the old one must open them)."""
        if self.sealer.keys is None:
            raise InvalidInput(f"the repository {self.location} is not encrypted: it has no passphrase")
        open_key_object(self.store.get(KEY), passphrase, self.location, self.config)
        self.store.replace(KEY, key_object(self.sealer.keys, new, self.config))

    # -- objects -------------------------------------------------------------------------

    def _compressor(self) -> zstandard.ZstdCompressor:
        # One per thread: a compressor is not safe to share, and making one per chunk costs.
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return compressor

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    def _encode(self, name: str, data: bytes) -> bytes:
        packed = self._compressor().compress(data)
        body = bytes([_ZSTD]) + packed if len(packed) < len(data) else bytes([_RAW]) + data
        return self.sealer.seal(name, body)

    def _unseal(self, name: str, sealed: bytes) -> memoryview:
        """The object's body (``[encoding][data]``), its authentication and encoding checked."""
        try:
            body = memoryview(self.sealer.open(name, sealed))
        except Tampered:
            raise DamagedObject(name, "its authentication tag does not match (changed or corrupted)") from None
        if not body or body[0] not in (_RAW, _ZSTD):
            raise DamagedObject(name, "unknown encoding")
        return body

    def _decode(self, name: str, sealed: bytes, limit: int) -> bytes:
        body = self._unseal(name, sealed)
        if body[0] == _RAW:
            return bytes(body[1:])
        try:
            declared = zstandard.frame_content_size(body[1:])
            if declared > limit:
                # Checked before decompressing: the header alone must not make us allocate.
                raise DamagedObject(name, f"it claims {declared} bytes, more than {limit}")
            if declared >= 0:
                return self._decompressor().decompress(body[1:])
            return self._decompressor().decompress(body[1:], max_output_size=limit)
        except zstandard.ZstdError as err:
            raise DamagedObject(name, f"it does not decompress: {err}") from err

    def _put_json(self, name: str, data: dict[str, Any]) -> None:
        """An index or manifest: everything stored before it (the objects it names) is made
        durable first, and it is durable when this returns."""
        self.store.flush()
        if not self.store.put(name, self._encode(name, json.dumps(data).encode())):
            raise RepositoryError(f"{name} exists already in the repository {self.location}")
        self.store.flush()

    def _get_json(self, name: str) -> dict[str, Any]:
        return self._json(name, self._decode(name, self.store.get(name), 1 << 30))

    @staticmethod
    def _json(name: str, raw: bytes) -> dict[str, Any]:
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise DamagedObject(name, f"not JSON: {err}") from err
        if not isinstance(data, dict):
            raise DamagedObject(name, "not a JSON object")
        return data

    # -- chunks ---------------------------------------------------------------------------

    def chunk_id(self, data: bytes | memoryview) -> str:
        return self.sealer.chunk_id(data)

    def has_chunk(self, chunk_id: str) -> bool:
        return self.store.exists(chunk_name(chunk_id))

    def put_chunk(self, data: bytes) -> tuple[str, int]:
        """Store a chunk unless it is there; returns its id and the bytes this call stored
        (0 when it was there already)."""
        chunk_id = self.chunk_id(data)
        if self.has_chunk(chunk_id):
            return chunk_id, 0
        return chunk_id, self.store_sealed(chunk_id, self.seal_chunk(chunk_id, data))

    def seal_chunk(self, chunk_id: str, data: bytes) -> bytes:
        """The object for a chunk: compressed, and encrypted in an encrypted repository."""
        return self._encode(chunk_name(chunk_id), data)

    def store_sealed(self, chunk_id: str, sealed: bytes) -> int:
        """Bytes stored, 0 when another writer stored the same chunk first."""
        return len(sealed) if self.store.put(chunk_name(chunk_id), sealed) else 0

    def get_chunk_into(self, chunk_id: str, length: int, out: bytearray | mmap.mmap) -> memoryview:
        """A chunk's content, checked against its id, decompressed into ``out`` (at least
        ``length`` long) instead of a new buffer: a restore reuses one per thread, which
        measured a third faster than a fresh 4 MiB object per chunk."""
        name = chunk_name(chunk_id)
        return self._open_chunk(chunk_id, self.store.get(name), length, out)

    def _open_chunk(self, chunk_id: str, sealed: bytes, length: int, out: bytearray | mmap.mmap) -> memoryview:
        name = chunk_name(chunk_id)
        body = self._unseal(name, sealed)
        data = body[1:] if body[0] == _RAW else self._decompress_into(name, body[1:], memoryview(out)[:length])
        if len(data) != length or self.chunk_id(data) != chunk_id:
            raise DamagedObject(name, "its content does not match its hash",
                                hint="restore another backup, or run a full backup to store it again")
        return data

    def copy_chunk_to(self, other: Repository, chunk_id: str, length: int) -> int:
        """Store this chunk in ``other`` exactly as it is stored here, once it is checked.
        Only between repositories that name and seal chunks alike (both unencrypted).
        Returns the bytes stored there (0: it was there already)."""
        if self.encrypted or other.encrypted:
            raise RepositoryError("a chunk is copied unchanged only between unencrypted repositories")
        sealed = self.store.get(chunk_name(chunk_id))
        self._open_chunk(chunk_id, sealed, length, bytearray(length))
        return len(sealed) if other.store.put(chunk_name(chunk_id), sealed) else 0

    def drop_unpublished(self, backup_id: str) -> None:
        """Remove the indexes of a backup that was never published here (an interrupted
        copy), so it can be written again."""
        if self.has_backup(backup_id):
            raise RepositoryError(f"backup {backup_id[:8]} is published in {self.location}")
        for info in list(self.store.list(f"indexes/{backup_id}/")):
            self.store.delete(info.name)

    def _decompress_into(self, name: str, frame: memoryview, out: memoryview) -> memoryview:
        filled = 0
        try:
            with self._decompressor().stream_reader(frame, read_size=len(frame)) as reader:
                while filled < len(out):
                    got = reader.readinto(out[filled:])
                    if not got:
                        break
                    filled += got
                if filled == len(out) and reader.read(1):
                    raise DamagedObject(name, "it decompresses to more than its chunk")
        except zstandard.ZstdError as err:
            raise DamagedObject(name, f"it does not decompress: {err}") from err
        return out[:filled]

    def get_chunk(self, chunk_id: str, length: int) -> bytes:
        """A chunk's content, checked against its id, in a buffer of its own."""
        return bytes(self.get_chunk_into(chunk_id, length, bytearray(length)))

    # -- indexes and manifests ---------------------------------------------------------

    def put_index(self, index: DiskIndex, position: int, digests: bytes | memoryview | None = None) -> str:
        """Store a disk's index: its chunk list, or ``digests`` (32 bytes a chunk, zero
        for a chunk of zeros) in its place."""
        name = index_name(index.backup, position)
        if digests is not None and len(digests) != 32 * -(-index.virtual_size // index.chunk_size):
            raise RepositoryError(f"{name}: {len(digests) // 32} chunk ids for a disk of {index.virtual_size} bytes")
        self.store.flush()  # the chunks it names are durable before it is
        binary = index.to_binary() if digests is None else index.binary_with(digests)
        if not self.store.put(name, self._encode(name, binary)):
            raise RepositoryError(f"{name} exists already in the repository {self.location}")
        self.store.flush()
        return name

    def _index_object(self, name: str) -> bytes:
        return self._decode(name, self.store.get(name), MAX_INDEX_BYTES)

    def index(self, name: str) -> DiskIndex:
        """A disk's index with its chunk ids (hex, None for zeros): for one disk at a time
        (a restore, a backup's parent). Passes over many use ``index_digests``."""
        raw = self._index_object(name)
        if raw.startswith(INDEX_MAGIC):
            index, digests = DiskIndex.header_of(raw, name)
            index.chunks = [None if d == b"" else bytes_of(d).hex() for d in as_array_all(digests)]
        else:
            index = DiskIndex.from_json(self._json(name, raw), name)
        return self._owned(index, name)

    def index_digests(self, name: str) -> tuple[DiskIndex, memoryview]:
        """A disk's index as its header (no chunk list) and its chunk digests, 32 bytes
        each, all zero for a chunk of zeros: no object per chunk."""
        raw = self._index_object(name)
        if raw.startswith(INDEX_MAGIC):
            index, digests = DiskIndex.header_of(raw, name)
        else:  # format 1: converted (its cost is an object per chunk, once)
            index = DiskIndex.from_json(self._json(name, raw), name)
            digests = memoryview(b"".join(bytes.fromhex(c) if c else ZERO for c in index.chunks))
            index.chunks = []
        return self._owned(index, name), digests

    def _owned(self, index: DiskIndex, name: str) -> DiskIndex:
        parts = name.split("/")
        if len(parts) != 3 or parts[0] != "indexes" or parts[1] != index.backup:
            # In an encrypted repository the name is authenticated too; in a plain one this
            # is what tells an index copied or moved from another backup.
            raise DamagedObject(name, f"it is the index of backup {index.backup[:36]}, not of the backup it is "
                                      "stored under (moved or copied from another backup)")
        return index

    def put_manifest(self, backup_id: str, manifest: dict[str, Any]) -> None:
        """Publish a backup. Call only after every index it names is stored."""
        self._put_json(manifest_name(backup_id), {"format": MANIFEST_FORMAT, **manifest})

    def manifest(self, backup_id: str) -> dict[str, Any]:
        name = manifest_name(backup_id)
        data = self._get_json(name)
        if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("disks"), list):
            raise DamagedObject(name, "not a backup manifest")
        if data.get("id") != backup_id:
            raise DamagedObject(name, f"it is the manifest of backup {str(data.get('id'))[:36]}, not of "
                                      f"{backup_id} (moved or copied from another backup)")
        for disk in data["disks"]:
            if not isinstance(disk, dict) or not str(disk.get("index", "")).startswith(f"indexes/{backup_id}/"):
                raise DamagedObject(name, "it names an index of another backup")
        return data

    def has_backup(self, backup_id: str) -> bool:
        """Whether the backup is published here (its manifest, written last, exists)."""
        return self.store.exists(manifest_name(backup_id))

    def backup_ids(self) -> list[str]:
        return sorted(info.name.split("/", 1)[1] for info in self.store.list("backups/"))

    def resolve(self, ref: str) -> str:
        """The published backup that ``ref`` (an id or a unique prefix of one) names."""
        matches = [b for b in self.backup_ids() if b.startswith(ref)]
        if not matches:
            raise NotFound(f"no backup {ref!r} in the repository {self.location}",
                           hint="see: freezeframe backup list")
        if len(matches) > 1 and ref not in matches:
            raise InvalidInput(f"{ref!r} names {len(matches)} backups in {self.location}", hint="give more of the id")
        return ref if ref in matches else matches[0]

    def delete_backup(self, backup_id: str) -> None:
        """Unpublish a backup (manifest first, so it is never half-listed), then its indexes.
        Its chunks stay until garbage collection finds no index naming them."""
        self.store.delete(manifest_name(backup_id))
        for info in list(self.store.list(f"indexes/{backup_id}/")):
            self.store.delete(info.name)

    def quarantine_chunk(self, chunk_id: str) -> bool:
        """Move a damaged chunk object aside, under ``quarantine/`` (kept for a look, never
        read as a chunk): a backup that reads its content then stores it anew. False when
        it is gone already."""
        name = chunk_name(chunk_id)
        try:
            data = self.store.get(name)
        except RepositoryError:
            return False
        self.store.put(f"quarantine/{chunk_id}-{uuid.uuid4().hex[:8]}", data)
        self.store.flush()
        self.store.delete(name)
        return True

    # -- whole-repository views: a fixed number of bytes per distinct chunk ---------------

    def index_names(self, backup_ids: Iterable[str]) -> Iterator[str]:
        for backup_id in backup_ids:
            for disk in self.manifest(backup_id)["disks"]:
                yield str(disk["index"])

    def stored_chunks(self) -> Iterator[tuple[bytes, int]]:
        """Every chunk object the store holds: its digest and stored size."""
        for info in self.store.list("chunks/"):
            tail = info.name.rsplit("/", 1)[1]
            if _is_id(tail):
                yield bytes.fromhex(tail), info.size

    def stored_among(self, named: Digests) -> npt.NDArray[np.bool_]:
        """For each of ``named`` (sorted, distinct digests), whether the store holds it: one
        listing marks one flag per named chunk, with no second set of ids (not a request
        per chunk: what a writer confirms before it publishes, and check and verify)."""
        held = np.zeros(len(named), dtype=bool)
        for digest, _ in self.stored_chunks():
            at = int(np.searchsorted(named, digest))
            if at < len(named) and bytes_of(named[at]) == digest:
                held[at] = True
        return held

    def missing_chunks(self, chunk_ids: Iterable[str]) -> set[str]:
        """Which of ``chunk_ids`` (hex) the store lacks, by one listing (``stored_among``)."""
        named = DigestSet()
        named.add_hex(chunk_ids)
        array = named.array
        return {bytes_of(d).hex() for d in array[~self.stored_among(array)]}

    def stats(self) -> RepoStats:
        ids = self.backup_ids()
        stats = RepoStats(backups=len(ids))
        named = DigestSet()
        # A disk's last chunk may be short; every other chunk is a whole chunk long (and a
        # chunk's id says its length: content of another length hashes otherwise).
        short: dict[bytes, int] = {}
        for name in self.index_names(ids):
            header, blob = self.index_digests(name)
            entries = as_array_all(blob)
            used = entries != b""
            stats.logical_bytes += int(used.sum()) * header.chunk_size
            tail = header.chunk_length(len(entries) - 1) if len(entries) else 0
            if len(entries) and used[-1] and tail < header.chunk_size:
                stats.logical_bytes -= header.chunk_size - tail
                short[bytes_of(entries[-1])] = tail
            named.add(entries[used])
        for digest, size in self.stored_chunks():
            stats.chunks += 1
            if digest in named:
                stats.stored_bytes += size
                stats.unique_bytes += short.get(digest, self.chunk_size)
            else:
                stats.unreferenced_chunks += 1
        return stats

    def check(self) -> CheckReport:
        """Structure only (issue-level verify re-reads data): every manifest opens, every
        index it names opens, every chunk an index names exists. One set of the named
        chunks; the listing marks which are stored; only when some are not does a second
        pass name the backups and disks that lack them."""
        report = CheckReport()
        named = DigestSet()
        readable: list[tuple[str, str, str]] = []  # backup, device, index name
        for backup_id in self.backup_ids():
            report.backups += 1
            try:
                disks = self.manifest(backup_id)["disks"]
            except RepositoryError as err:
                report.problems.append(f"backup {backup_id}: {err}")
                continue
            for disk in disks:
                try:
                    header, blob = self.index_digests(disk["index"])
                except (RepositoryError, KeyError, TypeError) as err:
                    report.problems.append(f"backup {backup_id} disk {disk.get('device')}: {err}")
                    continue
                report.indexes += 1
                named.add(as_array(blob))
                readable.append((backup_id, header.device, str(disk["index"])))
        array = named.array
        report.chunks_named = len(array)
        held = self.stored_among(array)
        if held.all():
            return report
        missing = array[~held]
        del named, array, held
        for backup_id, device, name in readable:
            digests = as_array(self.index_digests(name)[1])
            for chunk in np.unique(digests[np.isin(digests, missing)]):
                report.problems.append(f"backup {backup_id} disk {device}: chunk {bytes_of(chunk).hex()} is missing")
        return report
