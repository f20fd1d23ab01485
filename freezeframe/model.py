"""The values every layer shares: consistency levels, the quiesce policy, and records.

Plain, typed, immutable where they can be. No I/O here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from freezeframe.errors import InvalidInput


class Level(enum.Enum):
    """Consistency levels, ordered: crash < filesystem < application."""

    CRASH = "crash"
    FILESYSTEM = "filesystem"
    APPLICATION = "application"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def __lt__(self, other: Level) -> bool:
        return self.rank < other.rank

    def __le__(self, other: Level) -> bool:
        return self.rank <= other.rank

    def below(self) -> Level:
        """The next level down the ladder (crash stays crash)."""
        return _LADDER[max(self.rank - 1, 0)]

    @classmethod
    def parse(cls, text: str) -> Level:
        try:
            return cls(text)
        except ValueError:
            raise InvalidInput(
                f"unknown consistency level {text!r}",
                hint="use one of: application, filesystem, crash",
            ) from None


_LADDER = (Level.CRASH, Level.FILESYSTEM, Level.APPLICATION)
_RANKS = {level: i for i, level in enumerate(_LADDER)}


class OnFailure(enum.Enum):
    """What to do when the requested level cannot be had."""

    FALLBACK = "fallback"  # step down the ladder and record why
    FAIL = "fail"  # take no snapshot; keep a failed record with the reason


class WriterFailure(enum.Enum):
    """What a writer's failure does to the snapshot."""

    FAIL = "fail"  # no snapshot at all
    CONTINUE = "continue"  # the other writers go on; this one is marked failed; level steps down
    FALLBACK = "fallback"  # release every writer and step down the ladder (filesystem, then crash)


