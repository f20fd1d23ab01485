"""Lifecycle work over backups, after they are taken: prune and retention, verify, restore
tests, sync to another repository, schedules and the daemon that runs them.

The consistent point (``engine/``) is below this room and knows nothing of it; the
repository's own invariants (leases, what garbage collection may delete) are in
``backup/``, below both."""
