"""``freezeframe repo ...``: the backup repository."""

from __future__ import annotations

import os
from pathlib import Path

import click

from freezeframe.backup.leases import DEFAULT_LEASE_S
from freezeframe.backup.repository import DEFAULT_CHUNK_SIZE, MAX_LEASE_S, MIN_LEASE_S, Repository, is_repository
from freezeframe.backup.store import open_store
from freezeframe.cli.context import App, pass_app, passphrase_options, read_passphrase
from freezeframe.cli.output import emit_json, human_size, output_option, record_table, records_table, stdout, warn
from freezeframe.errors import InvalidInput, NotFound, RepositoryError


@click.group("repo")
def group() -> None:
    """Create and inspect backup repositories."""


_LOCATION = "PATH|s3://BUCKET/PREFIX"


@group.command("init")
@click.argument("path", required=False, metavar=_LOCATION)
@click.option("--endpoint", metavar="URL", help="The S3 endpoint, for an s3:// repository not on AWS "
                                                "(MinIO, Ceph, rclone ...). Kept in the repository's location.")
@click.option("--encryption", is_flag=True,
              help="Encrypt and authenticate every object (AES-256-GCM), with keys protected by a passphrase.")
@click.option("--chunk-size", type=click.IntRange(64, 65536), default=DEFAULT_CHUNK_SIZE >> 10, show_default=True,
              metavar="KIB", help="Chunk size in KiB (a power of two).")
@click.option("--lock-lease", "lease_s", type=click.FloatRange(MIN_LEASE_S, MAX_LEASE_S), default=DEFAULT_LEASE_S,
              show_default=True, metavar="SECONDS",
              help="How long a running backup's lease lasts without renewal (it renews every fifth of it, at most "
                   "every minute). A backup stopped longer than this counts as dead: garbage collection breaks its "
                   "lease and the backup, if it goes on, publishes nothing.")
