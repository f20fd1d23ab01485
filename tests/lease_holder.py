"""A writer holding a lease on a repository, as a process of its own (the tests stop it,
kill it, and run it in other namespaces). Usage: lease_holder.py REPO NAME [CHUNK_ID ...]

Takes the lease ``backup-NAME``, lists the chunk ids in a renewal, prints "held", then
waits for a line on stdin and checks its lease as a backup does before it publishes:
prints "held to the end" (exit 0) or "broken: WHY" (exit 3)."""

from __future__ import annotations

import sys

from freezeframe.backup.leases import Lease, LeaseBroken
from freezeframe.backup.repository import Repository
from freezeframe.backup.store import open_store


def main() -> int:
    repo = Repository.open(open_store(sys.argv[1]))
    with Lease.for_backup(repo.store, sys.argv[2], repo.lease_s, "lease-holder") as lease:
        lease.name_chunks(sys.argv[3:])
        lease.renew()
        print("held", flush=True)
        sys.stdin.readline()
        try:
            lease.check()
        except LeaseBroken as err:
            print(f"broken: {err.message}", flush=True)
            return 3
        print("held to the end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
