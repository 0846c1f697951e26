"""The fleet gateway (coordinator/fleet_gateway.py): only the Fleet API crosses it.

Without Flower: a gateway in front of a closed port answers 404 and 413 itself (whatever it forwarded
would come back 502). With Flower (e2e): ``fedtune coordinator serve`` with TLS and SuperNode
authentication, a real process tree. Through its fleet port the Control and runtime APIs are 404 and
the SuperLink's access log shows they never arrived, while on its loopback port they answer; a
registered ``flower-supernode`` comes online through the gateway and an unregistered one is
refused; an over-long body is refused before the SuperLink; SIGTERM stops the whole tree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from fedtune.coordinator.fleet_gateway import MAX_FLEET_BODY_BYTES, start_fleet_gateway
from fedtune.coordinator.superlink import free_port, list_supernodes, register_supernode, start_superlink, venv_bin
from fedtune.coordinator.tls import write_self_signed_ca_and_server_cert

REFUSED = [("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
           ("POST", "/v1/runtime/acquire-task"), ("GET", "/v1/fleet/send-node-heartbeat"),
           ("PUT", "/v1/fleet/send-node-heartbeat"), ("GET", "/docs"), ("GET", "/health"), ("POST", "/"),
           ("POST", "/v1/fleet/"), ("POST", "/v1/fleet/Send-Node-Heartbeat"), ("POST", "/v1/fleet/a/b"),
           ("POST", "/v1/fleet/%2e%2e/control/list-runs"), ("POST", "/v1/fleetx/send-node-heartbeat")]
PROTOBUF = {"content-type": "application/protobuf"}


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- the gateway alone: nothing listens behind it ---------------------------------------------------------

@pytest.fixture
def lone_gateway():
    gateway = start_fleet_gateway(host="127.0.0.1", port=0, superlink_port=free_port(), max_body_bytes=1024)
    yield httpx.Client(base_url=gateway.url(), timeout=10)
    gateway.stop()


def test_refused_requests_never_leave_the_gateway(lone_gateway):
    for method, path in REFUSED:
        assert lone_gateway.request(method, path, headers=PROTOBUF).status_code == 404, (method, path)
    forwarded = lone_gateway.post("/v1/fleet/send-node-heartbeat", content=b"", headers=PROTOBUF)
    assert forwarded.status_code == 502  # it did try: the SuperLink is down


def test_bodies_over_the_bound_get_413(lone_gateway):
    assert lone_gateway.post("/v1/fleet/push-object", content=b"x" * 1025).status_code == 413
    chunked = iter([b"x" * 600, b"x" * 600])  # no content-length: counted while read
    assert lone_gateway.post("/v1/fleet/push-object", content=chunked).status_code == 413
    assert lone_gateway.post("/v1/fleet/push-object", content=b"x" * 1024).status_code == 502  # within: forwarded


def test_the_default_bound_is_checked_on_the_declared_length():
    gateway = start_fleet_gateway(host="127.0.0.1", port=0, superlink_port=free_port())
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
            s.sendall(f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Length: {MAX_FLEET_BODY_BYTES + 1}\r\n\r\n".encode())
            assert s.recv(64).startswith(b"HTTP/1.1 413")  # answered before any of the body was sent
    finally:
        gateway.stop()


def test_a_taken_port_fails_in_the_caller():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(RuntimeError, match="cannot listen"):
            start_fleet_gateway(host="127.0.0.1", port=taken.getsockname()[1], superlink_port=free_port())


def test_superlink_tls_must_name_loopback_and_supernode_auth_needs_tls(tmp_path):
    tls = write_self_signed_ca_and_server_cert(tmp_path / "tls", ["coordinator.example.org"])
    with pytest.raises(ValueError, match="127.0.0.1"):
        start_superlink(tmp_path / "a", port=free_port(), env_extra={}, tls=tls)
    with pytest.raises(ValueError, match="needs TLS"):
        start_superlink(tmp_path / "b", port=free_port(), env_extra={}, supernode_auth=True)


# --- `fedtune coordinator serve` with TLS and SuperNode authentication (real Flower processes) --------------

@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    root = tmp_path_factory.mktemp("coordinator")
    tls = write_self_signed_ca_and_server_cert(root / "tls", ["127.0.0.1"])
    api_port, fleet_port, superlink_port = free_port(), free_port(), free_port()
    (root / "coordinator.toml").write_text(f"""\