@passphrase_options
@output_option
@pass_app
def init(app: App, path: str | None, endpoint: str | None, encryption: bool, chunk_size: int, lease_s: float,
         passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Create a repository at PATH (default: repo/ in the home), or in an S3 bucket under a
    prefix: s3://BUCKET/PREFIX [--endpoint URL]. The bucket must exist; the S3 credentials
    come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials, and are
    never stored.

    With --encryption the passphrase comes from --passphrase-file, --passphrase-env or
    FREEZEFRAME_PASSPHRASE. Keep it safe: without it the backups cannot be read."""
    where = app.repository_location(path, endpoint)
    passphrase = read_passphrase(passphrase_file, passphrase_env) if encryption else None
    if encryption and passphrase is None:
        raise InvalidInput("--encryption needs a passphrase",
                           hint="give --passphrase-file PATH, --passphrase-env VAR, or set FREEZEFRAME_PASSPHRASE")
    store = open_store(where)
    if not is_repository(store) and next(iter(store.list("")), None) is not None:
        raise RepositoryError(f"{where} is not empty and not a repository",
                              hint="choose an empty directory or prefix")
    repo = Repository.init(store, passphrase=passphrase, chunk_size=chunk_size << 10, lease_s=lease_s)
    app.pin(where, repo)
    record = {"path": where, "encryption": repo.config["encryption"], "chunk_size": repo.chunk_size,
              "compression": f"zstd level {repo.level}", "hash": repo.config["hash"], "id": repo.config["id"],
              "lock_lease_s": repo.lease_s}
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(record_table(record))


@group.command("stats")
@click.argument("path", required=False, metavar=_LOCATION)
@passphrase_options
@output_option
@pass_app
def stats(app: App, path: str | None, passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Logical and stored bytes, deduplication and compression ratios, chunk count."""
    repo = app.repository(path, read_passphrase(passphrase_file, passphrase_env))
    s = repo.stats()
    record = {"path": repo.location, "backups": s.backups, "logical_bytes": s.logical_bytes,
              "unique_bytes": s.unique_bytes, "stored_bytes": s.stored_bytes,
              "dedup_ratio": round(s.dedup_ratio, 3), "compression_ratio": round(s.compression_ratio, 3),
              "chunks": s.chunks, "unreferenced_chunks": s.unreferenced_chunks}
    if fmt == "json":
        emit_json(record)
        return
    shown = {**record, "logical_bytes": human_size(s.logical_bytes), "unique_bytes": human_size(s.unique_bytes),
             "stored_bytes": human_size(s.stored_bytes)}
    stdout.print(record_table(shown))


@group.command("check")
@click.argument("path", required=False, metavar=_LOCATION)
@passphrase_options
@output_option
@pass_app
def check(app: App, path: str | None, passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Check the repository's structure: every backup's manifest and indexes open, and every
    chunk they name exists. Exits 11 when something is missing or damaged."""
    repo = app.repository(path, read_passphrase(passphrase_file, passphrase_env))
    report = repo.check()
    record = {"path": repo.location, "backups": report.backups, "indexes": report.indexes,
              "chunks_named": report.chunks_named, "problems": report.problems}
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(record_table({**record, "problems": "\n".join(report.problems) or "none"}))
    if report.problems:
        raise click.exceptions.Exit(11)


@group.command("gc")
@click.argument("path", required=False, metavar=_LOCATION)
@passphrase_options
@output_option
@pass_app
def gc(app: App, path: str | None, passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """Delete the chunks no backup names any more (left by deleted and pruned backups, and
    by interrupted ones), while backups run: it waits for none, and none waits for it.
    What running backups store or name is kept (their leases protect it); the leases of
    backups that stopped renewing them are broken. Every published backup stays restorable."""
    from freezeframe.backup.gc import collect_garbage
    from freezeframe.cli.output import progress

    repo = app.repository(path, read_passphrase(passphrase_file, passphrase_env))
    with progress("garbage collection") as say:
        report = collect_garbage(repo, say=say)
    record = {"path": repo.location, "chunks_deleted": report.chunks, "bytes_freed": report.bytes,
              "indexes_deleted": report.indexes, "chunks_kept": report.kept, "chunks_too_young": report.young,
              "leases_honoured": report.live, "leases_broken": [{"name": n, "why": w} for n, w in report.broken],
              "leftovers_removed": report.leftovers}
    if fmt == "json":
        emit_json(record)
        return
    stdout.print(record_table({**record, "bytes_freed": human_size(report.bytes),
                               "leases_honoured": ", ".join(report.live) or "none",
                               "leases_broken": "\n".join(f"{n}: {w}" for n, w in report.broken) or "none"}))


@group.command("locks")
@click.argument("path", required=False, metavar=_LOCATION)
@passphrase_options
@output_option
@pass_app
def locks(app: App, path: str | None, passphrase_file: Path | None, passphrase_env: str | None, fmt: str) -> None:
    """The leases held on the repository: running backups, syncs and garbage collections,
    with their holders (host, machine, pid), ages, and whether they are still alive."""
    from freezeframe.backup.leases import Lease, read_leases, store_now

    repo = app.repository(path, read_passphrase(passphrase_file, passphrase_env))
    with Lease.unique(repo.store, "look", repo.lease_s) as probe:
        now = store_now(repo.store, probe.name)
        found = [lease for lease in read_leases(repo.store) if lease.name != probe.name]
    records = [{**lease.describe(now), "dead": lease.dead(now, repo.lease_s)} for lease in found]
    if fmt == "json":
        emit_json(records)
        return
    stdout.print(records_table([{**r, "dead": r["dead"] or "alive"} for r in records],
                               ["name", "kind", "instance", "host", "pid", "age_s", "renewed_s_ago", "dead"]))


@group.command("break-lock")
@click.argument("name")
@click.option("--repo", "path", metavar=_LOCATION, help="The repository (default: repo/ in the home).")
@passphrase_options
@output_option
@pass_app
def break_lock(app: App, name: str, path: str | None, passphrase_file: Path | None, passphrase_env: str | None,
               fmt: str) -> None:
    """Remove the lease NAME (see: repo locks). Only for a holder you know is gone: a backup
    still running then publishes nothing, and garbage collection stops protecting what it
    stored. Garbage collection breaks dead leases by itself."""
    from freezeframe.backup.leases import break_lease, read_leases

    repo = app.repository(path, read_passphrase(passphrase_file, passphrase_env))
    found = next((lease for lease in read_leases(repo.store) if lease.name == name), None)
    if found is None:
        raise NotFound(f"no lease {name!r} in the repository {repo.location}", hint="see: freezeframe repo locks")
    break_lease(repo.store, found)
    warn(f"broke the lease {name}: if its holder still runs, it will publish nothing")
    if fmt == "json":
        emit_json({"broken": name})


@group.command("import")
@click.argument("path", metavar=_LOCATION)
@click.option("--instance", help="Only this instance's backups.")
@passphrase_options
@output_option
@pass_app
def import_(app: App, path: str, instance: str | None, passphrase_file: Path | None, passphrase_env: str | None,
            fmt: str) -> None:
    """Record the backups of the repository at PATH in this host's catalog, from their
    manifests: on a new host, after losing the old one's home. Restores, verifies and tests
    then find them by id, and the next backup of an instance of the same name is an
    incremental of its newest one (read in full where its disks have no bitmap)."""
    from freezeframe.jobs.repo_import import import_repository

    repo = app.repository(path, read_passphrase(passphrase_file, passphrase_env))
    report = import_repository(app.catalog, repo, instance=instance)
    record = {"path": repo.location, "imported": report.imported, "already_known": report.present,
              "refused": [{"backup": b, "why": w} for b, w in report.refused]}
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(record_table({"path": repo.location, "imported": len(report.imported),
                                   "already known": len(report.present),
                                   "refused": "\n".join(f"{b[:8]}: {w}" for b, w in report.refused) or "none"}))
    if report.refused:
        raise click.exceptions.Exit(11)


@group.command("forget")
@click.argument("path", metavar=_LOCATION)
@pass_app
def forget(app: App, path: str) -> None:
    """Forget what this host pinned about the repository at PATH (its id, chunk hash, chunk
    size and encryption, recorded on first use). Only after re-creating it there on purpose:
    the next use pins it anew."""
    where = app.repository_location(path)
    if not app.catalog.forget_repository(where):
        raise NotFound(f"nothing is pinned for {where}")
    warn(f"forgot the repository pinned at {where}: the next command pins whatever it finds there")


@group.group("key")
def key() -> None:
    """The key of an encrypted repository."""


@key.command("export")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--repo", "path", metavar=_LOCATION, help="The repository (default: repo/ in the home).")
@passphrase_options
@pass_app
def key_export(app: App, file: Path, path: str | None, passphrase_file: Path | None,
               passphrase_env: str | None) -> None:
    """Write the repository's key object to FILE (owner-only), for safekeeping: with it and
    the passphrase, the backups can be read even if the repository's own copy is lost. It
    is still protected by the passphrase."""
    from freezeframe.backup.repository import KEY

    repo = app.repository(path, read_passphrase(passphrase_file, passphrase_env))
    if not repo.encrypted:
        raise InvalidInput(f"the repository {repo.location} is not encrypted: it has no key")
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInput(f"{file} exists already", hint="choose a new file") from None
    with os.fdopen(fd, "wb") as out:
        out.write(repo.store.get(KEY))


@key.command("passphrase")
@click.option("--repo", "path", metavar=_LOCATION, help="The repository (default: repo/ in the home).")
@passphrase_options
@click.option("--new-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The new passphrase, from this file (owner-only; first line).")
@click.option("--new-passphrase-env", metavar="VAR", help="The new passphrase, from this variable.")
@pass_app
def key_passphrase(app: App, path: str | None, passphrase_file: Path | None, passphrase_env: str | None,
                   new_passphrase_file: Path | None, new_passphrase_env: str | None) -> None:
    """Change the passphrase of an encrypted repository: the keys stay (no data is
    re-encrypted), wrapped anew. Keys exported before keep the old passphrase."""
    if new_passphrase_file is None and new_passphrase_env is None:
        raise InvalidInput("give the new passphrase with --new-passphrase-file or --new-passphrase-env")
    old = read_passphrase(passphrase_file, passphrase_env)
    new = read_passphrase(new_passphrase_file, new_passphrase_env)
    if old is None or not new:
        raise InvalidInput("both the current and a non-empty new passphrase are needed")
    repo = app.repository(path, old)
    repo.change_passphrase(old, new)
    warn(f"the passphrase of {repo.location} is changed: keep the new one safe")


@group.command("sync")
@click.argument("src", metavar="SRC")
@click.argument("dst", metavar="DST")
@click.option("--backup", "backups", multiple=True, metavar="ID",
              help="Copy only this backup (id or prefix; repeatable). Default: every backup in SRC.")
@passphrase_options
@click.option("--dst-passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
              help="DST's passphrase, from this file. Default: the same as SRC's.")
@click.option("--dst-passphrase-env", metavar="VAR", help="DST's passphrase, from this variable.")
@output_option
@pass_app
def sync(app: App, src: str, dst: str, backups: tuple[str, ...], passphrase_file: Path | None,
         passphrase_env: str | None, dst_passphrase_file: Path | None, dst_passphrase_env: str | None,
         fmt: str) -> None:
    """Copy backups from repository SRC to repository DST (a directory or s3://...), sending
    only the chunks DST lacks: the off-site copy. Backups DST has already are left alone; an
    interrupted copy is never listed in DST, and a rerun sends only what is still missing.
    Every chunk is checked as it is read. Restore from the copy with: backup restore ID
    --repo DST."""
    from freezeframe.cli.output import byte_progress
    from freezeframe.jobs.sync import sync_backups

    src_pass = read_passphrase(passphrase_file, passphrase_env)
    dst_pass = (read_passphrase(dst_passphrase_file, dst_passphrase_env)
                if dst_passphrase_file or dst_passphrase_env else src_pass)
    source, target = app.repository(src, src_pass), app.repository(dst, dst_pass)
    if source.location == target.location:
        raise InvalidInput("SRC and DST are the same repository")
    ids = [source.resolve(ref) for ref in backups] if backups else None
    with byte_progress("sync", enabled=fmt != "json") as bar:
        report = sync_backups(source, target, ids, progress=lambda done, total: bar(done, total, ""))
    record = {"src": source.location, "dst": target.location, "copied": report.backups,
              "already_there": report.present, "chunks_sent": report.chunks_sent, "bytes_sent": report.bytes_sent,
              "chunks_skipped": report.chunks_skipped}
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(record_table({**record, "copied": len(report.backups), "already_there": len(report.present),
                                   "bytes_sent": human_size(report.bytes_sent)}))
