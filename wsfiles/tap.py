"""``twistd wsfiles``: command-line options and the service tree they build.

Modelled on ``twisted/web/tap.py``: listeners are Twisted endpoint
descriptions, so ``ssl:`` and ``systemd:`` need no code of their own.
"""

from __future__ import annotations

import os
import re
from typing import Any

from autobahn.websocket.xormasker import USES_NVX
from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import server

from wsfiles.admission import HttpPolicy, Limits, normalise_host_name
from wsfiles.config import Settings
from wsfiles.redisstate import RedisAddress
from wsfiles.shares import OPTIONS as SHARE_OPTIONS
from wsfiles.shares import settings_from_options as share_settings
from wsfiles.sizes import parse_size
from wsfiles.storage.local import LocalStorage
from wsfiles.systemd import notify
from wsfiles.users import UserDirectory, UsersFileError
from wsfiles.web import WsfilesSite

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"

_log = Logger()

# (option, default, help): parsed as sizes, seconds and counts in postOptions.
SIZE_OPTIONS = [
    ("max-size", "1G", "Largest file accepted; K/M/G/T are powers of 1024."),
    ("min-free", "64M", "/healthz reports 503 when less than this is free."),
]
SECONDS_OPTIONS = [
    ("channel-timeout", "30", "Seconds a client has to open an offered file channel."),
    (
        "handshake-timeout",
        "10",
        "Seconds to send a request's headers (from TCP accept, or from"
        " its first byte on a kept-alive connection) and complete a WebSocket handshake.",
    ),
    (
        "keepalive-timeout",
        "15",
        "Seconds a kept-alive HTTP connection may wait for its next request.",
    ),
    ("idle-timeout", "600", "Seconds a command channel may stay silent while nothing transfers."),
    ("stall-timeout", "60", "Seconds a transfer may go without moving a byte."),
    ("ping-interval", "30", "Seconds between WebSocket pings on quiet connections."),
    ("ping-timeout", "30", "Seconds to wait for a pong before dropping a dead peer."),
    ("rate-limit", "50", "Commands per second per command channel (bursts of the same size)."),
    ("partial-ttl", "86400", "Seconds an interrupted resumable upload is kept for resuming."),
    ("grace", "30", "On SIGTERM, seconds transfers in flight get to finish."),
    ("download-ticket-ttl", "300", "Seconds a download URL from the 'download' op works."),
]
COUNT_OPTIONS = [
    ("max-connections", "4096", "Command channels open at once, in total."),
    ("max-connections-per-client", "256", "Command channels open at once per client name."),
    ("max-connections-per-ip", "256", "Command channels open at once per remote address."),
    ("max-http-connections-per-ip", "256", "Connections not (yet) WebSockets, per address."),
]


def _check_endpoint(option: str, description: str) -> None:
    """Build the endpoint now: a bad one is a usage error, not a traceback at start-up.

    Parsing can fail in any way its plugin likes: ``ValueError`` for a bad
    argument, ``OSError`` for an ``ssl:`` key file that cannot be read,
    ``IndexError`` for a ``systemd:`` index that systemd passed no socket for.
    """
    from twisted.internet import reactor

    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except Exception as e:
        if isinstance(e, IndexError) and description.startswith("systemd:"):
            raise usage.UsageError(
                f"{option} {description!r}: systemd passed no socket with that index"
                " (start the service through its .socket unit, or listen on tcp:)"
            ) from None
        raise usage.UsageError(f"{option} {description!r} is not a valid endpoint: {e}") from None
    # Parsing accepts what binding then refuses with a traceback: check the
    # two mistakes people make (Twisted keeps these as private attributes).
    port = getattr(endpoint, "_port", None)  # tcp:, ssl:
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise usage.UsageError(f"{option} {description!r}: the port must be 0-65535")
    address = getattr(endpoint, "_address", None)  # unix:
    if isinstance(address, str) and not os.path.isdir(os.path.dirname(address) or "."):
        raise usage.UsageError(
            f"{option} {description!r}: no folder {os.path.dirname(address)!r} for the socket"
        )


