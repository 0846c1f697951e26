"""What the admin API serves from: :class:`ApiSettings`, built by ``fedtune coordinator serve`` (and the tests)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from fedtune.coordinator.api.refusals import RefusalLimiter
from fedtune.coordinator.console.sessions import ConsoleSessions
from fedtune.coordinator.rounds import CoordinatorContext
from fedtune.coordinator.store.engine import read_session_factory


@dataclass
class ApiSettings:
    """What the API serves from.

    Attributes:
        ctx: store, blob directory and blob key (the round engine's context).
        catalog: the bases the coordinator knows (job creation, adapter download); None: jobs
            cannot be created here.
        signing_key: the coordinator's Ed25519 key for audit checkpoints (None: export and
            checkpoint endpoints answer 409).
        max_body_bytes: the largest request body (413 above it).
        refusals: the per-origin limit on refused requests (:mod:`.refusals`).
        console: the web console's signed-in sessions (:mod:`fedtune.coordinator.console`).
        secure_cookies: mark the console's cookies ``Secure`` (the API is served over TLS); they are
            also marked on any request that arrived over HTTPS.
    """

    ctx: CoordinatorContext
    catalog: Any = None
    signing_key: Any = None
    max_body_bytes: int = 1 << 20
    refusals: RefusalLimiter = field(default_factory=RefusalLimiter)
    console: ConsoleSessions = field(default_factory=ConsoleSessions)
    secure_cookies: bool = False
    requests: Counter = field(default_factory=Counter)  # (action, outcome) -> count, for /metrics

    @cached_property
    def read_sessions(self) -> sessionmaker[Session]:
        """Sessions on ``ctx``'s store whose transactions begin deferred: for requests that only read."""
        return read_session_factory(self.ctx.sessions)
