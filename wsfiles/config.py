"""The settings a running service is built from (filled in by tap.Options)."""

from __future__ import annotations

from dataclasses import dataclass, field

from wsfiles.admission import HttpPolicy, Limits

SUBPROTOCOL = "wsfiles.v1"
COMMAND_MESSAGE_LIMIT = 64 * 1024
#: Seconds a peer has to answer our close frame (Autobahn's 1 s is short under load).
CLOSE_HANDSHAKE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Settings:
    """Everything the protocols need to know about the service's configuration."""

    max_size: int = 1024**3
    channel_timeout: float = 30.0
    #: From TCP accept to the 101 answer; not re-armed by incoming bytes.
    handshake_timeout: float = 10.0
    #: A command channel with no command and no transfer for this long is closed.
    idle_timeout: float = 600.0
    #: A transfer that moves no byte for this long fails with ``stalled``.
    stall_timeout: float = 60.0
    #: Bytes per second a transfer must average over each ``stall_timeout``
    #: window, or it fails with ``stalled`` (0: any byte will do).
    min_rate: int = 1024
    auto_ping_interval: float = 30.0
    auto_ping_timeout: float = 30.0
    #: Commands per second per command channel (token bucket, bursts of this size).
    rate_limit: float = 50.0
    #: Origins allowed besides the service's own (``*``: any).
    allow_origins: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    #: Connections that are not (yet) WebSockets: their pool, Host names, keep-alive.
    http: HttpPolicy = field(default_factory=HttpPolicy)
    #: Bytes per client folder; None: unlimited.  The users file may override it.
    quota: int | None = None
    #: Files per client folder; None: unlimited.  The users file may override it.
    quota_files: int | None = None
    #: Bytes a folder's listing (the ``files`` of a ``list`` reply) may grow to.
    max_listing: int = 16 * 1024**2
    #: /healthz answers 503 when less than this is free.
    min_free: int = 64 * 1024**2
    #: False when --metrics-listen serves /metrics elsewhere.
    metrics_on_main_listener: bool = True
    #: Names this instance in its tickets (several instances behind a balancer).
    instance_id: str | None = None
    #: Proxies whose X-Forwarded-For names the real client (for per-IP limits).
    trusted_proxies: tuple[str, ...] = ()
    #: --redis URL: share changed events, quotas and per-client connection
    #: counts with other instances; None: this instance alone.
    redis: str | None = None
    #: Seconds a download URL of the ``download`` op works (wsfiles/downloads.py).
    download_ticket_ttl: float = 300.0
