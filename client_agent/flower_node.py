"""The agent's Flower SuperNode, with the ClientApp kept warm and a pull interval the site sets.

``python -m fedtune.client_agent.flower_node --pull-interval-s 0.5 [flower-supernode arguments]``
runs Flower's own SuperNode (``flwr.supernode.cli.flower_supernode``: the same fleet connection,
node authentication, TLS, node state and Runtime API as ``flower-supernode``) with two changes,
both for round latency (issue 16, measured in ``benchmarks/round.py``):

* **The ClientApp runs warm in this process.** ``flower-supernode`` in its default ``subprocess``
  isolation starts ``flower-superexec``, which starts a new ``flwr-clientapp`` process for every
  message: importing flwr and our app, unpacking the FAB, about 2 s per message on a site's CPU
  before the first byte reaches the agent. Here the SuperNode runs with ``--isolation process``
  (Flower's mode for an executor that lives outside the SuperNode) and :class:`WarmExecutor`, a
  thread of this process, is that executor: it asks the SuperNode's Runtime API for a task as
  ``flower-superexec`` does, then runs it as ``flwr-clientapp`` does (pull the task's message and
  context, call the ClientApp, push the reply and the task's output, a heartbeat while it runs),
  with ``fedtune.client_agent.flower_app:app`` imported once. The FAB is not unpacked: it carries
  no code (``coordinator/superlink.py``); both ends import the installed fedtune.
* **Object pulls retried quickly.** The warm executor takes a task as soon as the SuperNode has it,
  sometimes before the SuperNode stored every object of its message; Flower's pull then waits 1 s
  before asking again. :func:`_short_object_backoff` starts those retries at 20 ms.
* **The SuperNode's waits.** Flower's SuperNode that pulled no message sleeps a fixed 3 s before it asks
  the SuperLink again (``start_client_internal``), so a round's message waits up to 3 s at every site, and
  once a task runs it looks for the reply every 0.5 s; Flower 1.41 and 1.42 expose no setting for either.
  This module replaces that module's ``time`` with :class:`_SuperNodeSleeps`: a wait on this process's own
  state (the reply, an object not stored yet) lasts at most ``LOCAL_WAIT_S``; an idle wait between pulls
  starts at ``FAST_PULL_S`` after a message and doubles up to the site's ``pull_interval_s`` (the next
  round's message usually follows a reply within a second: a few more requests per round, not a faster
  steady rate). An idle site asks the SuperLink ``1 / interval`` times a second: the load to plan for at
  the SuperLink is sites / interval requests a second.
* **The executor woken by the message.** The SuperNode wakes :class:`WarmExecutor` as soon as it has
  stored a message with all its objects; the executor's own poll (``TASK_POLL_S``) is only a fallback.

Both touch Flower's internals by name (the module's ``time``, the Runtime API calls of
``run_clientapp``); flwr is pinned, and the e2e tests run every round through this module, so an
upgrade that moves them fails there, not in production.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
import types

log = logging.getLogger("fedtune.flower_node")

DEFAULT_PULL_INTERVAL_S = 0.5
FAST_PULL_S = 0.05  # the first idle wait after a message; it doubles up to the pull interval
LOCAL_WAIT_S = 0.02  # the longest wait on this process's own state (Flower: 0.5 s)
IDLE_SLEEP_S = 1.0  # Flower's loop sleeps 3 s when idle and 0.5 s on its own state: what tells them apart
TASK_POLL_S = 1.0  # the idle warm executor's fallback poll (it is woken by each message; Flower's SuperExec: 1 s)


class _SuperNodeSleeps(types.ModuleType):
    """``time`` for Flower's SuperNode loop: every attribute is the real module's except ``sleep``. A sleep of
    ``IDLE_SLEEP_S`` or more is the idle wait between pulls at the SuperLink: ``FAST_PULL_S`` after
    :meth:`message_arrived`, then doubling up to ``pull_interval_s``. A shorter one is a wait on the process's
    own state and lasts at most ``LOCAL_WAIT_S``. Only the SuperNode's main loop calls both."""

    def __init__(self, pull_interval_s: float) -> None:
        super().__init__("time")
        self.pull_interval_s = pull_interval_s
        self.next_idle_s = pull_interval_s

    def __getattr__(self, name: str):
        return getattr(time, name)

    def message_arrived(self) -> None:
        self.next_idle_s = min(FAST_PULL_S, self.pull_interval_s)

    def idle_wait_s(self) -> float:
        wait, self.next_idle_s = self.next_idle_s, min(2 * self.next_idle_s, self.pull_interval_s)
        return wait

    def sleep(self, seconds: float) -> None:
        time.sleep(self.idle_wait_s() if seconds >= IDLE_SLEEP_S else min(seconds, LOCAL_WAIT_S))


