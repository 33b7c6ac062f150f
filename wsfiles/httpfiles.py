"""Plain HTTP downloads: ``GET /files/PATH`` and ``HEAD`` (docs/protocol.md,
"Plain HTTP downloads").

So curl, wget and anything else that speaks HTTP can fetch a client's own
files, with the client's token in ``Authorization: Bearer TOKEN`` (never in
the URL).  ``serve_file`` holds every HTTP rule for one stored file (Range,
validators, conditional requests, Content-Disposition, streaming under flow
control and the transfer-rate rule), apart from who may see which folder, so
other resources (share links, ``/s/ID``) answer with the same semantics.

- A bad path, a missing file, a folder, a symlink or a special file all get
  the same 404, so nothing tells whether a name exists.
- The ETag is the stored SHA-256 (strong) where the backend keeps one (the
  local xattr, the S3 object's ``x-amz-meta-sha256``), else a weak
  ``W/"SIZE-MTIME"``.
- The body goes out as the client takes it: the download is the producer of
  the response and pauses whenever the connection's buffer is full, so a
  client that stops reading holds about one read of the file in memory.  A
  response that moves fewer than ``--min-rate`` x ``--stall-timeout`` bytes in
  ``--stall-timeout`` seconds (none at all, with ``--min-rate 0``) is cut.
"""

from __future__ import annotations

import json
import mimetypes
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from twisted.internet import defer, interfaces
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http, resource, server
from zope.interface import implementer

from wsfiles import errors
from wsfiles.admission import forwarded_client
from wsfiles.command import CommandChannelFactory
from wsfiles.config import Settings
from wsfiles.errors import ProtocolError
from wsfiles.names import check_path
from wsfiles.storage import (
    IDownload,
    IFolder,
    IsAFolder,
    KnownDigest,
    NotAFolder,
    NotFound,
    StorageFailure,
)
from wsfiles.streaming import StreamFailed
from wsfiles.timers import RateDeadline
from wsfiles.users import TooManyChecks

_log = Logger()

#: What a path that leads to no regular file is, whatever the reason.
_MISSING = (NotFound, IsAFolder, NotAFolder)
#: Guessed types sent as they are; anything else (HTML, SVG, XML, scripts:
#: what a browser could run) goes out as application/octet-stream.
_INERT_TYPES = re.compile(
    r"(image/(png|jpeg|gif|webp|avif|bmp)|audio/.+|video/.+|text/plain|text/csv"
    r"|application/(pdf|zip|gzip|x-tar|x-xz|x-bzip2|x-7z-compressed|json|octet-stream))"
)
_BYTES_RANGE = re.compile(r"\s*(\d{0,19})\s*-\s*(\d{0,19})\s*")


@dataclass(frozen=True)
class Served:
    """What ``serve_file`` answered: the status, the body bytes handed to the
    connection, and whether the whole body (or none was due) went out."""

    status: int
    sent: int = 0
    complete: bool = True


class _Unsatisfiable:
    """A Range none of whose bytes exist (416)."""


UNSATISFIABLE = _Unsatisfiable()


def parse_range(values: list[bytes] | None, size: int) -> tuple[int, int] | _Unsatisfiable | None:
    """The single byte range ``Range`` asks of a ``size``-byte file, as
    (first, last) inclusive; UNSATISFIABLE when it asks for none of them; None
    to send the whole file: no Range, one we cannot read (another unit, bad
    syntax, several header lines) or several ranges (we never send
    multipart/byteranges)."""
    if not values or len(values) != 1:
        return None
    unit, _, spec = values[0].decode("latin-1").partition("=")
    if unit.strip().lower() != "bytes":
        return None
    specs = [s for s in spec.split(",") if s.strip()]
    if len(specs) != 1:
        return None
    match = _BYTES_RANGE.fullmatch(specs[0])
    if match is None or match.group(1) == match.group(2) == "":
        return None
    if match.group(1) == "":  # the last N bytes
        suffix = int(match.group(2))
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - suffix), size - 1
    first = int(match.group(1))
    if match.group(2) and int(match.group(2)) < first:
        return None  # invalid: ignored (RFC 9110 14.2)
    if first >= size:
        return UNSATISFIABLE
    last = int(match.group(2)) if match.group(2) else size - 1
    return first, min(last, size - 1)


@dataclass(frozen=True)
class Validators:
    """What tells one version of a file from another."""

    etag: str
    mtime: float

    @property
    def strong(self) -> bool:
        return not self.etag.startswith("W/")

    @property
    def last_modified(self) -> bytes:
        return http.datetimeToString(int(self.mtime))

    @classmethod
    def of(cls, size: int, mtime: float, sha256: str | None) -> Validators:
        if sha256 is not None:
            return cls(f'"{sha256}"', mtime)
        return cls(f'W/"{size:x}-{int(mtime * 1_000_000):x}"', mtime)


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def _entity_tags(value: str) -> list[str]:
    """The entity-tags of an If-None-Match / If-Match list (``*`` stays ``*``)."""
    return re.findall(r'\*|(?:W/)?"[^"]*"', value)