def _default_http_connections() -> int:
    """1024, or a quarter of the open-file limit if lower: a flood of HTTP
    connections must leave descriptors for command channels and files."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(1, min(1024, soft // 4))


def _size(option: str, text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise usage.UsageError(f"--{option}: {e}") from None


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


def _s3_keys(path: str | None) -> tuple[str, str]:
    """The access and secret key: from a file, or from the standard environment."""
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                fields = f.read().split()
        except OSError as e:
            raise usage.UsageError(f"--s3-credentials: {e.strerror}") from None
        if len(fields) != 2:
            raise usage.UsageError("--s3-credentials: expected 'ACCESS_KEY SECRET_KEY'")
        return fields[0], fields[1]
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise usage.UsageError(
            "--storage s3 needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or --s3-credentials"
        )
    return access, secret


#: Left in a local ROOT served with --users.  Without --users the anonymous
#: client's folder is ROOT itself, which then holds every user's folder: a
#: server started so by mistake would show all of them to anyone.
USERS_MARK = ".wsfiles-users"


def _guard_anonymous_root(root: str, *, with_users: bool) -> None:
    mark = os.path.join(root, USERS_MARK)
    if with_users:
        if not os.path.exists(mark):
            with open(mark, "w", encoding="utf-8") as f:
                f.write("This ROOT holds users' folders: serve it with --users.\n")
        return
    if os.path.exists(mark):
        raise usage.UsageError(
            f"--root {root!r} was served with --users (it holds users' folders):"
            " without --users anyone could read them all; pass --users, or"
            f" remove {mark} if ROOT's folders are meant for anonymous clients"
        )


def _storage(options: Options, reactor: Any) -> Any:
    if options["storage"] == "s3":
        try:
            from wsfiles.storage.s3 import S3Client, S3Storage
        except ImportError as e:
            raise usage.UsageError(
                f"--storage s3 needs botocore ({e}): pip install 'wsfiles[s3]'"
            ) from None

        access, secret = options["s3-keys"]
        client = S3Client(
            reactor,
            options["s3-endpoint"],
            options["s3-bucket"],
            access,
            secret,
            options["s3-region"],
        )
        return S3Storage(client)
    try:
        storage = LocalStorage(options["root"])
    except OSError as e:
        raise usage.UsageError(f"cannot use --root {options['root']!r}: {e.strerror}") from None
    swept = storage.sweep_temporary_files()
    if swept:
        _log.info("removed {count} temporary files left by interrupted uploads", count=swept)
    return storage


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve per-client folders over WebSockets: JSON commands on /command,"
        " file data on /file, a web page on /.  See docs/configuration.md."
    )
    optParameters = [
        ["root", "r", "./wsfiles-data", "Folder holding the clients' files (created if missing)."],
        ["users", None, None, "Users file ('wsfiles user add'); without it all are anonymous."],
        ["quota", None, None, "Bytes per client folder (K/M/G/T); the users file may override."],
        ["quota-files", None, None, "Files per client folder; the users file may override."],
        ["max-listing", None, "16M", "Bytes a folder's listing may grow to (new files refused)."],
        [
            "min-rate",
            None,
            "1K",
            "Bytes/s a transfer must average over each --stall-timeout (0: any byte).",
        ],
        ["metrics-listen", None, None, "Serve /metrics and /healthz here, not on --listen."],
        [
            "max-http-connections",
            None,
            None,
            "Connections not (yet) WebSockets, in total (default: 1024, or a quarter"
            " of the open-file limit if lower).",
        ],
        [
            "instance-id",
            None,
            None,
            "Prefix of this instance's tickets, for routing behind a balancer.",
        ],
        ["redis", None, None, "Share state with other instances: redis://HOST[:PORT][/DB]."],
        ["storage", None, "local", "Where files live: 'local' (folders under --root) or 's3'."],
        [
            "s3-endpoint",
            None,
            None,
            "With --storage s3: the store's URL, e.g. http://127.0.0.1:7480.",
        ],
        ["s3-bucket", None, None, "With --storage s3: the bucket."],
        ["s3-region", None, "us-east-1", "With --storage s3: the SigV4 region."],
        [
            "s3-credentials",
            None,
            None,
            "File with 'ACCESS_KEY SECRET_KEY' (default: $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY).",
        ],
        *SHARE_OPTIONS,
        *([name, None, default, text] for name, default, text in SIZE_OPTIONS),
        *([name, None, default, text] for name, default, text in SECONDS_OPTIONS),
        *([name, None, default, text] for name, default, text in COUNT_OPTIONS),
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["allow-origin"] = []
        self["trusted-proxy"] = []
        self["allow-host"] = []

    def opt_listen(self, description: str) -> None:
        """Endpoint to listen on, e.g. tcp:8080:interface=127.0.0.1 (repeatable)."""
        _check_endpoint("--listen", description)
        self["listen"].append(description)

    def opt_trusted_proxy(self, address: str) -> None:
        """A proxy's IP whose X-Forwarded-For is believed for per-IP limits (repeatable)."""
        self["trusted-proxy"].append(address.strip())

    def opt_allow_host(self, name: str) -> None:
        """A host name the service answers to besides localhost and IP literals
        (repeatable; '*.example.org': any name under it; '*': any)."""
        try:
            self["allow-host"].append(normalise_host_name(name))
        except ValueError as e:
            raise usage.UsageError(f"--allow-host: {e}") from None

    def opt_allow_origin(self, origin: str) -> None:
        """A web origin allowed besides the service's own (repeatable; '*': any)."""
        self["allow-origin"].append(origin.strip())

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        for name, _, _ in SIZE_OPTIONS:
            self[name] = _size(name, self[name])
        for name, _, _ in SECONDS_OPTIONS:
            self[name] = _positive_seconds(name, self[name])
        for name, _, _ in COUNT_OPTIONS:
            self[name] = _positive_count(name, self[name])
        if self["max-http-connections"] is None:
            self["max-http-connections"] = _default_http_connections()
        else:
            self["max-http-connections"] = _positive_count(
                "max-http-connections", self["max-http-connections"]
            )
        if self["quota"] is not None:
            self["quota"] = _size("quota", self["quota"])
        if self["quota-files"] is not None:
            self["quota-files"] = _positive_count("quota-files", self["quota-files"])
        self["max-listing"] = _size("max-listing", self["max-listing"])
        self["shares"] = share_settings(self)
        self["min-rate"] = _size("min-rate", self["min-rate"])
        if self["metrics-listen"] is not None:
            _check_endpoint("--metrics-listen", self["metrics-listen"])
        if self["redis"] is not None:
            try:
                RedisAddress.parse(self["redis"])
            except ValueError as e:
                raise usage.UsageError(f"--redis: {e}") from None
        if self["users"] is not None:
            try:
                self["users"] = UserDirectory(self["users"])
            except UsersFileError as e:
                raise usage.UsageError(str(e)) from None
        root = self["root"]
        if os.path.exists(root) and not os.path.isdir(root):
            raise usage.UsageError(f"--root {root!r} exists and is not a folder")
        instance = self["instance-id"]
        if instance is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", instance):
            raise usage.UsageError("--instance-id: 1-32 of A-Z a-z 0-9 _ -")
        if self["storage"] not in ("local", "s3"):
            raise usage.UsageError("--storage must be 'local' or 's3'")
        if self["storage"] == "s3":
            if not self["s3-endpoint"] or not self["s3-bucket"]:
                raise usage.UsageError("--storage s3 needs --s3-endpoint and --s3-bucket")
            self["s3-keys"] = _s3_keys(self["s3-credentials"])
        else:  # last, once every other option is known to be good
            try:  # here, so that a root we cannot make is a usage error
                os.makedirs(root, exist_ok=True)
            except OSError as e:
                raise usage.UsageError(f"cannot create --root {root!r}: {e.strerror}") from None
            if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
                raise usage.UsageError(f"--root {root!r} is not writable by this user")
            _guard_anonymous_root(root, with_users=self["users"] is not None)

    def settings(self) -> Settings:
        return Settings(
            max_size=self["max-size"],
            channel_timeout=self["channel-timeout"],
            handshake_timeout=self["handshake-timeout"],
            idle_timeout=self["idle-timeout"],
            stall_timeout=self["stall-timeout"],
            min_rate=self["min-rate"],
            auto_ping_interval=self["ping-interval"],
            auto_ping_timeout=self["ping-timeout"],
            rate_limit=self["rate-limit"],
            allow_origins=tuple(self["allow-origin"]),
            http=HttpPolicy(
                allow_hosts=tuple(self["allow-host"]),
                max_connections=self["max-http-connections"],
                max_per_ip=self["max-http-connections-per-ip"],
                keepalive_timeout=self["keepalive-timeout"],
            ),
            limits=Limits(
                total=self["max-connections"],
                per_client=self["max-connections-per-client"],
                per_ip=self["max-connections-per-ip"],
            ),
            quota=self["quota"],
            quota_files=self["quota-files"],
            max_listing=self["max-listing"],
            min_free=self["min-free"],
            metrics_on_main_listener=self["metrics-listen"] is None,
            instance_id=self["instance-id"],
            trusted_proxies=tuple(self["trusted-proxy"]),
            redis=self["redis"],
            download_ticket_ttl=self["download-ticket-ttl"],
        )