[coordinator]
data_dir = "data"
database_url = "sqlite:///{root / 'coordinator.db'}"
port = {api_port}
fleet_port = {fleet_port}
superlink_port = {superlink_port}
tls_ca_cert = "tls/ca.pem"
tls_cert = "tls/server.pem"
tls_key = "tls/server.key"
supernode_auth = true
""")
    link_log = root / "data" / "superlink" / "superlink.log"

    def logs() -> str:
        return "\n-----\n".join(p.read_text(errors="replace")[-4000:] for p in (root / "serve.log", link_log)
                                if p.exists())

    verify = ssl.create_default_context(cafile=tls.ca_cert)
    api = httpx.Client(base_url=f"https://127.0.0.1:{api_port}", verify=verify, timeout=10)

    def healthy() -> bool:
        try:
            return api.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    with open(root / "serve.log", "wb") as log:
        serve = subprocess.Popen([venv_bin("fedtune"), "coordinator", "serve", "--config",
                                  str(root / "coordinator.toml")],
                                 cwd=root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 90
        while not healthy():
            if serve.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the admin API is not up over HTTPS (serve: {serve.poll()})\n{logs()}")
            time.sleep(0.5)
        yield SimpleNamespace(root=root, tls=tls, verify=verify, serve=serve, api=api, fleet_port=fleet_port,
                              superlink_port=superlink_port, link_log=link_log, logs=logs,
                              flwr_home=root / "data" / "flwr-home", connection="fedtune",
                              gateway=httpx.Client(base_url=f"https://127.0.0.1:{fleet_port}", verify=verify,
                                                   timeout=10))
    finally:
        if serve.poll() is None:
            serve.terminate()
            serve.wait(timeout=60)


def _access_lines(c, path: str, since: int = 0) -> list[str]:
    """The SuperLink's access-log lines for ``path`` (``... "POST <path> HTTP/1.1" <status>``) from
    character ``since`` on."""
    return [line for line in c.link_log.read_text(errors="replace")[since:].splitlines() if f" {path} HTTP/" in line]


def _log_end(c) -> int:
    return len(c.link_log.read_text(errors="replace"))


def _await_access(c, path: str, since: int = 0, *, status: int | None = None, timeout_s: float = 10.0,
                  logs=None) -> list[str]:
    """:func:`_access_lines` (those with ``status``) once there is one; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in _access_lines(c, path, since) if status is None or line.endswith(f'" {status}')]
        if lines:
            return lines
        if time.monotonic() > deadline:
            pytest.fail(f"no {path} ({status}) in the SuperLink's access log after {timeout_s} s\n{(logs or c.logs)()}")
        time.sleep(0.3)


@pytest.mark.e2e
def test_only_the_fleet_api_reaches_the_superlink(coordinator):
    c = coordinator
    since = _log_end(c)
    for method, path in REFUSED:
        assert c.gateway.request(method, path, headers=PROTOBUF).status_code == 404, (method, path)
    # a forwarded request is logged before its answer comes back, so the refused ones are absent now
    assert not any(_access_lines(c, path, since) for _, path in REFUSED), c.logs()

    # on loopback the SuperLink's Control API answers (and its access log records it); the client closes its
    # connection: Flower's uvicorn would wait for an idle TLS one at shutdown (see test_sigterm_...)
    with httpx.Client(base_url=f"https://127.0.0.1:{c.superlink_port}", verify=c.verify, timeout=10) as direct:
        assert direct.post("/v1/control/list-runs", content=b"", headers=PROTOBUF).status_code == 200
    _await_access(c, "/v1/control/list-runs", since, status=200)

    # a Fleet call is forwarded and the SuperLink's answer comes back whole: unsigned, it is refused;
    # the client's own X-Forwarded-For does not pass (the SuperLink's uvicorn trusts it from loopback)
    r = c.gateway.post("/v1/fleet/send-node-heartbeat", content=b"",
                       headers={**PROTOBUF, "X-Forwarded-For": "203.0.113.7"})
    assert (r.status_code, r.headers["content-type"]) == (401, "application/json"), r.text
    assert r.json() == {"detail": "Invalid SuperNode authentication"}
    _await_access(c, "/v1/fleet/send-node-heartbeat", since, status=401)
    assert "203.0.113.7" not in c.link_log.read_text(errors="replace")


@pytest.mark.e2e
def test_admin_api_is_https_only(coordinator):
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{coordinator.api.base_url.port}/healthz", timeout=5)


