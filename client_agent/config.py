"""One site's agent configuration: ``agent.toml``, read by ``fedtune agent run``.

The keys sit at the top level of the file or in an ``[agent]`` table. Relative paths resolve
against the file's directory, so a site directory can be moved as a whole::

    client_id = "bank-a"
    superlink = "coordinator.example.org:9092"   # the coordinator's fleet gateway
    root_cert = "keys/ca.pem"                     # without it: --insecure, loopback only
    node_auth_key = "keys/node-key"
    base = "/models/base-int4"
    data = "data/cases.jsonl"
    budget_epsilon = 8.0                          # lifetime budget of this dataset

:meth:`AgentConfig.from_toml` checks everything that can be checked before a process starts:
types and ranges, that the files exist, that the receipt key is an Ed25519 key the daemon will
accept, that the node key is an ECDSA P-384 OpenSSH key, that TLS is on unless the SuperLink is
on loopback, and that CUDA is there when asked for.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

DEVICES = ("cpu", "cuda")
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the coordinator's client id pattern
_LOOPBACK_NAMES = ("localhost",)

# The daemon's torch threads when agent.toml sets none (`fedtune agent run` sets it for its daemon).
THREADS_ENV = "FEDTUNE_AGENT_THREADS"


class AgentConfigError(ValueError):
    """agent.toml is unreadable, incomplete, or names something that is not there."""


@dataclass(frozen=True)
class AgentConfig:
    """What one site's agent needs: identity, coordinator address, keys, base, data and budget.

    Paths are absolute once loaded by :meth:`from_toml`.
    """

    client_id: str
    superlink: str  # "host:port" of the coordinator's fleet gateway
    base: Path
    data: Path
    budget_epsilon: float
    root_cert: Path | None = None
    signing_key: Path = Path("keys/receipt.pem")
    node_auth_key: Path | None = None
    dataset_id: str | None = None  # None: the data file's name stem (see `dataset`)
    budget_delta: float = 1e-5
    device: str = "cpu"
    state_dir: Path = Path("state")
    clientappio_port: int | None = None
    threads: int | None = None  # torch threads of the daemon; None: $FEDTUNE_AGENT_THREADS, else every CPU core
    pull_interval_s: float = 0.5  # longest idle wait between the SuperNode's pulls at the SuperLink (Flower: 3 s)

    @property
    def dataset(self) -> str:
        """The name the dataset's lifetime budget is kept under in the privacy ledger."""
        return self.dataset_id or self.data.stem

    @property
    def superlink_host(self) -> str:
        return split_address(self.superlink)[0]

    @property
    def insecure(self) -> bool:
        """No TLS to the SuperLink (allowed on loopback only)."""
        return self.root_cert is None

    @classmethod
    def from_toml(cls, path: str | Path) -> AgentConfig:
        """Read and check ``agent.toml``.

        Raises:
            AgentConfigError: the file cannot be read, a key is unknown, missing or of the wrong
                type, a named file is missing, a key file holds the wrong kind of key, TLS is off
                for a non-loopback SuperLink, or CUDA is asked for and not available.
        """
        path = Path(path)
        try:
            table = tomllib.loads(path.read_text())
        except OSError as e:
            raise AgentConfigError(f"cannot read the agent config {path}: {e.strerror or e}") from e
        except tomllib.TOMLDecodeError as e:
            raise AgentConfigError(f"{path} is not valid TOML: {e}") from e
        if isinstance(table.get("agent"), dict):
            if len(table) > 1:
                others = ", ".join(sorted(k for k in table if k != "agent"))
                raise AgentConfigError(f"{path}: put every key in the [agent] table or none; found {others} "
                                       "outside it")
            table = table["agent"]
        try:
            config = cls.from_mapping(table, base_dir=path.resolve().parent)
            config.check()
        except AgentConfigError as e:
            raise AgentConfigError(f"{path}: {e}") from e
        return config

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, base_dir: Path) -> AgentConfig:
        """Build a config from parsed TOML values; relative paths resolve against ``base_dir``.

        Raises:
            AgentConfigError: an unknown key, a missing required key, or a value of the wrong type
                or out of range. Files are not looked at (that is :meth:`check`).
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise AgentConfigError(f"unknown key(s) {', '.join(unknown)}; the known keys are "
                                   f"{', '.join(fields)}")
        required = [name for name, f in fields.items()
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise AgentConfigError(f"missing required key(s) {', '.join(missing)}")
        parsed: dict[str, Any] = {}
        for name, value in values.items():
            parsed[name] = _PARSERS[name](name, value, base_dir)
        for name in ("signing_key", "state_dir"):  # defaults are relative to the config file too
            parsed.setdefault(name, _path(name, str(fields[name].default), base_dir))
        return cls(**parsed)

    def check(self) -> None:
        """Check the values against the world: files, key types, TLS policy, CUDA.

        Raises:
            AgentConfigError: naming the first thing that is wrong and what to do about it.
        """
        split_address(self.superlink)  # raises on a malformed address
        if self.insecure and not is_loopback(self.superlink_host):
            raise AgentConfigError(
                f"TLS is required to reach the SuperLink at {self.superlink}: set root_cert to the coordinator's "
                "CA certificate (without it the SuperNode runs --insecure, allowed on 127.0.0.1/localhost only)")
        if not self.base.is_dir():
            raise AgentConfigError(f"base: {self.base} is not a directory (a checkpoint directory is expected)")
        if not (self.base / "config.json").is_file():
            raise AgentConfigError(f"base: {self.base} holds no config.json; is it a checkpoint directory?")
        _check_file("data", self.data)
        _check_file("signing_key", self.signing_key, hint="create one with: fedtune agent keygen --dir keys")
        _check_signing_key(self.signing_key)
        if self.root_cert is not None:
            _check_file("root_cert", self.root_cert)
        if self.node_auth_key is not None:
            _check_file("node_auth_key", self.node_auth_key, hint="create one with: fedtune agent keygen --dir keys")
            _check_node_key(self.node_auth_key)
        if self.state_dir.exists() and not self.state_dir.is_dir():
            raise AgentConfigError(f"state_dir: {self.state_dir} exists and is not a directory")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise AgentConfigError("device = \"cuda\" but torch sees no CUDA device here "
                                       f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                                       "set device = \"cpu\" or install a CUDA build of torch")

    def key_warnings(self) -> list[str]:
        """A line if the node key is accessible by group or others. (The receipt key is refused
        outright by :meth:`check`, since the daemon would refuse to load it.)"""
        key = self.node_auth_key
        if key is None or not key.exists():
            return []
        mode = key.stat().st_mode
        if not mode & (stat.S_IRWXG | stat.S_IRWXO):
            return []
        return [f"node_auth_key {key} is accessible by group or others (mode {mode & 0o777:o}); run: chmod 600 {key}"]


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``"[v6]:port"`` for IPv6) -> (host, port).

    Raises:
        AgentConfigError: not of that form, or the port is not in 1..65535.
    """
    if "://" in address:
        raise AgentConfigError(f"superlink: {address!r} must be host:port, without a URL scheme")
    host, sep, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentConfigError(f"superlink: {address!r} is not host:port (e.g. coordinator.example.org:9092)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_file(name: str, path: Path, hint: str = "") -> None:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise AgentConfigError(f"{name}: {path} {what}" + (f"; {hint}" if hint else ""))


def _check_signing_key(path: Path) -> None:
    from fedtune.compliance.signing import KeyFormatError, load_private_key

    try:
        load_private_key(path)  # the daemon's own check: Ed25519, not group/world accessible
    except KeyFormatError as e:
        raise AgentConfigError(f"signing_key: {e}") from e


def _check_node_key(path: Path) -> None:
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise AgentConfigError(f"node_auth_key: {path} is not an unencrypted OpenSSH private key ({e})") from e
    if not (isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)):
        raise AgentConfigError(f"node_auth_key: {path} holds a {type(key).__name__}; Flower needs ECDSA P-384 "
                               "(fedtune agent keygen, or ssh-keygen -t ecdsa -b 384 -N \"\")")


