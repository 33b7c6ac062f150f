"""The file channel (``/file``): binary frames streamed to and from disk.

A thin protocol.  It is admitted by a ticket its command channel handed
out, then forwards frame events to that channel's ``CommandSession`` and
sends downloads as one binary message of many frames, paced by the
transport's flow control so a slow reader never makes the server buffer
the file.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet import interfaces
from twisted.logger import Logger

from wsfiles.channels import ChannelBook, TrackedChannel, protocol_options
from wsfiles.config import SUBPROTOCOL, Settings
from wsfiles.masking import Unmasking
from wsfiles.pairing import PairingRegistry
from wsfiles.session import CommandSession
from wsfiles.streaming import SEND_BUFFER, MessageFrames

_log = Logger()


class FileChannelProtocol(TrackedChannel, Unmasking, WebSocketServerProtocol):
    """Translates file-channel frames into CommandSession calls."""

    channel_name = "file"
    factory: FileChannelFactory
    session: CommandSession | None = None

    def onConnect(self, request: ConnectionRequest) -> str | None:
        tickets = request.params.get("ticket")
        session = self.factory.registry.redeem(tickets[0]) if tickets else None
        if session is None:
            _log.info("refused a file channel from {peer}: bad ticket", peer=self.peer)
            raise self.factory.book.refuse(403, "missing, invalid, used or expired ticket")
        assert isinstance(session, CommandSession)
        self.session = session
        session.claim(self)
        return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

    def onOpen(self) -> None:
        super().onOpen()
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = SEND_BUFFER
        assert self.session is not None
        self.session.attach(self)

    # -- sending (called by the session) ---------------------------------

    def begin_message(self) -> interfaces.IConsumer:
        self._frames = MessageFrames(self)
        return self._frames

    def end_message(self) -> None:
        self._frames.end()

    def abort(self, code: int, reason: str) -> None:
        if self.state == self.STATE_OPEN:  # a dead connection needs no close frame
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode()[:123], isReply=False)

    def close(self) -> None:
        if self.state == self.STATE_OPEN:
            self.sendClose(1000, "the command channel closed")

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    # -- receiving: stream frames to the session, never buffer them ------

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        if self.session is not None:
            self.session.file_message_begin(self, isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        # Check the transfer's size ourselves first: Autobahn's own limit
        # would close the channel without telling the session why.
        if self.session is not None and not self.session.file_frame_begin(self, length):
            return  # the session closed this channel (1009)
        super().onMessageFrameBegin(length)

    def onMessageFrameData(self, payload: bytes) -> None:
        if self.session is not None:
            self.session.file_data(self, payload)

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        if self.session is not None:
            self.session.file_message_end(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.detach(self)


class FileChannelFactory(WebSocketServerFactory):
    protocol = FileChannelProtocol

    def __init__(self, settings: Settings, registry: PairingRegistry, *, book: ChannelBook) -> None:
        super().__init__()
        self.settings = settings
        self.registry = registry
        self.book = book
        # One frame may carry a whole file (browsers never fragment), so the
        # frame limit is the file limit; the session enforces each transfer's
        # declared size as frames arrive.  Autobahn treats 0 as "unlimited".
        limit = max(settings.max_size, 1)
        self.setProtocolOptions(
            **protocol_options(settings, maxMessagePayloadSize=limit, maxFramePayloadSize=limit),
            applyMask=False,  # Unmasking does it, faster (wsfiles.masking)
        )
