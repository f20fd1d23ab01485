"""One disk of a backup, read at any offset straight from the repository: what a backup
served over NBD reads through (``backup serve``, live restore, file restore).

Every chunk is checked against its id as it is read (``Repository.get_chunk``): a damaged
or missing chunk is an error for the reads that touch it, and never other bytes. Chunks
are kept in a cache bounded in bytes (least recently used goes first), because a guest
reads its metadata again and again, and a guest and a stream copying the disk read the
same regions. A read that continues where the last one ended (a copy, a stream, a
sequential scan) fetches the next chunks ahead in threads of their own, so it finds them
in memory; a chunk being fetched is fetched once, however many readers want it.

A repository that cannot be reached (an S3 outage) is waited for, for ``wait_s``: a read
is slow, not wrong, and a guest whose disk is served from here sees a pause, not an error.
Damage is not waited for: it does not heal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from freezeframe.backup.repository import DiskIndex, Repository
from freezeframe.errors import DamagedObject, MissingObject, RepositoryError, UnreadableData

log = logging.getLogger(__name__)

#: Default cache: Proxmox's live restore keeps 256 MB for the same two readers.
DEFAULT_CACHE_MIB = 256
#: A chunk read slower than this is logged: the sign of a stalled repository (a read
#: normally takes milliseconds; the store's own retries can hide an outage for minutes).
SLOW_S = 1.0
#: Chunks fetched ahead of a sequential reader (16 MiB of 4 MiB chunks).
DEFAULT_READ_AHEAD = 4


class ChunkUnreadable(UnreadableData):
    """A chunk of the served disk is damaged or missing: the reads over it fail."""


class DiskView:
    """Random access to one disk of one backup. Thread-safe."""

    def __init__(self, repo: Repository, index: DiskIndex, *, cache_mib: int = DEFAULT_CACHE_MIB,
                 read_ahead: int = DEFAULT_READ_AHEAD, workers: int = 4, wait_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.index = index
        self.size = index.virtual_size
        self.chunk_size = index.chunk_size
        self.read_ahead = max(0, read_ahead)
        self.wait_s = wait_s
        self._clock = clock
        self._limit = max(cache_mib, 0) << 20
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached = 0
        self._loading: dict[int, Future[bytes]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ff-view")
        self._ends: OrderedDict[int, bool] = OrderedDict()  # where recent reads ended
        #: Damaged or missing chunks met so far: position -> why.
        self.unreadable: dict[int, str] = {}
        self.fetched = 0  # chunks read from the repository (not the cache)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- reading --------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; ChunkUnreadable when a chunk they need is damaged
        or missing, RepositoryError when the repository stayed unreachable."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RepositoryError(f"a read of {length} bytes at {offset} is outside the disk "
                                  f"{self.index.device} ({self.size} bytes)")
        out = bytearray(length)
        if not length:
            return b""
        first, last = offset // self.chunk_size, (offset + length - 1) // self.chunk_size
        with self._lock:
            # Several readers at once (a guest and a stream): each continues one of the
            # last few reads' ends.
            sequential = self._ends.pop(offset, None) is not None or offset == 0
            self._ends[offset + length] = True
            while len(self._ends) > 16:
                self._ends.popitem(last=False)
        self._fetch(first, last + 1 + (self.read_ahead if sequential else 0))
        for position in range(first, last + 1):
            start = position * self.chunk_size
            data = self._chunk(position)
            lo, hi = max(offset, start), min(offset + length, start + len(data))
            out[lo - offset:hi - offset] = data[lo - start:hi - start]
        return bytes(out)

    def zero_ranges(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, is_zero)`` runs covering the range, by the index alone (a
        chunk of zeros is not stored): what NBD block status reports."""
        runs: list[tuple[int, int, bool]] = []
        end = min(offset + length, self.size)
        at = offset
        while at < end:
            position = at // self.chunk_size
            upto = min(end, (position + 1) * self.chunk_size)
            zero = self.index.chunks[position] is None
            if runs and runs[-1][2] == zero:
                runs[-1] = (runs[-1][0], upto - runs[-1][0], zero)
            else:
                runs.append((at, upto - at, zero))
            at = upto
        return runs

    def _length(self, position: int) -> int:
        return self.index.chunk_length(position)

    def _chunk(self, position: int) -> bytes:
        if self.index.chunks[position] is None:
            return bytes(self._length(position))
        with self._lock:
            cached = self._cache.get(position)
            if cached is not None:
                self._cache.move_to_end(position)
                return cached
            future = self._start(position)
        return future.result()

    def _start(self, position: int) -> Future[bytes]:
        """The fetch of ``position``: the one under way, or a new one. Under the lock."""
        future = self._loading.get(position)
        if future is None:
            future = self._pool.submit(self._load, position)
            self._loading[position] = future
        return future

    def _fetch(self, first: int, end: int) -> None:
        """Start fetching the chunks from ``first`` up to ``end`` that are neither cached
        nor under way, all at once."""
        with self._lock:
            for position in range(first, min(end, len(self.index.chunks))):
                if self.index.chunks[position] is not None and position not in self._cache:
                    self._start(position)

    def _load(self, position: int) -> bytes:
        chunk_id = self.index.chunks[position]
        assert chunk_id is not None
        try:
            data = self._get(position, chunk_id)
        except BaseException:
            with self._lock:
                self._loading.pop(position, None)
            raise
        with self._lock:
            self._loading.pop(position, None)
            self.fetched += 1
            if self._limit >= len(data):
                self._cache[position] = data
                self._cached += len(data)
                while self._cached > self._limit:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return data

    def _get(self, position: int, chunk_id: str) -> bytes:
        start = position * self.chunk_size
        deadline = self._clock() + self.wait_s
        pause = 0.5
        while True:
            began = self._clock()
            try:
                data = self.repo.get_chunk(chunk_id, self._length(position))
                took = self._clock() - began
                if took >= SLOW_S:
                    log.warning("reading bytes %d-%d of disk %s took %.1fs: the repository was slow or "
                                "unreachable", start, start + len(data) - 1, self.index.device, took)
                return data
            except (DamagedObject, MissingObject) as err:
                why = (f"disk {self.index.device} bytes {start}-{start + self._length(position) - 1} "
                       f"of backup {self.index.backup}: {err}")
                with self._lock:
                    first = position not in self.unreadable
                    self.unreadable[position] = why
                if first:
                    log.error("unreadable chunk: %s", why)
                raise ChunkUnreadable(why) from err
            except RepositoryError as err:
                if self._clock() >= deadline:
                    log.error("the repository stayed unreachable for %.0fs: %s", self.wait_s, err)
                    raise
                log.warning("the repository is unreachable, waiting: %s", err)
                time.sleep(pause)
                pause = min(pause * 2, 10.0)