def _date(value: bytes) -> int | None:
    try:
        return int(http.stringToDatetime(value))
    except (ValueError, IndexError, KeyError, OverflowError):
        return None


def not_modified(request: server.Request, validators: Validators) -> bool:
    """``If-None-Match`` (weak comparison), else ``If-Modified-Since``: would
    the client's copy do (304)?"""
    none_match = request.requestHeaders.getRawHeaders(b"if-none-match")
    if none_match:
        tags = _entity_tags(",".join(v.decode("latin-1") for v in none_match))
        ours = _opaque(validators.etag)
        return any(tag == "*" or _opaque(tag) == ours for tag in tags)
    since = request.getHeader(b"if-modified-since")
    if since is not None:
        when = _date(since)
        return when is not None and int(validators.mtime) <= when
    return False


def range_still_valid(request: server.Request, validators: Validators) -> bool:
    """``If-Range``: is the version the client holds the one we have?  An
    entity-tag matches only our strong ETag exactly; a date, our Last-Modified."""
    value = request.getHeader(b"if-range")
    if value is None:
        return True
    text = value.decode("latin-1").strip()
    if text.startswith('"') or text.startswith("W/"):
        return validators.strong and text == validators.etag
    when = _date(value)
    return when is not None and when == int(validators.mtime)


def content_disposition(name: str) -> bytes:
    """``attachment`` with the file's name: an ASCII ``filename`` for old
    clients and, when it differs, the exact name as ``filename*`` (RFC 6266,
    RFC 8187 / 5987 encoding)."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += "; filename*=UTF-8''" + quote(name, safe="!#$&+^`|~")
    return value.encode("ascii")


def content_type(name: str) -> bytes:
    """The type guessed from the name when it is one a browser shows without
    running anything, else application/octet-stream."""
    guessed, encoding = mimetypes.guess_type(name, strict=False)
    if guessed is None or encoding is not None or not _INERT_TYPES.fullmatch(guessed):
        return b"application/octet-stream"
    return guessed.encode("ascii")


class _NoHash:
    """The hash an IDownload feeds: nothing here needs the bytes hashed."""

    def update(self, data: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


async def recorded_sha256(download: IDownload) -> str | None:
    """The SHA-256 the backend keeps for the file ``download`` (opened whole,
    from offset 0) reads: S3's object metadata, or the local xattr, which a
    whole download hands out as a KnownDigest without hashing anything."""
    stored = getattr(download, "stored_sha256", None)
    if stored is not None:
        return str(stored)
    if download.offset != 0 or download.length != download.size:
        return None  # prefix_sha256 could hash; a whole download is asked only
    prefix = await download.prefix_sha256()
    return prefix.hexdigest() if isinstance(prefix, KnownDigest) else None


def answer(
    request: server.Request, status: int, code: str, message: str, **headers: bytes
) -> Served:
    """A short JSON refusal ``{"error": CODE, "message": TEXT}`` (nothing if
    the connection is gone)."""
    if request.channel is None:
        return Served(status, complete=False)
    body = json.dumps({"error": code, "message": message}).encode() + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", b"%d" % len(body))
    for name, value in headers.items():
        request.setHeader(name.replace("_", "-").encode(), value)
    request.write(body)
    request.finish()
    return Served(status)


def not_found(request: server.Request) -> Served:
    """One answer for every path that leads to no file of the asker's."""
    return answer(request, 404, errors.NOT_FOUND, "no such file")


