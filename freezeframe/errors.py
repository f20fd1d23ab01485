"""Every error freezeframe raises, as one tree.

::

    FreezeframeError                  exit 1   anything we raise
     +-- InvalidInput                 exit 2   a name, option or policy that cannot work
     +-- NotFound                     exit 3   no such instance, template, snapshot, VM
     +-- Conflict                     exit 4   exists already, or busy with another run
     +-- AgentError                   exit 5   the guest agent (qemu-ga)
     |    +-- AgentUnavailable                 cannot connect, or no answer to the handshake
     |    +-- AgentTimeout                     a command got no reply in time
     |    +-- AgentProtocolError               the reply is not what the protocol allows
     |    +-- AgentCommandError                the agent answered with an error
     +-- HypervisorError              exit 6   QEMU's monitor (QMP) and qemu-img
     |    +-- MonitorCommandError              QEMU answered a command with an error
     +-- SnapshotFailed               exit 7   the policy said fail, or the snapshot could not be taken
     |    +-- BackupFailed                     the backup could not be completed (nothing is listed)
     +-- CatalogError                 exit 8   the catalog database
     +-- LabError                     exit 9   building or running lab VMs
     +-- RepositoryError              exit 10  the backup repository: missing, locked, wrong passphrase
          +-- DamagedObject           exit 11  a stored object fails its hash or authentication check
          +-- MissingObject           exit 11  a stored object the repository should hold is gone

Each error carries its message and its exit code; only the CLI turns them into output
and an exit. Foreign exceptions (OSError, sqlite3, qemu.qmp) are translated once, at
the boundary of the module that met them, with the cause chained.
"""

from __future__ import annotations


class FreezeframeError(Exception):
    """Root of the tree. ``str(err)`` is the message for the user; ``exit_code`` the status."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: What the user can do about it, when we know.
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} ({self.hint})"


class InvalidInput(FreezeframeError):
    exit_code = 2


class NotFound(FreezeframeError):
    exit_code = 3


class Conflict(FreezeframeError):
    exit_code = 4


class AgentError(FreezeframeError):
    exit_code = 5


class AgentUnavailable(AgentError):
    pass


class AgentTimeout(AgentError):
    pass


class AgentProtocolError(AgentError):
    pass


class FreezeNotHeld(AgentError):
    """The guest thawed, but had let go of the freeze before the thaw (Windows VSS holds
    writes for 10 s at most): a copy taken in between is not file-system consistent."""


class AgentCommandError(AgentError):
    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"guest agent refused {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class HypervisorError(FreezeframeError):
    exit_code = 6


class MonitorCommandError(HypervisorError):
    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class SnapshotFailed(FreezeframeError):
    exit_code = 7

    def __init__(self, message: str, *, snapshot_id: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        #: The failed record kept in the catalog, when there is one.
        self.snapshot_id = snapshot_id


class CatalogError(FreezeframeError):
    exit_code = 8


class LabError(FreezeframeError):
    exit_code = 9


class BackupFailed(SnapshotFailed):
    """The consistent point was taken (or not), but the backup was not completed: it is
    not listed, and the changes since the last good backup stay tracked for the next."""


class RepositoryError(FreezeframeError):
    exit_code = 10


class DamagedObject(RepositoryError):
    """An object in the repository does not match its name (hash) or its authentication tag."""

    exit_code = 11

    def __init__(self, name: str, why: str, *, hint: str | None = None) -> None:
        super().__init__(f"repository object {name} is damaged: {why}", hint=hint)
        self.name = name
        self.why = why


class UnreadableData(RepositoryError):
    """Data of a backup could not be read (a damaged or missing chunk under it): the reads
    or files over it fail, never with other bytes."""

    exit_code = 11


class MissingObject(RepositoryError):
    """An object the repository should hold is not there (deleted, lost, or moved aside by
    a verify that found it damaged): the backups that need it are damaged too."""

    exit_code = 11

    def __init__(self, name: str, where: str) -> None:
        super().__init__(f"the repository {where} has no object {name}")
        self.name = name
