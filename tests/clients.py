"""A client committing numbered rows as fast as it can, and the oracle on a restored copy:
every row acknowledged before the point is there."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any


class Load(threading.Thread):
    """A client committing numbered rows as fast as it can, noting when each was acknowledged."""

    def __init__(self, commit: Callable[[int], None]) -> None:
        super().__init__(daemon=True)
        self.commit = commit
        self.acked: list[tuple[int, float]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self._halt.is_set():
            n += 1
            try:
                self.commit(n)
            except Exception as err:  # noted, and the test fails on it
                self.errors.append(repr(err))
                return
            self.acked.append((n, time.time()))

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def acked_before(self, instant: str) -> set[int]:
        limit = datetime.fromisoformat(instant.replace("Z", "+00:00")).timestamp()
        return {n for n, at in self.acked if at < limit}


def check_copy_rows(present: set[int], load: Load, manifest: dict[str, Any]) -> None:
    must_have = load.acked_before(manifest["window"]["writers_freeze_started_at"])
    assert must_have, "the load committed nothing before the freeze"
    missing = must_have - present
    assert not missing, f"lost {len(missing)} acknowledged commits, e.g. {sorted(missing)[:5]}"
