"""Console sessions: an admin-API token exchanged for a short-lived session cookie.

The browser never keeps the token: it is posted once to ``/console/sign-in``, checked like a bearer
token, and the session remembers only the token's row id and role. The cookie carries a random
session id (256 bits); the coordinator keeps its SHA-256, so a copy of its memory holds no usable
cookie. Each session has its own CSRF token, which the page reads from ``/console/session`` (a
same-origin read no other site can make) and sends as ``X-CSRF-Token`` with every change.

A session ends at sign-out, after :data:`IDLE_S` without a request, :data:`MAX_AGE_S` after sign-in,
or as soon as its token is revoked (checked on every request: :meth:`ConsoleSessions.signed_in`).
Sessions live in the coordinator's memory: a restart signs everyone out, which for a console of a
few operators is the safe side.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the admin API imports this module: its auth is imported where it is used
    from fedtune.coordinator.api.auth import Actor

COOKIE = "fedtune_session"
SIGN_IN_COOKIE = "fedtune_sign_in"  # the sign-in form's own CSRF nonce (double submit), before any session
CSRF_HEADER = "x-csrf-token"
IDLE_S = 15 * 60.0
MAX_AGE_S = 8 * 3600.0
MAX_SESSIONS = 1000  # the oldest go first beyond this: sign-ins cannot grow the coordinator's memory without limit
MAX_SESSIONS_PER_TOKEN = 5  # a token's oldest session goes first beyond this: one token cannot push out the others'
BACKGROUND_HEADER = "x-console-background"  # a page's own polling: it does not keep an idle session alive


@dataclass
class ConsoleSession:
    token_id: int
    role: str
    csrf: str
    signed_in: float
    last_seen: float

    def expired(self, now: float) -> bool:
        return now - self.last_seen > IDLE_S or now - self.signed_in > MAX_AGE_S


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


class ConsoleSessions:
    """The signed-in sessions, by the hash of their id (thread-safe: the API's handlers run in a pool)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._sessions: dict[str, ConsoleSession] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def create(self, token_id: int, role: str) -> tuple[str, ConsoleSession]:
        """A new session for the token ``token_id``; returns (the cookie's value, the session)."""
        session_id = secrets.token_urlsafe(32)
        now = self._clock()
        session = ConsoleSession(token_id=token_id, role=role, csrf=secrets.token_urlsafe(32), signed_in=now,
                                 last_seen=now)
        with self._lock:
            self._drop_expired(now)
            mine = sorted((k for k, s in self._sessions.items() if s.token_id == token_id),
                          key=lambda k: self._sessions[k].last_seen)
            for key in mine[:max(0, len(mine) - MAX_SESSIONS_PER_TOKEN + 1)]:
                del self._sessions[key]
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(min(self._sessions, key=lambda k: self._sessions[k].last_seen))
            self._sessions[_key(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, *, touch: bool = True) -> ConsoleSession | None:
        """The live session of a cookie value, or None. ``touch``: the request is the person's (its idle clock
        restarts); a page's background polling passes False, so a tab left open still times out."""
        if not session_id or len(session_id) > 100:
            return None
        now = self._clock()
        with self._lock:
            session = self._sessions.get(_key(session_id))
            if session is None:
                return None
            if session.expired(now):
                del self._sessions[_key(session_id)]
                return None
            if touch:
                session.last_seen = now
            return session

    def signed_in(self, session_id: str | None, read_sessions, *, touch: bool = True) -> tuple[
            ConsoleSession | None, Actor | None, str | None]:
        """(session, actor, None) for a cookie whose session is live and whose token is still valid (checked in
        the store through ``read_sessions``, so a revoked token ends its sessions at once); else (None, None,
        reason)."""
        from fedtune.coordinator.api.auth import authenticate_token_id

        session = self.get(session_id, touch=touch)
        if session is None:
            return None, None, "console_session_expired"
        with read_sessions() as s:
            actor, reason = authenticate_token_id(s, session.token_id)
        if actor is None:
            self.end_token(session.token_id)
            return None, None, reason
        return session, actor, None

    def end(self, session_id: str | None) -> bool:
        """Sign a session out; True if it was live."""
        if not session_id:
            return False
        with self._lock:
            return self._sessions.pop(_key(session_id), None) is not None

    def end_token(self, token_id: int) -> None:
        """End every session of a token (it was revoked)."""
        with self._lock:
            for key in [k for k, s in self._sessions.items() if s.token_id == token_id]:
                del self._sessions[key]

    def __len__(self) -> int:
        return len(self._sessions)

    def _drop_expired(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expired(now)]:
            del self._sessions[key]


def csrf_matches(session: ConsoleSession | None, given: str | None) -> bool:
    """Whether ``given`` is the session's CSRF token (constant-time)."""
    return session is not None and bool(given) and secrets.compare_digest(session.csrf.encode(), given.encode())
