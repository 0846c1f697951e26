"""The demo's processes: the coordinator (``fedtune coordinator serve --config``) and one agent per
site (``fedtune agent run --config``), each started from the config files an operator would write
(``docs/deploy.md``), on 127.0.0.1 with TLS and Flower node authentication.

Every child runs in its own session, so Ctrl-C reaches only the demo, which stops the agents
first (each stops its SuperNode, then its daemon) and the coordinator last (admin API, job
supervisor, fleet gateway, SuperLink): the store sees at most an aborted round in flight, which
the round engine never commits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, table: str, values: dict) -> Path:
    """A flat ``[table]`` TOML file (the demo's coordinator.toml / agent.toml)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"[{table}]"] + [f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def fedtune_bin() -> str:
    path = Path(sys.executable).parent / "fedtune"
    return str(path) if path.exists() else "fedtune"


@dataclass
class Child:
    """A child process in its own session, its log file, and how to stop it."""

    name: str
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Child:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as f:
            popen = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        return cls(name, popen, log)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout_s: float) -> None:
        """Wait for the child; past ``timeout_s`` kill its whole process group."""
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def tail(self, chars: int = 2500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Stack:
    """The running children; :meth:`stop` stops one-off workers, agents, then the coordinator."""

    coordinator: Child | None = None
    agents: list[Child] = field(default_factory=list)
    workers: list[Child] = field(default_factory=list)  # one-off runs (train-local): they exit on their own

    def check(self) -> None:
        """Raise if a child died (its log tail is in the message)."""
        for child in ([self.coordinator] if self.coordinator else []) + self.agents:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited with {child.popen.returncode}; log {child.log}:\n"
                                   f"{child.tail()}")

    def stop_agents(self) -> None:
        for child in self.agents:
            child.signal(signal.SIGTERM)
        for child in self.agents:
            child.wait(60)

    def stop(self) -> None:
        """Workers and agents first, then the coordinator; a second Ctrl-C while waiting kills every child at once."""
        try:
            for child in self.workers:
                child.signal(signal.SIGTERM)
            for child in self.workers:
                child.wait(30)
            self.stop_agents()
            if self.coordinator is not None:
                self.coordinator.signal(signal.SIGTERM)
                self.coordinator.wait(60)
        except KeyboardInterrupt:
            for child in self.workers + self.agents + ([self.coordinator] if self.coordinator else []):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.popen.pid, signal.SIGKILL)
            raise


def wait_until(what: str, check, timeout_s: float, stack: Stack, poll_s: float = 1.0):
    """Poll ``check()`` until it returns something truthy; raise if a child dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stack.check()
        value = check()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def healthy(url: str, verify) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=3, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False
