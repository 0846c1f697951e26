"""Agent-side processes: the agent daemon (``daemon.py``) and its Flower SuperNode.

:func:`start_agent` starts the daemon (which loads the base once and writes its endpoint file when
ready), then ``flower-supernode`` with ``--node-config "agent-endpoint='<endpoint file>'"`` and its
own ClientAppIo port. TLS (``root_cert``: the SuperLink's CA certificate) and node authentication
(``auth_private_key``: an OpenSSH ECDSA P-384 key, from :func:`write_supernode_auth_key` or
``ssh-keygen -t ecdsa -b 384 -N ""``, whose ``.pub`` the coordinator registers with ``flwr supernode
register`` before the SuperNode connects) are optional; without TLS the SuperNode runs ``--insecure``
(loopback only). The SuperLink is ``superlink_address`` ("host:port", the coordinator's fleet
gateway), or 127.0.0.1:``superlink_port`` for tests and benchmarks on one host.

Each child runs in its own process group: a terminal's Ctrl-C reaches only the parent, which
stops the children in order (SuperNode first, then the daemon) with :meth:`AgentProcesses.stop`.

Process helpers (spawn, ports, stop) are the coordinator's :mod:`fedtune.coordinator.superlink`
ones' twins, kept here so the agent side does not import the coordinator.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.client_agent.daemon import ENDPOINT_FILE
from fedtune.client_agent.flower_node import DEFAULT_PULL_INTERVAL_S


def write_supernode_auth_key(private_path: Path) -> Path:
    """Create a SuperNode authentication key pair: an ECDSA P-384 private key in OpenSSH format at
    ``private_path`` (mode 0600) and its public key at ``<private_path>.pub``, the files
    ``ssh-keygen -t ecdsa -b 384 -N ""`` writes. Returns the public key's path (give that file to
    the coordinator operator; the private key never leaves the agent host).

    Raises:
        FileExistsError: the private key exists (a key is never overwritten).
    """
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(public + b" fedtune-supernode\n")
    return public_path


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AgentProcesses:
    """One agent's daemon and SuperNode; :meth:`stop` stops the SuperNode first, then the daemon."""

    client_id: str
    daemon: subprocess.Popen
    supernode: subprocess.Popen | None
    state_dir: Path

    @property
    def endpoint_file(self) -> Path:
        return self.state_dir / ENDPOINT_FILE

    def stop(self, grace_s: float = 15.0) -> None:
        for proc in (self.supernode, self.daemon):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for name in ("daemon.log", "supernode.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {name}\n" + (self.state_dir / name).read_text(errors="replace")[-chars:])
        return "\n".join(parts)


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                process_group=0)


def _superlink_address(superlink_port: int | None, superlink_address: str | None) -> str:
    if superlink_address is not None:
        return superlink_address
    if superlink_port is None:
        raise ValueError("give the SuperLink as superlink_address='host:port' or superlink_port (on 127.0.0.1)")
    return f"127.0.0.1:{superlink_port}"


