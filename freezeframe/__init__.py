"""freezeframe: consistent snapshots of QEMU/KVM virtual machines and Linux hosts.

The command line (``freezeframe --help``) is the main interface. For programs, the
snapshot flow is ``freezeframe.engine.plan.plan_snapshot`` then
``freezeframe.engine.run.take_snapshot``; every error is a ``FreezeframeError``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from freezeframe.errors import FreezeframeError
    from freezeframe.model import Level, OnFailure, Policy, Snapshot, WriterFailure, WriterSpec

__version__ = "0.1.0"

__all__ = ["FreezeframeError", "Level", "OnFailure", "Policy", "Snapshot", "WriterFailure", "WriterSpec",
           "__version__"]

_HOMES = {"FreezeframeError": "freezeframe.errors", "Level": "freezeframe.model", "OnFailure": "freezeframe.model",
          "Policy": "freezeframe.model", "Snapshot": "freezeframe.model", "WriterFailure": "freezeframe.model",
          "WriterSpec": "freezeframe.model"}


def __getattr__(name: str) -> Any:
    # Loaded on first use: every freezeframe process imports this package, the guard and
    # the sentinel too, whose start-up the run waits for.
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'freezeframe' has no attribute {name!r}")
