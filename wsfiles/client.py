"""A Python client for wsfiles (Twisted + Autobahn).

    client = await connect("ws://127.0.0.1:8080", token=None)
    files = await client.list()
    await client.upload("notes.txt", b"hello")          # or an open binary file
    # Folders (protocol 1.2) need connect(..., subprotocols=COMMAND_SUBPROTOCOLS):
    await client.mkdir("docs/2026", parents=True)
    entries = await client.list("docs", recursive=True)  # every page, followed
    with open("copy.txt", "wb") as sink:
        await client.download("notes.txt", sink)
    await client.close()

It speaks docs/protocol.md and nothing else: it opens the file channel when
the server offers one, streams uploads with flow control, streams downloads
into a file object, and checks every SHA-256 the server reports.
"""

from __future__ import annotations

import io
import json
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlencode, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.xormasker import XorMaskerNull
from twisted.internet import defer, endpoints, threads
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IReactorTCP

from wsfiles import hashes
from wsfiles.client_tree import BAD_REPLY, FolderCommands
from wsfiles.config import SUBPROTOCOL
from wsfiles.masking import Masker
from wsfiles.streaming import (
    CHUNK_SIZE,
    DOWNLOAD_FRAME,
    SEND_BUFFER,
    CountingConsumer,
    FileStreamer,
    MessageFrames,
    StreamFailed,
)
from wsfiles.tuning import malloc_tuned

#: What a command channel offers to speak protocol 1.2 (folders) where the
#: server does: 1.2 first, then 1.1.  Opt-in (``connect(subprotocols=...)``;
#: the wsfiles command does): a library's default must not change the shape of
#: the replies its callers already parse (1.2 listings carry folders).
COMMAND_SUBPROTOCOLS: tuple[str, ...] = ("wsfiles.v1.2", SUBPROTOCOL)
#: The default: protocol 1.1.
PROTOCOL_11: tuple[str, ...] = (SUBPROTOCOL,)

#: Client-side error codes (the server's are in docs/protocol.md).
CONNECTION_FAILED = "connection_failed"
CHANNEL_CLOSED = "channel_closed"
CHECKSUM_MISMATCH = "checksum_mismatch"
BAD_URL = "bad_url"
#: Failures a resumable transfer retries after.
RETRYABLE = frozenset({CONNECTION_FAILED, CHANNEL_CLOSED, "stalled", "superseded"})


class WsfilesError(Exception):
    """The server refused a command, or the transfer failed; ``code`` says why."""

    def __init__(
        self,
        code: str,
        message: str,
        reply: dict[str, Any] | None = None,
        *,
        http_status: int | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply = reply
        #: The HTTP status that refused the opening handshake (401: the token), if any.
        self.http_status = http_status


#: The schemes a base URL may have; a browser's http(s) URL names the same server.
_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}


def websocket_base_url(url: str) -> str:
    """``url`` as the ``ws://`` or ``wss://`` base the channels' paths go under.

    ``http://`` and ``https://`` (what a person copies from the browser's
    address bar) mean the same server as ``ws://`` and ``wss://``: the web page
    and both channels share one listener.  A query or fragment is dropped.
    Anything else raises WsfilesError ``bad_url``, saying what would work.
    """
    text = url.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if "://" not in text or not scheme:
        raise WsfilesError(
            BAD_URL, f"{url!r} has no scheme: use ws://{text.lstrip('/')} (or wss://, http(s)://)"
        )
    if scheme not in _SCHEMES:
        raise WsfilesError(
            BAD_URL, f"{url!r}: the scheme must be ws://, wss://, http:// or https://"
        )
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise WsfilesError(BAD_URL, f"{url!r}: the port must be a number 0-65535") from None
    if not parts.hostname:
        raise WsfilesError(BAD_URL, f"{url!r} names no host")
    return f"{_SCHEMES[scheme]}://{parts.netloc}{parts.path.rstrip('/')}"


