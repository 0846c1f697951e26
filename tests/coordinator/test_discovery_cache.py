"""Discovery once per run: the ServerApp's transport asks the nodes who they are only when the set of
connected nodes or the store's registrations changed (issue 16: the hello was 6-10 s of every round)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedtune.coordinator.server_app import HELLO_KEY, FlowerTransport


@pytest.fixture(autouse=True)
def _run_id(monkeypatch):
    """Flower messages are made inside a run: what ``flwr-serverapp`` sets before calling the ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@dataclass
class HelloGrid:
    """Flower's Grid surface that discovery uses: connected node ids, push, pull. ``clients`` maps a node
    to the client its agent says it is; every pushed hello is answered at once."""

    clients: dict[int, str]
    hellos_sent: int = 0
    _pending: dict[str, int] = field(default_factory=dict)

    def get_node_ids(self):
        return list(self.clients)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{self.hellos_sent}"
            self.hellos_sent += 1
            self._pending[mid] = m.metadata.dst_node_id
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in list(ids):
            node = self._pending.pop(mid, None)
            if node is None or node not in self.clients:
                continue
            out.append(SimpleNamespace(
                metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node), has_error=lambda: False,
                content=SimpleNamespace(config_records={HELLO_KEY: {"client_id": self.clients[node]}})))
        return out


def test_nodes_are_asked_once_while_nothing_changes_and_again_when_a_node_joins_or_a_registration_changes():
    grid = HelloGrid({11: "bank-a", 12: "bank-b"})
    registered = {"bank-a": 11, "bank-b": 12, "bank-c": None}
    transport = FlowerTransport(grid, expected_nodes=2, node_wait_s=0, poll_s=0.01,
                                registered_nodes=lambda: registered)
    assert transport.connected_clients() == {"bank-a", "bank-b"} and grid.hellos_sent == 2
    for _ in range(3):  # three more rounds, the same nodes: no hello
        assert transport.connected_clients() == {"bank-a", "bank-b"}
    assert grid.hellos_sent == 2 and transport.discoveries == 1 and transport.discoveries_skipped == 3

    grid.clients[13] = "bank-c"  # a late node joins: every node is asked again, the new one is bound
    assert transport.connected_clients() == {"bank-a", "bank-b", "bank-c"} and grid.hellos_sent == 5

    del grid.clients[12]  # a node leaves
    assert transport.connected_clients() == {"bank-a", "bank-c"} and grid.hellos_sent == 7

    registered["bank-a"] = 99  # the operator re-registered bank-a to another node: node 11 is refused now
    assert transport.connected_clients() == {"bank-c"} and grid.hellos_sent == 9
    assert [(n, c) for n, c, _ in transport.discovery_refusals] == [(11, "bank-a")]
    assert transport.connected_clients() == {"bank-c"} and transport.discovery_refusals == []  # audited once


def test_a_node_that_did_not_answer_is_asked_again_next_round(monkeypatch):
    grid = HelloGrid({11: "bank-a", 12: "bank-b"})
    silent = grid.clients.pop(12)
    grid.get_node_ids = lambda: [11, 12]  # node 12 is connected but its hello is lost
    transport = FlowerTransport(grid, expected_nodes=2, node_wait_s=0, poll_s=0.01,
                                registered_nodes=lambda: {"bank-a": 11, "bank-b": 12})
    import fedtune.coordinator.server_app as server_app

    monkeypatch.setattr(server_app, "DISCOVERY_TIMEOUT_S", 0.05)
    assert transport.connected_clients() == {"bank-a"}
    grid.clients[12] = silent
    assert transport.connected_clients() == {"bank-a", "bank-b"}
    assert transport.discoveries == 2


def test_reply_object_pulls_retry_after_20_ms_for_as_long_as_flowers_time_limit(monkeypatch):
    """A reply is pulled while its SuperNode may still push its objects: Flower's first retry after 1 s cost most
    of a second per round (benchmarks/round.py)."""
    import inspect

    from flwr.superlink.grid import http_grid

    from fedtune.coordinator.server_app import short_object_backoff

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test
    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages)  # flwr pinned: fails if it moves
    short_object_backoff()
    short_object_backoff()  # idempotent
    patched = http_grid.pull_objects
    assert patched.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.1, "max_tries_per_object": None}
    assert not hasattr(patched.func, "keywords")