class _AnnouncingEndpoint:
    """Wraps a server endpoint to log the address it actually bound.

    Useful with port 0, and it is the line the tests wait for.  It is logged
    once the reactor runs, when signal handlers are in place: from then on
    a SIGTERM stops the service cleanly.  ``listening`` fires then too.
    """

    def __init__(self, endpoint, description: str, reactor) -> None:
        self._endpoint = endpoint
        self._description = description
        self._reactor = reactor
        self.listening: Deferred = Deferred()

    def listen(self, factory):
        def announce(port):
            address = port.getHost()

            def running() -> None:
                _log.info(
                    "wsfiles listening on {host}:{port} ({description})",
                    host=getattr(address, "host", ""),
                    port=getattr(address, "port", ""),
                    description=self._description,
                )
                self.listening.callback(port)

            self._reactor.callWhenRunning(running)
            return port

        return self._endpoint.listen(factory).addCallback(announce)


#: Interrupted resumable uploads are removed within --partial-ttl + this.
SWEEP_EVERY = 60.0
#: A removed or re-tokened user's connections end within this (a stat of the
#: users file each time; every instance sharing the file notices on its own).
USERS_RECHECK_EVERY = 1.0


def _sweep_partials(storage: Any, ttl: float) -> Deferred:
    """Remove expired partials (local folders or the object store)."""

    def report(removed: int) -> None:
        if removed:
            _log.info("removed {count} expired partial uploads", count=removed)

    return defer.maybeDeferred(storage.sweep_partials, ttl).addCallback(report)


