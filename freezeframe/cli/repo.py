"""``freezeframe repo ...``: the backup repository."""

from __future__ import annotations

from pathlib import Path

import click

from freezeframe.backup.repository import DEFAULT_CHUNK_SIZE, Repository, is_repository
from freezeframe.backup.store import open_store
from freezeframe.cli.context import App, pass_app, passphrase_options, read_passphrase
from freezeframe.cli.output import emit_json, human_size, output_option, record_table, stdout
from freezeframe.errors import InvalidInput, RepositoryError


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
@passphrase_options
@output_option
@pass_app
def init(app: App, path: str | None, endpoint: str | None, encryption: bool, chunk_size: int,
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
    repo = Repository.init(store, passphrase=passphrase, chunk_size=chunk_size << 10)
    record = {"path": where, "encryption": repo.config["encryption"], "chunk_size": repo.chunk_size,
              "compression": f"zstd level {repo.level}", "hash": repo.config["hash"], "id": repo.config["id"]}
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
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=3600, show_default=True, metavar="SECONDS",
              help="How long to wait for running backups to finish before giving up (exit 4).")
@passphrase_options
@output_option
@pass_app
def gc(app: App, path: str | None, wait_s: float, passphrase_file: Path | None, passphrase_env: str | None,
       fmt: str) -> None:
    """Delete the chunks no backup names any more (left by deleted and pruned backups, and
    by interrupted ones). Waits for running backups to finish; backups that start meanwhile
    wait for it. Every backup stays restorable."""
    from freezeframe.cli.output import progress
    from freezeframe.engine.collect import collect_garbage

    repo = app.repository(path, read_passphrase(passphrase_file, passphrase_env))
    with progress("garbage collection") as say:
        report = collect_garbage(repo, wait_s=wait_s, waiting=say)
    record = {"path": repo.location, "chunks_deleted": report.chunks, "bytes_freed": report.bytes,
              "indexes_deleted": report.indexes, "chunks_kept": report.kept}
    if fmt == "json":
        emit_json(record)
    else:
        stdout.print(record_table({**record, "bytes_freed": human_size(report.bytes)}))


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
    from freezeframe.engine.sync import sync_backups

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
