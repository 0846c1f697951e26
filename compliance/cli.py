"""``fedtune audit``: export the audit trail, verify an export offline, sign checkpoints, reports, keys.

``verify`` reads files only (no database, no network); the commands that read the store import it
when they run.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedtune.compliance.checkpoints import CoordinatorKeyError, load_coordinator_key
from fedtune.compliance.signing import encode_public_key, generate_signing_key, key_id, public_key_pem, save_private_key
from fedtune.compliance.verify import verify_export

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

app = typer.Typer(help="The audit trail: export, verify offline, checkpoints, compliance reports.",
                  no_args_is_help=True)

DATABASE_URL_ENV = "FEDTUNE_DATABASE_URL"
CLI_ACTOR = ("cli", "fedtune-audit")

DatabaseUrl = Annotated[str | None, typer.Option("--database-url", help=f"The coordinator's store (default: "
                                                                        f"${DATABASE_URL_ENV}).")]
KeyFile = Annotated[Path | None, typer.Option("--key-file", help="The coordinator's Ed25519 key (default: "
                                                                 "$FEDTUNE_COORDINATOR_KEY_FILE).")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _sessions(database_url: str | None) -> sessionmaker[Session]:
    from fedtune.coordinator.store import create_session_factory, create_store_engine

    url = database_url or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise _fail(f"no database: pass --database-url or set {DATABASE_URL_ENV}")
    try:
        return create_session_factory(create_store_engine(url), immediate=True)
    except ValueError as e:
        raise _fail(str(e)) from e


def _signing_key(key_file: Path | None) -> Any:
    try:
        return load_coordinator_key(key_file)
    except CoordinatorKeyError as e:
        raise _fail(str(e)) from e


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as e:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date or time", param_hint=option) from e
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@app.command()
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

    from fedtune.compliance.export import export_audit
    from fedtune.coordinator.store import append_audit_event
    from fedtune.coordinator.store.audit import AuditIntegrityError

    if record_format not in ("jsonl", "csv"):
        raise typer.BadParameter(f"{record_format!r}: choose jsonl or csv", param_hint="--format")
    key = _signing_key(key_file)
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
        raise _fail(str(e)) from e
    except SQLAlchemyError as e:
        raise _fail(f"cannot read the audit log (is this a migrated fedtune store?): {e}") from e
    scope = "all" if result.complete else "filtered"
    typer.echo(f"exported {result.records} records ({scope}) to {result.out_dir}; checkpoint tree_size="
               f"{result.checkpoint.tree_size} root={result.checkpoint.root_hash} key {result.checkpoint.key_id}")


@app.command()
def verify(
    export_dir: Annotated[Path, typer.Argument(help="The directory `fedtune audit export` wrote.")],
    pubkey: Annotated[Path | None, typer.Option("--pubkey", help="The coordinator's public key (PEM or "
                                                                 "ed25519:<base64>), obtained separately.")] = None,
    since_checkpoint: Annotated[Path | None, typer.Option(
        "--since-checkpoint", help="An earlier checkpoint.json (or an earlier export directory) this log must "
                                   "extend.")] = None,
) -> None:
    """Verify an export offline: manifest, signatures, chain, Merkle root, consistency. Exit 0 only if all hold."""
    result = verify_export(export_dir, pubkey=pubkey, since_checkpoint=since_checkpoint)
    typer.echo(result.summary())
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def checkpoint(database_url: DatabaseUrl = None, key_file: KeyFile = None) -> None:
    """Sign a checkpoint of the audit log now (the round engine also signs one after every round)."""
    from fedtune.coordinator.store.audit import AuditIntegrityError, checkpoint_of, sign_audit_checkpoint

    key = _signing_key(key_file)
    try:
        with _sessions(database_url).begin() as s:
            signed = checkpoint_of(sign_audit_checkpoint(s, key))
    except AuditIntegrityError as e:
        raise _fail(str(e)) from e
    typer.echo(json.dumps(signed.to_dict(), indent=2))


@app.command()
def keygen(out: Annotated[Path, typer.Option("--out", help="Where to write the private key (PEM, mode 0600); "
                                                           "the public key goes to OUT.pub.pem.")]) -> None:
    """Create the coordinator's Ed25519 checkpoint key; set FEDTUNE_COORDINATOR_KEY_FILE to it."""
    key = generate_signing_key()
    public = out.with_name(out.name.removesuffix(".pem") + ".pub.pem")
    try:
        save_private_key(out, key)
    except FileExistsError as e:
        raise _fail(f"{out} exists; a key is never overwritten") from e
    public.write_bytes(public_key_pem(key))
    typer.echo(f"private key: {out}\npublic key: {public} ({encode_public_key(key)})\nkey id: {key_id(key)}")


@app.command()
def lineage(
    job: Annotated[str, typer.Option("--job", help="The job.")],
    version: Annotated[int, typer.Option("--version", help="The adapter version.")],
    output: Annotated[str, typer.Option("--output", help="json or md.")] = "md",
    database_url: DatabaseUrl = None,
) -> None:
    """The lineage of an adapter version: parents, rounds, contributing clients, epsilon per client."""
    from fedtune.compliance.reports import ReportNotFound, adapter_lineage

    _print_report(lambda s: adapter_lineage(s, job, version), output, database_url, ReportNotFound)


@app.command()
def processing(
    job: Annotated[str, typer.Option("--job", help="The job.")],
    output: Annotated[str, typer.Option("--output", help="json or md.")] = "md",
    database_url: DatabaseUrl = None,
) -> None:
    """A job's record of processing: purpose, data categories, parties, safeguards, retention."""
    from fedtune.compliance.reports import ReportNotFound, processing_record

    _print_report(lambda s: processing_record(s, job), output, database_url, ReportNotFound)


def _print_report(build: Any, output: str, database_url: str | None, not_found: type[Exception]) -> None:
    from fedtune.compliance.reports import report_markdown

    if output not in ("json", "md"):
        raise typer.BadParameter(f"{output!r}: choose json or md", param_hint="--output")
    try:
        with _sessions(database_url)() as s:
            report = build(s)
    except not_found as e:
        raise _fail(str(e)) from e
    typer.echo(json.dumps(report, indent=2, ensure_ascii=False) if output == "json" else report_markdown(report))
