"""The agent's SuperNode wrapper (client_agent/flower_node.py): what it changes in Flower's SuperNode and what
it refuses. The warm ClientApp itself runs in every Flower e2e test (tests/e2e/)."""

from __future__ import annotations

import time

import pytest

from fedtune.client_agent import flower_node


def test_short_sleeps_cap_every_sleep_and_pass_everything_else_through(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = flower_node._ShortSleeps(0.25)
    clock.sleep(3)  # Flower's idle wait between pulls
    clock.sleep(0.5)  # its wait for a reply
    clock.sleep(0.1)
    assert slept == [0.25, 0.25, 0.1]
    assert clock.monotonic is time.monotonic and clock.time is time.time


def test_the_wrapper_patches_the_module_flower_sleeps_in():
    """If Flower moves its 3 s idle wait out of start_client_internal's `time.sleep`, this fails (flwr pinned)."""
    import inspect

    import flwr.supernode.start_client_internal as internal

    assert "time.sleep(3)" in inspect.getsource(internal.start_client_internal)
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
    assert patched.keywords == {"initial_backoff": 0.02, "backoff_cap": 1.0}
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
