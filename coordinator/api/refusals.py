"""Refused admin-API requests, limited per origin and audited in bursts.

Every refused request (401: no, bad or revoked token; 403: a role that may not) used to leave its own
audit record, so anyone who could reach the admin port could grow the trail without limit. Now:

* **Per origin, a fixed window.** An origin is the client address the API sees (the TCP peer, or
  ``X-Forwarded-For`` when the peer is one of ``trusted_proxies``: uvicorn has already put it in the
  ASGI scope); IPv6 addresses count per /64 by default (``ipv6_prefix``), since one host usually
  holds a whole /64. An origin's first refusal opens its window of ``window_s`` seconds.
* **Within the limit, as before.** The first ``limit`` refusals of a window are answered 401 / 403
  and each is audited on its own, before its response leaves (the app does that).
* **Over the limit, 429 and one record.** Every further refusal in that window is answered 429 (with
  ``Retry-After`` and the limit in the body) and only counted here, in the window's :class:`Burst`:
  count, first and last time, and the statuses, reasons, actors, methods and paths it would have
  been audited with (at most :data:`MAX_DISTINCT` distinct values of each, the rest counted under
  ``(other)``). The burst becomes ONE ``request.refused_burst`` record when its window closes
  (written by the app at the next request or by its sweeper within a second), when its origin is
  evicted, or when the API shuts down. So a window leaves at most ``limit + 1`` records, and the
  individual records plus the bursts' counts are every refused request.
* **Never a successful request.** Only what would be refused is limited: a valid token with a role
  that may act is served from an origin over its limit, and nothing here looks at it.
* **Bounded memory.** At most ``max_origins`` windows are kept; a new origin past that evicts the
  oldest window (its burst, if any, is closed and written, not dropped).

Crash: the individual records are committed before their responses. What a crash (kill -9, power
loss) loses is the bursts still in memory: for each origin then over its limit, the count of the
429s of its open window (at most ``window_s`` plus the sweep interval of refusals; none of them was
served anything). The log has a WARNING line when an origin first goes over its limit in a window,
so even then the log says which origins were refused in bulk. A clean stop (SIGTERM) writes every
open burst.

Reads :class:`RefusalPolicy` (``coordinator.toml``: ``refused_requests_limit``,
``refused_requests_window_s``, ``refused_requests_max_origins``, ``refused_requests_ipv6_prefix``).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedtune.compliance.canonical import format_timestamp

log = logging.getLogger(__name__)

MAX_DISTINCT = 8
"""The most distinct values of each kind (path, method, actor...) a burst record names."""
OTHER = "(other)"
MAX_PATH_CHARS = 200
MAX_METHOD_CHARS = 16


@dataclass(frozen=True)
class RefusalPolicy:
    """How many refused requests an origin gets audited one by one, per window.

    Attributes:
        limit: refused requests per origin per window answered 401 / 403 and audited one by one.
        window_s: the window's length in seconds, from the origin's first refusal.
        max_origins: the most origins tracked at once (the oldest window is evicted past it).
        ipv6_prefix: IPv6 origins are counted per network of this prefix length (128: per address).
    """

    limit: int = 10
    window_s: float = 60.0
    max_origins: int = 10_000
    ipv6_prefix: int = 64

    def __post_init__(self) -> None:
        checks = (("limit", self.limit, 1, 1_000_000), ("window_s", self.window_s, 1, 86_400),
                  ("max_origins", self.max_origins, 1, 10_000_000), ("ipv6_prefix", self.ipv6_prefix, 32, 128))
        for name, value, low, high in checks:
            kinds = (int, float) if name == "window_s" else (int,)
            if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
                raise ValueError(f"refused_requests_{name}: {value!r} is not a number in [{low}, {high}]")


def _tally(counter: Counter[str], key: str) -> None:
    """Count ``key``; a new key once ``counter`` names :data:`MAX_DISTINCT` values counts as :data:`OTHER`."""
    named = len(counter) - (OTHER in counter)
    counter[key if key in counter or named < MAX_DISTINCT else OTHER] += 1


@dataclass
class Burst:
    """The refusals of one origin's window beyond its limit (each answered 429)."""

    origin: str
    window_started_at: datetime
    first_at: datetime
    last_at: datetime
    count: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    actors: Counter[str] = field(default_factory=Counter)
    methods: Counter[str] = field(default_factory=Counter)
    paths: Counter[str] = field(default_factory=Counter)

    def add(self, at: datetime, *, status: int, reason: str | None, actor: str, method: str, path: str) -> None:
        self.count += 1
        self.last_at = at
        _tally(self.statuses, str(status))
        _tally(self.reasons, reason or "-")
        _tally(self.actors, actor)
        _tally(self.methods, method[:MAX_METHOD_CHARS])
        _tally(self.paths, path[:MAX_PATH_CHARS])

    def context(self, policy: RefusalPolicy) -> dict[str, Any]:
        """The ``request.refused_burst`` record's context."""
        return {"count": self.count, "answered": 429, "first_at": format_timestamp(self.first_at),
                "last_at": format_timestamp(self.last_at),
                "window_started_at": format_timestamp(self.window_started_at),
                "limit": policy.limit, "window_s": policy.window_s,
                "statuses": dict(self.statuses), "reasons": dict(self.reasons), "actors": dict(self.actors),
                "methods": dict(self.methods), "paths": dict(self.paths)}