@pytest.mark.e2e
def test_registered_supernode_comes_online_through_the_gateway_unregistered_is_refused(coordinator):
    from fedtune.client_agent.supernode import start_supernode, write_supernode_auth_key

    c = coordinator
    where = {"flwr_home": c.flwr_home, "connection": c.connection, "cwd": c.root}
    nodes: dict[str, subprocess.Popen] = {}

    def start(site: str) -> None:  # both dial the gateway (fleet_port), never the SuperLink's own port
        nodes[site] = start_supernode(superlink_port=c.fleet_port, endpoint_file=c.root / site / "agent.json",
                                      state_dir=c.root / site, flwr_home=c.root / site / "flwr-home",
                                      root_cert=c.tls.ca_cert, auth_private_key=c.root / site / "node-key")

    def logs() -> str:
        return c.logs() + "".join(f"\n----- {site}\n" + (c.root / site / "supernode.log").read_text(errors="replace")
                                  [-3000:] for site in nodes)

    write_supernode_auth_key(c.root / "site-b" / "node-key")  # never registered
    public = write_supernode_auth_key(c.root / "site-a" / "node-key")
    try:
        start("site-b")  # starts while site-a's key is registered (flwr CLI calls are seconds each)
        node_id = register_supernode(public, **where)
        start("site-a")
        _await_access(c, "/v1/fleet/activate-node", status=200, timeout_s=60, logs=logs)
        try:
            assert nodes["site-b"].wait(timeout=60) != 0, logs()
        except subprocess.TimeoutExpired:
            pytest.fail(f"the unregistered SuperNode is still running\n{logs()}")
        assert nodes["site-a"].poll() is None, logs()
        assert {int(n["node-id"]): n["status"] for n in list_supernodes(**where)} == {node_id: "online"}, logs()
    finally:
        for proc in nodes.values():
            proc.terminate()
        for proc in nodes.values():
            proc.wait(timeout=30)


@pytest.mark.e2e
def test_oversized_body_is_refused_before_the_superlink(coordinator):
    c = coordinator
    gateway = start_fleet_gateway(host="127.0.0.1", port=0, superlink_port=c.superlink_port, tls=c.tls,
                                  max_body_bytes=4096)
    since = _log_end(c)
    try:
        client = httpx.Client(base_url=gateway.url(), verify=c.verify, timeout=10)
        assert client.post("/v1/fleet/get-run", content=b"\0" * 4097, headers=PROTOBUF).status_code == 413
        assert client.post("/v1/fleet/get-run", content=iter([b"\0" * 3000] * 2), headers=PROTOBUF).status_code == 413
        within = client.post("/v1/fleet/get-run", content=b"\0" * 4096, headers=PROTOBUF)
        assert within.status_code not in (404, 413, 502), within.text  # the SuperLink's own answer
        assert len(_await_access(c, "/v1/fleet/get-run", since)) == 1, c.logs()  # only the one within the bound
    finally:
        gateway.stop()


@pytest.mark.e2e
def test_sigterm_stops_the_whole_tree(coordinator):
    """Last in this module: it stops the coordinator the tests above share. Its admin API and fleet gateway
    each hold an idle TLS keep-alive connection from this module's clients: closing those must not wait for
    a close_notify the clients never send (30 s each)."""
    c = coordinator
    assert c.api.get("/healthz").status_code == 200 and c.gateway.post("/v1/fleet/get-run").status_code == 415
    c.serve.send_signal(signal.SIGTERM)
    try:
        assert c.serve.wait(timeout=25) == 0, c.logs()
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still running 25 s after SIGTERM\n{c.logs()}")
    for port in (c.superlink_port, c.fleet_port, c.api.base_url.port):
        assert not _port_open(port), f"port {port} still open after serve exited\n{c.logs()}"


def test_a_fleet_request_that_never_finishes_is_closed():
    """The port every site reaches: a partial request line is closed after the read timeout."""
    gateway = start_fleet_gateway(host="127.0.0.1", port=0, superlink_port=free_port(), read_timeout_s=1.0)
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/fleet/push-messages HTTP/1.1\r\nHost: x\r\nContent-Len")
            started = time.monotonic()
            sock.settimeout(5)
            with contextlib.suppress(ConnectionError):  # a reset is a close too
                assert sock.recv(4096) == b""
            assert 0.8 <= time.monotonic() - started < 3.0
    finally:
        gateway.stop()
