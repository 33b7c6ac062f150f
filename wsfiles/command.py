"""The command channel (``/command``): JSON text frames in, JSON text frames out.

A thin protocol: it vets the handshake (origin, token, connection limits),
then hands each message to a ``CommandSession`` (session.py), which does all
the work.
"""

from __future__ import annotations

import inspect
import json
from collections import deque
from collections.abc import Callable
from types import FunctionType, MappingProxyType
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wsfiles.admission import ConnectionSlots, forwarded_client
from wsfiles.changes import ChangeHub
from wsfiles.channels import ChannelBook, TrackedChannel, protocol_options
from wsfiles.config import COMMAND_MESSAGE_LIMIT, SUBPROTOCOL, Settings
from wsfiles.folders import SUBPROTOCOL_12
from wsfiles.pairing import PairingRegistry
from wsfiles.quota import EntryLimits, QuotaLedger
from wsfiles.ratelimit import ClientBuckets
from wsfiles.redisstate import RedisState
from wsfiles.session import CommandSession
from wsfiles.storage import IStorage
from wsfiles.users import TooManyChecks, UserDirectory, UserEntry

_log = Logger()

#: Close code for a channel whose user was removed or whose token was
#: rotated or expired (docs/protocol.md, "Close codes").
CLOSE_REVOKED = 4401

ANONYMOUS = "anonymous"

#: What Autobahn keeps per connection that only the opening handshake reads
#: (the raw request and response, parsed headers, the key, what the client
#: offered), and the empty value each reads as once the connection is open.
_HANDSHAKE_ONLY: dict[str, Any] = {
    "http_headers": MappingProxyType({}),
    "http_request_data": b"",
    "http_response_data": "",
    "http_status_line": "",
    "http_request_uri": "",
    "http_request_path": "",
    "http_request_host": "",
    "http_request_params": MappingProxyType({}),
    "websocket_protocols": (),
    "websocket_extensions": (),
    "websocket_origin": "",
    "_wskey": None,
}

#: Values an open connection's attribute may share with its class's default.
_IMMUTABLE = (type(None), bool, int, float, str, bytes, tuple, MappingProxyType)

#: Autobahn's per-connection state as it stands on an open, quiet connection:
#: class-level defaults, so that an idle connection's instance dict needs
#: none of them (see ``CommandChannelProtocol._compact``).  Every one is
#: immutable; Autobahn assigns, never mutates, them.
_OPEN_STATE_DEFAULTS: dict[str, Any] = {
    "_perMessageCompress": None,
    "autoPingPending": None,
    "autoPingPendingSent": None,
    "autoPingPendingSeq": 0,
    "autoPingTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "openHandshakeTimeoutCall": None,
    "closedByMe": False,
    "droppedByMe": False,
    "failedByMe": False,
    "current_frame": None,
    "data": b"",
    "inside_message": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "send_state": 0,  # SEND_STATE_GROUND
    "trackedTimings": None,
    "triggered": False,
    "wasClean": False,
    "wasCloseHandshakeTimeout": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "wasNotCleanReason": None,
    "wasOpenHandshakeTimeout": False,
    "wasServerConnectionDropTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "websocket_extensions_in_use": (),
    "websocket_protocol_in_use": None,
    "websocket_version": 13,
    # Autobahn queues writes only for sync/chopped sends, which wsfiles never
    # makes; ``sendData`` gives a connection its own deque if one comes.
    "send_queue": (),
}
#: Per-connection containers that an open connection leaves empty (Autobahn
#: fills them only during the handshake or for queued writes): an empty one
#: is dropped in favour of the shared empty default.
_EMPTY_SHARED = frozenset({"send_queue", "websocket_extensions_in_use"})


def bearer_token(request: ConnectionRequest) -> str | None:
    """The token from ``Authorization: Bearer T`` or, for browsers, ``?token=T``."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    tokens = request.params.get("token")
    return tokens[0] if tokens else None


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked WebSocket text frame (RFC 6455 section 5.2) carrying ``payload``."""
    length = len(payload)
    if length <= 125:
        return bytes((0x81, length)) + payload
    if length <= 0xFFFF:
        return b"\x81\x7e" + length.to_bytes(2, "big") + payload
    return b"\x81\x7f" + length.to_bytes(8, "big") + payload