@implementer(interfaces.IConsumer, interfaces.IPushProducer)
class _Response:
    """The request as a download's consumer.

    Flow control passes straight through (the connection pauses the
    download); the transfer-rate rule (``--stall-timeout``, ``--min-rate``)
    cuts a client that takes too little; and the response stays registered
    until the connection's buffer has drained after the last byte, so the
    rule covers the end of the body too.
    """

    def __init__(
        self, request: server.Request, clock: IReactorTime, settings: Settings, what: str
    ) -> None:
        self._request = request
        self._what = what
        self._producer: Any = None
        self._registered = False
        self._drained: Deferred | None = None
        self.paused = False
        self.sent = 0
        self.stalled = False
        seconds = settings.stall_timeout
        self._rate = RateDeadline(clock, seconds, int(settings.min_rate * seconds), self._expired)

    # -- IConsumer (the download) --

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        if not self._registered:
            self._registered = True
            self._rate.start()
            self._request.registerProducer(self, True)

    def unregisterProducer(self) -> None:
        self._producer = None  # we stay registered until drained (see drained)

    def write(self, data: bytes) -> None:
        self.sent += len(data)
        self._rate.progress(self.sent)
        self._request.write(data)

    # -- IPushProducer (the connection) --

    def pauseProducing(self) -> None:
        self.paused = True
        if self._producer is not None:
            self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self._producer is not None:
            self._producer.resumeProducing()
        elif self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    def stopProducing(self) -> None:
        if self._producer is not None:
            self._producer.stopProducing()
        if self._drained is not None:
            drained, self._drained = self._drained, None
            drained.errback(StreamFailed("the connection was lost", consumer_gone=True))

    # --

    def drained(self) -> Deferred:
        """Fires once the connection's buffer has taken the last bytes (at once
        when it is not full); fails if the connection goes first."""
        if not self.paused:
            return defer.succeed(None)
        self._drained = Deferred()
        return self._drained

    def _expired(self) -> None:
        self.stalled = True
        _log.info(
            "cut {what} to {peer} after {sent} bytes: it took fewer than --min-rate x"
            " --stall-timeout bytes in {seconds:g} s",
            what=self._what,
            peer=str(self._request.getClientAddress()),
            sent=self.sent,
            seconds=self._rate.seconds,
        )
        transport = self._request.transport
        if transport is not None:
            transport.abortConnection()

    def close(self) -> None:
        self._rate.cancel()
        if self._registered and self._request.channel is not None:
            self._request.unregisterProducer()
        self._registered = False


def _watch(request: server.Request) -> list[bool]:
    """A flag set once the request's connection is gone (no answer is due)."""
    gone = [False]
    request.notifyFinish().addErrback(lambda _: gone.__setitem__(0, True))
    return gone


