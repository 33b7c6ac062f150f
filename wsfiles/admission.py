"""Who may connect, how many, and how fast: plain policy objects.

The protocols ask these before they accept a handshake or a command; each
refusal has a stable answer (an HTTP status in the handshake, an error code
on the command channel).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Hashable
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


#: ``--allow-host`` values: a DNS name, ``*.`` before one (any name under it),
#: or ``*`` (any name: the check is off).
_HOST_NAME = re.compile(
    r"(\*\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*"
)


def normalise_host_name(text: str) -> str:
    """An ``--allow-host`` value as it is compared: lower case, no final dot.

    Raises ValueError for anything that is not a name (a port, a scheme, a path).
    """
    name = text.strip().lower()
    if name == "*":
        return name
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(f"{text!r} is not a host name (give it without scheme, port or path)")
    return name


def host_allowed(host: str | None, names: tuple[str, ...]) -> bool:
    """DNS-rebinding check: does ``Host`` name this service?

    A page on an attacker's name that is re-pointed to this server's address
    sends matching ``Host`` and ``Origin``, so the origin check cannot see it;
    the name in ``Host`` gives it away.  Always allowed: ``localhost`` and
    IP literals (no name an attacker controls), and requests without
    ``Host`` (HTTP/1.0: not a browser).  Otherwise the name must be one of
    ``names`` (``--allow-host``), compared without port and final dot.
    """
    if host is None:
        return True
    hp = _host_port(host.strip(), 0)
    if hp is None:
        return False
    name = hp[0]
    if name.endswith("."):
        name = name[:-1]
    if name == "localhost" or "*" in names or name in names:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return any(n.startswith("*.") and name.endswith(n[1:]) for n in names)
    return True


def forwarded_client(peer: str, forwarded_for: str | None, trusted: tuple[str, ...]) -> str:
    """The client's address: the peer's, or behind a trusted proxy the last
    ``X-Forwarded-For`` entry (the one our proxy appended)."""
    if peer in trusted and forwarded_for and forwarded_for.strip():
        return forwarded_for.split(",")[-1].strip()
    return peer


@dataclass(frozen=True)
class HttpPolicy:
    """What connections that are not (yet) WebSockets may hold and where they may go."""

    #: Host names served besides localhost and IP literals (``--allow-host``).
    allow_hosts: tuple[str, ...] = ()
    #: Such connections open at once, in total and per client address.
    max_connections: int = 1024
    max_per_ip: int = 256
    #: Seconds a kept-alive connection may wait for its next request.
    keepalive_timeout: float = 15.0


class HttpPool:
    """Counts the connections that are not (yet) WebSockets, in total and per
    address, apart from the command channels' limits, and says whom to drop
    when a new one would break a limit.

    A connection is a hashable token; ``address`` None counts it in the total
    only (a trusted proxy's connection before its request names the client).
    When a limit is reached, the connection that has waited longest for a
    request (idle between requests, or still sending headers) makes room,
    provided it has waited ``evict_after`` seconds (a burst of real clients
    whose requests the server has not read yet is not cut); otherwise the
    newcomer is refused.  So a flood of idle or slow connections can hold at
    most the pool, and never keeps a new client out for long.
    """

    evict_after = 1.0

    def __init__(
        self,
        total: int,
        per_ip: int,
        clock: IReactorTime,
        evict: Callable[[Hashable, str], None],
    ) -> None:
        self.total_limit = total
        self.per_ip_limit = per_ip
        self._clock = clock
        self._evict = evict
        self._address: dict[Hashable, str | None] = {}
        self._per_ip: Counter[str] = Counter()
        #: Connections waiting for a request, oldest first, with when they began.
        self._waiting: dict[Hashable, float] = {}

    @property
    def total(self) -> int:
        return len(self._address)

    def count(self, address: str) -> int:
        return self._per_ip[address]

    def admit(self, conn: Hashable, address: str | None) -> tuple[int, str] | None:
        """Count a new connection (waiting for its first request), or say why not."""
        if self.total >= self.total_limit and not self._make_room(None):
            return 503, "the server is at its limit of HTTP connections"
        if (
            address is not None
            and self._per_ip[address] >= self.per_ip_limit
            and not self._make_room(address)
        ):
            return 429, "too many HTTP connections from this address"
        self._address[conn] = address
        if address is not None:
            self._per_ip[address] += 1
        self._waiting[conn] = self._clock.seconds()
        return None

    def readdress(self, conn: Hashable, address: str) -> tuple[int, str] | None:
        """Count ``conn`` under ``address`` from now on (a proxy's request named
        its client), or say why not (it then stays counted as it was)."""
        old = self._address.get(conn, address)
        if conn not in self._address or old == address:
            return None
        if self._per_ip[address] >= self.per_ip_limit and not self._make_room(address):
            return 429, "too many HTTP connections from this address"
        self._uncount(conn)
        self._address[conn] = address
        self._per_ip[address] += 1
        return None

    def waiting(self, conn: Hashable) -> None:
        """``conn`` waits for a request (it may be dropped to make room)."""
        if conn in self._address:
            self._waiting.pop(conn, None)
            self._waiting[conn] = self._clock.seconds()

    def busy(self, conn: Hashable) -> None:
        """``conn``'s request has been read: it is answered, or becoming a WebSocket."""
        self._waiting.pop(conn, None)

    def release(self, conn: Hashable) -> None:
        """``conn`` closed or became a WebSocket (idempotent)."""
        if conn in self._address:
            self._uncount(conn)
            del self._address[conn]
        self._waiting.pop(conn, None)

    def _uncount(self, conn: Hashable) -> None:
        address = self._address[conn]
        if address is not None:
            self._per_ip[address] -= 1
            if self._per_ip[address] <= 0:
                del self._per_ip[address]

    def _make_room(self, address: str | None) -> bool:
        """Drop the longest-waiting connection (of ``address``, if given)."""
        oldest = self._clock.seconds() - self.evict_after
        for conn, since in self._waiting.items():
            if since > oldest:
                return False  # the rest waited less
            if address is None or self._address.get(conn) == address:
                reason = (
                    "HTTP connections at their limit"
                    if address is None
                    else ("HTTP connections from its address at their limit")
                )
                self.release(conn)
                self._evict(conn, reason)
                return True
        return False


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
    """``rate`` commands per second, bursts up to ``rate``: ``take`` says whether
    a command may run now (closing a flooding connection is ratelimit.FloodWatch's)."""

    __slots__ = ("_clock", "_stamp", "_tokens", "rate")

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._stamp = clock.seconds()

    def take(self) -> bool:
        now = self._clock.seconds()
        self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