def _refused(protocol: WebSocketClientProtocol, reason: str | None) -> WsfilesError:
    """Why a channel never opened; a refused handshake keeps its HTTP status."""
    status_line = getattr(protocol, "http_status_line", None) or ""
    fields = status_line.split(None, 2)
    if len(fields) >= 2 and fields[1].isdigit() and fields[1] != "101":
        status = int(fields[1])
        said = fields[2] if len(fields) > 2 else ""
        return WsfilesError(
            CONNECTION_FAILED,
            f"the server refused the connection (HTTP {status} {said})".replace(" )", ")"),
            http_status=status,
        )
    return WsfilesError(CONNECTION_FAILED, str(reason))


class _CommandProtocol(WebSocketClientProtocol):
    client: WsfilesClient

    def onOpen(self) -> None:
        if not self.factory.opened.called:  # (not given up meanwhile)
            self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not isBinary:
            self.factory.client._received(json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(_refused(self, reason))
        self.factory.client._command_closed(code, reason)
        self.factory.closed.callback(code)


class _FileProtocol(WebSocketClientProtocol):
    """The client's end of the file channel: streams messages into a sink."""

    def onOpen(self) -> None:
        self.transport.bufferSize = TUNED_RECEIVE_BUFFER if malloc_tuned() else SEND_BUFFER
        if not self.factory.opened.called:  # (not given up meanwhile)
            self.factory.opened.callback(self)

    _masker: Masker | None = None

    def sendMessageFrame(self, payload: bytes, sync: bool = False) -> None:
        """One frame of the message being sent, masked by wsfiles.masking.

        Autobahn picks the frame's random key and writes the header (it still
        builds its own masker for the frame, unused); the payload is masked
        here (a copy, the XOR in place, and the copy to ``bytes`` Twisted
        insists on) instead of by Autobahn's masker, which also zero-fills
        a buffer first, and Autobahn's masker is swapped for its
        pass-through one so it only keeps count.  No compression is ever
        negotiated on the file channel, so the payload goes out as given.
        """
        if self.state != self.STATE_OPEN:
            return
        self.beginMessageFrame(len(payload))
        key = self.send_message_frame_mask
        if key and payload:
            if self._masker is None:
                self._masker = Masker(key)
            else:
                self._masker.rekey(key)
            payload = bytes(self._masker.process(payload))
            self.send_message_frame_masker = XorMaskerNull()
        self.sendMessageFrameData(payload, sync)

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self.factory.client._file_message_begin(self)

    def onMessageFrameData(self, payload: bytes) -> None:
        self.factory.client._file_data(self, payload)

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        self.factory.client._file_message_end(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(_refused(self, reason))
        self.factory.client._file_closed(self, code)
        self.factory.closed.callback(code)


Progress = Callable[[int, int], None]

#: Upload frame sizes: 1 MiB frames cost the server an eighth of the per-frame
#: work of 128 KiB ones, but they cost this process a page fault per 4 KiB
#: unless malloc reuses big buffers (wsfiles.tuning); docs/performance.md.
TUNED_UPLOAD_FRAME = 1024 * 1024
#: Read size of a tuned process's file channel: a whole download frame per
#: read, so few reads span a frame boundary.
TUNED_RECEIVE_BUFFER = DOWNLOAD_FRAME


def upload_frame_size() -> int:
    """The frame size uploads use in this process."""
    return TUNED_UPLOAD_FRAME if malloc_tuned() else CHUNK_SIZE


class _Download:
    """Where the bytes of the current download go."""

    def __init__(
        self, sink: BinaryIO, progress: Progress | None = None, hash: str = hashes.SHA256
    ) -> None:
        self.sink = sink
        self.hash = hash
        self.sha256 = hashes.new(hash)  # (named for the default; BLAKE3 when asked)
        self.received = 0
        self.total = 0
        self.progress = progress
        self.done: Deferred = Deferred()
        #: Its ``sending`` has come: the next message on the file channel is its.
        self.announced = False

    def write(self, data: bytes) -> None:
        self.sink.write(data)
        self.sha256.update(data)
        self.received += len(data)
        if self.progress is not None:
            self.progress(self.received, self.total)


class _Message:
    """A download message on the file channel, before it is known whose it is."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.ended = False
        self.owner: _Download | None = None


@dataclass(frozen=True)
class BatchFile:
    """One file of ``WsfilesClient.save_batch``: small, in memory."""

    name: str
    data: bytes
    mtime: float | None = None
    if_sha256: str | None = None
    if_absent: bool = False
    sha256: str | None = None  # declared: the server refuses other bytes

    def declared(self) -> dict[str, Any]:
        """Its entry in the ``save_batch`` command (which, like every command,
        must fit the server's 64 KiB message limit: measure with this)."""
        entry: dict[str, Any] = {"name": self.name, "size": len(self.data)}
        if self.mtime is not None:
            entry["mtime"] = self.mtime
        if self.if_sha256 is not None:
            entry["if_sha256"] = self.if_sha256
        if self.if_absent:
            entry["if_absent"] = True
        if self.sha256 is not None:
            entry["sha256"] = self.sha256
        return entry


def _sha256_of(data: bytes) -> str:
    digest = hashes.new()
    digest.update(data)
    return digest.hexdigest()


def _source_size(source: BinaryIO) -> int:
    try:
        return os.fstat(source.fileno()).st_size - source.tell()
    except (AttributeError, OSError, io.UnsupportedOperation):
        position = source.tell()
        end = source.seek(0, io.SEEK_END)
        source.seek(position)
        return end - position


class WsfilesClient(FolderCommands):
    """One command channel, and the file channel the server pairs with it."""

    def __init__(self, base_url: str, reactor: IReactorTCP, tls_options: Any = None) -> None:
        self.base_url = base_url
        self._reactor = reactor
        self._tls_options = tls_options
        self.hello: dict[str, Any] = {}
        self._hello: Deferred = Deferred()
        self._command: _CommandProtocol | None = None
        self._command_factory: WebSocketClientFactory | None = None
        self._file: _FileProtocol | None = None
        self._file_factory: WebSocketClientFactory | None = None
        self._replies: dict[int, DeferredQueue] = {}
        self._next_id = 0
        #: Downloads asked for whose message has not ended, oldest first.
        self._downloads: deque[_Download] = deque()
        #: Messages of the current file channel not yet handed to their download.
        self._messages: deque[_Message] = deque()
        self._transfer_lock = defer.DeferredLock()
        #: Messages that answer no command of ours (errors without an id).
        self.notices: DeferredQueue = DeferredQueue()
        #: File lists from ``changed`` events, in order.
        self.changes: DeferredQueue = DeferredQueue()
        #: Whole ``changed`` events of a 1.2 channel (any folder), in order.
        self.folder_changes: DeferredQueue = DeferredQueue()
        #: The subprotocols the command channel offers, and the one selected.
        self.subprotocols: Sequence[str] = PROTOCOL_11
        self.subprotocol: str | None = None
        self.close_code: int | None = None
        self.file_close_codes: list[int | None] = []

    # -- connections -----------------------------------------------------

    def _endpoint(self, url: str) -> Any:
        parts = urlsplit(url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        endpoint = endpoints.HostnameEndpoint(self._reactor, parts.hostname, port)
        if secure:
            from twisted.internet.ssl import optionsForClientTLS

            options = self._tls_options or optionsForClientTLS(parts.hostname)
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        return endpoint

    async def _open(
        self,
        url: str,
        protocol: type,
        headers: dict[str, str] | None = None,
        subprotocols: Sequence[str] = (SUBPROTOCOL,),
    ) -> tuple[Any, WebSocketClientFactory]:
        factory = WebSocketClientFactory(url, protocols=list(subprotocols), headers=headers or {})
        factory.protocol = protocol
        factory.client = self
        factory.opened = Deferred()
        factory.closed = Deferred()
        # Downloads are streamed into the sink, never buffered: no limit here.
        factory.setProtocolOptions(
            maxMessagePayloadSize=0, maxFramePayloadSize=0, closeHandshakeTimeout=5
        )
        try:
            await self._endpoint(url).connect(factory)
        except Exception as e:
            raise WsfilesError(CONNECTION_FAILED, f"cannot connect to {url}: {e}") from None
        return await factory.opened, factory

    async def _connect(
        self, token: str | None, token_in_query: bool, extra_headers: dict[str, str]
    ) -> None:
        self._connect_args = (token, token_in_query, extra_headers)
        url = self.base_url + "/command"
        headers = dict(extra_headers)
        if token is not None and token_in_query:
            url += "?" + urlencode({"token": token})
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            self._command, self._command_factory = await self._open(
                url, _CommandProtocol, headers, self.subprotocols
            )
        except BaseException:
            self._hello.addErrback(lambda _: None)  # _open's error says it already
            raise
        self.subprotocol = self._command.websocket_protocol_in_use
        self.hello = await self._hello

    async def _open_file_channel(self, path: str) -> None:
        """Open the channel the server offered.

        An offer means the server has given up any earlier file channel, so
        that one's late close must not fail the transfer about to start.
        """
        self._file = None
        self._file, self._file_factory = await self._open(self.base_url + path, _FileProtocol)

    async def close(self) -> None:
        """Close both channels and wait until they are gone."""
        waits = []
        for factory in (self._command_factory, self._file_factory):
            if factory is not None:
                waits.append(factory.closed)
        if self._command is not None:
            self._command.sendClose(1000)
        await defer.gatherResults(waits)

    async def abort(self) -> None:
        """Drop both channels at once, without the closing handshake (when
        the user interrupts: a stalled peer must not keep us waiting); wait
        until they are gone."""
        waits = []
        for protocol, factory in (
            (self._command, self._command_factory),
            (self._file, self._file_factory),
        ):
            if protocol is not None and factory is not None and not factory.closed.called:
                waits.append(factory.closed)
                protocol.dropConnection(abort=True)
        await defer.gatherResults(waits)

    def _command_closed(self, code: int | None, reason: str | None) -> None:
        self.close_code = code
        self._command = None
        if not self._hello.called:
            self._hello.errback(WsfilesError(CONNECTION_FAILED, str(reason)))
        for queue in list(self._replies.values()):
            queue.put({"op": "error", "code": CHANNEL_CLOSED, "message": "connection closed"})

    def _file_closed(self, protocol: _FileProtocol, code: int | None) -> None:
        self.file_close_codes.append(code)
        if protocol is self._file:
            self._file = None
            downloads = list(self._downloads)
            self._download = None
            for download in downloads:
                if not download.done.called:
                    download.done.errback(WsfilesError(CHANNEL_CLOSED, "the file channel closed"))

    @property
    def _download(self) -> _Download | None:
        """The oldest download in flight (the only one, unless pipelined)."""
        return self._downloads[0] if self._downloads else None

    @_download.setter
    def _download(self, download: _Download | None) -> None:
        """Arm ``download`` alone for the next message (or none)."""
        self._downloads.clear()
        self._messages.clear()
        if download is not None:
            self._downloads.append(download)

    # -- messages --------------------------------------------------------

    def send(self, message: dict[str, Any]) -> int:
        """Send a command with a fresh id; return the id."""
        self._next_id += 1
        message = {**message, "id": self._next_id}
        self._replies[self._next_id] = DeferredQueue()
        self.send_text(json.dumps(message))
        return self._next_id

    def send_text(self, text: str) -> None:
        """Send any text frame on the command channel (the server must cope)."""
        assert self._command is not None, "not connected"
        self._command.sendMessage(text.encode("utf-8"), isBinary=False)

    def send_binary_on_command(self, data: bytes) -> None:
        """Send data where it does not belong (the server refuses it)."""
        assert self._command is not None, "not connected"
        self._command.sendMessage(data, isBinary=True)

    def send_on_file_channel(self, data: bytes, *, binary: bool = True) -> None:
        """Send one message on the file channel outside any transfer."""
        assert self._file is not None, "no file channel"
        self._file.sendMessage(data, isBinary=binary)

    @property
    def has_file_channel(self) -> bool:
        return self._file is not None

    async def reply(self, request_id: int) -> dict[str, Any]:
        """The next message about command ``request_id``."""
        return await self._replies[request_id].get()

    def _received(self, message: dict[str, Any]) -> None:
        if message.get("op") == "hello" and not self._hello.called:
            self._hello.callback(message)
            return
        if message.get("op") == "changed":
            if "path" in message:  # a 1.2 channel: any folder, maybe "more" without files
                self.folder_changes.put(message)
            if not message.get("path") and "files" in message:
                self.changes.put(message["files"])
            return
        queue = self._replies.get(message.get("id"))  # type: ignore[arg-type]
        if queue is None:
            self.notices.put(message)
        else:
            queue.put(message)

    async def _transfer_reply(self, request_id: int) -> dict[str, Any]:
        """The next reply about a transfer, after opening any file channel it offers."""
        while True:
            reply = await self.reply(request_id)
            if reply.get("op") != "channel":
                return reply
            await self._open_file_channel(reply["url"])

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a command and return its one reply; raise WsfilesError on error."""
        request_id = self.send(message)
        try:
            return _checked(await self.reply(request_id))
        finally:
            del self._replies[request_id]

    # -- commands --------------------------------------------------------

    async def delete(self, name: str, *, if_sha256: str | None = None) -> dict[str, Any]:
        """Delete ``name``; with ``if_sha256``, only if the file stored still has
        that SHA-256 (otherwise the server answers ``conflict``)."""
        self._paths_allowed(name)
        message = {"op": "delete", "name": name}
        if if_sha256 is not None:
            message["if_sha256"] = if_sha256
        return await self.request(message)

    async def rename(self, name: str, to: str, *, overwrite: bool = False) -> dict[str, Any]:
        """Rename or move ``name`` to ``to`` (paths on a 1.2 channel: across folders)."""
        self._paths_allowed(name, to)
        message = {"op": "rename", "name": name, "to": to}
        if overwrite:
            message["overwrite"] = True
        return await self.request(message)

    async def upload(
        self,
        name: str,
        source: bytes | BinaryIO,
        *,
        size: int | None = None,
        resume: bool = False,
        checksum: bool = False,
        retries: int = 5,
        progress: Progress | None = None,
        mtime: float | None = None,
        if_sha256: str | None = None,
        if_absent: bool = False,
        pipelined: bool = False,
        hash: str = hashes.SHA256,
    ) -> dict[str, Any]:
        """Save ``source`` (bytes, or a binary file from its position) as ``name``.

        ``hash="blake3"`` (where ``hello["hashes"]`` lists it) has the server
        hash the upload with BLAKE3 instead: ``ack`` then carries ``blake3``,
        which is what is checked (and what ``checksum`` declares).

        Returns the server's ``ack`` after checking its SHA-256 against the
        bytes sent.  ``resume`` makes the upload resumable and retries it from
        where the server stopped when a connection drops (reconnecting the
        command channel if needed), up to ``retries`` times.  ``checksum``
        declares the file's SHA-256 first (one extra read of the source), so
        the server refuses to store anything else.  ``size`` is what to
        declare, by default the true size; declaring another is a protocol
        error the server must refuse.  ``mtime`` sets the stored file's
        modification time; ``if_sha256`` saves only over a file with that
        SHA-256 and ``if_absent`` only where there is none (else ``conflict``).
        ``pipelined`` sends the ``save`` without waiting for this client's
        earlier transfers: the server queues transfers and runs them back to
        back, so many small files do not pay a round trip each (``wsfiles
        sync``).  A pipelined upload is never retried here: a dropped
        connection fails it, and with ``resume`` the caller's next upload of
        the file continues where the server stopped.
        """
        self._paths_allowed(name)
        if isinstance(source, bytes | bytearray | memoryview):
            source = io.BytesIO(source)
        start = source.tell()
        actual = _source_size(source)
        declared = actual if size is None else size
        sha256 = _hash_range(source, start, actual, hash) if checksum else None
        extra: dict[str, Any] = {} if hash == hashes.SHA256 else {"hash": hash}
        if mtime is not None:
            extra["mtime"] = mtime
        if if_sha256 is not None:
            extra["if_sha256"] = if_sha256
        if if_absent:
            extra["if_absent"] = True
        return await self._transfer(
            lambda: self._upload_once(
                name, source, start, actual, declared, sha256, resume, progress, extra
            ),
            resume,
            retries,
            pipelined,
        )

    async def download(
        self,
        name: str,
        sink: BinaryIO,
        *,
        resume: bool = False,
        retries: int = 5,
        progress: Progress | None = None,
        hash: str = hashes.SHA256,
        pipelined: bool = False,
    ) -> dict[str, Any]:
        """Write file ``name`` into ``sink``; return the server's ``sent``.

        ``hash="blake3"`` asks for (and checks) the BLAKE3 of the file instead.

        The SHA-256 of everything written is checked against ``sent``. With
        ``resume``, a dropped connection is retried from the bytes already
        written (a ranged ``get``), up to ``retries`` times; and a sink that
        already holds bytes (opened for reading and appending, positioned at
        its end) is taken as the start of the file: only the rest is fetched.

        ``pipelined`` sends the ``get`` without waiting for this client's
        earlier transfers (as ``upload`` does): each message of the file
        channel goes to the oldest download whose ``sending`` has come (held
        in memory until it is known whose it is).  Not retried here; a
        dropped file channel fails every pipelined download in flight.
        """
        self._paths_allowed(name)
        download = _Download(sink, progress, hash)
        if resume and sink.tell() > 0:
            held = sink.tell()
            download.sha256 = await threads.deferToThread(_feed_hash, sink, 0, held, hash)
            sink.seek(held)
            download.received = held
        return await self._transfer(
            lambda: self._download_once(name, download, resume), resume, retries, pipelined
        )

    async def save_batch(self, files: list[BatchFile]) -> list[dict[str, Any]]:
        """Save many small files with one ``save_batch`` (protocol 1.2): one
        command, one binary message, one reply with each file's outcome
        (``{"name", "size", "sha256"}`` or ``{"name", "error", "message"}``),
        in order.  Each saved file's SHA-256 is checked against the bytes
        sent (WsfilesError ``checksum_mismatch`` otherwise)."""
        self._paths_allowed(*(file.name for file in files))
        declared = [file.declared() for file in files]
        async with self._transfer_lock:
            request_id = self.send({"op": "save_batch", "files": declared})
            try:
                _checked(await self._transfer_reply(request_id))  # "ready"
                assert self._file is not None
                self._file.sendMessage(b"".join(file.data for file in files), isBinary=True)
                reply = _checked(await self._transfer_reply(request_id))
            finally:
                del self._replies[request_id]
        outcomes = reply.get("files")
        if not isinstance(outcomes, list) or len(outcomes) != len(files):
            raise WsfilesError(BAD_REPLY, "a save_batch reply without one outcome per file", reply)
        for file, outcome in zip(files, outcomes, strict=True):
            if "error" not in outcome and outcome.get("sha256") != _sha256_of(file.data):
                raise WsfilesError(
                    CHECKSUM_MISMATCH, f"the server stored other bytes for {file.name!r}", reply
                )
        return outcomes

    async def _transfer(
        self,
        attempt: Callable[[], Awaitable[dict[str, Any]]],
        resume: bool,
        retries: int,
        pipelined: bool = False,
    ) -> dict[str, Any]:
        """One transfer at a time; a resumable one is retried after a dropped connection.

        A pipelined one (uploads only: their bytes go out after their own
        ``ready``) is sent at once and not retried.
        """
        if pipelined:
            return await attempt()
        async with self._transfer_lock:
            failures = 0
            while True:
                try:
                    return await attempt()
                except WsfilesError as e:
                    failures += 1
                    if not resume or e.code not in RETRYABLE or failures > retries:
                        raise
                    if self._command is None:  # the command channel went too
                        self._hello = Deferred()
                        await self._connect(*self._connect_args)

    async def _upload_once(
        self,
        name: str,
        source: BinaryIO,
        start: int,
        actual: int,
        declared: int,
        sha256: str | None,
        resume: bool,
        progress: Progress | None = None,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"op": "save", "name": name, "size": declared, **(extra or {})}
        hash = message.get("hash", hashes.SHA256)
        if sha256 is not None:
            message[hash] = sha256  # the declared digest, of the hash asked for
        if resume:
            message["resume"] = True
        request_id = self.send(message)
        sending: Deferred | None = None
        streamer: FileStreamer | None = None
        try:
            while True:
                reply = await self._transfer_reply(request_id)
                op = reply.get("op")
                if op == "ready":
                    assert self._file is not None
                    offset = min(int(reply.get("offset", 0)), actual)
                    prefix = hashes.new(hash)
                    if offset:  # the server has these: hash them, in a thread
                        prefix = await threads.deferToThread(
                            _feed_hash, source, start, offset, hash
                        )
                    source.seek(start + offset)
                    frames = MessageFrames(self._file)
                    streamer = FileStreamer(
                        source, actual - offset, upload_frame_size(), sha256=prefix
                    )
                    report = None
                    if progress is not None:

                        def report(written: int, offset: int = offset) -> None:
                            progress(offset + written, actual)

                    sending = streamer.stream_to(CountingConsumer(frames, progress=report))
                    sending.addCallback(lambda _, frames=frames: frames.end())
                    sending.addErrback(lambda failure: failure.trap(StreamFailed))
                else:
                    _checked(reply)
                    await sending
                    assert streamer is not None
                    if reply.get(hash) != streamer.sha256.hexdigest():
                        raise WsfilesError(
                            CHECKSUM_MISMATCH, "the server stored other bytes than we sent", reply
                        )
                    return reply
        except BaseException:
            if streamer is not None:
                streamer.stop()
                if self._file is not None and self._file.state == self._file.STATE_OPEN:
                    frames.end()  # close the half-sent message; the server discards it
            raise
        finally:
            del self._replies[request_id]

    async def _download_once(self, name: str, download: _Download, resume: bool) -> dict[str, Any]:
        # Armed before asking: the file channel's bytes may overtake the
        # command channel's "sending" (they are separate connections).
        download.done = Deferred()
        download.announced = False
        self._downloads.append(download)
        message: dict[str, Any] = {"op": "get", "name": name}
        if download.hash != hashes.SHA256:
            message["hash"] = download.hash
        if resume and download.received:
            message["offset"] = download.received
        request_id = self.send(message)
        begun = False
        try:
            while True:
                reply = await self._transfer_reply(request_id)
                op = reply.get("op")
                if op == "sending":
                    begun = True
                    download.total = reply["size"]
                    download.announced = True
                    self._claim()
                elif op == "sent":
                    await download.done
                    if download.received != reply["size"]:
                        raise WsfilesError(
                            CHANNEL_CLOSED, f"got {download.received} of {reply['size']} bytes"
                        )
                    if reply.get(download.hash) != download.sha256.hexdigest():
                        raise WsfilesError(CHECKSUM_MISMATCH, "the bytes do not match", reply)
                    return reply
                else:
                    if begun:
                        # A message was begun and cut: that file channel cannot
                        # carry on (the server gives it up too); the next
                        # transfer gets a new one.
                        cut, self._file = self._file, None
                        if cut is not None:
                            cut.dropConnection(abort=True)
                    _checked(reply)
        finally:
            if download in self._downloads:  # (failed: no message, or a cut one)
                self._downloads.remove(download)
                self._messages = deque(m for m in self._messages if m.owner is not download)
                self._claim()
            # Nobody awaits a download cut before "sent": do not log it as unhandled.
            download.done.addErrback(lambda _: None)
            del self._replies[request_id]

    # -- the file channel's incoming data --------------------------------

    # Only the current file channel's bytes count: one the server has given up
    # may still deliver the rest of a cut message, which belongs to no transfer.

    # Whose a message is: the transfers run in order, so it is the oldest
    # download's, unless that one fails without a message (``not_found``...).
    # It is known once that download's ``sending`` has come, or when it is the
    # only download in flight; until then the message is held.

    def _file_message_begin(self, protocol: _FileProtocol) -> None:
        if protocol is not self._file:
            return
        if not self._downloads:
            self.notices.put({"op": "client:unexpected-binary"})
            return
        self._messages.append(_Message())
        self._claim()

    def _file_data(self, protocol: _FileProtocol, data: bytes) -> None:
        if protocol is not self._file or not self._messages:
            return
        message = self._messages[-1]  # (the one arriving)
        if message.owner is not None:
            message.owner.write(data)
        else:
            message.chunks.append(data)

    def _file_message_end(self, protocol: _FileProtocol) -> None:
        if protocol is not self._file or not self._messages:
            return
        self._messages[-1].ended = True
        self._claim()

    def _claim(self) -> None:
        """Hand held messages to their downloads, and end the finished ones."""
        while self._messages and self._downloads:
            message, head = self._messages[0], self._downloads[0]
            if message.owner is None:
                if not (head.announced or len(self._downloads) == 1):
                    return
                message.owner = head
                for chunk in message.chunks:
                    head.write(chunk)
                message.chunks = []
            if not message.ended:
                return
            self._messages.popleft()
            self._downloads.popleft()
            if not head.done.called:
                head.done.callback(None)


def _feed_hash(source: BinaryIO, start: int, length: int, hash: str = hashes.SHA256) -> Any:
    """A SHA-256 (or ``hash``) object fed with ``length`` bytes of ``source`` from ``start``."""
    digest = hashes.new(hash)
    source.seek(start)
    remaining = length
    while remaining > 0:
        chunk = source.read(min(1 << 20, remaining))
        if not chunk:
            raise WsfilesError(CHANNEL_CLOSED, "the source shrank while it was read")
        digest.update(chunk)
        remaining -= len(chunk)
    return digest


def _hash_range(source: BinaryIO, start: int, length: int, hash: str = hashes.SHA256) -> str:
    """Hex SHA-256 (or ``hash``) of ``length`` bytes from ``start``; leaves the
    position at ``start``."""
    digest = _feed_hash(source, start, length, hash).hexdigest()
    source.seek(start)
    return digest


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    if reply.get("op") == "error":
        raise WsfilesError(str(reply.get("code")), str(reply.get("message")), reply)
    return reply


async def connect(
    base_url: str,
    token: str | None = None,
    *,
    reactor: Any = None,
    token_in_query: bool = False,
    tls_options: Any = None,
    headers: dict[str, str] | None = None,
    subprotocols: Sequence[str] = PROTOCOL_11,
) -> WsfilesClient:
    """Open a command channel to ``base_url`` (``ws://host:port``) and wait for hello.

    ``http://`` and ``https://`` name the same server as ``ws://`` and
    ``wss://``; another scheme, or none, is WsfilesError ``bad_url``.

    ``headers`` are added to the command channel's handshake (an ``Origin``,
    say, to act like a page).  ``subprotocols`` are offered in that order: by
    default ``("wsfiles.v1",)``, a 1.1 client; ``COMMAND_SUBPROTOCOLS``
    (``wsfiles.v1.2`` then ``wsfiles.v1``) speaks 1.2 (folders) where the server does.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    client = WsfilesClient(websocket_base_url(base_url), reactor, tls_options)
    client.subprotocols = tuple(subprotocols)
    await client._connect(token, token_in_query, headers or {})
    return client
