"""`fedtune coordinator ...`: the admin API with its SuperLink, and API tokens.

``serve`` runs, in one process tree: the admin API (uvicorn), the Flower SuperLink (a child
process; its Control API stays on 127.0.0.1) and the job supervisor that starts a Flower run for
every running job. Settings come from options or a TOML file (``--config``; options win); keys
the coordinator needs and does not find are generated once into ``DATA_DIR/keys`` (mode 0600).
"""

from __future__ import annotations

import base64
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="The coordinator: admin API, Flower SuperLink, job supervisor, API tokens.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
token_app = typer.Typer(help="Admin-API bearer tokens (printed once, stored hashed).", no_args_is_help=True)
app.add_typer(token_app, name="token")
console = Console()
err = Console(stderr=True, soft_wrap=True)

DATABASE_ENV = "FEDTUNE_DATABASE_URL"
DatabaseUrl = Annotated[str | None, typer.Option(help=f"Store URL (SQLite or PostgreSQL); default ${DATABASE_ENV} or "
                                                      "sqlite:///DATA_DIR/coordinator.db.")]
DataDir = Annotated[Path, typer.Option(help="Where blobs, keys, Flower state and logs live.")]
DEFAULT_DATA_DIR = Path(".fedtune/coordinator")


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(code=code)


@dataclass
class ServeConfig:
    """Everything ``serve`` needs; fields are the TOML keys (``coordinator.toml``)."""

    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = None
    bases: list[Path] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8080
    fleet_port: int = 9092
    superlink: bool = True
    tls_ca_cert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    supernode_auth: bool = False
    blob_key_file: Path | None = None
    signing_key_file: Path | None = None

    @classmethod
    def from_toml(cls, path: Path) -> ServeConfig:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: {e}") from e
        data = data.get("coordinator", data)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
        paths = {"data_dir", "tls_ca_cert", "tls_cert", "tls_key", "blob_key_file", "signing_key_file"}
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in paths:
                out[key] = (path.parent / value).resolve()
            elif key == "bases":
                out[key] = [(path.parent / v).resolve() for v in value]
            else:
                out[key] = value
        return cls(**out)

    def url(self) -> str:
        return self.database_url or os.environ.get(DATABASE_ENV) or f"sqlite:///{(self.data_dir / 'coordinator.db')}"


def _key_file(path: Path | None, default: Path, make) -> Path:
    """An existing key file, or a new one at ``default`` (0600) when none was configured."""
    if path is not None:
        if not path.exists():
            raise ValueError(f"key file {path} does not exist")
        return path
    if not default.exists():
        default.parent.mkdir(parents=True, exist_ok=True)
        make(default)
        console.print(f"generated {default} (mode 0600): back it up; losing it loses the adapters / checkpoints")
    return default


def _write_blob_key(path: Path) -> None:
    from fedtune.coordinator.encryption import generate_blob_key

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(generate_blob_key().key).decode() + "\n")


def _write_signing_key(path: Path) -> None:
    from fedtune.compliance.signing import generate_signing_key, save_private_key

    save_private_key(path, generate_signing_key())


