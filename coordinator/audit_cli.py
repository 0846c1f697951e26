"""``fedtune audit`` commands that read the coordinator's store: ``export``, ``checkpoint``,
``lineage``, ``processing``. ``fedtune.cli`` puts them into the ``fedtune audit`` group beside
compliance's offline commands (``verify``, ``keygen``: :mod:`fedtune.compliance.cli`).

The store (and SQLAlchemy) is imported when a command runs, not when the ``fedtune`` command starts.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedtune.compliance.cli import KeyFile, cli_error, load_key_or_exit
from fedtune.coordinator.settings import CoordinatorSettings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

DATABASE_URL_ENV = CoordinatorSettings.env_name("database_url")
CLI_ACTOR = ("cli", "fedtune-audit")

DatabaseUrl = Annotated[str | None, typer.Option("--database-url", help=f"The coordinator's store (default: "
                                                                        f"${DATABASE_URL_ENV}).")]


def _sessions(database_url: str | None) -> sessionmaker[Session]:
    from fedtune.coordinator.store import create_session_factory, create_store_engine

    url = database_url or CoordinatorSettings().database_url
    if not url:
        raise cli_error(f"no database: pass --database-url or set {DATABASE_URL_ENV}")
    try:
        return create_session_factory(create_store_engine(url), immediate=True)
    except ValueError as e:
        raise cli_error(str(e)) from e


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as e:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date or time", param_hint=option) from e
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def export(
    out: Annotated[Path, typer.Option("--out", help="A new (or empty) directory for the export.")],
    record_format: Annotated[str, typer.Option("--format", help="Records file format: jsonl or csv.")] = "jsonl",
    since: Annotated[str | None, typer.Option("--from", help="Only records at or after this time (ISO 8601; "
                                                             "UTC when no offset is given).")] = None,
    until: Annotated[str | None, typer.Option("--to", help="Only records before this time.")] = None,
    job: Annotated[str | None, typer.Option("--job", help="Only this job's records.")] = None,
    database_url: DatabaseUrl = None,
    key_file: KeyFile = None,
) -> None:
    """Sign a checkpoint and export the audit records, the checkpoint, the public key and a signed manifest."""
    from sqlalchemy.exc import SQLAlchemyError

    from fedtune.coordinator.audit_export import export_audit
    from fedtune.coordinator.store import append_audit_event
    from fedtune.coordinator.store.audit import AuditIntegrityError

    if record_format not in ("jsonl", "csv"):
        raise typer.BadParameter(f"{record_format!r}: choose jsonl or csv", param_hint="--format")
    key = load_key_or_exit(key_file)
    window = {"since": _parse_time(since, "--from"), "until": _parse_time(until, "--to")}
    try:
        with _sessions(database_url).begin() as s:
            result = export_audit(s, out, signing_key=key, record_format=record_format, job_id=job, **window)
            append_audit_event(s, action="audit.export", actor_type=CLI_ACTOR[0], actor_id=CLI_ACTOR[1],
                               resource_type="audit_log", outcome="success",
                               context={"format": record_format, "records": result.records,
                                        "tree_size": result.checkpoint.tree_size, "complete": result.complete,
                                        "job_id": job, "from": since, "to": until})
    except (AuditIntegrityError, FileExistsError, ValueError) as e:
        raise cli_error(str(e)) from e
    except SQLAlchemyError as e:
        raise cli_error(f"cannot read the audit log (is this a migrated fedtune store?): {e}") from e
    scope = "all" if result.complete else "filtered"
    typer.echo(f"exported {result.records} records ({scope}) to {result.out_dir}; checkpoint tree_size="
               f"{result.checkpoint.tree_size} root={result.checkpoint.root_hash} key {result.checkpoint.key_id}")


def checkpoint(database_url: DatabaseUrl = None, key_file: KeyFile = None) -> None:
    """Sign a checkpoint of the audit log now (the round engine also signs one after every round)."""
    from fedtune.coordinator.store.audit import AuditIntegrityError, checkpoint_of, sign_audit_checkpoint

    key = load_key_or_exit(key_file)
    try:
        with _sessions(database_url).begin() as s:
            signed = checkpoint_of(sign_audit_checkpoint(s, key))
    except AuditIntegrityError as e:
        raise cli_error(str(e)) from e
    typer.echo(json.dumps(signed.to_dict(), indent=2))


def lineage(
    job: Annotated[str, typer.Option("--job", help="The job.")],
    version: Annotated[int, typer.Option("--version", help="The adapter version.")],
    output: Annotated[str, typer.Option("--output", help="json or md.")] = "md",
    database_url: DatabaseUrl = None,
) -> None:
    """The lineage of an adapter version: parents, rounds, contributing clients, epsilon per client."""
    from fedtune.coordinator.reports import ReportNotFound, adapter_lineage

    _print_report(lambda s: adapter_lineage(s, job, version), output, database_url, ReportNotFound)


def processing(
    job: Annotated[str, typer.Option("--job", help="The job.")],
    output: Annotated[str, typer.Option("--output", help="json or md.")] = "md",
    database_url: DatabaseUrl = None,
) -> None:
    """A job's record of processing: purpose, data categories, parties, safeguards, retention."""
    from fedtune.coordinator.reports import ReportNotFound, processing_record

    _print_report(lambda s: processing_record(s, job), output, database_url, ReportNotFound)


def _print_report(build: Any, output: str, database_url: str | None, not_found: type[Exception]) -> None:
    from fedtune.compliance.reports import report_markdown

    if output not in ("json", "md"):
        raise typer.BadParameter(f"{output!r}: choose json or md", param_hint="--output")
    try:
        with _sessions(database_url)() as s:
            report = build(s)
    except not_found as e:
        raise cli_error(str(e)) from e
    typer.echo(json.dumps(report, indent=2, ensure_ascii=False) if output == "json" else report_markdown(report))
