"""The Flower ClientApp: a thin forwarder to the local agent daemon (``daemon.py``).

It runs warm in the SuperNode's process (``flower_node.py``; Flower's own executor would start a fresh
``flwr-clientapp`` process per message, which works too) and holds nothing: it reads
the daemon's endpoint file named by the SuperNode's ``agent-endpoint`` node-config value, forwards
the message content as Flower protobuf bytes, and turns the daemon's answer into the reply. It
imports neither torch nor the model (a per-message process should start fast): the keys and the
protobuf hop come from ``fedtune.compliance.wire``, which loads torch only when tensors are read.

Messages: ``query`` with config ``fedtune.hello`` -> ``{"client_id", "protocol_version",
"base_digest"}``; ``train`` -> the daemon's signed TrainReply or Refusal.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune.compliance.wire import HELLO_KEY, recorddict_from_bytes, recorddict_to_bytes

ENDPOINT_CONFIG_KEY = "agent-endpoint"
DEFAULT_TRAIN_TIMEOUT_S = 3600.0

app = ClientApp()


class AgentUnavailable(RuntimeError):
    """The local agent daemon cannot be reached or refused the request."""


def _endpoint(context: Context) -> tuple[str, str]:
    path = context.node_config.get(ENDPOINT_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise AgentUnavailable(f"SuperNode has no node-config {ENDPOINT_CONFIG_KEY!r} (the agent endpoint file); "
                               f"start it with --node-config \"{ENDPOINT_CONFIG_KEY}='/path/agent-endpoint.json'\"")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise AgentUnavailable(f"cannot read the agent endpoint file {path}: {e}") from e
    return data["url"], data["token"]


def _call(context: Context, method: str, route: str, body: bytes | None = None,
          timeout: float = 30.0) -> bytes:
    url, token = _endpoint(context)
    request = urllib.request.Request(url + route, data=body, method=method,
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        raise AgentUnavailable(f"agent refused {route}: HTTP {e.code} {e.read()[:500]!r}") from e
    except OSError as e:
        raise AgentUnavailable(f"agent at {url} unreachable: {e}") from e


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Discovery: which registered client this node's agent is."""
    hello = json.loads(_call(context, "GET", "/v1/hello"))
    record = ConfigRecord({"client_id": str(hello["client_id"]), "protocol_version": int(hello["protocol_version"]),
                           "base_digest": str(hello["base_digest"])})
    return Message(RecordDict({HELLO_KEY: record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Forward a train message to the agent daemon; reply with its signed answer."""
    timeout = float(context.node_config.get("agent-train-timeout-s", DEFAULT_TRAIN_TIMEOUT_S))
    answer: Any = _call(context, "POST", "/v1/train", recorddict_to_bytes(msg.content), timeout=timeout)
    return Message(recorddict_from_bytes(answer), reply_to=msg)
