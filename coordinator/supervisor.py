"""The job supervisor: keeps one Flower run going for every job the store says is ``running``.

The admin API only changes a job's status; this loop makes Flower follow it:

* ``running`` and no live run -> ``flwr run`` with the job id (a crashed or stopped ServerApp is
  restarted: the engine resumes from the newest version; after ``max_restarts`` quick failures in
  a row the job is left alone and the reason logged);
* ``aborted`` with a live run -> ``flwr stop`` (the engine discards the round in flight);
* ``paused`` -> nothing: the ServerApp returns after the round in flight;
* ``completed`` / ``failed`` -> nothing: the ServerApp has returned.

Runs are tracked in memory: the SuperLink is this process's child, so no run outlives it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from fedtune.coordinator.rounds import CoordinatorContext
from fedtune.coordinator.store import Job
from fedtune.coordinator.superlink import run_status, start_run, stop_run

log = logging.getLogger(__name__)


@dataclass
class FlowerRuns:
    """Where ``flwr`` finds the SuperLink and the app (see ``superlink.py``)."""

    app_dir: Path
    flwr_home: Path
    connection: str
    node_wait_s: float = 120.0

    def start(self, job_id: str, expected_nodes: int) -> int:
        return start_run(self.app_dir, flwr_home=self.flwr_home, connection=self.connection,
                         run_config=f"job-id='{job_id}' expected-nodes={expected_nodes} node-wait-s={self.node_wait_s}")

    def status(self, run_id: int) -> str:
        return run_status(run_id, flwr_home=self.flwr_home, connection=self.connection, cwd=self.app_dir.parent)

    def stop(self, run_id: int) -> None:
        stop_run(run_id, flwr_home=self.flwr_home, connection=self.connection, cwd=self.app_dir.parent)


@dataclass
class _Tracked:
    run_id: int
    started: float
    quick_failures: int = 0


@dataclass
class JobSupervisor:
    """Reconcile Flower runs with job statuses every ``poll_s`` seconds, in a daemon thread."""

    ctx: CoordinatorContext
    runs: FlowerRuns
    poll_s: float = 3.0
    max_restarts: int = 5
    quick_s: float = 30.0  # a run that ends sooner than this counts as a quick failure
    tracked: dict[str, _Tracked] = field(default_factory=dict)
    given_up: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="job-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile_once()
            except Exception:  # keep supervising: one bad poll (SuperLink restarting...) is not fatal
                log.exception("job supervisor: reconcile failed; retrying in %.0f s", self.poll_s)
            self._stop.wait(self.poll_s)

    def reconcile_once(self) -> None:
        with self.ctx.sessions() as s:
            jobs = {j.id: (j.status, len(j.config.get("clients") or []))
                    for j in s.execute(select(Job).where(Job.status.in_(("running", "aborted", "paused")))).scalars()}
        for job_id, tracked in list(self.tracked.items()):
            status = jobs.get(job_id, ("finished", 0))[0]
            live = not self.runs.status(tracked.run_id).startswith("finished")
            if live and status == "aborted":
                log.info("job %s aborted: stopping Flower run %d", job_id, tracked.run_id)
                self.runs.stop(tracked.run_id)
                del self.tracked[job_id]
            elif not live:
                if status == "running":  # the ServerApp ended but the job is not done: a crash or a stop
                    quick = time.monotonic() - tracked.started < self.quick_s
                    tracked.quick_failures = tracked.quick_failures + 1 if quick else 0
                    if tracked.quick_failures >= self.max_restarts:
                        log.error("job %s: %d Flower runs in a row ended within %.0f s; not restarting it "
                                  "(see the SuperLink log; pause and resume the job to retry)", job_id,
                                  tracked.quick_failures, self.quick_s)
                        self.given_up.add(job_id)
                    self._launch(job_id, jobs[job_id][1], failures=tracked.quick_failures)
                else:
                    del self.tracked[job_id]
        for job_id, (status, clients) in jobs.items():
            if status == "running" and job_id not in self.tracked:
                self._launch(job_id, clients)
            if status != "running":
                self.given_up.discard(job_id)

    def _launch(self, job_id: str, clients: int, failures: int = 0) -> None:
        if job_id in self.given_up:
            self.tracked.pop(job_id, None)
            return
        run_id = self.runs.start(job_id, max(1, clients))
        log.info("job %s: started Flower run %d", job_id, run_id)
        self.tracked[job_id] = _Tracked(run_id, time.monotonic(), failures)