class WarmExecutor(threading.Thread):
    """Run every ClientApp task of the SuperNode at ``runtime_api_address`` in this process."""

    def __init__(self, runtime_api_address: str, *, poll_s: float = TASK_POLL_S) -> None:
        super().__init__(name="fedtune-warm-clientapp", daemon=True)
        self.address = runtime_api_address
        self.poll_s = poll_s
        self.tasks_run = 0
        self.wake = threading.Event()  # set by the SuperNode when it has stored a message

    def run(self) -> None:
        """Serve tasks until the process ends. If this thread fails, the whole SuperNode exits (code 70): a
        SuperNode that stays connected but never answers would hold every round to its timeout; an agent
        that exits is seen by its supervisor (``fedtune agent run`` stops and says so)."""
        try:
            self._serve()
        except BaseException:
            log.exception("the warm ClientApp executor failed: stopping this SuperNode")
            logging.shutdown()
            os._exit(70)

    def _serve(self) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        from fedtune.client_agent.flower_app import app

        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())
        while True:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except Exception as e:  # the SuperNode's API starting or restarting: ask again
                log.debug("acquire task: %s", e)
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                self._run_task(app, res.token)
                self.tasks_run += 1
                continue  # another message may be waiting
            self.wake.wait(self.poll_s)
            self.wake.clear()

    def _run_task(self, app, token: str) -> None:
        """What ``flwr-clientapp --token`` does for one task, minus the process, the FAB and the exit."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=make_simple_http_retry_invoker())
        heartbeat = HeartbeatSender(_heartbeat_fn(client))
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        started = time.monotonic()
        try:
            heartbeat.start()
            message, context, _run, _fab = pull_task_input(client)
            pulled = time.monotonic()
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
            log.info("task %s: %s message pulled in %.3f s, ClientApp %.3f s", message.metadata.group_id or "-",
                     message.metadata.message_type, pulled - started, time.monotonic() - pulled)
        except Exception as e:  # the error goes back to the SuperLink, as flwr-clientapp does
            log.exception("ClientApp task failed")
            details = f"{type(e)}:<'{e}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # logged; the task's output still goes back
                log.exception("pushing the ClientApp's reply failed")
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            log.info("task done in %.3f s (%s)", time.monotonic() - started, status)


def _short_object_backoff() -> None:
    """``flwr-clientapp`` pulls a task's message objects with a first retry after 1 s (``PULL_INITIAL_BACKOFF``)
    when the SuperNode has not stored an object yet. A process that takes 2 s to start never sees that; a warm
    executor that takes the task at once often does (measured: 1.05 s of every round). Here the retries start
    at 20 ms and double up to 0.1 s (requests on this host's loopback), for the Runtime API calls of this process
    only, for as long as Flower's time limit allows (500 tries at 0.1 s would end a large message's wait within
    a minute)."""
    import functools

    from flwr.supernode.runtime import run_clientapp

    if not isinstance(run_clientapp.pull_and_inflate_object_from_tree, functools.partial):
        run_clientapp.pull_and_inflate_object_from_tree = functools.partial(
            run_clientapp.pull_and_inflate_object_from_tree, initial_backoff=0.02, backoff_cap=0.1,
            max_tries_per_object=None)


def _on_each_message(internal, sleeps: _SuperNodeSleeps, executor: WarmExecutor) -> None:
    """Wrap the SuperNode's ``_pull_and_store_message`` (it returns a run id once a message and all its objects
    are stored): then the idle pulls speed up and the executor wakes."""
    pull = internal._pull_and_store_message

    def pull_and_wake(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            sleeps.message_arrived()
            executor.wake.set()
        return run_id

    internal._pull_and_store_message = pull_and_wake


def _heartbeat_fn(client):
    """Flower's task heartbeat, without what ``make_task_heartbeat_fn_http`` does when the SuperNode says the
    task is gone (``raise_signal(SIGINT)``: it would stop this whole SuperNode, not one task). The task's
    reply is then refused at the push, which is logged."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except (httpx.TransportError, httpx.HTTPStatusError):
            return False
        if not res.success:
            log.warning("the SuperNode no longer knows the running task (expired?): its reply will be refused")
        return True

    return beat


def _runtime_address(argv: list[str]) -> str:
    """The SuperNode's Runtime API address from its ``--host`` / ``--port`` arguments (Flower's defaults)."""
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    args, _ = _parse_args_run_supernode().parse_known_args(argv)
    host = args.host if args.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return f"[{host}]:{args.port}" if ":" in host else f"{host}:{args.port}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Flower's SuperNode with the fedtune ClientApp kept warm in-process; every other argument "
                    "goes to flower-supernode (see `flower-supernode --help`).")
    parser.add_argument("--pull-interval-s", type=float, default=DEFAULT_PULL_INTERVAL_S,
                        help="longest wait between the SuperNode's pulls at the SuperLink while idle (Flower: 3 s); "
                             "each idle site makes 1/interval requests a second")
    ours, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not 0.05 <= ours.pull_interval_s <= 3.0:
        parser.error(f"--pull-interval-s {ours.pull_interval_s}: give 0.05 to 3 seconds")
    if "--isolation" in rest:
        parser.error("--isolation is set by this command (process: the ClientApp runs warm here)")
    handler = logging.StreamHandler()  # Flower logs through its own handler; ours adds times to our lines
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sleeps = _SuperNodeSleeps(ours.pull_interval_s)
    internal.time = sleeps
    _short_object_backoff()
    rest = [*rest, "--isolation", "process"]
    executor = WarmExecutor(_runtime_address(rest))
    _on_each_message(internal, sleeps, executor)
    executor.start()
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
