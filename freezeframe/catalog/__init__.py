"""The catalog of templates, instances and snapshots."""

from freezeframe.catalog.store import Catalog

__all__ = ["Catalog"]
