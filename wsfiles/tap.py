"""``twistd wsfiles``: command-line options and the service tree they build.

Modelled on ``twisted/web/tap.py``: listeners are Twisted endpoint
descriptions, so ``ssl:`` and ``systemd:`` need no code of their own.
"""

from __future__ import annotations

import os

from autobahn.websocket.xormasker import USES_NVX
from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from wsfiles.admission import Limits
from wsfiles.config import Settings
from wsfiles.sizes import parse_size
from wsfiles.storage import LocalStorage
from wsfiles.users import UserDirectory, UsersFileError
from wsfiles.web import WsfilesSite

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"

_log = Logger()


def _positive_seconds(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise usage.UsageError(f"--{option} must be a number, not {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise usage.UsageError(f"--{option} must be a positive number")
    return value


def _positive_count(option: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise usage.UsageError(f"--{option} must be a whole number, not {text!r}") from None
    if value < 1:
        raise usage.UsageError(f"--{option} must be at least 1")
    return value


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve per-client folders over WebSockets: JSON commands on /command,"
        " file data on /file.  See docs/protocol.md."
    )
    optParameters = [
        ["root", "r", "./wsfiles-data", "Folder holding the clients' files (created if missing)."],
        [
            "max-size",
            None,
            "1G",
            "Largest file accepted, in bytes; K/M/G/T suffixes are powers of 1024.",
        ],
        [
            "users",
            None,
            None,
            "Users file (see 'wsfiles user add'); without it every client is anonymous.",
        ],
        ["channel-timeout", None, "30", "Seconds a client has to open an offered file channel."],
        [
            "handshake-timeout",
            None,
            "10",
            "Seconds from TCP accept to a completed WebSocket handshake.",
        ],
        [
            "idle-timeout",
            None,
            "600",
            "Seconds a command channel may stay silent while nothing transfers.",
        ],
        ["stall-timeout", None, "60", "Seconds a transfer may go without moving a byte."],
        ["ping-interval", None, "30", "Seconds between WebSocket pings on quiet connections."],
        ["ping-timeout", None, "30", "Seconds to wait for a pong before dropping a dead peer."],
        ["max-connections", None, "4096", "Command channels open at once, in total."],
        [
            "max-connections-per-client",
            None,
            "256",
            "Command channels open at once per client name.",
        ],
        [
            "max-connections-per-ip",
            None,
            "256",
            "Command channels open at once per remote address.",
        ],
        [
            "rate-limit",
            None,
            "50",
            "Commands per second per command channel (bursts of the same size).",
        ],
        ["quota", None, None, "Bytes per client folder (K/M/G/T); the users file may override it."],
        [
            "partial-ttl",
            None,
            "86400",
            "Seconds an interrupted resumable upload is kept for resuming.",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allow-origin"] = []

    def opt_allow_origin(self, origin: str) -> None:
        """Origin allowed besides the service's own, e.g. https://app.example (repeatable; '*' allows any)."""
        self["allow-origin"].append(origin.strip())

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:8080:interface=127.0.0.1 (repeatable)."""
        from twisted.internet import reactor

        try:
            endpoints.serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as e:
            raise usage.UsageError(
                f"--listen {description!r} is not a valid endpoint: {e}"
            ) from None
        self["listen"].append(description)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self["max-size"] = parse_size(self["max-size"])
        except ValueError as e:
            raise usage.UsageError(f"--max-size: {e}") from None
        for option in (
            "channel-timeout",
            "handshake-timeout",
            "idle-timeout",
            "stall-timeout",
            "ping-interval",
            "ping-timeout",
            "rate-limit",
            "partial-ttl",
        ):
            self[option] = _positive_seconds(option, self[option])
        for option in ("max-connections", "max-connections-per-client", "max-connections-per-ip"):
            self[option] = _positive_count(option, self[option])
        if self["quota"] is not None:
            try:
                self["quota"] = parse_size(self["quota"])
            except ValueError as e:
                raise usage.UsageError(f"--quota: {e}") from None
        if self["users"] is not None:
            try:
                self["users"] = UserDirectory(self["users"])
            except UsersFileError as e:
                raise usage.UsageError(str(e)) from None
        root = self["root"]
        if os.path.exists(root) and not os.path.isdir(root):
            raise usage.UsageError(f"--root {root!r} exists and is not a folder")


class _AnnouncingEndpoint:
    """Wraps a server endpoint to log the address it actually bound.

    Useful with port 0, and it is the line the tests wait for.  It is logged
    once the reactor runs, when signal handlers are in place: from then on
    a SIGTERM stops the service cleanly.
    """

    def __init__(self, endpoint, description: str, reactor) -> None:
        self._endpoint = endpoint
        self._description = description
        self._reactor = reactor

    def listen(self, factory):
        def announce(port):
            address = port.getHost()
            self._reactor.callWhenRunning(
                _log.info,
                "wsfiles listening on {host}:{port} ({description})",
                host=getattr(address, "host", ""),
                port=getattr(address, "port", ""),
                description=self._description,
            )
            return port

        return self._endpoint.listen(factory).addCallback(announce)


#: Interrupted resumable uploads are removed within --partial-ttl + this.
SWEEP_EVERY = 60.0


def _sweep_partials(storage: LocalStorage, ttl: float) -> None:
    removed = storage.sweep_partials(ttl)
    if removed:
        _log.info("removed {count} expired partial uploads", count=removed)


class WsfilesService(service.MultiService):
    """The listeners; a listener that cannot bind stops start-up with one clear line."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            _log.critical("wsfiles cannot start: {error}", error=str(e))
            raise SystemExit(f"wsfiles: {e}") from None


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    settings = Settings(
        max_size=options["max-size"],
        channel_timeout=options["channel-timeout"],
        handshake_timeout=options["handshake-timeout"],
        idle_timeout=options["idle-timeout"],
        stall_timeout=options["stall-timeout"],
        auto_ping_interval=options["ping-interval"],
        auto_ping_timeout=options["ping-timeout"],
        rate_limit=options["rate-limit"],
        allow_origins=tuple(options["allow-origin"]),
        limits=Limits(
            total=options["max-connections"],
            per_client=options["max-connections-per-client"],
            per_ip=options["max-connections-per-ip"],
        ),
        quota=options["quota"],
    )
    try:
        storage = LocalStorage(options["root"])
    except OSError as e:
        raise usage.UsageError(f"cannot use --root {options['root']!r}: {e.strerror}") from None
    if not USES_NVX:
        _log.warn(
            "Autobahn's native accelerator (NVX) is off: uploads will be unmasked"
            " in pure Python, several times slower (is AUTOBAHN_USE_NVX=0 set?)"
        )
    swept = storage.sweep_temporary_files()
    if swept:
        _log.info("removed {count} temporary files left by interrupted uploads", count=swept)
    site = WsfilesSite(settings, storage, options["users"], reactor)
    top = WsfilesService()
    ttl = options["partial-ttl"]
    sweeper = TimerService(min(SWEEP_EVERY, ttl), _sweep_partials, storage, ttl)
    sweeper.setServiceParent(top)
    for description in options["listen"]:
        listener = strports.service(description, site, reactor=reactor)
        listener.endpoint = _AnnouncingEndpoint(listener.endpoint, description, reactor)
        listener.setServiceParent(top)
    return top
