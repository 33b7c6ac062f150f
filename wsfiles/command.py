"""The command channel (``/command``): JSON text frames in, JSON text frames out.

A thin protocol: it vets the handshake (origin, token, connection limits),
then hands each message to a ``CommandSession`` (session.py), which does all
the work.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from wsfiles.admission import ConnectionSlots
from wsfiles.changes import ChangeHub
from wsfiles.channels import ChannelBook, TrackedChannel, protocol_options
from wsfiles.config import COMMAND_MESSAGE_LIMIT, SUBPROTOCOL, Settings
from wsfiles.pairing import PairingRegistry
from wsfiles.quota import QuotaLedger
from wsfiles.redisstate import RedisState
from wsfiles.session import CommandSession
from wsfiles.storage import IStorage
from wsfiles.users import UserDirectory

_log = Logger()

ANONYMOUS = "anonymous"


def bearer_token(request: ConnectionRequest) -> str | None:
    """The token from ``Authorization: Bearer T`` or, for browsers, ``?token=T``."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    tokens = request.params.get("token")
    return tokens[0] if tokens else None


class CommandChannelProtocol(TrackedChannel, WebSocketServerProtocol):
    """Translates command-channel frames into CommandSession calls."""

    channel_name = "command"

    factory: CommandChannelFactory
    session: CommandSession | None = None
    _client: str | None = None
    _slot: tuple[str, str] | None = None

    def onConnect(self, request: ConnectionRequest) -> Any:
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
            taking = self._take_slot(name, ip)
            return subprotocol if taking is None else taking.addCallback(lambda _: subprotocol)

        return users.authenticate(token, wanted=lambda: not self.gone.called).addCallback(
            authenticated
        )

    def _client_ip(self, request: ConnectionRequest) -> str:
        """The peer's address; behind a trusted proxy, the one it forwarded for."""
        peer = getattr(self.transport.getPeer(), "host", "")
        if peer in self.factory.settings.trusted_proxies:
            forwarded = request.headers.get("x-forwarded-for", "")
            if forwarded.strip():
                return forwarded.split(",")[-1].strip()  # what our proxy appended
        return peer

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
        # Behind WebSocketResource the HTTPChannel stays registered as the
        # transport's producer, which keeps it and its Request (headers and
        # all) alive as long as the connection: about 3 kB each, for nothing.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        # Autobahn keeps the handshake (raw request, parsed headers, raw
        # response) for the connection's life; only the handshake reads them.
        self.http_headers = {}
        self.http_request_data = b""
        self.http_response_data = ""
        factory = self.factory
        client = self._client or ANONYMOUS
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
            changes=factory.changes,
            folder_key=self._client,
            metrics=factory.book.metrics,
        )
        self.session.draining = factory.draining  # a stop began during the handshake
        _log.info("client {client} connected from {peer}", client=client, peer=self.peer)
        self.session.start()

    def _send_json(self, message: dict[str, Any]) -> None:
        self._send_text(json.dumps(message).encode("utf-8"))

    def _send_text(self, payload: bytes) -> None:
        if self.state == self.STATE_OPEN:  # closing or closed: nobody to tell
            self.sendMessage(payload, isBinary=False)

    def going_away(self) -> None:
        """The server is stopping: close with 1001."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=1001, reasonUtf8=b"server shutting down", isReply=False)

    def _close(self, code: int, reason: str) -> None:
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)

    # Text messages are buffered by Autobahn (they are small: the factory
    # limits them); binary ones are refused at their first byte and their
    # payload is dropped instead of buffered.
    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if isBinary and self.session is not None:
            self.session.binary_received()

    def onMessageFrameBegin(self, length: int) -> None:
        super().onMessageFrameBegin(length)
        # The message limit is ours, not Autobahn's: Autobahn would also apply
        # it to what we send, and a long file list is a large message.
        if self.message_data_total_length > COMMAND_MESSAGE_LIMIT and not self.failedByMe:
            self._fail_connection(1009, f"commands are limited to {COMMAND_MESSAGE_LIMIT} bytes")

    def onMessageFrameData(self, payload: bytes) -> None:
        if not self.message_is_binary:
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
        quota_override = users.quota_of if users else lambda _: None
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
                maxMessagePayloadSize=0,  # checked in onMessageFrameBegin, incoming only
                maxFramePayloadSize=COMMAND_MESSAGE_LIMIT,
            )
        )