@implementer(IPushProducer)
class CommandChannelProtocol(TrackedChannel, WebSocketServerProtocol):
    """Translates command-channel frames into CommandSession calls.

    It is also the producer of its replies: when a client stops reading them
    and the send buffer fills, Twisted pauses it and it stops reading that
    client's commands until the buffer drains (a reply can be a whole listing,
    so a client that only sends would otherwise grow the server's memory).
    """

    channel_name = "command"

    factory: CommandChannelFactory
    session: CommandSession | None = None
    _client: str | None = None
    #: The users-file line (token id, hash) this channel was admitted with.
    _credential: tuple[str, str] | None = None
    _slot: tuple[str, str] | None = None
    _bucket_key = ""
    #: The client offered protocol 1.2 (folders) at the handshake.
    _folders = False
    send_queue: Any

    def onConnect(self, request: ConnectionRequest) -> Any:
        # A client that offers wsfiles.v1.2 speaks protocol 1.2 (folders).
        if SUBPROTOCOL_12 in request.protocols:
            subprotocol: str | None = SUBPROTOCOL_12
            self._folders = True
        else:
            subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.protocols else None
        users = self.factory.users
        ip = self._client_ip(request)
        if users is None:
            taking = self._take_slot(ANONYMOUS, ip)
            return subprotocol if taking is None else taking.addCallback(lambda _: subprotocol)
        token = bearer_token(request)
        if not token:
            _log.info("refused a command channel from {peer}: no token", peer=self.peer)
            raise self.factory.book.refuse(401, "a token is required")

        def authenticated(name: str | None) -> str | None:
            if self.gone.called:
                raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "gone during the token check")
            if name is None:
                _log.info("refused a command channel from {peer}: wrong token", peer=self.peer)
                raise self.factory.book.refuse(401, "wrong token")
            self._client = name
            self._credential = users.credential_of(name)
            taking = self._take_slot(name, ip)
            return subprotocol if taking is None else taking.addCallback(lambda _: subprotocol)

        def throttled(failure: Failure) -> None:
            failure.trap(TooManyChecks)
            _log.info("refused a command channel from {ip}: {reason}", ip=ip, reason=failure.value)
            # 403, not 429: a client can tell "slow down signing in" from
            # "too many connections" (docs/protocol.md).
            raise self.factory.book.refuse(403, str(failure.value))

        checking = users.authenticate(token, wanted=lambda: not self.gone.called, address=ip)
        return checking.addCallbacks(authenticated, throttled)

    def _client_ip(self, request: ConnectionRequest) -> str:
        """The peer's address; behind a trusted proxy, the one it forwarded for."""
        peer = getattr(self.transport.getPeer(), "host", "")
        forwarded = request.headers.get("x-forwarded-for")
        return forwarded_client(peer, forwarded, self.factory.settings.trusted_proxies)

    def _take_slot(self, client: str, ip: str) -> Deferred | None:
        """Take a connection slot or refuse; a Deferred when Redis must be asked."""
        refusal = self.factory.slots.refusal(client, ip)
        if inspect.isawaitable(refusal):
            return Deferred.fromCoroutine(refusal).addCallback(self._slot_answer, client, ip)
        self._slot_answer(refusal, client, ip)
        return None

    def _slot_answer(self, refusal: tuple[int, str] | None, client: str, ip: str) -> None:
        slots = self.factory.slots
        if refusal is not None:
            status, reason = refusal
            _log.warn(
                "refused a command channel for {client} from {ip}: {reason}",
                client=client,
                ip=ip,
                reason=reason,
            )
            raise self.factory.book.refuse(status, reason)
        if self.gone.called:
            # Gone while the token was checked or Redis asked: onClose has run
            # already, so no slot may be taken and no session opened.  (Autobahn
            # would otherwise complete the handshake of the dead connection.)
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, "gone during the handshake")
        slots.take(client, ip)
        self._slot = (client, ip)

    def onOpen(self) -> None:
        super().onOpen()
        self.transport.registerProducer(self, True)
        self._compact()
        factory = self.factory
        client = self._client or ANONYMOUS
        self._bucket_key = factory.buckets.key(
            client, self._slot[1] if self._slot else self.peer, anonymous=self._client is None
        )
        self.session = CommandSession(
            client=client,
            folder=factory.storage.folder(self._client),
            registry=factory.registry,
            settings=factory.settings,
            send=self._send_json,
            send_raw=self._send_text,
            clock=factory.clock,
            close_connection=self._close,
            quota=factory.quota,
            entry_limits=factory.entry_limits,
            changes=factory.changes,
            folder_key=self._client,
            metrics=factory.book.metrics,
            bucket=factory.buckets.take(self._bucket_key),
            folders=self._folders,
            permissions=self._permissions(),
            shares=factory.shares,
        )
        self.session.draining = factory.draining  # a stop began during the handshake
        _log.info("client {client} connected from {peer}", client=client, peer=self.peer)
        self.session.start()

    def _permissions(self) -> Callable[[], UserEntry | None] | None:
        """How the session reads this client's users-file line (read_only,
        max_size) at each command: a ``wsfiles user set`` applies without
        closing the connection."""
        users, name = self.factory.users, self._client
        if users is None or name is None:
            return None
        return lambda: users.permissions_of(name)

    def _compact(self) -> None:
        """Shrink this connection's instance dict to what differs per connection.

        Autobahn keeps about 90 attributes per connection; most hold the
        handshake, which is over, or equal the class-level defaults above (the
        factory's options live on its protocol class, see
        ``CommandChannelFactory``).  Dropping those and rebuilding the dict
        takes an idle connection's dict from 3.3 kB to under 0.5 kB.  Reads
        see the same values; Autobahn's later assignments land in the
        instance again.
        """
        cls = type(self)
        kept: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if name in _HANDSHAKE_ONLY:
                continue
            default = getattr(cls, name, _MISSING)
            if value is default or (
                type(value) is type(default) and type(value) in _IMMUTABLE and value == default
            ):
                continue
            if name in _EMPTY_SHARED and not value:
                continue
            kept[name] = value
        self.__dict__ = kept
        # The transport's dict grew during the handshake's writes to a table
        # of 832 bytes for 17 keys; rebuilt, the same keys take 464.
        transport_state = getattr(self.transport, "__dict__", None)
        if transport_state is not None:
            self.transport.__dict__ = dict(transport_state)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if sync or chopsize or self.send_queue:
            if type(self.send_queue) is not deque:
                self.send_queue = deque(self.send_queue)
            super().sendData(data, sync, chopsize)
            return
        # Autobahn's own version formats a debug log line for every write.
        self.transport.write(data)
        if self.state == self.STATE_OPEN:
            self.trafficStats.outgoingOctetsWireLevel += len(data)
        elif self.state == self.STATE_CONNECTING:
            self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logTxOctets(data, False)

    def _send_json(self, message: dict[str, Any]) -> None:
        self._send_text(json.dumps(message).encode("utf-8"))

    def _send_text(self, payload: bytes) -> None:
        if self.state != self.STATE_OPEN:  # closing or closed: nobody to tell
            return
        if (
            self._perMessageCompress is None
            and not self.autoFragmentSize
            and not self.maskServerFrames
            and not self.logFrames
            and not self.trackedTimings
        ):
            # What sendMessage would send (one unmasked, uncompressed text
            # frame), without its per-message bookkeeping.
            self.sendData(text_frame(payload))
        else:
            self.sendMessage(payload, isBinary=False)

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's own version formats a debug log line for every read.
        self._dataReceived(data)

    # -- IPushProducer: replies pace the reading of commands ------------------

    # Twisted pauses us from inside the write that filled the buffer: the rest
    # of the read being parsed still reaches the session, which holds those
    # commands until we resume.  A listing over the buffer's 64 KiB pauses and
    # resumes once even for a client that reads at once; that costs nothing.
    # Closing relies on Autobahn's dropConnection unregistering this producer
    # (a registered producer would hold up loseConnection).

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()
        if self.session is not None:
            self.session.client_backed_up()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()
        if self.session is not None:
            self.session.client_caught_up()

    def stopProducing(self) -> None:
        pass

    def end_if_revoked(self, users: UserDirectory) -> None:
        """Close with 4401 when the line this channel was admitted with is gone
        (removed, a new token, or its ``expires`` passed; other settings
        changing leave it open).

        The session's close then ends its file channel and aborts its
        transfers as on any close: temp files removed, nothing half-stored.
        """
        if self._client is None or self.state != self.STATE_OPEN:
            return
        if users.credential_of(self._client) != self._credential:
            _log.info(
                "closing the command channel of {client}: its token is no longer valid",
                client=self._client,
            )
            self._close(CLOSE_REVOKED, "credentials no longer valid")

    def going_away(self) -> None:
        """The server is stopping: close with 1001."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=1001, reasonUtf8=b"server shutting down", isReply=False)

    def _close(self, code: int, reason: str) -> None:
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)

    # Text messages are buffered by Autobahn (they are small: we limit them);
    # binary ones, of any size, are refused at their first byte and their
    # payload is dropped instead of buffered, so the channel stays usable.
    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if isBinary and self.session is not None:
            self.session.binary_received()

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        # The message limit is ours, not Autobahn's: Autobahn would also apply
        # it to what we send (a long file list is a large message), and to the
        # binary messages we drop.
        if (
            not self.message_is_binary
            and self.message_data_total_length > COMMAND_MESSAGE_LIMIT
            and not self.failedByMe
        ):
            self._fail_connection(1009, f"commands are limited to {COMMAND_MESSAGE_LIMIT} bytes")

    def onMessageFrameData(self, payload: bytes) -> None:
        # Empty frames are legal and carry nothing; Autobahn would keep a list
        # entry for each, and the 64 KiB limit counts bytes, not frames.
        if payload and not self.message_is_binary:
            super().onMessageFrameData(payload)

    def onMessageFrameEnd(self) -> None:
        if not self.message_is_binary:
            super().onMessageFrameEnd()

    def onMessageEnd(self) -> None:
        if not self.message_is_binary:
            super().onMessageEnd()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.session is not None:
            self.session.text_received(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self._slot is not None:
            self.factory.slots.release(*self._slot)
            self._slot = None
        if self.session is not None:
            _log.info("client {client} disconnected", client=self.session.client)
            self.session.close()
            self.session = None
            self.factory.buckets.release(self._bucket_key)


for _name, _value in {**_HANDSHAKE_ONLY, **_OPEN_STATE_DEFAULTS}.items():
    setattr(CommandChannelProtocol, _name, _value)

_MISSING = object()


def _with_options(base: type, factory: WebSocketServerFactory) -> type:
    """A subclass of ``base`` whose class attributes are ``factory``'s protocol options.

    Autobahn copies every option (about 35) from the factory into each
    connection's instance dict unless the class already has it: here it has,
    so connections share them.  The factory itself is a class attribute too.
    """
    options: dict[str, Any] = {}
    for name in base.CONFIG_ATTRS:  # type: ignore[attr-defined]
        value = getattr(factory, name)
        # A function option (perMessageCompressionAccept) must not become a method.
        options[name] = staticmethod(value) if isinstance(value, FunctionType) else value
    return type(
        base.__name__, (base,), {**options, "factory": factory, "__module__": base.__module__}
    )


class CommandChannelFactory(WebSocketServerFactory):
    protocol = CommandChannelProtocol

    def __init__(
        self,
        settings: Settings,
        storage: IStorage,
        registry: PairingRegistry,
        users: UserDirectory | None,
        *,
        clock: IReactorTime,
        book: ChannelBook,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.storage = storage
        self.registry = registry
        self.users = users
        self.clock = clock
        self.book = book
        #: Set when the service begins a graceful stop.
        self.draining = False
        #: The site's share links (set by WsfilesSite), handed to each session.
        self.shares: Any = None
        quota_override = users.quota_of if users else lambda _: None
        self.buckets = ClientBuckets(settings.rate_limit, clock)
        self.entry_limits = EntryLimits(
            settings.quota_files,
            settings.max_listing,
            users.quota_files_of if users else lambda _: None,
        )
        self.redis: RedisState | None = None
        if settings.redis is None:
            self.slots = ConnectionSlots(settings.limits)
            self.changes = ChangeHub(storage, clock)
            self.quota = QuotaLedger(settings.quota, quota_override)
        else:
            self.redis = RedisState(
                settings.redis,
                storage=storage,
                reactor=clock,
                limits=settings.limits,
                quota=settings.quota,
                quota_override=quota_override,
                name=settings.instance_id,
            )
            self.slots = self.redis.slots
            self.changes = self.redis.changes
            self.quota = self.redis.quota
        self.setProtocolOptions(
            **protocol_options(
                settings,
                # Text is limited in onMessageFrameBegin; binary is dropped as it comes.
                maxMessagePayloadSize=0,
                maxFramePayloadSize=0,
            )
        )

    def setProtocolOptions(self, **options: Any) -> None:
        super().setProtocolOptions(**options)
        # Each change makes a new class: connections already open keep theirs.
        self.protocol = _with_options(CommandChannelProtocol, self)