class SnapshotState(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """What the user asked of one snapshot."""

    level: Level
    on_failure: OnFailure = OnFailure.FALLBACK
    #: How long the guest agent gets to answer the first probe: an absent agent costs this.
    agent_timeout: float = 3.0
    #: How long guest-fsfreeze-freeze may take (it runs the guest's freeze hooks).
    freeze_timeout: float = 10.0
    #: Any other guest-agent command, thaw included.
    command_timeout: float = 10.0
    #: The longest the instance may stay frozen (VSS holds writes for 10 s at most). When it
    #: runs out the instance is thawed at once, and a snapshot that completes later does not
    #: count as filesystem-consistent.
    freeze_budget: float = 10.0

    def __post_init__(self) -> None:
        for name in ("agent_timeout", "freeze_timeout", "command_timeout", "freeze_budget"):
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise InvalidInput(f"{name.replace('_', '-')} must be between 0 and 3600 seconds, not {value}")


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterSpec:
    """One configured writer of an instance. ``options`` never hold secrets: a password
    comes from ``password_env`` (a variable name) or ``password_file`` (owner-only)."""

    name: str
    kind: str
    options: dict[str, str] = field(default_factory=dict)
    timeout: float = 30.0
    retries: int = 0
    on_failure: WriterFailure = WriterFailure.FALLBACK


@dataclass(frozen=True, slots=True, kw_only=True)
class Template:
    name: str
    application_consistent: bool
    created_at: str
    #: The guest freeze hooks its instances need for application level (see Instance).
    guest_hooks: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    name: str
    kind: str  # "qemu", "libvirt" or "host"
    qmp_socket: str | None
    qga_socket: str | None
    template: str | None
    #: The instance's own setting; None means "as the template says" (false without one).
    own_application_consistent: bool | None
    #: The setting in force, resolved against the template.
    application_consistent: bool
    created_at: str
    lab: bool = False
    #: Host instances: the mount points snapshotted together.
    mounts: tuple[str, ...] = ()
    #: The longest this instance may stay frozen, when a snapshot does not say.
    freeze_budget: float | None = None
    #: libvirt domains: the connection URI and the domain's name.
    libvirt_uri: str | None = None
    libvirt_domain: str | None = None
    #: The instance's own list of required guest hooks; None: as its template says.
    own_guest_hooks: tuple[str, ...] | None = None
    #: The guest freeze hooks (names in fsfreeze-hook.d) that must have run, with exit
    #: status 0 on freeze and thaw, for application level; empty: every hook found must
    #: have, and at least one must be found.
    guest_hooks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotDisk:
    """One disk (VM) or file system (host) of a snapshot, and where its copy is."""

    #: VMs: the guest-visible device (its qdev id). Hosts: the mount point.
    device: str
    #: VMs: the block node that held the disk at the snapshot point. Hosts: the provider.
    node: str
    #: A file with the content at the snapshot point: a qcow2 (read with its backing chain)
    #: or a file-system image that can be loop-mounted. None when the copy is a directory.
    image: str | None
    virtual_size: int
    allocated_size: int
    #: A directory holding the copy (a btrfs snapshot), when it is not an image.
    path: str | None = None


@dataclass(slots=True, kw_only=True)
class Snapshot:
    id: str
    name: str
    created_at: str
    state: SnapshotState
    instance: str
    requested_level: Level
    achieved_level: Level | None = None
    fallback_reasons: list[str] = field(default_factory=list)
    freeze_window_ms: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    disks: list[SnapshotDisk] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    #: "snapshot", or "backup" for the consistent point of a backup (listed with backups).
    purpose: str = "snapshot"

    @property
    def application_consistent(self) -> bool:
        return self.achieved_level is Level.APPLICATION

    @property
    def size(self) -> int:
        return sum(d.allocated_size for d in self.disks)


class BackupType(enum.Enum):
    """What a backup reads (the quiesce policy's backup types)."""

    FULL = "full"  # every allocated block
    INCREMENTAL = "incremental"  # what changed since the previous backup of each disk
    DIFFERENTIAL = "differential"  # what changed since the last full
    COPY = "copy"  # a full read that leaves dirty bitmaps and the backup chain untouched


class BackupState(enum.Enum):
    CREATING = "creating"
    CREATED = "created"
    FAILED = "failed"
    DELETED = "deleted"


class VerifyState(enum.Enum):
    """What the last verification of a backup found."""

    OK = "ok"  # every chunk read back and matched
    FAILED = "failed"  # a chunk or index is damaged or missing: the backup cannot be restored whole


@dataclass(slots=True, kw_only=True)
class BackupDisk:
    """One disk of a backup: what was read and stored, and why it was read in full."""

    device: str
    virtual_size: int
    #: The repository index object that lists this disk's chunks.
    index: str | None = None
    #: The persistent dirty bitmap started at this backup's point (None: none was started).
    bitmap: str | None = None
    bytes_read: int = 0
    #: Chunks stored for the first time (uncompressed bytes).
    bytes_new: int = 0
    #: Chunks read and found stored already (deduplicated).
    bytes_reused: int = 0
    #: Chunks not read at all: unchanged since the parent, referenced from its index.
    bytes_unchanged: int = 0
    #: Bytes the repository holds for the new chunks (compressed, encrypted).
    bytes_stored: int = 0
    #: Why this disk was read in full when an incremental or differential was asked.
    full_read_reason: str | None = None
    #: Chunks found gone from the repository before publishing (removed by garbage
    #: collection with a pruned parent, or lost) and read from the disk again.
    chunks_stored_again: int = 0


@dataclass(slots=True, kw_only=True)
class Backup:
    id: str
    instance: str
    type: BackupType
    created_at: str
    state: BackupState
    repository: str
    #: The backup this one is incremental (or differential) to.
    parent: str | None = None
    #: The consistent point: a record in the snapshots table with the same id.
    point: Snapshot | None = None
    disks: list[BackupDisk] = field(default_factory=list)
    error: str | None = None
    duration_s: float | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    #: When every chunk was last read back, and what that found (None: never verified).
    verified_at: str | None = None
    verify_state: VerifyState | None = None
    verify_problems: list[str] = field(default_factory=list)
    #: When it was last restored and checked (``backup test``), and what that found:
    #: {"outcome": "passed" | "failed", "checks": [{what, where, passed, detail}]}.
    restore_tested_at: str | None = None
    restore_test: dict[str, Any] | None = None

    @property
    def level(self) -> Level | None:
        return self.point.achieved_level if self.point else None


RETENTION_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True, slots=True)
class Retention:
    """An instance's retention policy: how many backups each rule keeps (None: the rule is
    not used). What the rules mean is in ``jobs/retention.py``."""

    last: int | None = None
    hourly: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None
    yearly: int | None = None

    def __post_init__(self) -> None:
        for rule in RETENTION_RULES:
            value = getattr(self, rule)
            if value is not None and value < 0:
                raise InvalidInput(f"--keep-{rule} must be 0 or more, not {value}")

    @property
    def keeps_everything(self) -> bool:
        return all(getattr(self, rule) is None for rule in RETENTION_RULES)

    def to_json(self) -> dict[str, int | None]:
        return {rule: getattr(self, rule) for rule in RETENTION_RULES}


@dataclass(slots=True, kw_only=True)
class Schedule:
    """When the daemon backs an instance up, and what it does around each backup."""

    instance: str
    #: Exactly one of: a fixed interval (anchored at ``created_at``) or a cron expression
    #: (5 fields, the host's local time).
    every_s: float | None = None
    cron: str | None = None
    backup_type: str | None = None  # None: incremental once a full exists
    repository: str | None = None  # None: the default repository
    consistency: str | None = None  # None: the instance's own setting
    #: Verify the instance's backups, and restore-test its newest one, this often (None: never).
    verify_every_s: float | None = None
    test_every_s: float | None = None
    #: Prune the instance by its retention policy after each backup.
    prune: bool = False
    created_at: str = ""
    #: The last slot a backup ran for, and when the last verify and restore test ran.
    last_slot: str | None = None
    last_verify_at: str | None = None
    last_test_at: str | None = None