async def serve_file(
    request: server.Request,
    folder: IFolder,
    path: str,
    *,
    settings: Settings,
    clock: IReactorTime,
    filename: str | None = None,
) -> Served:
    """Answer a GET or HEAD ``request`` with file ``path`` of ``folder``, and
    finish it (or drop the connection, when the body cannot be completed).

    Every HTTP rule of a stored file is here: 404 for anything but a regular
    file; ETag, Last-Modified, If-None-Match / If-Modified-Since (304), a
    single Range (206, 416; several ranges get the whole file), If-Range;
    Content-Disposition naming ``filename`` (default: the path's last
    segment); the body streamed under flow control and the transfer-rate rule
    (``settings.stall_timeout``, ``settings.min_rate``, on ``clock``).  Who may
    read ``folder`` is the caller's business.
    """
    gone = _watch(request)
    try:
        check_path(path)
    except ProtocolError:
        return not_found(request)
    try:
        info = await folder.stat(path)
        whole = await folder.open_download(path)
    except _MISSING:
        return not_found(request)
    except StorageFailure as e:
        _log.warn("GET of a file failed: {error}", error=e)
        return answer(request, 503, errors.STORAGE_ERROR, "the storage failed: retry later")
    body: IDownload = whole
    try:
        if whole.size != info.size:  # replaced between the two looks
            return answer(
                request, 503, errors.UNAVAILABLE, "the file is being replaced", retry_after=b"1"
            )
        size = whole.size
        validators = Validators.of(size, info.mtime, await recorded_sha256(whole))
        if gone[0]:
            return Served(499, complete=False)
        name = filename if filename is not None else path.rpartition("/")[2]
        request.setHeader(b"etag", validators.etag.encode("ascii"))
        request.setHeader(b"last-modified", validators.last_modified)
        request.setHeader(b"cache-control", b"private, no-cache")
        request.setHeader(b"accept-ranges", b"bytes")
        if not_modified(request, validators):
            request.setResponseCode(304)
            return _finish(request, 304)
        request.setHeader(b"content-type", content_type(name))
        request.setHeader(b"content-disposition", content_disposition(name))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", b"sandbox; default-src 'none'")
        span = None
        if request.method == b"GET" and range_still_valid(request, validators):
            span = parse_range(request.requestHeaders.getRawHeaders(b"range"), size)
        if isinstance(span, _Unsatisfiable):
            return answer(
                request,
                416,
                "range_not_satisfiable",
                f"the file has {size} bytes",
                content_range=b"bytes */%d" % size,
            )
        status, length = 200, size
        if span is not None and span != (0, size - 1):
            first, last = span
            status, length = 206, last - first + 1
            try:
                body = await folder.open_download(path, first, length)
            except (*_MISSING, ValueError):  # gone, or shrank, since the first look
                return answer(
                    request, 503, errors.UNAVAILABLE, "the file is being replaced", retry_after=b"1"
                )
            stored = getattr(whole, "stored_sha256", None)
            if body.size != size or getattr(body, "stored_sha256", None) != stored:
                return answer(
                    request, 503, errors.UNAVAILABLE, "the file is being replaced", retry_after=b"1"
                )
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (first, last, size))
        request.setResponseCode(status)
        request.setHeader(b"content-length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            return _finish(request, status)
        return await _stream(request, body, status, length, settings, clock, gone, path)
    finally:
        if body is not whole:
            body.close()
        whole.close()


async def _stream(
    request: server.Request,
    body: IDownload,
    status: int,
    length: int,
    settings: Settings,
    clock: IReactorTime,
    gone: list[bool],
    path: str,
) -> Served:
    response = _Response(request, clock, settings, f"the download of {path!r}")
    try:
        await body.stream_to(response, _NoHash())
        await response.drained()
    except StreamFailed as e:
        if not e.consumer_gone:
            _log.warn("a download of {path!r} failed: {error}", path=path, error=e)
        response.close()
        transport = request.transport
        if not (e.consumer_gone or gone[0]) and transport is not None:
            transport.abortConnection()  # the client sees a short body, never a wrong one
        return Served(status, response.sent, complete=False)
    response.close()
    if gone[0]:
        return Served(status, response.sent, complete=False)
    request.finish()
    return Served(status, response.sent, complete=response.sent == length)


def _finish(request: server.Request, status: int) -> Served:
    """Finish a response without a body (unless the connection is gone)."""
    if request.channel is None:
        return Served(status, complete=False)
    request.finish()
    return Served(status)


class _Refused(Exception):
    """An answer instead of a file: who is asking is not settled."""

    def __init__(self, status: int, code: str, message: str, **headers: bytes) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


#: RFC 6750's challenge; ``error="invalid_token"`` when a token was sent and refused.
_CHALLENGE = b'Bearer realm="wsfiles"'


class FilesResource(resource.Resource):
    """``GET /files/PATH`` and ``HEAD``: the authenticated client's own files.

    The token comes only from ``Authorization: Bearer TOKEN`` (a ``token``
    in the query string is ignored: URLs end up in logs and histories);
    without ``--users`` every request reads the anonymous folder.
    """

    isLeaf = True

    def __init__(self, factory: CommandChannelFactory) -> None:
        super().__init__()
        self._factory = factory

    def render_GET(self, request: server.Request) -> Any:
        def failed(failure: Any) -> None:
            _log.failure("GET /files failed", failure)
            if request.channel is not None and not request.startedWriting:
                answer(request, 500, errors.INTERNAL_ERROR, "logged")
            elif request.transport is not None:
                request.transport.abortConnection()

        Deferred.fromCoroutine(self._serve(request)).addErrback(failed)
        return server.NOT_DONE_YET

    render_HEAD = render_GET

    async def _serve(self, request: server.Request) -> None:
        factory = self._factory
        if factory.draining:
            answer(request, 503, errors.UNAVAILABLE, "the server is stopping")
            return
        try:
            client = await self._client(request)
        except _Refused as e:
            answer(request, e.status, e.code, e.message, **e.headers)
            return
        if request.channel is None:
            return  # gone while the token was checked
        path = _path_of(request)
        if path is None:
            not_found(request)
            return
        folder = factory.storage.folder(client)
        await serve_file(request, folder, path, settings=factory.settings, clock=factory.clock)

    async def _client(self, request: server.Request) -> str | None:
        """The client whose folder the request reads (None: the anonymous one)."""
        factory = self._factory
        users = factory.users
        if users is None:
            return None
        header = (request.getHeader(b"authorization") or b"").decode("latin-1").strip()
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refused(
                401, "unauthorized", "send Authorization: Bearer TOKEN", www_authenticate=_CHALLENGE
            )
        peer = getattr(request.getClientAddress(), "host", "") or ""
        forwarded = (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1")
        ip = forwarded_client(peer, forwarded, factory.settings.trusted_proxies)
        try:
            name = await users.authenticate(
                token.strip(), wanted=lambda: request.channel is not None, address=ip
            )
        except TooManyChecks as e:
            raise _Refused(403, "too_many_sign_ins", str(e)) from None
        if name is None:
            _log.info("GET /files from {peer}: wrong token", peer=str(request.getClientAddress()))
            raise _Refused(
                401,
                "unauthorized",
                "wrong or revoked token",
                www_authenticate=_CHALLENGE + b', error="invalid_token"',
            )
        return str(name)


def _path_of(request: server.Request) -> str | None:
    """The file path after ``/files/`` (Twisted has percent-decoded each
    segment); None unless it is UTF-8 (serve_file's check_path judges the rest)."""
    try:
        return b"/".join(request.postpath).decode("utf-8")
    except UnicodeDecodeError:
        return None
