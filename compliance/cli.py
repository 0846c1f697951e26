"""``fedtune audit``: the commands that need no database: ``verify`` an export offline (files only, no
network) and ``keygen``; and what the store's commands share (errors, the key option).

The commands that read the coordinator's store (``export``, ``checkpoint``, ``lineage``,
``processing``) are the coordinator's (``fedtune.coordinator.audit_cli``); ``fedtune.cli`` puts
both into the ``fedtune audit`` group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from fedtune.compliance.checkpoints import CoordinatorKeyError, load_coordinator_key
from fedtune.compliance.signing import encode_public_key, generate_signing_key, key_id, public_key_pem, save_private_key
from fedtune.compliance.verify import verify_export

AUDIT_HELP = "The audit trail: export, verify offline, checkpoints, compliance reports."

KeyFile = Annotated[Path | None, typer.Option("--key-file", help="The coordinator's Ed25519 key (default: "
                                                                 "$FEDTUNE_COORDINATOR_KEY_FILE).")]


def cli_error(message: str) -> typer.Exit:
    """Print ``error: message`` to stderr; the exit (code 1) for the caller to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def load_key_or_exit(key_file: Path | None) -> Any:
    """The coordinator's signing key (``--key-file`` or the environment), or exit 1 saying why not."""
    try:
        return load_coordinator_key(key_file)
    except CoordinatorKeyError as e:
        raise cli_error(str(e)) from e


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


def keygen(out: Annotated[Path, typer.Option("--out", help="Where to write the private key (PEM, mode 0600); "
                                                           "the public key goes to OUT.pub.pem.")]) -> None:
    """Create the coordinator's Ed25519 checkpoint key; set FEDTUNE_COORDINATOR_KEY_FILE to it."""
    key = generate_signing_key()
    public = out.with_name(out.name.removesuffix(".pem") + ".pub.pem")
    try:
        save_private_key(out, key)
    except FileExistsError as e:
        raise cli_error(f"{out} exists; a key is never overwritten") from e
    public.write_bytes(public_key_pem(key))
    typer.echo(f"private key: {out}\npublic key: {public} ({encode_public_key(key)})\nkey id: {key_id(key)}")
