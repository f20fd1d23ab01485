"""Pruning: deleting the backups an instance's retention policy no longer keeps.

The decision is ``retention.select`` over the instance's complete backups, per
repository. Pruning a backup removes its manifest and indexes (it is no longer listed
or restorable) and marks its record deleted; the chunks it alone used are freed by the
next garbage collection (``repo gc``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from freezeframe.backup.repository import Repository
from freezeframe.catalog import Catalog
from freezeframe.errors import InvalidInput
from freezeframe.jobs.retention import select
from freezeframe.model import BackupState


@dataclass(frozen=True, slots=True)
class Decision:
    instance: str
    backup: str
    created_at: str
    repository: str
    #: The rule that keeps it ("keep-last", ...), or None: it goes.
    kept_by: str | None


def plan_prune(catalog: Catalog, instance: str | None = None) -> list[Decision]:
    """What the retention policies say, for one instance or every instance that has one."""
    policies = catalog.retentions()
    if instance is not None:
        catalog.instance(instance)
        if instance not in policies:
            raise InvalidInput(f"instance {instance!r} has no retention policy",
                               hint=f"set one with: freezeframe policy set {instance} --keep-last N ...")
        policies = {instance: policies[instance]}
    decisions: list[Decision] = []
    for name, policy in sorted(policies.items()):
        backups = catalog.backups(instance=name)
        for repository in sorted({b.repository for b in backups}):
            mine = [b for b in backups if b.repository == repository]
            chosen = select(policy, [(b.id, b.created_at) for b in mine])
            decisions += [Decision(name, b.id, b.created_at, repository, chosen[b.id]) for b in reversed(mine)]
    return decisions


def prune(catalog: Catalog, decisions: list[Decision], open_repo: Callable[[str], Repository]) -> list[Decision]:
    """Delete every backup the decisions let go; returns those deleted."""
    gone: list[Decision] = []
    repos: dict[str, Repository] = {}
    for decision in decisions:
        if decision.kept_by is not None:
            continue
        repo = repos.get(decision.repository) or repos.setdefault(decision.repository, open_repo(decision.repository))
        repo.delete_backup(decision.backup)
        backup = catalog.backup(decision.backup)
        backup.state = BackupState.DELETED
        backup.error = "pruned: the retention policy of its instance no longer keeps it"
        catalog.save_backup(backup)
        gone.append(decision)
    return gone