def start_daemon(*, client_id: str, base: Path, key: Path, data: Path, state_dir: Path,
                 budget_epsilon: float | None = None, budget_delta: float | None = None,
                 dataset_id: str | None = None, device: str | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m fedtune.client_agent.daemon``; the endpoint file appears when it is ready.
    ``dataset_id`` and ``device`` left None keep the daemon's defaults ("default", cpu)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / ENDPOINT_FILE).unlink(missing_ok=True)
    args = [sys.executable, "-m", "fedtune.client_agent.daemon", "--client-id", client_id, "--base", str(base),
            "--key", str(key), "--data", str(data), "--state-dir", str(state_dir)]
    if budget_epsilon is not None:
        args += ["--budget-epsilon", str(budget_epsilon), "--budget-delta", str(budget_delta or 1e-5)]
    if dataset_id is not None:
        args += ["--dataset-id", dataset_id]
    if device is not None:
        args += ["--device", device]
    args += extra_args or []
    return _spawn(args, state_dir / "daemon.log", {**os.environ, **(env or {})})


def wait_for_endpoint(state_dir: Path, proc: subprocess.Popen, timeout_s: float = 180.0) -> Path:
    """Wait until the daemon wrote its endpoint file.

    Raises:
        RuntimeError: the daemon exited or did not get ready in time.
    """
    path = state_dir / ENDPOINT_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists():
            return path
        if proc.poll() is not None:
            raise RuntimeError(f"agent daemon exited with {proc.returncode}:\n"
                               f"{(state_dir / 'daemon.log').read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)
    raise RuntimeError(f"agent daemon not ready after {timeout_s} s")


def start_supernode(*, endpoint_file: Path, state_dir: Path, flwr_home: Path, superlink_port: int | None = None,
                    superlink_address: str | None = None, root_cert: Path | None = None,
                    auth_private_key: Path | None = None, clientappio_port: int | None = None,
                    pull_interval_s: float = DEFAULT_PULL_INTERVAL_S) -> subprocess.Popen:
    """Start Flower's SuperNode (``python -m fedtune.client_agent.flower_node``: the ClientApp kept warm
    in its process, idle pulls every ``pull_interval_s``) connected to the SuperLink at
    ``superlink_address`` ("host:port"), or, when that is None, at 127.0.0.1:``superlink_port``. Its
    Runtime API listens on 127.0.0.1 only. Its log is ``state_dir/supernode.log``.

    Raises:
        ValueError: neither ``superlink_address`` nor ``superlink_port`` is given.
    """
    args = [sys.executable, "-m", "fedtune.client_agent.flower_node", "--pull-interval-s", f"{pull_interval_s:g}",
            "--superlink", _superlink_address(superlink_port, superlink_address),
            "--host", "127.0.0.1", "--port", str(clientappio_port or _free_port()),
            "--node-config", f"agent-endpoint='{endpoint_file}'"]
    args += ["--root-certificates", str(root_cert)] if root_cert else ["--insecure"]
    if auth_private_key is not None:
        args += ["--auth-supernode-private-key", str(auth_private_key)]
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1",
           # Flower looks up its own commands by name: find this venv's
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    return _spawn(args, state_dir / "supernode.log", env)


def start_agent(*, client_id: str, base: Path, key: Path, data: Path, state_dir: Path,
                superlink_port: int | None = None, superlink_address: str | None = None,
                budget_epsilon: float | None = None, budget_delta: float | None = None,
                dataset_id: str | None = None, device: str | None = None,
                root_cert: Path | None = None, auth_private_key: Path | None = None,
                clientappio_port: int | None = None, daemon_args: list[str] | None = None,
                wait: bool = True) -> AgentProcesses:
    """Start one agent: its daemon, then (once the daemon is ready, if ``wait``) its SuperNode.
    Without ``wait``, call :func:`attach_supernode` with the SuperLink's address later."""
    daemon = start_daemon(client_id=client_id, base=base, key=key, data=data, state_dir=state_dir,
                          budget_epsilon=budget_epsilon, budget_delta=budget_delta, dataset_id=dataset_id,
                          device=device, extra_args=daemon_args)
    agent = AgentProcesses(client_id, daemon, None, state_dir)
    if wait:
        attach_supernode(agent, superlink_port=superlink_port, superlink_address=superlink_address,
                         root_cert=root_cert, auth_private_key=auth_private_key, clientappio_port=clientappio_port)
    return agent


def attach_supernode(agent: AgentProcesses, *, superlink_port: int | None = None, superlink_address: str | None = None,
                     root_cert: Path | None = None, auth_private_key: Path | None = None,
                     clientappio_port: int | None = None, ready_timeout_s: float = 180.0,
                     pull_interval_s: float = DEFAULT_PULL_INTERVAL_S) -> None:
    """Wait (up to ``ready_timeout_s``) for the agent's daemon, then start its SuperNode; on any
    failure, or an interrupt while waiting, stop the agent's processes and re-raise."""
    try:
        endpoint = wait_for_endpoint(agent.state_dir, agent.daemon, timeout_s=ready_timeout_s)
        agent.supernode = start_supernode(superlink_port=superlink_port, superlink_address=superlink_address,
                                          endpoint_file=endpoint, state_dir=agent.state_dir,
                                          flwr_home=agent.state_dir / "flwr-home", root_cert=root_cert,
                                          auth_private_key=auth_private_key, clientappio_port=clientappio_port,
                                          pull_interval_s=pull_interval_s)
    except BaseException:
        agent.stop()
        raise
