"""The agent's SuperNode wrapper (client_agent/flower_node.py): what it changes in Flower's SuperNode and what
it refuses. The warm ClientApp itself runs in every Flower e2e test (tests/e2e/)."""

from __future__ import annotations

import time

import pytest

from fedtune.client_agent import flower_node


def test_idle_waits_speed_up_after_a_message_and_back_off_to_the_interval(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = flower_node._SuperNodeSleeps(0.5)
    clock.sleep(3)  # Flower's idle wait between pulls: the site's interval
    clock.message_arrived()
    for _ in range(6):
        clock.sleep(3)
    assert slept == [0.5, 0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert clock.monotonic is time.monotonic and clock.time is time.time


def test_waits_on_the_supernodes_own_state_are_short_and_leave_the_idle_backoff_alone(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = flower_node._SuperNodeSleeps(0.5)
    clock.message_arrived()
    clock.sleep(0.5)  # its wait for the ClientApp's reply
    clock.sleep(0.5)
    clock.sleep(0.01)
    clock.sleep(3)  # the first idle wait after the reply went out
    assert slept == [0.02, 0.02, 0.01, 0.05]


def test_an_interval_below_the_fast_pull_is_never_exceeded(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = flower_node._SuperNodeSleeps(0.05)
    clock.message_arrived()
    clock.sleep(3)
    clock.sleep(3)
    assert slept == [0.05, 0.05]


def test_a_stored_message_wakes_the_executor_and_speeds_up_the_pulls():
    import types

    results = iter([None, 7])
    internal = types.SimpleNamespace(_pull_and_store_message=lambda **kw: next(results))
    clock = flower_node._SuperNodeSleeps(0.5)
    executor = flower_node.WarmExecutor("127.0.0.1:9")
    flower_node._on_each_message(internal, clock, executor)
    assert internal._pull_and_store_message(state=None) is None  # nothing pulled: nothing wakes
    assert not executor.wake.is_set() and clock.next_idle_s == 0.5
    assert internal._pull_and_store_message(state=None) == 7
    assert executor.wake.is_set() and clock.next_idle_s == 0.05


def test_the_wrapper_patches_the_module_flower_sleeps_in():
    """If Flower moves its 3 s idle wait out of start_client_internal's `time.sleep`, this fails (flwr pinned)."""
    import inspect

    import flwr.supernode.start_client_internal as internal

    assert "time.sleep(3)" in inspect.getsource(internal.start_client_internal)
    assert "time.sleep(0.5)" in inspect.getsource(internal._push_messages)  # its wait for the reply
    assert "run_id = _pull_and_store_message(" in inspect.getsource(internal.start_client_internal)
    assert internal.time is time  # not patched in this process: only `python -m ...flower_node` does


@pytest.mark.parametrize(("argv", "message"), [
    (["--pull-interval-s", "10"], "--pull-interval-s 10.0: give 0.05 to 3 seconds"),
    (["--pull-interval-s", "0"], "--pull-interval-s 0.0: give 0.05 to 3 seconds"),
    (["--isolation", "subprocess"], "--isolation is set by this command"),
])
def test_bad_arguments_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        flower_node.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_runtime_api_address_follows_the_supernode_arguments():
    assert flower_node._runtime_address(["--superlink", "x:1", "--port", "9101"]) == "127.0.0.1:9101"
    assert flower_node._runtime_address(["--host", "::1", "--port", "9101"]) == "[::1]:9101"
    assert flower_node._runtime_address([]) == "127.0.0.1:9094"  # Flower's default port


def test_object_pulls_of_the_warm_executor_retry_after_20_ms_not_1_s(monkeypatch):
    import inspect

    from flwr.supernode.runtime import run_clientapp

    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree",
                        run_clientapp.pull_and_inflate_object_from_tree)  # restored after the test
    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(run_clientapp.pull_task_input)
    flower_node._short_object_backoff()
    flower_node._short_object_backoff()  # idempotent
    patched = run_clientapp.pull_and_inflate_object_from_tree
    assert patched.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.1, "max_tries_per_object": None}
    assert not hasattr(patched.func, "keywords")


def test_a_failing_executor_stops_the_whole_process_with_code_70():
    """A SuperNode whose executor died would stay connected and never answer: the process must exit instead."""
    import subprocess
    import sys

    script = ("from fedtune.client_agent.flower_node import WarmExecutor\n"
              "w = WarmExecutor('127.0.0.1:9')\n"
              "w._serve = lambda: 1 / 0\n"
              "w.start(); w.join(); import time; time.sleep(30)\n")
    done = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 70, done.stderr
    assert "the warm ClientApp executor failed" in done.stderr and "ZeroDivisionError" in done.stderr


def test_the_clientapp_loads_neither_torch_nor_the_model():
    """A per-message ``flwr-clientapp`` process should start fast: the ClientApp takes its wire keys and its
    protobuf hop from compliance.wire, which must load torch only when tensors are read."""
    import subprocess
    import sys

    code = ("import sys, fedtune.client_agent.flower_app; "
            "print(sorted(m for m in ('torch', 'safetensors', 'fedtune.model') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-P", "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_the_clientapp_and_the_daemon_pass_a_recorddict_unchanged():
    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from fedtune.compliance.wire import HELLO_KEY, recorddict_from_bytes, recorddict_to_bytes

    content = RecordDict({HELLO_KEY: ConfigRecord({"client_id": "bank-a", "nonce": b"\x01\x02"}),
                          "m": MetricRecord({"records": 3})})
    back = recorddict_from_bytes(recorddict_to_bytes(content))
    assert dict(back.config_records[HELLO_KEY]) == {"client_id": "bank-a", "nonce": b"\x01\x02"}
    assert dict(back.metric_records["m"]) == {"records": 3}
