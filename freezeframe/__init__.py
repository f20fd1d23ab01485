"""freezeframe: consistent snapshots of QEMU/KVM virtual machines and Linux hosts.

The command line (``freezeframe --help``) is the main interface. For programs, the
snapshot flow is ``freezeframe.engine.plan.plan_snapshot`` then
``freezeframe.engine.run.take_snapshot``; every error is a ``FreezeframeError``.
"""

from freezeframe.errors import FreezeframeError
from freezeframe.model import Level, OnFailure, Policy, Snapshot, WriterFailure, WriterSpec

__version__ = "0.1.0"

__all__ = ["FreezeframeError", "Level", "OnFailure", "Policy", "Snapshot", "WriterFailure", "WriterSpec",
           "__version__"]
