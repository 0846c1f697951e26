"""Coordinator-side Flower processes: the SuperLink, the Flower app directory, and runs.

* :func:`start_superlink` runs ``flower-superlink`` with runtime dependency installation OFF
  (with it on, a SuperLink ran ``uv sync`` and pulled GBs of CUDA wheels), on 127.0.0.1 (its
  Control API has no authentication: never expose it; other sites reach its Fleet API through
  :mod:`fedtune.coordinator.fleet_gateway`), insecure or with TLS, optionally with SuperNode
  authentication. Its environment carries the ServerApp's config (``server_app.py``).
* :func:`write_flower_app_dir` writes the small Flower app (pyproject only): its components name
  the installed modules ``fedtune.coordinator.server_app:app`` and
  ``fedtune.client_agent.flower_app:app`` (the FAB carries no code; both ends import the installed
  fedtune).
* :func:`write_flwr_home` defines the connection ``flwr run`` uses; :func:`start_run` /
  :func:`run_status` / :func:`wait_for_run` drive runs through ``flwr run|ls --format json``.

SIGTERM to the SuperLink stops its superexec and ServerApp children too.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from fedtune.coordinator.tls import TlsFiles

APP_NAME = "fedtune-rounds"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests and the demo)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_bin(name: str) -> str:
    """The path of a console script installed beside this Python (flower-superlink, flwr, ...)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: own FLWR_HOME, telemetry and update checks off."""
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1",
                # flower-superlink starts flower-superexec / flwr-serverapp by name: find this venv's
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")})
    env.update(extra or {})
    return env


@dataclass
class ManagedProcess:
    """A child process with its log file; :meth:`stop` sends SIGTERM, then SIGKILL after a grace period."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    def stop(self, grace_s: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        return self.popen.returncode

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def spawn(name: str, args: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    popen = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             stdin=subprocess.DEVNULL)
    log.close()
    return ManagedProcess(name, popen, log_path)


def _require_loopback_name(cert_path: Path) -> None:
    """Raise ValueError unless the certificate's subjectAltName lists the IP address 127.0.0.1."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cert_path}: not a readable PEM certificate ({e})") from e
    try:
        ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.IPAddress)
    except x509.ExtensionNotFound:
        ips = []
    if ipaddress.ip_address("127.0.0.1") not in ips:
        raise ValueError(f"{cert_path} does not name 127.0.0.1 in its subjectAltName: the ServerApp, the flwr "
                         "CLI and the fleet gateway reach the SuperLink on loopback; add 127.0.0.1 to the "
                         "certificate's hosts")


def start_superlink(workdir: Path, *, port: int, env_extra: dict[str, str], tls: TlsFiles | None = None,
                    supernode_auth: bool = False) -> ManagedProcess:
    """Start ``flower-superlink`` on 127.0.0.1:``port`` (Fleet, Control and ServerApp APIs on one port).

    Args:
        workdir: its FLWR_HOME, state database and log live here.
        env_extra: the ServerApp's config (FEDTUNE_DATABASE_URL, FEDTUNE_BLOB_DIR, FEDTUNE_BLOB_KEY_FILE).
        tls: server TLS files; the certificate must name 127.0.0.1, the address the ServerApp, the
            ``flwr`` CLI and the fleet gateway dial. None runs ``--insecure`` (plain HTTP on loopback).
        supernode_auth: only SuperNodes whose public keys were registered may connect (needs ``tls``:
            ``flower-superlink`` refuses ``--enable-supernode-auth`` with ``--insecure``).

    Raises:
        ValueError: ``supernode_auth`` without ``tls``, or a certificate that does not name 127.0.0.1.
    """
    if supernode_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS (flower-superlink refuses --enable-supernode-auth "
                         "with --insecure): configure tls_ca_cert, tls_cert and tls_key")
    if tls is not None:
        _require_loopback_name(tls.cert)
    workdir.mkdir(parents=True, exist_ok=True)
    args = [venv_bin("flower-superlink"), "--disable-runtime-dependency-installation",
            "--database", str(workdir / "superlink-state.db"), "--host", "127.0.0.1", "--port", str(port)]
    if tls is None:
        args.append("--insecure")
    else:
        args += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    if supernode_auth:
        args.append("--enable-supernode-auth")
    proc = spawn("superlink", args, workdir / "superlink.log", flower_env(workdir / "flwr-home", env_extra))
    proc.extra["port"] = port
    return proc


def wait_for_port(port: int, timeout_s: float = 60.0, proc: ManagedProcess | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``.

    Raises:
        RuntimeError: the process died or the port stayed closed (its log tail is in the message).
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s"
                       + (f":\n{proc.log_tail()}" if proc else ""))


def write_flower_app_dir(app_dir: Path, *, job_id: str = "") -> Path:
    """Write the Flower app directory ``flwr run`` packs into a FAB (a pyproject.toml, no code)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "fedtune federated rounds (components are the installed fedtune package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedtune"

