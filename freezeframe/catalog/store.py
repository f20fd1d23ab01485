"""The catalog: templates, instances and snapshots, in one SQLite file.

The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[i]`` takes a database
from version i to i+1, inside one transaction, so a catalog is never half-migrated.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from freezeframe.errors import CatalogError, Conflict, InvalidInput, NotFound
from freezeframe.model import (
    RETENTION_RULES,
    Backup,
    BackupDisk,
    BackupState,
    BackupType,
    Instance,
    Level,
    Retention,
    Schedule,
    Snapshot,
    SnapshotDisk,
    SnapshotState,
    Template,
    VerifyState,
    WriterFailure,
    WriterSpec,
)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE templates (
        name TEXT PRIMARY KEY,
        application_consistent INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE instances (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        qmp_socket TEXT,
        qga_socket TEXT,
        template TEXT REFERENCES templates(name),
        application_consistent INTEGER,
        lab INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    CREATE TABLE snapshots (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_at TEXT NOT NULL,
        state TEXT NOT NULL,
        instance TEXT NOT NULL,
        requested_level TEXT NOT NULL,
        achieved_level TEXT,
        fallback_reasons TEXT NOT NULL,
        freeze_window_ms REAL,
        timings_ms TEXT NOT NULL,
        error TEXT,
        manifest TEXT NOT NULL
    );
    CREATE INDEX snapshots_by_instance ON snapshots(instance, created_at);
    CREATE TABLE snapshot_disks (
        snapshot_id TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        device TEXT NOT NULL,
        node TEXT NOT NULL,
        image TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        allocated_size INTEGER NOT NULL,
        PRIMARY KEY (snapshot_id, position)
    );
    """,
    # 2: host instances (mount points), writers, and copies that are directories.
    """
    ALTER TABLE instances ADD COLUMN mounts TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE writers (
        instance TEXT NOT NULL REFERENCES instances(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        position INTEGER NOT NULL,
        kind TEXT NOT NULL,
        options TEXT NOT NULL,
        timeout REAL NOT NULL,
        retries INTEGER NOT NULL,
        on_failure TEXT NOT NULL,
        PRIMARY KEY (instance, name)
    );
    CREATE TABLE snapshot_disks_v2 (
        snapshot_id TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        device TEXT NOT NULL,
        node TEXT NOT NULL,
        image TEXT,
        virtual_size INTEGER NOT NULL,
        allocated_size INTEGER NOT NULL,
        path TEXT,
        PRIMARY KEY (snapshot_id, position)
    );
    INSERT INTO snapshot_disks_v2
        SELECT snapshot_id, position, device, node, image, virtual_size, allocated_size, NULL FROM snapshot_disks;
    DROP TABLE snapshot_disks;
    ALTER TABLE snapshot_disks_v2 RENAME TO snapshot_disks
    """,
    # 3: a freeze budget per instance.
    """
    ALTER TABLE instances ADD COLUMN freeze_budget REAL
    """,
    # 4: backups; the consistent point of a backup is a snapshot record with purpose 'backup'.
    """
    ALTER TABLE snapshots ADD COLUMN purpose TEXT NOT NULL DEFAULT 'snapshot';
    CREATE TABLE backups (
        id TEXT PRIMARY KEY,
        instance TEXT NOT NULL,
        type TEXT NOT NULL,
        created_at TEXT NOT NULL,
        state TEXT NOT NULL,
        repository TEXT NOT NULL,
        parent TEXT,
        error TEXT,
        duration_s REAL,
        timings_s TEXT NOT NULL,
        disks TEXT NOT NULL
    );
    CREATE INDEX backups_by_instance ON backups(instance, created_at)
    """,
    # 5: what verifying a backup found.
    """
    ALTER TABLE backups ADD COLUMN verified_at TEXT;
    ALTER TABLE backups ADD COLUMN verify_state TEXT;
    ALTER TABLE backups ADD COLUMN verify_problems TEXT NOT NULL DEFAULT '[]'
    """,
    # 6: what the last restore test found.
    """
    ALTER TABLE backups ADD COLUMN restore_tested_at TEXT;
    ALTER TABLE backups ADD COLUMN restore_test TEXT
    """,
    # 7: retention policies.
    """
    CREATE TABLE retention (
        instance TEXT PRIMARY KEY,
        keep_last INTEGER,
        keep_hourly INTEGER,
        keep_daily INTEGER,
        keep_weekly INTEGER,
        keep_monthly INTEGER,
        keep_yearly INTEGER,
        updated_at TEXT NOT NULL
    )
    """,
    # 8: schedules: one per instance (the options as JSON, so adding one needs no migration).
    """
    CREATE TABLE schedules (
        instance TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_slot TEXT,
        last_verify_at TEXT,
        last_test_at TEXT
    )
    """,
    # 9: libvirt domains (kind 'libvirt'): the connection URI and the domain's name.
    """
    ALTER TABLE instances ADD COLUMN libvirt_uri TEXT;
    ALTER TABLE instances ADD COLUMN libvirt_domain TEXT
    """,
    # 10: the guest freeze hooks an application-consistent snapshot needs (JSON list of
    # names; [] every hook found; NULL on an instance: as its template says).
    """
    ALTER TABLE instances ADD COLUMN guest_hooks TEXT;
    ALTER TABLE templates ADD COLUMN guest_hooks TEXT
    """,
    # 11: what this host pinned about each repository on first use (its identity: JSON).
    """
    CREATE TABLE repositories (
        location TEXT PRIMARY KEY,
        identity TEXT NOT NULL,
        pinned_at TEXT NOT NULL
    )
    """,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid {kind} name {name!r}",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def utc_now() -> str:
    """Now, as records keep it. ``FREEZEFRAME_NOW`` (an ISO time) stands in for the clock: the
    daemon sets it for the jobs it runs on a simulated clock (``daemon --clock``), so that a
    test can run weeks of schedule and retention in a minute."""
    fixed = os.environ.get("FREEZEFRAME_NOW")
    moment = parse_time(fixed) if fixed else datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """A time as records keep it (ISO 8601, ``Z`` or an offset), in this host's local zone:
    the zone retention periods and cron schedules are counted in."""
    return datetime.fromisoformat(text).astimezone()


