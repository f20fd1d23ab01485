"""freezeframe's persistent dirty bitmaps while a disk's chain changes under them.

A backup leaves a persistent bitmap on the disk's active layer (``ff-<backup>``); the
next incremental reads what it marks. Two things move the active layer:

* **A snapshot** puts an overlay on top. From that instant the guest writes to the
  overlay, and a bitmap left on the old layer would see none of it. So the snapshot's
  own transaction adds each of our bitmaps to the overlay and merges the old layer's
  copy into it: the overlay's bitmap then marks every change since its backup, before
  and after the snapshot. The old layer keeps its copy, read-only, in the snapshot image.
* **A delete** commits the overlay into the layer below. An active commit drops the
  overlay with its bitmaps, so before the pivot (the job is READY, the base writable)
  each of our overlay's bitmaps is merged into the base's bitmap of that name (added if
  missing). From then on the base's recording bitmaps see every write the job still
  copies, so nothing the guest writes until the pivot is lost.

libvirt does the same for its checkpoints (on a snapshot and at a commit's pivot); this
module gives freezeframe's QMP path the same behaviour. A bitmap that is inconsistent or
busy is not carried: QEMU refuses to read it, and the next backup reads that disk in full
with the reason.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

#: Bitmaps freezeframe made start with this; others are the operator's and left alone.
PREFIX = "ff-"


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One of freezeframe's bitmaps on a node, as ``query-named-block-nodes`` shows it."""

    name: str
    granularity: int


def ours(node: dict[str, Any]) -> list[Bitmap]:
    """freezeframe's bitmaps on ``node`` that can be read (carried or merged)."""
    found = []
    for entry in node.get("dirty-bitmaps", []):
        name = entry.get("name")
        if not isinstance(name, str) or not name.startswith(PREFIX):
            continue
        if entry.get("inconsistent") or entry.get("busy") or not entry.get("persistent"):
            continue
        found.append(Bitmap(name, int(entry.get("granularity", 65536))))
    return found


def carry(source: str, target: str, bitmaps: list[Bitmap], *, present: Collection[str] = ()) -> list[dict[str, Any]]:
    """Transaction actions that give ``target`` each of ``bitmaps`` (persistent, recording),
    holding at least what ``source``'s bitmap of that name holds. ``present``: the names
    ``target`` has already (merged into, not added)."""
    actions: list[dict[str, Any]] = []
    for bitmap in bitmaps:
        if bitmap.name not in present:
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": target, "name": bitmap.name, "persistent": True, "granularity": bitmap.granularity}})
        actions.append({"type": "block-dirty-bitmap-merge", "data": {
            "node": target, "target": bitmap.name, "bitmaps": [{"node": source, "name": bitmap.name}]}})
    return actions
