"""`fedtune agent keygen` and `fedtune agent run --config agent.toml` (client_agent/config.py).

Unit tests: loading agent.toml (paths, defaults, refusals) and the key files keygen writes, read
back with the `cryptography` parsers and the coordinator's public-key decoder. End to end
(`e2e`): a real SuperLink on 127.0.0.1 and `fedtune agent run` as a subprocess: it connects, stops
cleanly on SIGINT, and stops the other child when one dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedtune.cli import app
from fedtune.client_agent.config import AgentConfig, AgentConfigError
from fedtune.compliance.signing import decode_public_key, encode_public_key, load_private_key

runner = CliRunner()
PRIVATE_FILES = ("receipt.pem", "node-key")


def _keygen(key_dir: Path, *extra: str):
    return runner.invoke(app, ["agent", "keygen", "--dir", str(key_dir), *extra])


@pytest.fixture
def site(tmp_path):
    """A site directory: keys/ (keygen), base/ (config.json only: loading is not tested here), data."""
    root = tmp_path / "site"
    assert _keygen(root / "keys").exit_code == 0
    (root / "base").mkdir()
    (root / "base" / "config.json").write_text("{}")
    (root / "cases.jsonl").write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    return root


def _write(site: Path, text: str) -> Path:
    path = site / "agent.toml"
    path.write_text(text)
    return path


MINIMAL = """\
client_id = "bank-a"
superlink = "127.0.0.1:9092"
base = "base"
data = "cases.jsonl"
budget_epsilon = 8
"""


# --- agent.toml ------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_file_and_defaults_apply(site, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the site directory: paths must not depend on the cwd
    cfg = AgentConfig.from_toml(_write(site, MINIMAL))
    assert cfg.base == site / "base" and cfg.data == site / "cases.jsonl"
    assert cfg.signing_key == site / "keys" / "receipt.pem" and cfg.state_dir == site / "state"
    assert cfg.dataset == "cases" and cfg.budget_delta == 1e-5 and cfg.device == "cpu"
    assert cfg.budget_epsilon == 8.0 and isinstance(cfg.budget_epsilon, float)
    assert cfg.root_cert is None and cfg.insecure and cfg.node_auth_key is None and cfg.clientappio_port is None


def test_an_agent_table_reads_like_top_level_keys(site):
    extra = 'node_auth_key = "keys/node-key"\ndataset_id = "cases-2024"\nbudget_delta = 1e-6\nclientappio_port = 9500\n'
    cfg = AgentConfig.from_toml(_write(site, "[agent]\n" + MINIMAL + extra))
    assert cfg.node_auth_key == site / "keys" / "node-key"
    assert cfg.dataset == "cases-2024" and cfg.budget_delta == 1e-6 and cfg.clientappio_port == 9500


def test_keys_inside_and_outside_the_agent_table_are_refused(site):
    with pytest.raises(AgentConfigError, match="in the \\[agent\\] table or none"):
        AgentConfig.from_toml(_write(site, 'device = "cpu"\n[agent]\n' + MINIMAL))


def test_an_unknown_key_is_refused_listing_the_known_ones(site):
    with pytest.raises(AgentConfigError) as e:
        AgentConfig.from_toml(_write(site, MINIMAL + "budget_epsilom = 3\n"))
    message = str(e.value)
    assert "budget_epsilom" in message and "known keys" in message
    for known in ("client_id", "superlink", "root_cert", "signing_key", "node_auth_key", "budget_delta", "device",
                  "state_dir", "clientappio_port"):
        assert known in message


@pytest.mark.parametrize("key", ["client_id", "superlink", "base", "data", "budget_epsilon"])
def test_a_missing_required_key_is_named(site, key):
    text = "".join(line + "\n" for line in MINIMAL.splitlines() if not line.startswith(key))
    with pytest.raises(AgentConfigError, match=f"missing required key\\(s\\) {key}$"):
        AgentConfig.from_toml(_write(site, text))


@pytest.mark.parametrize("superlink", ["10.0.0.5:9092", "coordinator.example.org:9092", "[2001:db8::1]:9092"])
def test_insecure_to_a_non_loopback_superlink_is_refused(site, superlink):
    with pytest.raises(AgentConfigError, match="TLS is required"):
        AgentConfig.from_toml(_write(site, MINIMAL.replace("127.0.0.1:9092", superlink)))


@pytest.mark.parametrize("superlink", ["localhost:9092", "127.0.0.1:1", "[::1]:9092"])
def test_insecure_on_loopback_is_allowed(site, superlink):
    assert AgentConfig.from_toml(_write(site, MINIMAL.replace("127.0.0.1:9092", superlink))).insecure


def test_tls_to_a_remote_superlink_needs_the_ca_file_to_exist(site):
    text = MINIMAL.replace("127.0.0.1", "coordinator.example.org") + 'root_cert = "keys/ca.pem"\n'
    with pytest.raises(AgentConfigError, match=r"root_cert: .*ca\.pem does not exist"):
        AgentConfig.from_toml(_write(site, text))
    (site / "keys" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")  # contents are Flower's to check
    cfg = AgentConfig.from_toml(site / "agent.toml")
    assert not cfg.insecure and cfg.superlink_host == "coordinator.example.org"


@pytest.mark.parametrize("superlink", ["https://coordinator:9092", "coordinator", "coordinator:0", "host:port"])
def test_a_malformed_superlink_address_is_refused(site, superlink):
    with pytest.raises(AgentConfigError, match="superlink"):
        AgentConfig.from_toml(_write(site, MINIMAL.replace("127.0.0.1:9092", superlink)))


def test_cuda_is_refused_when_torch_sees_no_gpu(site, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AgentConfigError, match='device = "cuda" but torch sees no CUDA device'):
        AgentConfig.from_toml(_write(site, MINIMAL + 'device = "cuda"\n'))


@pytest.mark.parametrize(("line", "match"), [
    ("budget_epsilon = -1", "budget_epsilon must be a positive number"),
    ("budget_epsilon = true", "budget_epsilon must be a positive number"),
    ("budget_delta = 1.5", "budget_delta must be below 1"),
    ('device = "tpu"', "device must be one of cpu, cuda"),
    ("clientappio_port = 70000", "clientappio_port must be a port number"),
    ("threads = 0", "threads must be a number of CPU threads"),
    ("pull_interval_s = 5", "pull_interval_s must be 0.05 to 3 seconds"),
    ("pull_interval_s = 0", "pull_interval_s must be 0.05 to 3 seconds"),
    ('client_id = "bank a"', "is not a client id"),
])
def test_bad_values_are_refused_by_name(site, line, match):
    key = line.split(" = ")[0]
    text = "".join(f"{l}\n" for l in MINIMAL.splitlines() if not l.startswith(key)) + line + "\n"
    with pytest.raises(AgentConfigError, match=match):
        AgentConfig.from_toml(_write(site, text))


def test_missing_files_are_named(site):
    (site / "cases.jsonl").unlink()
    with pytest.raises(AgentConfigError, match=r"data: .*cases\.jsonl does not exist"):
        AgentConfig.from_toml(_write(site, MINIMAL))


def test_a_readable_receipt_key_is_refused_and_a_readable_node_key_warned_about(site):
    path = _write(site, MINIMAL + 'node_auth_key = "keys/node-key"\n')
    (site / "keys" / "node-key").chmod(0o640)
    cfg = AgentConfig.from_toml(path)
    (warning,) = cfg.key_warnings()
    assert "node-key" in warning and "mode 640" in warning and "chmod 600" in warning
    (site / "keys" / "receipt.pem").chmod(0o644)  # the daemon would refuse to load it: refused up front
    with pytest.raises(AgentConfigError, match="signing_key: .*accessible by group or others"):
        AgentConfig.from_toml(path)


def test_a_node_key_of_the_wrong_kind_is_refused(site):
    (site / "keys" / "other-key").write_bytes((site / "keys" / "receipt.pem").read_bytes())
    os.chmod(site / "keys" / "other-key", 0o600)
    with pytest.raises(AgentConfigError, match="node_auth_key: .*not an unencrypted OpenSSH private key"):
        AgentConfig.from_toml(_write(site, MINIMAL + 'node_auth_key = "keys/other-key"\n'))


def test_agent_run_reports_a_config_error_without_starting_anything(site):
    result = runner.invoke(app, ["agent", "run", "--config", str(_write(site, MINIMAL + "colour = 1\n"))])
    assert result.exit_code == 2 and "unknown key(s) colour" in result.output
    assert not (site / "state").exists()


# --- keygen ----------------------------------------------------------------------------------


def test_keygen_writes_both_key_pairs_and_the_registration_body(tmp_path):
    key_dir = tmp_path / "keys"
    result = _keygen(key_dir, "--client-id", "bank-a", "--org", "ORG-17")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in key_dir.iterdir()) == ["node-key", "node-key.pub", "receipt.pem", "receipt.pub"]
    for name in PRIVATE_FILES:
        assert (key_dir / name).stat().st_mode & 0o777 == 0o600
    assert key_dir.stat().st_mode & 0o777 == 0o700
    assert "never leave this site" in result.output

    # Receipt key: the public line is what POST /clients takes, and belongs to the private key.
    receipt = load_private_key(key_dir / "receipt.pem")
    public_text = (key_dir / "receipt.pub").read_text()
    assert public_text.endswith("\n") and public_text.count("\n") == 1
    assert encode_public_key(decode_public_key(public_text.strip())) == encode_public_key(receipt)

    # Node key: OpenSSH ECDSA P-384, both halves (what `flwr supernode register` reads).
    node_public = serialization.load_ssh_public_key((key_dir / "node-key.pub").read_bytes())
    node_private = serialization.load_ssh_private_key((key_dir / "node-key").read_bytes(), password=None)
    assert isinstance(node_public, ec.EllipticCurvePublicKey) and isinstance(node_public.curve, ec.SECP384R1)
    assert node_private.public_key().public_numbers() == node_public.public_numbers()

    body = json.loads(result.output[result.output.index("\n{") + 1:])
    assert body == {"id": "bank-a", "org": "ORG-17", "name": "bank-a", "public_key": public_text.strip(),
                    "node_public_key": (key_dir / "node-key.pub").read_text().strip()}
    assert public_text.strip() in result.output.split("\n{")[0]  # printed before the body, too


def test_keygen_never_overwrites_a_key(tmp_path):
    key_dir = tmp_path / "keys"
    assert _keygen(key_dir).exit_code == 0
    before = {p.name: p.read_bytes() for p in key_dir.iterdir()}
    again = _keygen(key_dir)
    assert again.exit_code == 2 and "receipt.pem exists" in again.output
    assert {p.name: p.read_bytes() for p in key_dir.iterdir()} == before

    # Any one of the four files blocks it, and nothing is written.
    other = tmp_path / "other"
    other.mkdir()
    (other / "node-key.pub").write_text("ecdsa-sha2-nistp384 AAAA old\n")
    refused = _keygen(other)
    assert refused.exit_code == 2 and "node-key.pub exists" in refused.output
    assert [p.name for p in other.iterdir()] == ["node-key.pub"]


# --- `fedtune agent run` as a real process ---------------------------------------------------


def _children(pid: int) -> list[int]:
    """``pid``'s descendants, from /proc/<pid>/task/*/children."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [grand for child in found for grand in (child, *_children(child))]


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/<pid>/stat (tells a pid from a reused one); None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces and parentheses
    return None if fields[0] == "Z" else fields[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A real SuperLink (insecure, 127.0.0.1) and a tiny base, shared by the e2e tests."""
    from fedtune.coordinator.superlink import free_port, start_superlink, wait_for_port

    root = tmp_path_factory.mktemp("superlink")
    port = free_port()
    link = start_superlink(root / "superlink", port=port, env_extra={})
    base = root / "base"
    assert runner.invoke(app, ["model", "init-tiny", str(base)]).exit_code == 0
    try:
        wait_for_port(port, proc=link)
        yield f"127.0.0.1:{port}", base
    finally:
        link.stop()


def _start_site(tmp_path: Path, superlink: tuple[str, Path]) -> tuple[subprocess.Popen, Path, Path]:
    address, base = superlink
    site = tmp_path / "site"
    assert _keygen(site / "keys").exit_code == 0
    (site / "cases.jsonl").write_text("".join(
        json.dumps({"prompt": f"case {i}:", "completion": " ok"}) + "\n" for i in range(8)))
    config = _write(site, MINIMAL.replace("127.0.0.1:9092", address).replace('"base"', f'"{base}"'))
    out = site / "agent.out"
    with out.open("wb") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "fedtune"), "agent", "run", "--config", str(config)],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return proc, site, out


def _wait_for(line: str, proc: subprocess.Popen, out: Path, timeout_s: float = 90.0) -> dict[int, str]:
    """Wait until the agent prints ``line``; returns its descendants (pid -> start time) at that moment."""
    deadline = time.monotonic() + timeout_s
    while line not in out.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"agent never printed {line!r} (exit {proc.poll()}):\n{out.read_text(errors='replace')}")
        time.sleep(0.3)
    return {pid: start for pid in _children(proc.pid) if (start := _start_time(pid)) is not None}


def _wait_exit(proc: subprocess.Popen, out: Path, timeout_s: float, after: str) -> tuple[int, str]:
    """The agent's exit code and output; fails the test if it is still running after ``timeout_s``."""
    try:
        return proc.wait(timeout=timeout_s), out.read_text(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"agent still running {timeout_s} s after {after}:\n{out.read_text(errors='replace')}")


def _assert_all_gone(children: dict[int, str]) -> None:
    left = [f"{pid} {_cmdline(pid)}" for pid, start in children.items() if _start_time(pid) == start]
    assert not left, f"processes left behind: {left}"


@pytest.mark.e2e
def test_agent_run_connects_and_stops_cleanly_on_sigint(tmp_path, superlink):
    t0 = time.monotonic()
    proc, site, out = _start_site(tmp_path, superlink)
    children = _wait_for("connected to", proc, out)
    commands = [_cmdline(pid) for pid in children]
    assert any("fedtune.client_agent.daemon" in c for c in commands), commands
    assert any("fedtune.client_agent.flower_node" in c for c in commands), commands  # SuperNode, warm ClientApp
    daemon = next(pid for pid, c in zip(children, commands, strict=True) if "fedtune.client_agent.daemon" in c)
    environ = Path(f"/proc/{daemon}/environ").read_bytes().split(b"\0")
    expected = os.environ.get("FEDTUNE_AGENT_THREADS") or str(os.cpu_count())  # no `threads` key: every core
    assert f"FEDTUNE_AGENT_THREADS={expected}".encode() in environ
    assert "SuperNode ID:" in (site / "state" / "supernode.log").read_text(errors="replace")

    t_stop = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, text = _wait_exit(proc, out, 20, "SIGINT")
    assert code == 0, text
    assert text.index("loading base") < text.index("daemon ready") < text.index("connected to") < text.index("stopped")
    _assert_all_gone(children)
    print(f"agent run: connected after {t_stop - t0:.1f} s, stopped in {time.monotonic() - t_stop:.1f} s")


@pytest.mark.e2e
def test_agent_run_stops_the_supernode_and_fails_when_the_daemon_dies(tmp_path, superlink):
    proc, _site, out = _start_site(tmp_path, superlink)
    children = _wait_for("SuperNode started", proc, out)  # supervising from here on
    (daemon,) = [pid for pid in children if "fedtune.client_agent.daemon" in _cmdline(pid)]
    os.kill(daemon, signal.SIGKILL)
    code, text = _wait_exit(proc, out, 30, "its daemon died")
    assert code == 1, text
    assert f"the daemon exited on its own (code {-signal.SIGKILL})" in text
    assert "--- daemon.log" in text and "--- supernode.log" in text  # the log tails
    _assert_all_gone(children)
