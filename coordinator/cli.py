"""`fedtune coordinator ...`: the admin API with its SuperLink, and API tokens.

``serve`` runs, in one process tree: the admin API (uvicorn), the Flower SuperLink (a child
process on 127.0.0.1:``superlink_port``: its Fleet, Control and runtime APIs share that port and
the Control API has no authentication), the fleet gateway (``fleet_gateway.py``, on
``fleet_host:fleet_port``: forwards only the Fleet API to the SuperLink; what SuperNodes dial) and
the job supervisor that starts a Flower run for every running job. Only two ports are meant to be
reachable from other sites: the admin API and the fleet gateway; both serve HTTPS with the
coordinator's certificate when TLS is configured. Settings come from options or a TOML file
(``--config``; options win); keys the coordinator needs and does not find are generated once into
``DATA_DIR/keys`` (mode 0600).

The admin API's HTTP server (:func:`admin_api_server_options`) bounds what a client that never
finishes can hold: each request (head and body) must arrive in full within
``request_read_timeout_s`` of the connection opening or the previous response
(:class:`RequestReadTimeoutProtocol`; uvicorn has no such timeout of its own), idle keep-alive
connections close after ``keep_alive_timeout_s``, and a request head is at most 16 KiB. Its client
address is the TCP peer's: ``X-Forwarded-For`` is read only from the ``trusted_proxies`` listed
(none by default), so no local process can write another origin into the audit trail. Refused
requests are limited per client address (``refused_requests_*``, :mod:`fedtune.coordinator.api.refusals`).
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import signal
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from fedtune.coordinator.http_limits import MAX_REQUEST_HEAD_BYTES, request_read_timeout_protocol
from fedtune.coordinator.settings import CoordinatorSettings

if TYPE_CHECKING:
    from fedtune.coordinator.api.refusals import RefusalPolicy
    from fedtune.coordinator.tls import TlsFiles

app = typer.Typer(help="The coordinator: admin API, Flower SuperLink, job supervisor, API tokens.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
token_app = typer.Typer(help="Admin-API bearer tokens (printed once, stored hashed).", no_args_is_help=True)
app.add_typer(token_app, name="token")
console = Console()
err = Console(stderr=True, soft_wrap=True)
log = logging.getLogger(__name__)

DATABASE_ENV = CoordinatorSettings.env_name("database_url")
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
    fleet_host: str = "127.0.0.1"
    fleet_port: int = 9092
    superlink_port: int = 9091
    superlink: bool = True
    tls_ca_cert: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    supernode_auth: bool = False
    blob_key_file: Path | None = None
    signing_key_file: Path | None = None
    trusted_proxies: list[str] = field(default_factory=list)
    request_read_timeout_s: float = 30.0
    keep_alive_timeout_s: int = 5
    refused_requests_limit: int = 10
    refused_requests_window_s: float = 60.0
    refused_requests_max_origins: int = 10_000
    refused_requests_ipv6_prefix: int = 64

    def refusal_policy(self) -> RefusalPolicy:
        """The per-origin limit on refused admin-API requests.

        Raises:
            ValueError: a ``refused_requests_*`` setting out of range (named).
        """
        from fedtune.coordinator.api.refusals import RefusalPolicy

        return RefusalPolicy(limit=self.refused_requests_limit, window_s=self.refused_requests_window_s,
                             max_origins=self.refused_requests_max_origins,
                             ipv6_prefix=self.refused_requests_ipv6_prefix)

    def check_http_settings(self) -> None:
        """Raises ValueError naming a bad ``trusted_proxies`` entry, timeout or ``refused_requests_*`` setting."""
        self.refusal_policy()
        if not isinstance(self.trusted_proxies, list):
            raise ValueError(f"trusted_proxies: {self.trusted_proxies!r} is not a list of IP addresses or networks")
        for name in ("request_read_timeout_s", "keep_alive_timeout_s"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int | float):
                raise ValueError(f"{name}: {getattr(self, name)!r} is not a number of seconds")
        for entry in self.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except (TypeError, ValueError):
                raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network (e.g. 10.0.0.5 or "
                                 f"10.0.0.0/24); list only the reverse proxies in front of the admin API") from None
        if not 0 < self.request_read_timeout_s <= 3600:
            raise ValueError(f"request_read_timeout_s: {self.request_read_timeout_s} is not in (0, 3600] seconds")
        if not 0 < self.keep_alive_timeout_s <= 3600:
            raise ValueError(f"keep_alive_timeout_s: {self.keep_alive_timeout_s} is not in (0, 3600] seconds")

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
        return (self.database_url or CoordinatorSettings().database_url
                or f"sqlite:///{(self.data_dir / 'coordinator.db')}")

    def tls_files(self) -> TlsFiles | None:
        """The coordinator's TLS files (admin API, fleet gateway, SuperLink), or None without TLS.

        Raises:
            ValueError: only some of ``tls_ca_cert``, ``tls_cert``, ``tls_key`` are set.
        """
        from fedtune.coordinator.tls import TlsFiles

        if not (self.tls_cert or self.tls_key or self.tls_ca_cert):
            return None
        if not (self.tls_cert and self.tls_key and self.tls_ca_cert):
            raise ValueError("TLS needs all of tls_ca_cert, tls_cert and tls_key")
        return TlsFiles(ca_cert=self.tls_ca_cert, cert=self.tls_cert, key=self.tls_key)


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


def admin_api_server_options(cfg: ServeConfig) -> dict[str, Any]:
    """The uvicorn settings the admin API runs with (see the module docstring): request read timeout,
    keep-alive timeout, request head limit, and ``X-Forwarded-For`` from ``cfg.trusted_proxies`` only.

    Raises:
        ValueError: a bad ``trusted_proxies`` entry, timeout or ``refused_requests_*`` setting
            (:meth:`ServeConfig.check_http_settings`).
    """
    cfg.check_http_settings()
    return {"http": request_read_timeout_protocol(cfg.request_read_timeout_s),
            "timeout_keep_alive": cfg.keep_alive_timeout_s, "h11_max_incomplete_event_size": MAX_REQUEST_HEAD_BYTES,
            "proxy_headers": bool(cfg.trusted_proxies), "forwarded_allow_ips": list(cfg.trusted_proxies),
            "log_level": "warning"}


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
    host: Annotated[str | None, typer.Option(help="Admin API address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Admin API port (default 8080).")] = None,
    fleet_host: Annotated[str | None, typer.Option(
        help="The fleet gateway's address; 0.0.0.0 accepts SuperNodes of other sites (default 127.0.0.1).")] = None,
    fleet_port: Annotated[int | None, typer.Option(
        help="The fleet gateway's port: SuperNodes dial it (default 9092).")] = None,
    superlink_port: Annotated[int | None, typer.Option(
        help="The SuperLink's port, on 127.0.0.1 only; 0 picks a free one (default 9091).")] = None,
    no_superlink: Annotated[bool, typer.Option(help="Serve the API only (no SuperLink, no job runs).")] = False,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        help="A reverse proxy (IP or network) whose X-Forwarded-For names the client in the audit trail "
             "(repeatable; default none: the TCP peer is the client).")] = None,
) -> None:
    """Serve the admin API, the Flower SuperLink behind its fleet gateway, and a Flower run per running job.

    Reachable from other sites (when their hosts are not 127.0.0.1): the admin API
    (--host/--port) and the fleet gateway (--fleet-host/--fleet-port), which forwards
    only the SuperLink's Fleet API. The SuperLink itself, its unauthenticated Control
    API included, listens on 127.0.0.1:--superlink-port. With TLS configured (the
    TOML's tls_* keys) both reachable ports serve HTTPS with the coordinator's certificate.
    """
    try:
        cfg = ServeConfig.from_toml(config) if config else ServeConfig()
    except (ValueError, TypeError) as e:
        raise _fail(str(e)) from e
    for name, value in (("data_dir", data_dir), ("database_url", database_url), ("host", host), ("port", port),
                        ("fleet_host", fleet_host), ("fleet_port", fleet_port), ("superlink_port", superlink_port)):
        if value is not None:
            setattr(cfg, name, value)
    if base:
        cfg.bases = list(base)
    if trusted_proxy:
        cfg.trusted_proxies = list(trusted_proxy)
    if no_superlink:
        cfg.superlink = False
    try:
        run_coordinator(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        raise _fail(str(e)) from e


def run_coordinator(cfg: ServeConfig) -> None:
    """Start everything ``serve`` runs and block until Ctrl-C / SIGTERM; then stop the admin API, the job
    supervisor, the fleet gateway and the SuperLink, in that order.

    Raises:
        ValueError: inconsistent settings (partial TLS, SuperNode auth without TLS, one port for two servers).
    """
    from fedtune.compliance.checkpoints import load_coordinator_key
    from fedtune.coordinator.api import ApiSettings, create_app
    from fedtune.coordinator.api.refusals import RefusalLimiter
    from fedtune.coordinator.encryption import load_blob_key
    from fedtune.coordinator.fleet_gateway import ThreadedServer
    from fedtune.coordinator.jobs import BaseCatalog
    from fedtune.coordinator.rounds import CoordinatorContext

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tls = cfg.tls_files()
    server_options = admin_api_server_options(cfg)
    data = cfg.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    blob_key_file = _key_file(cfg.blob_key_file, data / "keys" / "blob.key", _write_blob_key)
    signing_key_file = _key_file(cfg.signing_key_file, data / "keys" / "coordinator.pem", _write_signing_key)
    env = CoordinatorSettings(database_url=cfg.url(), blob_dir=data / "blobs", blob_key_file=blob_key_file,
                              coordinator_key_file=signing_key_file).to_env()  # the ServerApp's (server_app.py)
    sessions = _sessions(cfg.url())
    signing_key = load_coordinator_key(signing_key_file)
    ctx = CoordinatorContext(sessions=sessions, blob_dir=data / "blobs",
                             blob_key=load_blob_key(env),
                             signing_key=signing_key)
    catalog = BaseCatalog.from_paths(cfg.bases)
    for digest, path in catalog.paths.items():
        console.print(f"base {path}: digest {digest}")
    settings = ApiSettings(ctx=ctx, catalog=catalog, signing_key=signing_key,
                           refusals=RefusalLimiter(cfg.refusal_policy()), secure_cookies=tls is not None)
    with contextlib.ExitStack() as running:  # stops what started, last first, however serve ends
        running.enter_context(_signals_exit())
        if cfg.superlink:
            _start_flower(cfg, data, env, ctx, tls, running)
        api = ThreadedServer.start(create_app(settings), name="admin API", host=cfg.host, port=cfg.port, tls=tls,
                                   **server_options)
        running.callback(api.stop)
        console.print(f"admin API on {api.url()}/api/v1 (OpenAPI: /docs); web console on {api.url()}/console")
        api.wait()


@contextlib.contextmanager
def _signals_exit():
    """While inside, the first SIGTERM or SIGINT raises SystemExit(0) in the main thread, whatever it is
    doing (starting up, serving), so that the ExitStack around it stops everything that started. While
    that runs, SIGTERM is ignored and a second Ctrl-C (KeyboardInterrupt) cuts it short."""
    handled = (signal.SIGTERM, signal.SIGINT)

    def exit_(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print(f"{signal.Signals(signum).name}: stopping")
        raise SystemExit(0)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = {sig: signal.signal(sig, exit_) for sig in handled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_flower(cfg: ServeConfig, data: Path, env: dict[str, str], ctx, tls: TlsFiles | None,
                  running: contextlib.ExitStack) -> None:
    """SuperLink on loopback, the fleet gateway in front of it, the job supervisor; each one's stop goes on
    ``running`` as soon as it started."""
    from fedtune.coordinator.fleet_gateway import start_fleet_gateway
    from fedtune.coordinator.superlink import (
        free_port,
        start_superlink,
        wait_for_port,
        write_flower_app_dir,
        write_flwr_home,
    )
    from fedtune.coordinator.supervisor import FlowerRuns, JobSupervisor

    superlink_port = cfg.superlink_port or free_port()
    if superlink_port == cfg.fleet_port:
        raise ValueError(f"superlink_port and fleet_port are both {superlink_port}: the SuperLink and the fleet "
                         "gateway need a port each")
    link = start_superlink(data / "superlink", port=superlink_port, env_extra=env, tls=tls,
                           supernode_auth=cfg.supernode_auth)
    running.callback(link.stop)
    wait_for_port(superlink_port, proc=link)
    console.print(f"Flower SuperLink on 127.0.0.1:{superlink_port} only ({'TLS' if tls else 'insecure'}"
                  f"{', SuperNode auth' if cfg.supernode_auth else ''}; Fleet, Control and runtime APIs); "
                  f"log {link.log_path}")
    gateway = start_fleet_gateway(host=cfg.fleet_host, port=cfg.fleet_port, superlink_port=superlink_port, tls=tls)
    running.callback(gateway.stop)
    console.print(f"fleet gateway on {gateway.url()}: SuperNodes dial this host, port {gateway.port} "
                  f"(forwards POST /v1/fleet/* only)")
    if tls is None and not _is_loopback(cfg.fleet_host):
        err.print(f"[yellow]warning:[/yellow] the fleet gateway listens on {escape(cfg.fleet_host)} without TLS: "
                  "SuperNode traffic crosses the network in clear text; configure tls_ca_cert, tls_cert, tls_key")
    runs = FlowerRuns(app_dir=write_flower_app_dir(data / "flower-app"),
                      flwr_home=write_flwr_home(data / "flwr-home", name="fedtune", port=superlink_port,
                                                root_cert=tls.ca_cert if tls else None),
                      connection="fedtune", node_auth=cfg.supernode_auth)
    supervisor = JobSupervisor(ctx, runs)
    supervisor.start()
    running.callback(supervisor.stop)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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
    from fedtune.coordinator.store.engine import read_session_factory

    with read_session_factory(_sessions(ServeConfig(data_dir=data_dir, database_url=database_url).url()))() as s:
        for t in s.execute(select(ApiToken).order_by(ApiToken.id)).scalars():
            state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "active"
            console.print(f"{t.id:>4}  {t.role:<9} {state:<24} {escape(t.name)}")
