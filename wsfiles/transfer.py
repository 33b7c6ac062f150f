"""The file channel (``/file``): binary frames streamed to and from disk.

A thin protocol.  It is admitted by a ticket its command channel handed
out, then forwards frame events to that channel's ``CommandSession`` and
sends downloads as one binary message of many frames, paced by the
transport's flow control so a slow reader never makes the server buffer
the file.
"""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionRequest
from twisted.internet import interfaces
from twisted.logger import Logger
from zope.interface import implementer

from wsfiles.channels import ChannelBook, TrackedChannel, protocol_options
from wsfiles.config import SUBPROTOCOL, Settings
from wsfiles.masking import Unmasking
from wsfiles.pairing import PairingRegistry
from wsfiles.session import CommandSession
from wsfiles.streaming import SEND_BUFFER, MessageFrames

_log = Logger()


class _DownloadFrames(MessageFrames):
    """A download's frames: its producer is paced through the channel, which
    stays its transport's producer (see ``FileChannelProtocol``)."""

    _protocol: FileChannelProtocol

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._protocol.download_producer = producer

    def unregisterProducer(self) -> None:
        if self._protocol.download_producer is not None:
            self._protocol.download_producer = None
            self._protocol.download_ended()


@implementer(interfaces.IPushProducer)
class FileChannelProtocol(TrackedChannel, Unmasking, WebSocketServerProtocol):
    """Translates file-channel frames into CommandSession calls.

    It is its transport's producer for the whole connection, as the command
    channel is, so that nothing it sends can back up without bound (a client
    could send pings and never read the pongs).  When the send buffer fills:

    - with no download running, only replies to the client (pongs) fill it:
      it stops reading the client until the buffer drains;
    - during a download, the download's producer is paused instead, and
      reading goes on (the client's pongs to our pings and its close frame
      must still be read); pings that arrive meanwhile get one pong, for the
      latest, once the buffer drains (RFC 6455 5.5.3 allows that).
    """

    channel_name = "file"
    factory: FileChannelFactory
    session: CommandSession | None = None
    #: The producer of the download being sent (paced with the transport).
    download_producer: Any = None
    #: The send buffer is over its size (the transport paused us).
    _send_backed_up = False
    #: The session holds reading (an upload's write to storage is pending).
    _held_by_session = False
    _reading_paused = False
    #: The latest ping that came while backed up: answered once drained.
    _pending_pong: bytes | None = None

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
        self.transport.registerProducer(self, True)
        assert self.session is not None
        self.session.attach(self)

    # -- sending (called by the session) ---------------------------------

    def begin_message(self) -> interfaces.IConsumer:
        self._frames = _DownloadFrames(self)
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
        """The session holds reading (an upload's write to storage is pending)."""
        self._held_by_session = True
        self._pace_reading()

    def resume_reading(self) -> None:
        self._held_by_session = False
        self._pace_reading()

    # -- IPushProducer: what we send paces what we read ------------------

    def pauseProducing(self) -> None:
        self._send_backed_up = True
        if self.download_producer is not None:
            self.download_producer.pauseProducing()
        self._pace_reading()

    def resumeProducing(self) -> None:
        self._send_backed_up = False
        self._pace_reading()
        pong, self._pending_pong = self._pending_pong, None
        if pong is not None and self.state == self.STATE_OPEN:
            self.sendPong(pong)
        if self.download_producer is not None:
            self.download_producer.resumeProducing()

    def download_ended(self) -> None:
        """With no download left to pause, unread pongs pace reading again."""
        self._pace_reading()

    def stopProducing(self) -> None:
        """The connection is gone: so is the download's consumer."""
        producer, self.download_producer = self.download_producer, None
        if producer is not None:
            producer.stopProducing()

    def _pace_reading(self) -> None:
        """Read unless the session holds us, or pongs alone back the client up."""
        paused = self._held_by_session or (self._send_backed_up and self.download_producer is None)
        if paused == self._reading_paused or self.transport is None:
            return
        self._reading_paused = paused
        if paused:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()

    def onPing(self, payload: bytes) -> None:
        if self._send_backed_up:
            self._pending_pong = payload  # only the latest needs an answer
            return
        super().onPing(payload)

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
