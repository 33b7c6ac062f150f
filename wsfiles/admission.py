"""Who may connect, how many, and how fast: plain policy objects.

The protocols ask these before they accept a handshake or a command; each
refusal has a stable answer (an HTTP status in the handshake, an error code
on the command channel).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _host_port(authority: str, default_port: int) -> tuple[str, int] | None:
    """Split ``host[:port]`` (IPv6 in brackets) into a lower-case host and a port."""
    try:
        parts = urlsplit("//" + authority)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else default_port


def origin_allowed(
    origin: str | None, host: str | None, allowed: tuple[str, ...], secure: bool
) -> bool:
    """Cross-site WebSocket hijacking check.

    No ``Origin`` (not a browser): allowed.  ``null``: refused.  Otherwise the
    origin must be listed exactly (``*`` lists every origin), or name the same
    host and port as the ``Host`` header the browser sent.
    """
    if origin is None:
        return True
    origin = origin.strip()
    if origin == "null" or not origin:
        return False
    if "*" in allowed or origin in allowed:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.netloc:
        return False
    origin_hp = _host_port(parts.netloc, _DEFAULT_PORTS[scheme])
    host_hp = _host_port(host or "", 443 if secure else 80)
    return origin_hp is not None and origin_hp == host_hp


@dataclass(frozen=True)
class Limits:
    """Connection limits; each counts command channels only."""

    total: int = 4096
    per_client: int = 256
    per_ip: int = 256


class ConnectionSlots:
    """Counts open command channels in total, per client name and per IP."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.total = 0
        self._per_client: Counter[str] = Counter()
        self._per_ip: Counter[str] = Counter()

    def refusal(self, client: str, ip: str) -> tuple[int, str] | None:
        """The HTTP status and reason if a new connection would break a limit."""
        if self.total >= self.limits.total:
            return 503, "the server is at its connection limit"
        if self._per_client[client] >= self.limits.per_client:
            return 429, "too many connections for this client"
        if self._per_ip[ip] >= self.limits.per_ip:
            return 429, "too many connections from this address"
        return None

    def take(self, client: str, ip: str) -> None:
        self.total += 1
        self._per_client[client] += 1
        self._per_ip[ip] += 1

    def release(self, client: str, ip: str) -> None:
        self.total -= 1
        self._per_client[client] -= 1
        self._per_ip[ip] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]


class TokenBucket:
    """``rate`` commands per second, bursts up to ``rate``.

    ``take`` says whether a command may run now.  ``flooding`` turns true
    when more than ten times the rate was refused within one second: only
    then may the connection be closed.
    """

    __slots__ = (
        "_clock",
        "_refused_in_window",
        "_refused_window_start",
        "_stamp",
        "_tokens",
        "rate",
    )

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._stamp = clock.seconds()
        self._refused_window_start = self._stamp
        self._refused_in_window = 0

    def take(self) -> bool:
        now = self._clock.seconds()
        self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if now - self._refused_window_start >= 1:
            self._refused_window_start = now
            self._refused_in_window = 0
        self._refused_in_window += 1
        return False

    @property
    def flooding(self) -> bool:
        return self._refused_in_window > 10 * self.rate