# --- value parsers: (key, raw TOML value, config directory) -> typed value ---------------------


def _text(name: str, value: Any, _base: Path) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AgentConfigError(f"{name} must be a non-empty string, not {value!r}")
    return value.strip()


def _client_id(name: str, value: Any, base: Path) -> str:
    client_id = _text(name, value, base)
    if not CLIENT_ID.fullmatch(client_id):
        raise AgentConfigError(f"{name} {client_id!r} is not a client id (letters, digits, '.', '_', '-'; "
                               "at most 64; the id the coordinator registered this site under)")
    return client_id


def _path(name: str, value: Any, base: Path) -> Path:
    path = Path(_text(name, value, base)).expanduser()
    return path if path.is_absolute() else (base / path)


def _positive(name: str, value: Any, _base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise AgentConfigError(f"{name} must be a positive number, not {value!r}")
    return float(value)


def _delta(name: str, value: Any, base: Path) -> float:
    delta = _positive(name, value, base)
    if delta >= 1:
        raise AgentConfigError(f"{name} must be below 1 (typically 1e-5 or less), not {value!r}")
    return delta


def _device(name: str, value: Any, base: Path) -> str:
    device = _text(name, value, base)
    if device not in DEVICES:
        raise AgentConfigError(f"{name} must be one of {', '.join(DEVICES)}, not {value!r}")
    return device


def _port(name: str, value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise AgentConfigError(f"{name} must be a port number (1-65535), not {value!r}")
    return value


def _threads(name: str, value: Any, _base: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1024:
        raise AgentConfigError(f"{name} must be a number of CPU threads (1-1024), not {value!r}")
    return value


def _pull_interval(name: str, value: Any, _base: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.05 <= value <= 3:
        raise AgentConfigError(f"{name} must be 0.05 to 3 seconds (each idle site asks the SuperLink 1/{name} "
                               f"times a second), not {value!r}")
    return float(value)


def _superlink(name: str, value: Any, base: Path) -> str:
    address = _text(name, value, base)
    split_address(address)
    return address


_PARSERS = {
    "client_id": _client_id, "superlink": _superlink, "base": _path, "data": _path, "budget_epsilon": _positive,
    "root_cert": _path, "signing_key": _path, "node_auth_key": _path, "dataset_id": _text,
    "budget_delta": _delta, "device": _device, "state_dir": _path, "clientappio_port": _port,
    "threads": _threads, "pull_interval_s": _pull_interval,
}