class CannotStart(SystemExit, Exception):
    """Start-up failed: one line, no traceback, and the process exits 1.

    A SystemExit, so Python prints only its message; an Exception too, so
    twistd's daemon mode (which catches Exception) reports it to the waiting
    parent through its status pipe, which would otherwise wait for ever.
    """


class WsfilesService(service.MultiService):
    """The service tree's top: readiness, start-up errors, and a graceful stop.

    - A listener that cannot bind stops start-up with one clear line.
    - Once every listener is up, systemd hears ``READY=1``.
    - On SIGTERM: ``STOPPING=1``, the listeners close, transfers in flight
      get ``grace`` seconds, then the rest is aborted cleanly.
    """

    def __init__(self, site: WsfilesSite, grace: float) -> None:
        super().__init__()
        self.site = site
        self.grace = grace
        self.endpoints: list[_AnnouncingEndpoint] = []

    def listen(self, description: str, factory: server.Site, reactor) -> None:
        listener = strports.service(description, factory, reactor=reactor)
        endpoint = _AnnouncingEndpoint(listener.endpoint, description, reactor)
        listener.endpoint = endpoint
        self.endpoints.append(endpoint)
        listener.setServiceParent(self)

    def privilegedStartService(self) -> None:
        # One line, once: twistd prints the SystemExit's message (to stderr,
        # which its log also captures), so there is no log event as well.
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise CannotStart(f"wsfiles cannot start: {e}") from None
        except (OSError, OverflowError, ValueError) as e:  # what binding raises besides
            raise CannotStart(f"wsfiles cannot start listening: {e}") from None

    def startService(self) -> None:
        super().startService()
        redis = self.site.command_factory.redis
        if redis is not None:
            redis.start()
        ready = defer.gatherResults([endpoint.listening for endpoint in self.endpoints])
        ready.addCallback(lambda _: notify("READY=1"))

    def stopService(self) -> Deferred:
        notify("STOPPING=1")
        stopped = super().stopService()  # the listeners first: accept nothing new
        stopped.addCallback(lambda _: Deferred.fromCoroutine(self.site.drain(self.grace)))
        redis = self.site.command_factory.redis
        if redis is not None:
            stopped.addCallback(lambda _: redis.stop())
        close = getattr(self.site.storage, "close", None)  # an object store's connections
        if close is not None:
            stopped.addCallback(lambda _: close())
        stopped.addErrback(lambda failure: _log.failure("error while stopping", failure))
        return stopped


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    storage = _storage(options, reactor)
    if not USES_NVX:
        _log.warn(
            "Autobahn's native accelerator (NVX) is off: uploads will be unmasked"
            " in pure Python, several times slower (is AUTOBAHN_USE_NVX=0 set?)"
        )
    site = WsfilesSite(
        options.settings(), storage, options["users"], reactor, shares=options["shares"]
    )
    top = WsfilesService(site, options["grace"])
    ttl = options["partial-ttl"]
    TimerService(min(SWEEP_EVERY, ttl), _sweep_partials, storage, ttl).setServiceParent(top)
    if options["users"] is not None:
        TimerService(USERS_RECHECK_EVERY, site.recheck_users).setServiceParent(top)
    for description in options["listen"]:
        top.listen(description, site, reactor)
    if options["metrics-listen"] is not None:
        top.listen(options["metrics-listen"], site.operations_site(), reactor)
    return top