[tool.flwr.app.components]
serverapp = "fedtune.coordinator.server_app:app"
clientapp = "fedtune.client_agent.flower_app:app"

[tool.flwr.app.config]
job-id = "{job_id}"
node-wait-s = 60
expected-nodes = 0
""")
    return app_dir


def write_flwr_home(flwr_home: Path, *, name: str, port: int, root_cert: Path | None = None) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` for ``flwr run/ls/stop``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    tls = f'root-certificates = "{root_cert}"' if root_cert else "insecure = true"
    (flwr_home / "config.toml").write_text(f"""\
[superlink]
default = "{name}"

[superlink.{name}]
address = "127.0.0.1:{port}"
{tls}
""")
    return flwr_home


def _flwr(args: list[str], flwr_home: Path, cwd: Path, timeout_s: float = 120.0) -> dict:
    out = subprocess.run([venv_bin("flwr"), *args, "--format", "json"], env=flower_env(flwr_home), cwd=cwd,
                         capture_output=True, text=True, timeout=timeout_s)
    text = out.stdout.strip()
    try:
        data = json.loads(text[text.index("{"):]) if "{" in text else {}
    except ValueError as e:
        raise RuntimeError(f"flwr {args[0]}: unreadable output:\n{text}\n{out.stderr}") from e
    if out.returncode != 0 or data.get("success") is False:
        raise RuntimeError(f"flwr {' '.join(args)} failed ({out.returncode}): {text}\n{out.stderr[-2000:]}")
    return data


def start_run(app_dir: Path, *, flwr_home: Path, connection: str, run_config: str = "") -> int:
    """Start a run of the app on the SuperLink ``connection``; returns the Flower run id."""
    args = ["run", str(app_dir), connection] + (["--run-config", run_config] if run_config else [])
    return int(_flwr(args, flwr_home, app_dir.parent)["run-id"])


def register_supernode(public_key: Path, *, flwr_home: Path, connection: str, cwd: Path) -> int:
    """Register a SuperNode's public key (OpenSSH ECDSA, the agent's ``.pub`` file) with a SuperLink
    started with ``supernode_auth``; returns the node id Flower assigns. Only registered SuperNodes
    can connect."""
    return int(_flwr(["supernode", "register", str(public_key), connection], flwr_home, cwd)["node-id"])


def unregister_supernode(node_id: int, *, flwr_home: Path, connection: str, cwd: Path) -> None:
    """Unregister a SuperNode: its key can no longer connect (and, in Flower, never be registered again)."""
    _flwr(["supernode", "unregister", str(node_id), connection], flwr_home, cwd)


def list_supernodes(*, flwr_home: Path, connection: str, cwd: Path) -> list[dict]:
    """The SuperLink's SuperNodes as ``flwr supernode list`` reports them (node id, status, ...)."""
    return list(_flwr(["supernode", "list", connection], flwr_home, cwd).get("nodes", []))


def stop_run(run_id: int, *, flwr_home: Path, connection: str, cwd: Path) -> None:
    """Stop a run (its ServerApp is terminated; the round in flight is discarded by the engine)."""
    _flwr(["stop", str(run_id), connection], flwr_home, cwd)


def run_info(run_id: int, *, flwr_home: Path, connection: str, cwd: Path) -> dict:
    """The run as ``flwr ls --run-id`` reports it: ``status``, ``status-details``, ``elapsed``,
    ``network-traffic`` (``inbound-bytes`` from SuperNodes, ``outbound-bytes``), ``compute-time``;
    empty when the SuperLink does not know the run."""
    runs = _flwr(["ls", connection, "--run-id", str(run_id)], flwr_home, cwd).get("runs", [])
    return dict(runs[0]) if runs else {}


def run_status(run_id: int, *, flwr_home: Path, connection: str, cwd: Path) -> str:
    """``pending``, ``starting``, ``running`` or ``finished:{completed,failed,stopped}``."""
    return str(run_info(run_id, flwr_home=flwr_home, connection=connection, cwd=cwd).get("status", ""))


def wait_for_run(run_id: int, *, flwr_home: Path, connection: str, cwd: Path, timeout_s: float,
                 poll_s: float = 3.0) -> str:
    """Poll until the run is finished; returns its final status.

    Raises:
        TimeoutError: still not finished after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = run_status(run_id, flwr_home=flwr_home, connection=connection, cwd=cwd)
        if status.startswith("finished"):
            return status
        time.sleep(poll_s)
    raise TimeoutError(f"run {run_id} is still {status!r} after {timeout_s} s")