@dataclass
class _Window:
    started: float  # the limiter's clock
    started_at: datetime
    refused: int = 0
    burst: Burst | None = None


@dataclass(frozen=True)
class Verdict:
    """What to do with one refused request.

    Attributes:
        within_limit: answer it as refused (401 / 403) and audit it; False: answer 429, it is in a burst.
        origin: the origin it was counted under.
        remaining: refusals left in the window after this one.
        reset_s: whole seconds until the window closes (at least 1).
        policy: the limit it was counted against.
    """

    within_limit: bool
    origin: str
    remaining: int
    reset_s: int
    policy: RefusalPolicy

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` headers (draft-ietf-httpapi-ratelimit-headers-06), and ``Retry-After`` over the limit."""
        headers = {"RateLimit-Limit": str(self.policy.limit), "RateLimit-Remaining": str(self.remaining),
                   "RateLimit-Reset": str(self.reset_s),
                   "RateLimit-Policy": f"{self.policy.limit};w={self.policy.window_s:g}"}
        if not self.within_limit:
            headers["Retry-After"] = str(self.reset_s)
        return headers


class RefusalLimiter:
    """Per-origin windows of refused requests (see the module docstring); safe to share between threads."""

    def __init__(self, policy: RefusalPolicy | None = None, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.policy = policy or RefusalPolicy()
        self._clock, self._wall = clock, wall
        self._windows: OrderedDict[str, _Window] = OrderedDict()  # oldest window first
        self._closed: list[Burst] = []
        self._lock = threading.Lock()

    def origin_of(self, host: str | None) -> str:
        """The origin ``host`` is counted under: an IPv4 address, an IPv6 network, or the host as given."""
        if not host:
            return "unknown"
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host[:64]
        if address.version == 6 and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.version == 6 and self.policy.ipv6_prefix < 128:
            return str(ipaddress.ip_network(f"{address}/{self.policy.ipv6_prefix}", strict=False))
        return str(address)

    def refuse(self, host: str | None, *, status: int, reason: str | None, actor: str, method: str,
               path: str) -> Verdict:
        """Count one refused request from ``host``; say whether it is within the origin's limit."""
        origin = self.origin_of(host)
        with self._lock:
            now = self._clock()
            self._close_expired(now)
            window = self._windows.get(origin)
            if window is None:
                while len(self._windows) >= self.policy.max_origins:
                    self._close(*self._windows.popitem(last=False))
                window = self._windows[origin] = _Window(started=now, started_at=self._wall())
            window.refused += 1
            reset_s = max(1, math.ceil(window.started + self.policy.window_s - now))
            if window.refused <= self.policy.limit:
                return Verdict(True, origin, self.policy.limit - window.refused, reset_s, self.policy)
            at = self._wall()
            if window.burst is None:
                window.burst = Burst(origin=origin, window_started_at=window.started_at, first_at=at, last_at=at)
                log.warning("origin %s went over %d refused requests in %g s: refusing with 429 and auditing the "
                            "rest of the window as one request.refused_burst record", origin, self.policy.limit,
                            self.policy.window_s)
            window.burst.add(at, status=status, reason=reason, actor=actor, method=method, path=path)
            return Verdict(False, origin, 0, reset_s, self.policy)

    def take_closed(self) -> list[Burst]:
        """The bursts whose window has closed or whose origin was evicted, each returned once."""
        with self._lock:
            self._close_expired(self._clock())
            closed, self._closed = self._closed, []
        return closed

    def close_all(self) -> list[Burst]:
        """Close every window (shutdown) and return every burst not yet taken."""
        with self._lock:
            while self._windows:
                self._close(*self._windows.popitem(last=False))
            closed, self._closed = self._closed, []
        return closed

    def tracked_origins(self) -> int:
        return len(self._windows)

    def _close_expired(self, now: float) -> None:
        # windows are in the order they opened and all last window_s, so the expired ones come first
        while self._windows:
            origin, window = next(iter(self._windows.items()))
            if now - window.started < self.policy.window_s:
                return
            del self._windows[origin]
            self._close(origin, window)

    def _close(self, origin: str, window: _Window) -> None:
        if window.burst is not None:
            self._closed.append(window.burst)
