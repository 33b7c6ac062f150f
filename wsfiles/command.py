"""The command channel (``/command``): JSON text frames in, JSON text frames out.

A thin protocol: it authenticates the handshake, then hands each message to
a ``CommandSession`` (session.py), which does all the work.
"""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.logger import Logger

from wsfiles.config import COMMAND_MESSAGE_LIMIT, SUBPROTOCOL, Settings
from wsfiles.pairing import PairingRegistry
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


class CommandChannelProtocol(WebSocketServerProtocol):
    """Translates command-channel frames into CommandSession calls."""

    factory: CommandChannelFactory
    session: CommandSession | None = None
    _client: str | None = None

    def onConnect(self, request: ConnectionRequest) -> Any:
        subprotocol = SUBPROTOCOL if SUBPROTOCOL in request.protocols else None
        users = self.factory.users
        if users is None:
            return subprotocol
        token = bearer_token(request)
        if not token:
            raise ConnectionDeny(401, "a token is required")

        def authenticated(name: str | None) -> str | None:
            if name is None:
                _log.info("refused a command channel from {peer}: wrong token", peer=self.peer)
                raise ConnectionDeny(401, "wrong token")
            self._client = name
            return subprotocol

        return users.authenticate(token).addCallback(authenticated)

    def onOpen(self) -> None:
        factory = self.factory
        client = self._client or ANONYMOUS
        self.session = CommandSession(
            client=client,
            folder=factory.storage.folder(self._client),
            registry=factory.registry,
            max_size=factory.settings.max_size,
            send=self._send_json,
        )
        _log.info("client {client} connected from {peer}", client=client, peer=self.peer)
        self.session.start()

    def _send_json(self, message: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(message).encode("utf-8"), isBinary=False)

    # Text messages are buffered by Autobahn (they are small: the factory
    # limits them); binary ones are refused at their first byte and their
    # payload is dropped instead of buffered.
    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if isBinary and self.session is not None:
            self.session.binary_received()

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
    ) -> None:
        super().__init__()
        self.settings = settings
        self.storage = storage
        self.registry = registry
        self.users = users
        self.setProtocolOptions(
            maxMessagePayloadSize=COMMAND_MESSAGE_LIMIT,
            maxFramePayloadSize=COMMAND_MESSAGE_LIMIT,
            failByDrop=False,
            webStatus=False,
            openHandshakeTimeout=settings.open_handshake_timeout,
            autoPingInterval=settings.auto_ping_interval,
            autoPingTimeout=settings.auto_ping_timeout,
        )
