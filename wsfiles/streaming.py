"""Moving bytes with flow control, shared by the server and the client.

``FileStreamer`` pushes a file into any IConsumer in fixed-size chunks and
stops whenever the consumer says its buffer is full; ``MessageFrames`` is
the consumer that turns those chunks into frames of one binary WebSocket
message.  Together they send a file of any size with bounded memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from zope.interface import implementer

#: Frame size for file data from a process whose malloc is not tuned
#: (wsfiles.tuning): larger reads would each cost it a fresh mmap.
CHUNK_SIZE = 128 * 1024
#: Frame size of the downloads the server sends.  Autobahn copies the rest of
#: a read at every frame boundary it finds in it; 1 MiB frames cut the
#: receiving client's CPU by about a sixth against 128 KiB ones, and the
#: server's too (docs/performance.md).
DOWNLOAD_FRAME = 1024 * 1024
SEND_BUFFER = 256 * 1024


class StreamFailed(Exception):
    """The source could not be read, or streaming was stopped.

    ``consumer_gone`` tells a lost connection (the transport stopped us)
    from a failure of the source.
    """

    def __init__(self, message: str, *, consumer_gone: bool = False) -> None:
        super().__init__(message)
        self.consumer_gone = consumer_gone


class StreamEnd:
    """The end of a push producer's stream, shared by every streamer: let go of
    the consumer, then fire ``_done`` (once) with success or the failure."""

    _done: Deferred | None
    _consumer: interfaces.IConsumer | None

    def _finish(self, failure: Exception | None) -> None:
        done, self._done = self._done, None
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.unregisterProducer()
        if done is None:
            return
        if failure is None:
            done.callback(None)
        else:
            done.errback(failure)


@implementer(interfaces.IPushProducer)
class FileStreamer(StreamEnd):
    """Streams ``size`` bytes of ``source`` to a consumer in ``chunk_size`` pieces,
    pausing when told to and hashing them as it reads.

    Reads are inline: a read-ahead thread measured slower on 2 cores
    (docs/performance.md).  ``sha256`` may be a hash already fed with earlier
    bytes (a resumed transfer) to continue.
    """

    def __init__(
        self, source: BinaryIO, size: int, chunk_size: int = CHUNK_SIZE, *, sha256: Any = None
    ) -> None:
        self._source = source
        self.size = size
        self._chunk_size = chunk_size
        self._remaining = size  # not yet written to the consumer
        self.sha256 = sha256 if sha256 is not None else hashlib.sha256()
        self._consumer: interfaces.IConsumer | None = None
        self._paused = False
        self._done: Deferred | None = None

    def stream_to(self, consumer: interfaces.IConsumer) -> Deferred:
        """Fire with None once every byte was written to ``consumer``."""
        self._consumer = consumer
        self._done = Deferred()
        done = self._done
        consumer.registerProducer(self, True)
        self.resumeProducing()
        return done

    def resumeProducing(self) -> None:
        """Write until the consumer's buffer fills (it then calls pauseProducing
        from inside write) or the file is exhausted."""
        self._paused = False
        while not self._paused and self._done is not None and self._remaining > 0:
            try:
                chunk = self._source.read(min(self._chunk_size, self._remaining))
            except OSError as e:
                self._finish(StreamFailed(os.strerror(e.errno) if e.errno else str(e)))
                return
            if not chunk:
                self._finish(StreamFailed("the file shrank while it was being sent"))
                return
            self.sha256.update(chunk)
            self._remaining -= len(chunk)
            assert self._consumer is not None
            self._consumer.write(chunk)
        if self._remaining == 0 and self._done is not None:
            self._finish(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        """The transport is gone (it calls this before the protocol hears of it)."""
        if self._done is not None:
            self._finish(StreamFailed("the connection was lost", consumer_gone=True))

    def stop(self) -> None:
        """Give up: the Deferred from ``stream_to`` fails with StreamFailed."""
        if self._done is not None:
            self._finish(StreamFailed("the transfer was stopped"))


@implementer(interfaces.IConsumer)
class MessageFrames:
    """An IConsumer whose writes become the frames of one binary message.

    The message begins with the first write; ``end`` closes it, and sends an
    empty message if nothing was written (Autobahn cannot end a message that
    has no frame).
    """

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol
        self._begun = False
        self.ended = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._protocol.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        transport = self._protocol.transport
        if transport is not None and getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()

    def write(self, data: bytes) -> None:
        if not self._begun:
            self._begun = True
            self._protocol.beginMessage(isBinary=True)
        self._protocol.sendMessageFrame(data)

    def end(self) -> None:
        """Finish the message (once; later calls do nothing)."""
        if self.ended:
            return
        self.ended = True
        if self._begun:
            self._protocol.endMessage()
        else:
            self._protocol.sendMessage(b"", isBinary=True)


@implementer(interfaces.IConsumer)
class CountingConsumer:
    """Passes writes through to ``inner``, counting them and reporting progress."""

    def __init__(
        self, inner: interfaces.IConsumer, progress: Callable[[int], None] | None = None
    ) -> None:
        self._inner = inner
        self._progress = progress
        self.written = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._inner.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._inner.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self._inner.write(data)
        if self._progress is not None:
            self._progress(self.written)