def _sessions(url: str):
    from fedtune.coordinator.migrations import upgrade_database
    from fedtune.coordinator.store import create_session_factory, create_store_engine

    engine = create_store_engine(url)
    upgrade_database(engine)
    return create_session_factory(engine, immediate=True)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option(help="coordinator.toml (see docs/deploy.md); options override it.")]
    = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where blobs, keys, Flower state and logs live.")] = None,
    database_url: DatabaseUrl = None,
    base: Annotated[list[Path] | None, typer.Option(help="A base checkpoint jobs may use (repeatable).")] = None,
    host: Annotated[str | None, typer.Option(help="Admin API address.")] = None,
    port: Annotated[int | None, typer.Option(help="Admin API port.")] = None,
    fleet_port: Annotated[int | None, typer.Option(help="The SuperLink's port (SuperNodes connect here).")] = None,
    no_superlink: Annotated[bool, typer.Option(help="Serve the API only (no SuperLink, no job runs).")] = False,
) -> None:
    """Serve the admin API, run the Flower SuperLink and start a Flower run for every running job."""
    try:
        cfg = ServeConfig.from_toml(config) if config else ServeConfig()
    except (ValueError, TypeError) as e:
        raise _fail(str(e)) from e
    for name, value in (("data_dir", data_dir), ("database_url", database_url), ("host", host), ("port", port),
                        ("fleet_port", fleet_port)):
        if value is not None:
            setattr(cfg, name, value)
    if base:
        cfg.bases = list(base)
    if no_superlink:
        cfg.superlink = False
    try:
        run_coordinator(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise _fail(str(e)) from e


def run_coordinator(cfg: ServeConfig) -> None:
    """Start everything ``serve`` runs and block until the API server stops (Ctrl-C / SIGTERM)."""
    import uvicorn

    from fedtune.compliance.checkpoints import load_coordinator_key
    from fedtune.coordinator.api import ApiSettings, create_app
    from fedtune.coordinator.encryption import load_blob_key
    from fedtune.coordinator.jobs import BaseCatalog
    from fedtune.coordinator.rounds import CoordinatorContext

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    data = cfg.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    blob_key_file = _key_file(cfg.blob_key_file, data / "keys" / "blob.key", _write_blob_key)
    signing_key_file = _key_file(cfg.signing_key_file, data / "keys" / "coordinator.pem", _write_signing_key)
    env = {"FEDTUNE_DATABASE_URL": cfg.url(), "FEDTUNE_BLOB_DIR": str(data / "blobs"),
           "FEDTUNE_BLOB_KEY_FILE": str(blob_key_file), "FEDTUNE_COORDINATOR_KEY_FILE": str(signing_key_file)}
    sessions = _sessions(cfg.url())
    signing_key = load_coordinator_key(signing_key_file)
    ctx = CoordinatorContext(sessions=sessions, blob_dir=data / "blobs",
                             blob_key=load_blob_key({"FEDTUNE_BLOB_KEY_FILE": str(blob_key_file)}),
                             signing_key=signing_key)
    catalog = BaseCatalog.from_paths(cfg.bases)
    for digest, path in catalog.paths.items():
        console.print(f"base {path}: digest {digest}")
    settings = ApiSettings(ctx=ctx, catalog=catalog, signing_key=signing_key)
    link = supervisor = None
    try:
        if cfg.superlink:
            link, supervisor = _start_flower(cfg, data, env, ctx)
        console.print(f"admin API on http://{cfg.host}:{cfg.port}/api/v1 (OpenAPI: /docs)")
        uvicorn.run(create_app(settings), host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        if supervisor is not None:
            supervisor.stop()
        if link is not None:
            link.stop()


def _start_flower(cfg: ServeConfig, data: Path, env: dict[str, str], ctx):
    from fedtune.coordinator.superlink import (
        TlsFiles,
        start_superlink,
        wait_for_port,
        write_flower_app_dir,
        write_flwr_home,
    )
    from fedtune.coordinator.supervisor import FlowerRuns, JobSupervisor

    tls = None
    if cfg.tls_cert or cfg.tls_key or cfg.tls_ca_cert:
        if not (cfg.tls_cert and cfg.tls_key and cfg.tls_ca_cert):
            raise ValueError("TLS needs all of tls_ca_cert, tls_cert and tls_key")
        tls = TlsFiles(ca_cert=cfg.tls_ca_cert, cert=cfg.tls_cert, key=cfg.tls_key)
    link = start_superlink(data / "superlink", port=cfg.fleet_port, env_extra=env, tls=tls,
                           supernode_auth=cfg.supernode_auth)
    wait_for_port(cfg.fleet_port, proc=link)
    console.print(f"Flower SuperLink on 127.0.0.1:{cfg.fleet_port} ({'TLS' if tls else 'insecure'}"
                  f"{', SuperNode auth' if cfg.supernode_auth else ''}); log {link.log_path}")
    runs = FlowerRuns(app_dir=write_flower_app_dir(data / "flower-app"),
                      flwr_home=write_flwr_home(data / "flwr-home", name="fedtune", port=cfg.fleet_port,
                                                root_cert=cfg.tls_ca_cert if tls else None),
                      connection="fedtune")
    supervisor = JobSupervisor(ctx, runs)
    supervisor.start()
    return link, supervisor


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="admin, operator or auditor.")],
    name: Annotated[str, typer.Option(help="What the token is for (no personal data).")],
    database_url: DatabaseUrl = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Create a token and print it ONCE (only its hash is stored)."""
    from fedtune.coordinator.api.auth import create_token

    url = ServeConfig(data_dir=data_dir, database_url=database_url).url()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _sessions(url).begin() as s:
            row, token = create_token(s, name=name, role=role)
            token_id = row.id
    except ValueError as e:
        raise _fail(str(e)) from e
    err.print(f"token {token_id} ({role}, {name!r}); it is shown once, store it in a secret manager:")
    print(token)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(help="The token's id (token list).")],
                 database_url: DatabaseUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Revoke a token: every later request with it is denied (and audited)."""
    from fedtune.coordinator.api.auth import revoke_token

    try:
        with _sessions(ServeConfig(data_dir=data_dir, database_url=database_url).url()).begin() as s:
            revoke_token(s, token_id)
    except LookupError as e:
        raise _fail(str(e)) from e
    console.print(f"token {token_id} revoked")


@token_app.command("list")
def token_list(database_url: DatabaseUrl = None, data_dir: DataDir = DEFAULT_DATA_DIR) -> None:
    """Tokens with their role and state (never the token text: it is not stored)."""
    from sqlalchemy import select

    from fedtune.coordinator.store import ApiToken

    with _sessions(ServeConfig(data_dir=data_dir, database_url=database_url).url())() as s:
        for t in s.execute(select(ApiToken).order_by(ApiToken.id)).scalars():
            state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
            console.print(f"{t.id:>4}  {t.role:<9} {state:<24} {escape(t.name)}")