class Catalog:
    """Open with ``Catalog.open(path)``; every method is one transaction."""

    # -- repositories: what was pinned on first use -------------------------------------

    def repository_pin(self, location: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT identity FROM repositories WHERE location = ?", (location,)).fetchone()
        return dict(json.loads(row["identity"])) if row else None

    def pin_repository(self, location: str, identity: dict[str, Any]) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO repositories (location, identity, pinned_at) VALUES (?, ?, ?)",
                       (location, json.dumps(identity), utc_now()))

    def forget_repository(self, location: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM repositories WHERE location = ?", (location,)).rowcount > 0

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    def open(cls, path: Path) -> Catalog:
        try:
            db = sqlite3.connect(path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.Error as err:
            raise CatalogError(f"cannot open the catalog {path}: {err}") from err
        catalog = cls(db, path)
        catalog._migrate()
        return catalog

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as err:
            raise CatalogError(f"catalog {self.path}: {err}") from err

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise CatalogError(
                    f"the catalog {self.path} has schema version {version}, newer than this "
                    f"freezeframe knows ({len(MIGRATIONS)})",
                    hint="upgrade freezeframe",
                )
            for step in range(version, len(MIGRATIONS)):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {step + 1}")

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    # -- templates ---------------------------------------------------------------------

    def add_template(self, name: str, *, application_consistent: bool) -> Template:
        validate_name("template", name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM templates WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"template {name!r} exists already")
            db.execute(
                "INSERT INTO templates (name, application_consistent, created_at) VALUES (?, ?, ?)",
                (name, int(application_consistent), utc_now()),
            )
        return self.template(name)

    def template(self, name: str) -> Template:
        row = self._db.execute("SELECT * FROM templates WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"no template named {name!r}", hint="see: freezeframe template list")
        return _template(row)

    def templates(self) -> list[Template]:
        return [_template(r) for r in self._db.execute("SELECT * FROM templates ORDER BY name")]

    def update_template(self, name: str, *, application_consistent: bool | None = None,
                        guest_hooks: tuple[str, ...] | None = None) -> Template:
        with self._tx() as db:
            self.template(name)
            if application_consistent is not None:
                db.execute("UPDATE templates SET application_consistent = ? WHERE name = ?",
                           (int(application_consistent), name))
            if guest_hooks is not None:
                db.execute("UPDATE templates SET guest_hooks = ? WHERE name = ?", (json.dumps(list(guest_hooks)), name))
        return self.template(name)

    def remove_template(self, name: str) -> None:
        with self._tx() as db:
            self.template(name)
            users = [r[0] for r in db.execute("SELECT name FROM instances WHERE template = ?", (name,))]
            if users:
                raise Conflict(
                    f"template {name!r} is used by {', '.join(users)}",
                    hint="remove those instances or move them to another template first",
                )
            db.execute("DELETE FROM templates WHERE name = ?", (name,))

    # -- instances ---------------------------------------------------------------------

    def add_instance(
        self,
        name: str,
        *,
        kind: str,
        qmp_socket: str | None,
        qga_socket: str | None,
        template: str | None = None,
        application_consistent: bool | None = None,
        lab: bool = False,
        mounts: tuple[str, ...] = (),
        freeze_budget: float | None = None,
        libvirt_uri: str | None = None,
        libvirt_domain: str | None = None,
    ) -> Instance:
        validate_name("instance", name)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM instances WHERE name = ?", (name,)).fetchone():
                raise Conflict(f"instance {name!r} exists already", hint="choose another name or remove it first")
            if template is not None:
                self.template(template)
            db.execute(
                """INSERT INTO instances (name, kind, qmp_socket, qga_socket, template,
                   application_consistent, lab, created_at, mounts, freeze_budget, libvirt_uri, libvirt_domain)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (name, kind, qmp_socket, qga_socket, template,
                 None if application_consistent is None else int(application_consistent),
                 int(lab), utc_now(), json.dumps(list(mounts)), freeze_budget, libvirt_uri, libvirt_domain),
            )
        return self.instance(name)

    def instance(self, name: str) -> Instance:
        row = self._db.execute(
            """SELECT i.*, t.application_consistent AS template_application_consistent,
                      t.guest_hooks AS template_guest_hooks
               FROM instances i LEFT JOIN templates t ON t.name = i.template WHERE i.name = ?""",
            (name,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no instance named {name!r}", hint="see: freezeframe instance list")
        return _instance(row)

    def instances(self) -> list[Instance]:
        rows = self._db.execute(
            """SELECT i.*, t.application_consistent AS template_application_consistent,
                      t.guest_hooks AS template_guest_hooks
               FROM instances i LEFT JOIN templates t ON t.name = i.template ORDER BY i.name"""
        )
        return [_instance(r) for r in rows]

    def update_instance(self, name: str, **changes: Any) -> Instance:
        allowed = {"qmp_socket", "qga_socket", "template", "application_consistent", "freeze_budget", "guest_hooks"}
        unknown = set(changes) - allowed
        if unknown:
            raise InvalidInput(f"cannot change {', '.join(sorted(unknown))} of an instance")
        with self._tx() as db:
            self.instance(name)
            if changes.get("template") is not None:
                self.template(changes["template"])
            for column, value in changes.items():
                if column == "application_consistent" and value is not None:
                    value = int(value)
                if column == "guest_hooks" and value is not None:
                    value = json.dumps(list(value))
                db.execute(f"UPDATE instances SET {column} = ? WHERE name = ?", (value, name))
        return self.instance(name)

    def remove_instance(self, name: str, *, force: bool = False) -> None:
        """Remove an instance. Its live snapshots block that unless ``force``, which marks them deleted."""
        with self._tx() as db:
            self.instance(name)
            live = [
                r[0]
                for r in db.execute(
                    "SELECT name FROM snapshots WHERE instance = ? AND purpose = 'snapshot' "
                    "AND state IN ('created', 'creating', 'deleting')",
                    (name,),
                )
            ]
            if live and not force:
                raise Conflict(
                    f"instance {name!r} still has snapshots: {', '.join(live)}",
                    hint="delete them first with: freezeframe snapshot delete ID",
                )
            db.execute(
                "UPDATE snapshots SET state = 'deleted', error = coalesce(error, 'instance removed') "
                "WHERE instance = ? AND state != 'failed' AND purpose = 'snapshot'",
                (name,),
            )
            # Its schedule goes with it (nothing is left to back up); its retention policy stays,
            # since its backups outlive it and prune still applies the policy to them.
            db.execute("DELETE FROM schedules WHERE instance = ?", (name,))
            db.execute("DELETE FROM instances WHERE name = ?", (name,))

    # -- writers -----------------------------------------------------------------------

    def add_writer(self, instance: str, spec: WriterSpec) -> WriterSpec:
        validate_name("writer", spec.name)
        with self._tx() as db:
            self.instance(instance)
            if db.execute("SELECT 1 FROM writers WHERE instance = ? AND name = ?", (instance, spec.name)).fetchone():
                raise Conflict(f"instance {instance!r} has a writer named {spec.name!r} already",
                               hint="choose another --name, or remove that writer first")
            position = db.execute("SELECT coalesce(max(position), -1) + 1 FROM writers WHERE instance = ?",
                                  (instance,)).fetchone()[0]
            db.execute(
                "INSERT INTO writers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (instance, spec.name, position, spec.kind, json.dumps(spec.options), spec.timeout,
                 spec.retries, spec.on_failure.value),
            )
        return spec

    def writers(self, instance: str) -> list[WriterSpec]:
        """The instance's writers in the order they quiesce (they are released in reverse)."""
        self.instance(instance)
        rows = self._db.execute("SELECT * FROM writers WHERE instance = ? ORDER BY position", (instance,))
        return [
            WriterSpec(name=r["name"], kind=r["kind"], options=json.loads(r["options"]), timeout=r["timeout"],
                       retries=r["retries"], on_failure=WriterFailure(r["on_failure"]))
            for r in rows
        ]

    def remove_writer(self, instance: str, name: str) -> None:
        with self._tx() as db:
            self.instance(instance)
            if db.execute("DELETE FROM writers WHERE instance = ? AND name = ?", (instance, name)).rowcount == 0:
                raise NotFound(f"instance {instance!r} has no writer named {name!r}",
                               hint=f"see: freezeframe writer list {instance}")

    # -- snapshots ---------------------------------------------------------------------

    def save_snapshot(self, snap: Snapshot) -> None:
        """Insert or replace the whole record, disks included."""
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    snap.id, snap.name, snap.created_at, snap.state.value, snap.instance,
                    snap.requested_level.value,
                    snap.achieved_level.value if snap.achieved_level else None,
                    json.dumps(snap.fallback_reasons), snap.freeze_window_ms,
                    json.dumps(snap.timings_ms), snap.error, json.dumps(snap.manifest), snap.purpose,
                ),
            )
            db.execute("DELETE FROM snapshot_disks WHERE snapshot_id = ?", (snap.id,))
            db.executemany(
                "INSERT INTO snapshot_disks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (snap.id, i, d.device, d.node, d.image, d.virtual_size, d.allocated_size, d.path)
                    for i, d in enumerate(snap.disks)
                ],
            )

    def snapshot(self, ref: str) -> Snapshot:
        """A snapshot by id, unique id prefix, or name (the newest live one of that name)."""
        rows = self._db.execute("SELECT * FROM snapshots WHERE id = ?", (ref,)).fetchall()
        if not rows:
            rows = self._db.execute(
                "SELECT * FROM snapshots WHERE name = ? ORDER BY state = 'deleted', created_at DESC LIMIT 1",
                (ref,),
            ).fetchall()
        if not rows and len(ref) >= 4:
            rows = self._db.execute(
                "SELECT * FROM snapshots WHERE id LIKE ? || '%'", (ref,)
            ).fetchall()
            if len(rows) > 1:
                raise InvalidInput(f"snapshot id prefix {ref!r} is ambiguous", hint="give more of the id")
        if not rows:
            raise NotFound(f"no snapshot {ref!r}", hint="see: freezeframe snapshot list")
        return self._snapshot(rows[0])

    def snapshots(self, *, instance: str | None = None, include_deleted: bool = False,
                  purpose: str | None = "snapshot") -> list[Snapshot]:
        """Snapshot records, oldest first; ``purpose=None`` includes the points of backups."""
        query = "SELECT * FROM snapshots WHERE 1"
        args: list[Any] = []
        if purpose is not None:
            query += " AND purpose = ?"
            args.append(purpose)
        if instance is not None:
            query += " AND instance = ?"
            args.append(instance)
        if not include_deleted:
            query += " AND state != 'deleted'"
        rows = self._db.execute(query + " ORDER BY created_at, id", args).fetchall()
        return [self._snapshot(r) for r in rows]

    def snapshots_using_image(self, image: str) -> list[Snapshot]:
        rows = self._db.execute(
            """SELECT DISTINCT s.* FROM snapshots s JOIN snapshot_disks d ON d.snapshot_id = s.id
               WHERE d.image = ? AND s.state != 'deleted'""",
            (image,),
        ).fetchall()
        return [self._snapshot(r) for r in rows]

    def repoint_image(self, old: str, new: str) -> None:
        """Live snapshots whose disk content was in ``old`` now find it in ``new`` (after a merge)."""
        with self._tx() as db:
            db.execute(
                """UPDATE snapshot_disks SET image = ? WHERE image = ? AND snapshot_id IN
                   (SELECT id FROM snapshots WHERE state != 'deleted')""",
                (new, old),
            )

    def _snapshot(self, row: sqlite3.Row) -> Snapshot:
        disks = [
            SnapshotDisk(
                device=d["device"], node=d["node"], image=d["image"],
                virtual_size=d["virtual_size"], allocated_size=d["allocated_size"], path=d["path"],
            )
            for d in self._db.execute(
                "SELECT * FROM snapshot_disks WHERE snapshot_id = ? ORDER BY position", (row["id"],)
            )
        ]
        return Snapshot(
            id=row["id"],
            name=row["name"],
            created_at=row["created_at"],
            state=SnapshotState(row["state"]),
            instance=row["instance"],
            requested_level=Level(row["requested_level"]),
            achieved_level=Level(row["achieved_level"]) if row["achieved_level"] else None,
            fallback_reasons=json.loads(row["fallback_reasons"]),
            freeze_window_ms=row["freeze_window_ms"],
            timings_ms=json.loads(row["timings_ms"]),
            error=row["error"],
            disks=disks,
            manifest=json.loads(row["manifest"]),
            purpose=row["purpose"],
        )

    # -- schedules ---------------------------------------------------------------------

    _SPEC = ("every_s", "cron", "backup_type", "repository", "consistency", "verify_every_s", "test_every_s",
             "prune")

    def save_schedule(self, schedule: Schedule) -> None:
        self.instance(schedule.instance)
        spec = {key: getattr(schedule, key) for key in self._SPEC}
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO schedules VALUES (?, ?, ?, ?, ?, ?)",
                       (schedule.instance, json.dumps(spec), schedule.created_at or utc_now(), schedule.last_slot,
                        schedule.last_verify_at, schedule.last_test_at))

    def remove_schedule(self, instance: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM schedules WHERE instance = ?", (instance,)).rowcount == 0:
                raise NotFound(f"instance {instance!r} has no schedule", hint="see: freezeframe schedule list")

    def schedules(self) -> list[Schedule]:
        return [Schedule(instance=row["instance"], **json.loads(row["spec"]), created_at=row["created_at"],
                         last_slot=row["last_slot"], last_verify_at=row["last_verify_at"],
                         last_test_at=row["last_test_at"])
                for row in self._db.execute("SELECT * FROM schedules ORDER BY instance").fetchall()]

    # -- retention ---------------------------------------------------------------------

    def set_retention(self, instance: str, policy: Retention | None) -> None:
        """Set (or, with None, remove) the instance's retention policy."""
        self.instance(instance)
        with self._tx() as db:
            db.execute("DELETE FROM retention WHERE instance = ?", (instance,))
            if policy is not None:
                db.execute("INSERT INTO retention VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (instance, *(getattr(policy, r) for r in RETENTION_RULES), utc_now()))

    def retention(self, instance: str) -> Retention | None:
        row = self._db.execute("SELECT * FROM retention WHERE instance = ?", (instance,)).fetchone()
        return _retention(row) if row is not None else None

    def retentions(self) -> dict[str, Retention]:
        """Every instance's retention policy, by instance name."""
        return {row["instance"]: _retention(row)
                for row in self._db.execute("SELECT * FROM retention ORDER BY instance").fetchall()}

    # -- backups -----------------------------------------------------------------------

    def save_backup(self, backup: Backup) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO backups (id, instance, type, created_at, state, repository, parent, error, "
                "duration_s, timings_s, disks, verified_at, verify_state, verify_problems, restore_tested_at, "
                "restore_test) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (backup.id, backup.instance, backup.type.value, backup.created_at, backup.state.value,
                 backup.repository, backup.parent, backup.error, backup.duration_s,
                 json.dumps(backup.timings_s), json.dumps([asdict(d) for d in backup.disks]),
                 backup.verified_at, backup.verify_state.value if backup.verify_state else None,
                 json.dumps(backup.verify_problems), backup.restore_tested_at,
                 json.dumps(backup.restore_test) if backup.restore_test is not None else None),
            )

    def backup(self, ref: str) -> Backup:
        """A backup by id or unique id prefix (4 characters or more)."""
        rows = self._db.execute("SELECT * FROM backups WHERE id = ?", (ref,)).fetchall()
        if not rows and len(ref) >= 4:
            rows = self._db.execute("SELECT * FROM backups WHERE id LIKE ? || '%'", (ref,)).fetchall()
            if len(rows) > 1:
                raise InvalidInput(f"backup id prefix {ref!r} is ambiguous", hint="give more of the id")
        if not rows:
            raise NotFound(f"no backup {ref!r}", hint="see: freezeframe backup list")
        return self._backup(rows[0])

    def backups(self, *, instance: str | None = None, repository: str | None = None,
                states: tuple[BackupState, ...] = (BackupState.CREATED,)) -> list[Backup]:
        """Backups oldest first; by default only complete ones (a partial backup is never listed)."""
        query = f"SELECT * FROM backups WHERE state IN ({', '.join('?' * len(states))})"
        args: list[Any] = [s.value for s in states]
        if instance is not None:
            query += " AND instance = ?"
            args.append(instance)
        if repository is not None:
            query += " AND repository = ?"
            args.append(repository)
        return [self._backup(r) for r in self._db.execute(query + " ORDER BY created_at, id", args).fetchall()]

    def _backup(self, row: sqlite3.Row) -> Backup:
        point = self._db.execute("SELECT * FROM snapshots WHERE id = ?", (row["id"],)).fetchone()
        return Backup(
            id=row["id"], instance=row["instance"], type=BackupType(row["type"]), created_at=row["created_at"],
            state=BackupState(row["state"]), repository=row["repository"], parent=row["parent"],
            point=self._snapshot(point) if point is not None else None,
            disks=[BackupDisk(**d) for d in json.loads(row["disks"])], error=row["error"],
            duration_s=row["duration_s"], timings_s=json.loads(row["timings_s"]),
            verified_at=row["verified_at"],
            verify_state=VerifyState(row["verify_state"]) if row["verify_state"] else None,
            verify_problems=json.loads(row["verify_problems"]),
            restore_tested_at=row["restore_tested_at"],
            restore_test=json.loads(row["restore_test"]) if row["restore_test"] else None,
        )


def _retention(row: sqlite3.Row) -> Retention:
    return Retention(**{rule: row[f"keep_{rule}"] for rule in RETENTION_RULES})


def _template(row: sqlite3.Row) -> Template:
    return Template(
        name=row["name"], application_consistent=bool(row["application_consistent"]), created_at=row["created_at"],
        guest_hooks=_hooks(row["guest_hooks"]),
    )


def _hooks(stored: str | None) -> tuple[str, ...] | None:
    return None if stored is None else tuple(str(h) for h in json.loads(stored))


def _instance(row: sqlite3.Row) -> Instance:
    own = row["application_consistent"]
    inherited = row["template_application_consistent"]
    effective = own if own is not None else inherited
    own_hooks = _hooks(row["guest_hooks"])
    hooks = own_hooks if own_hooks is not None else _hooks(row["template_guest_hooks"])
    return Instance(
        name=row["name"],
        kind=row["kind"],
        qmp_socket=row["qmp_socket"],
        qga_socket=row["qga_socket"],
        template=row["template"],
        own_application_consistent=None if own is None else bool(own),
        application_consistent=bool(effective),
        created_at=row["created_at"],
        lab=bool(row["lab"]),
        mounts=tuple(json.loads(row["mounts"])),
        freeze_budget=row["freeze_budget"],
        libvirt_uri=row["libvirt_uri"],
        libvirt_domain=row["libvirt_domain"],
        own_guest_hooks=own_hooks,
        guest_hooks=hooks or (),
    )
