"""Leases: how a writer (a backup, a sync, garbage collection) holds a repository shared
by many hosts, on any store, with no server of its own.

A lease is a folder of immutable objects, so it needs nothing from a store but put, list
and delete (no overwrite, no conditional write)::

    locks/<name>/00000000      the holder: JSON, who took it (machine id, boot id, PID
                               namespace, pid and its start time, host name), what for
                               (a backup's id and instance) and the lease time
    locks/<name>/<n>           renewal n: the 32-byte ids of the chunks the holder will
                               name without having stored them itself (chunks it found
                               stored, and those an incremental keeps from its parent)

The holder writes a renewal every ``renew_every`` seconds (a fifth of the lease, at most
a minute). A lease is alive while its newest object is younger than the repository's
lease time, measured by the store's own clock (object timestamps compared with each
other, never with a host's clock), whoever wrote it and wherever. A lease whose holder
ran on this machine in an earlier boot, or in our PID namespace as a process that is
gone, is dead at once. A dead lease is broken by garbage collection (or by
``repo break-lock``): its holder object is deleted first.

The holder knows when its lease might have been judged dead without asking anyone: when
more than three quarters of the lease passed between two of its renewals (it was stopped,
starved, or the store was unreachable). It then counts its lease as broken, and so does
it when its holder object is gone. A backup renews once more just before it publishes and
publishes nothing with a broken lease (its chunks stay for the next run to reuse).
Why this keeps every chunk a published backup names is argued in ``gc.py``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from freezeframe.backup.digests import Digests, as_array
from freezeframe.backup.store import ObjectInfo, ObjectStore
from freezeframe.errors import Conflict, DamagedObject, RepositoryError
from freezeframe.process import ProcessIdentity

LOCKS = "locks/"
LEASE_FORMAT = "freezeframe-lease/1"
RENEWAL_MAGIC = b"FFRENEW1"
DEFAULT_LEASE_S = 600
#: Garbage collection deletes chunks only within this many seconds of its last look at
#: the renewals; a holder checks the chunks it listed in a renewal no sooner than this
#: after writing it (see gc.py).
DELETE_WINDOW_S = 2.0
#: A holder that went this share of the lease without renewing counts its lease as broken.
LAPSE_SHARE = 0.75
MAX_HOLDER_BYTES = 64 << 10
#: 2 M chunk ids per renewal: 8 TiB of 4 MiB chunks; far above what one renewal carries.
MAX_RENEWAL_BYTES = len(RENEWAL_MAGIC) + (2 << 20) * 32
_SEQ_WIDTH = 8
#: The most a holder writes in one renewal (256 k ids): what it copies to write one.
_PIECE = min(8 << 20, MAX_RENEWAL_BYTES - len(RENEWAL_MAGIC))


class LeaseBroken(RepositoryError):
    """The holder cannot be sure its lease held: it must publish nothing."""


def renew_every(lease_s: float) -> float:
    return min(60.0, lease_s / 5)


def _object(name: str, seq: int) -> str:
    return f"{LOCKS}{name}/{seq:0{_SEQ_WIDTH}d}"


@dataclass(slots=True)
class LeaseState:
    """A lease as a reader of the repository finds it."""

    name: str
    #: What the holder wrote about itself (empty when unreadable or not there).
    holder: dict[str, Any]
    identity: ProcessIdentity | None
    #: Store-clock times of its first and newest object.
    started: float
    renewed: float
    #: Its holder object's name, when there is one, and every other object.
    holder_object: str | None
    renewals: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.holder.get("kind", "unknown"))

    @property
    def backup(self) -> str | None:
        found = self.holder.get("backup")
        return found if isinstance(found, str) else None

    def dead(self, now: float, lease_s: float) -> str | None:
        """Why the lease is dead at store time ``now``, or None while it is alive."""
        if self.holder_object is None:
            return "its holder object is gone (broken, or its holder was releasing it)"
        if self.identity is not None and self.identity.gone():
            return f"its process (pid {self.identity.pid} on this machine) is gone"
        age = now - self.renewed
        if age >= lease_s:
            return f"not renewed for {age:.0f}s (the lease is {lease_s:g}s)"
        return None

    def describe(self, now: float) -> dict[str, Any]:
        ident = self.identity
        return {"name": self.name, "kind": self.kind, "backup": self.backup,
                "instance": self.holder.get("instance"), "host": ident.host if ident else self.holder.get("host"),
                "machine_id": ident.machine_id if ident else None, "pid": ident.pid if ident else None,
                "taken_at": self.holder.get("taken_at"), "age_s": round(now - self.started, 1),
                "renewed_s_ago": round(now - self.renewed, 1), "renewals": len(self.renewals)}


def _holder(store: ObjectStore, name: str) -> dict[str, Any]:
    try:
        raw = store.get(name)
    except RepositoryError:
        return {}
    if len(raw) > MAX_HOLDER_BYTES:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def read_leases(store: ObjectStore) -> list[LeaseState]:
    """Every lease in the repository (one listing, and one read per holder object)."""
    groups: dict[str, list[ObjectInfo]] = {}
    for info in store.list(LOCKS):
        rest = info.name[len(LOCKS):]
        groups.setdefault(rest.split("/", 1)[0], []).append(info)
    found = []
    for name, infos in sorted(groups.items()):
        first = _object(name, 0)
        holder_info = next((i for i in infos if i.name in (first, f"{LOCKS}{name}")), None)
        holder = _holder(store, holder_info.name) if holder_info else {}
        found.append(LeaseState(
            name=name, holder=holder, identity=ProcessIdentity.from_json(holder.get("holder")),
            started=holder_info.mtime if holder_info else min(i.mtime for i in infos),
            renewed=max(i.mtime for i in infos), holder_object=holder_info.name if holder_info else None,
            renewals=sorted(i.name for i in infos if holder_info is None or i.name != holder_info.name)))
    return found


def store_now(store: ObjectStore, name: str) -> float:
    """The store's clock now, read from the timestamp of a lease object just written."""
    for info in store.list(f"{LOCKS}{name}/"):
        return info.mtime
    raise RepositoryError(f"the lease {name} vanished right after it was written in {store.location}")


def renewal_ids(store: ObjectStore, name: str) -> Digests:
    """The chunk ids a renewal object lists (32-byte digests); a damaged one is an error."""
    raw = store.get(name)
    if len(raw) > MAX_RENEWAL_BYTES or not raw.startswith(RENEWAL_MAGIC) or (len(raw) - len(RENEWAL_MAGIC)) % 32:
        raise DamagedObject(name, "not a lease renewal")
    return as_array(memoryview(raw)[len(RENEWAL_MAGIC):])


def break_lease(store: ObjectStore, lease: LeaseState) -> None:
    """Remove a lease: its holder object first, so the holder sees it broken at its next
    renewal even if the rest is removed later."""
    if lease.holder_object is not None:
        store.delete(lease.holder_object)
    for name in lease.renewals:
        store.delete(name)


class Lease:
    """A lease held by this process: taken on ``__enter__``, renewed by a thread of its own
    (and by ``renew``), released on ``__exit__``."""

    def __init__(self, store: ObjectStore, name: str, *, lease_s: float, kind: str,
                 backup: str | None = None, instance: str | None = None,
                 clock: Any = time.monotonic) -> None:
        self.store = store
        self.name = name
        self.lease_s = float(lease_s)
        self.kind = kind
        self.backup = backup
        self.instance = instance
        self._clock = clock
        self._seq = 0
        # 32-byte digests in pieces of at most _PIECE bytes: no object per id, and no copy
        # of them all when the list grows or is written.
        self._pending: list[bytearray] = []
        self._lock = threading.Lock()  # the pending ids
        self._renewing = threading.Lock()  # one renewal at a time
        self._last_ok = 0.0
        self._journaled_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Why the lease cannot be trusted any more (None while it holds).
        self.broken: str | None = None

    @classmethod
    def for_backup(cls, store: ObjectStore, backup_id: str, lease_s: float, instance: str | None) -> Lease:
        return cls(store, f"backup-{backup_id}", lease_s=lease_s, kind="backup", backup=backup_id,
                   instance=instance)

    @classmethod
    def unique(cls, store: ObjectStore, kind: str, lease_s: float) -> Lease:
        return cls(store, f"{kind}-{uuid.uuid4()}", lease_s=lease_s, kind=kind)

    # -- holding --------------------------------------------------------------------------

    def __enter__(self) -> Lease:
        self.take()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def take(self) -> None:
        ident = ProcessIdentity.current()
        holder = {"format": LEASE_FORMAT, "name": self.name, "kind": self.kind, "backup": self.backup,
                  "instance": self.instance, "holder": ident.to_json(), "host": ident.host,
                  "taken_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "lease_s": self.lease_s}
        started = self._clock()
        if not self.store.put(_object(self.name, 0), json.dumps(holder).encode()):
            raise Conflict(f"the lease {self.name} is held already in {self.store.location}")
        self._last_ok = started
        self._seq = 1
        self._thread = threading.Thread(target=self._keep, name=f"ff-lease-{self.name[:20]}", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(renew_every(self.lease_s)):
            try:
                self.renew()
            except LeaseBroken:
                return
            except RepositoryError:
                continue  # the store is unreachable: the next try, or the lapse, decides

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(RepositoryError):
            for info in list(self.store.list(f"{LOCKS}{self.name}/")):
                self.store.delete(info.name)

    # -- what the holder names ---------------------------------------------------------------

    def name_chunks(self, chunk_ids: Iterable[str]) -> None:
        """Chunks this holder will name without having stored them: listed in the next
        renewal, so garbage collection keeps them from then on."""
        self.name_digests(b"".join(bytes.fromhex(c) for c in chunk_ids))

    def name_digests(self, digests: bytes) -> None:
        """``name_chunks`` for ids given as one blob of 32-byte digests."""
        view = memoryview(digests)
        with self._lock:
            while view:
                if not self._pending or len(self._pending[-1]) >= _PIECE:
                    self._pending.append(bytearray())
                room = _PIECE - len(self._pending[-1])
                self._pending[-1] += view[:room]
                view = view[room:]

    def renew(self) -> None:
        """Write the next renewal (with the chunks named since the last) and check the
        holder object is still there. Raises LeaseBroken when the lease cannot be trusted."""
        with self._renewing:
            if self.broken is not None:
                raise LeaseBroken(self.broken)
            began = self._clock()
            gap = began - self._last_ok
            if gap >= LAPSE_SHARE * self.lease_s:
                self.broken = (f"the lease {self.name} went {gap:.0f}s without renewal (the lease is "
                               f"{self.lease_s:g}s): garbage collection may have judged it dead")
                raise LeaseBroken(self.broken)
            with self._lock:
                batch, self._pending = self._pending, []
            # A big batch (a copy that found a million chunks in place) is written as
            # several renewals, a piece each.
            for number, piece in enumerate(batch or [bytearray()]):
                try:
                    self.store.put(_object(self.name, self._seq), RENEWAL_MAGIC + piece)
                except BaseException:
                    with self._lock:
                        self._pending[:0] = batch[number:]
                    raise
                self._seq += 1
            if not self.store.exists(_object(self.name, 0)):
                self.broken = (f"the lease {self.name} was broken (by repo break-lock, or by garbage "
                               "collection, which judged it dead)")
                raise LeaseBroken(self.broken)
            self._last_ok = began
            if batch:
                # From when the renewal is surely visible: a collection that looked just
                # before may still delete for DELETE_WINDOW_S after its look.
                self._journaled_at = self._clock()

    def settle(self) -> None:
        """Return once garbage collection has surely seen every chunk named so far (the
        pending ones are written first): from then on, a chunk found stored stays stored."""
        with self._lock:
            pending = bool(self._pending)
        if pending:
            self.renew()
        if self._journaled_at is not None:
            wait = self._journaled_at + DELETE_WINDOW_S - self._clock()
            if wait > 0:
                time.sleep(wait)

    def check(self) -> None:
        """Just before publishing: a renewal now, which raises LeaseBroken if the lease may
        have been lost at any time since it was taken."""
        self.renew()
