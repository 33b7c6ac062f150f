"""Download tickets: the web page's way to hand a file to the browser's own
download manager (docs/protocol.md, "Download tickets").

A browser cannot put ``Authorization: Bearer`` on a link it follows, and a
token must never go into a URL.  So the page asks over its command channel
(``{"op": "download", "name": PATH}``) and gets a URL ``/d/TICKET/NAME``:

- ``TICKET`` is 192 random bits (32 URL-safe characters), bound to the
  client's folder, that one path and the file's ETag at the time of asking;
- ``GET`` and ``HEAD`` of it are answered by ``wsfiles.httpfiles.serve_file``
  (Range, If-Range, ETag, Content-Disposition, flow control, the
  transfer-rate rule) for ``--download-ticket-ttl`` seconds (300);
- it is useless for anything else: another path is 404, a file changed since
  (another ETag) is 410, an expired or unknown ticket 404, a client removed
  from the users file 404.

Only a digest of a ticket is stored (memory, or Redis with ``--redis``, so
a ticket works on every instance behind a balancer whatever it routes
where), and logs show its first 6 characters only.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server

from wsfiles import errors
from wsfiles.admission import forwarded_client
from wsfiles.config import Settings
from wsfiles.errors import ProtocolError
from wsfiles.storage import (
    IDownload,
    IFolder,
    IsAFolder,
    IStorage,
    NotAFolder,
    NotFound,
    StorageFailure,
)

if TYPE_CHECKING:
    from wsfiles.command import CommandChannelFactory
    from wsfiles.redisstate import RedisLink
    from wsfiles.session import CommandSession
    from wsfiles.users import UserDirectory

_log = Logger()

#: 192 random bits, 32 URL-safe characters.
TICKET_BYTES = 24
_TICKET = re.compile(r"[A-Za-z0-9_-]{32}")
#: What logs show of a ticket.
LOG_PREFIX = 6
#: Tickets one instance keeps in memory at most (the oldest go first).
MAX_TICKETS = 100_000
#: The HTTP refusal of a ticket whose file changed since it was issued.
FILE_CHANGED = "file_changed"


@dataclass(frozen=True)
class Ticket:
    """What a ticket lets its holder read."""

    client: str  # who asked (its folder, and whose removal ends the ticket)
    folder: str | None  # the storage folder key (None: the anonymous folder)
    path: str
    etag: str
    expires: float
    #: The client's token id when it asked: rotating the token ends the ticket.
    token_id: str | None = None


class StoreUnavailable(Exception):
    """Redis is unreachable: tickets can be neither issued nor honoured."""


def _key(ticket: str) -> str:
    """Tickets are stored under their SHA-256: a dump of the store holds none."""
    return hashlib.sha256(ticket.encode("ascii")).hexdigest()


def short(ticket: str) -> str:
    return ticket[:LOG_PREFIX] + "…"


class MemoryTicketStore:
    """One instance's tickets, in memory (lost on restart: they live minutes)."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._tickets: OrderedDict[str, Ticket] = OrderedDict()

    async def add(self, ticket: str, record: Ticket) -> None:
        now = self._clock.seconds()
        # Every ticket lives as long, so the oldest expire first: drop them.
        while self._tickets:
            oldest = next(iter(self._tickets.values()))
            if oldest.expires > now and len(self._tickets) < MAX_TICKETS:
                break
            self._tickets.popitem(last=False)
        self._tickets[_key(ticket)] = record

    async def get(self, ticket: str) -> Ticket | None:
        record = self._tickets.get(_key(ticket))
        if record is None or record.expires <= self._clock.seconds():
            return None
        return record


class RedisTicketStore:
    """``--redis``: tickets as ``PREFIX dticket:SHA256`` strings expiring with
    them, so a ticket issued by one instance works on every other."""

    def __init__(self, link: RedisLink, clock: IReactorTime) -> None:
        self._link = link
        self._clock = clock

    async def _ask(self, d: Deferred) -> Any:
        from wsfiles.redisstate import SHARED_FAILURES

        try:
            return await d
        except SHARED_FAILURES as e:
            raise StoreUnavailable(f"Redis is unreachable ({e})") from None

    async def add(self, ticket: str, record: Ticket) -> None:
        ttl_ms = max(1, int((record.expires - self._clock.seconds()) * 1000))
        key = f"{self._link.prefix}dticket:{_key(ticket)}"
        await self._ask(self._link.command("SET", key, json.dumps(asdict(record)), "PX", ttl_ms))

    async def get(self, ticket: str) -> Ticket | None:
        key = f"{self._link.prefix}dticket:{_key(ticket)}"
        raw = await self._ask(self._link.command("GET", key))
        if not raw:
            return None
        try:
            record = Ticket(**json.loads(raw))
        except (ValueError, TypeError):
            return None
        return record if record.expires > self._clock.seconds() else None


class DownloadTickets:
    """One site's download tickets: the store, the TTL, and who may still read.

    It reads the command channels' factory for what they share: the storage,
    the users file, the clock, Redis, and whether the service is stopping.
    """

    def __init__(self, factory: CommandChannelFactory) -> None:
        self._factory = factory
        self.settings: Settings = factory.settings
        self.ttl = factory.settings.download_ticket_ttl
        self.storage: IStorage = factory.storage
        self.users: UserDirectory | None = factory.users
        self.clock: IReactorTime = factory.clock
        self.store: MemoryTicketStore | RedisTicketStore = MemoryTicketStore(self.clock)
        if factory.redis is not None:
            self.store = RedisTicketStore(factory.redis.link, self.clock)

    @property
    def draining(self) -> bool:
        return bool(self._factory.draining)

    def token_id_of(self, session: CommandSession) -> str | None:
        """What a ticket records of its client (None without users)."""
        return self.users.token_id_of(session.client) if self.users is not None else None

    def client_gone(self, record: Ticket) -> bool:
        """The ticket's client was removed from the users file, expired, or
        signs in with another token now (one that leaked was rotated)."""
        if self.users is None:
            return False
        token_id = self.users.token_id_of(record.client)
        return token_id is None or token_id != record.token_id


async def current_etag(folder: IFolder, path: str) -> tuple[int, str, str | None]:
    """(size, ETag, recorded SHA-256 or None) of file ``path`` now, as
    ``serve_file`` would send them."""
    from wsfiles import httpfiles  # (it imports the session's module: not at import time)

    info = await folder.stat(path)
    whole = await folder.open_download(path)
    try:
        sha256 = await httpfiles.recorded_sha256(whole)
        return whole.size, httpfiles.Validators.of(whole.size, info.mtime, sha256).etag, sha256
    finally:
        whole.close()


# -- the op ----------------------------------------------------------------------


def _service(session: CommandSession) -> DownloadTickets:
    # The site's tickets travel to each session with its share service (web.py).
    service = getattr(session.shares, "downloads", None)
    if service is None:
        raise ProtocolError(errors.UNKNOWN_OP, "this server has no download links")
    return service


async def download_command(
    session: CommandSession, message: dict[str, Any], request_id: Any
) -> None:
    """``download``: a short-lived URL for one of the client's files (reading:
    read-only clients may)."""
    service = _service(session)
    if session.draining or service.draining:
        raise ProtocolError(errors.UNAVAILABLE, "the server is shutting down; try again soon")
    path = session._check_name(message.get("name"))
    await session._stat(path)  # not_found / is_a_folder as for get
    try:
        size, etag, sha256 = await current_etag(session.folder, path)
    except (NotFound, IsAFolder, NotAFolder):
        raise ProtocolError(errors.NOT_FOUND, f"no file named {path!r}") from None
    ticket = secrets.token_urlsafe(TICKET_BYTES)
    expires = service.clock.seconds() + service.ttl
    folder_key = session.client if service.users is not None else None
    try:
        await service.store.add(
            ticket,
            Ticket(session.client, folder_key, path, etag, expires, service.token_id_of(session)),
        )
    except StoreUnavailable as e:
        raise ProtocolError(
            errors.UNAVAILABLE, f"download links are unavailable: {e}; retry later"
        ) from None
    _log.info(
        "{client} got download ticket {ticket} for {path!r}",
        client=session.client,
        ticket=short(ticket),
        path=path,
    )
    name = path.rpartition("/")[2]
    reply: dict[str, Any] = {
        "op": "download",
        "name": path,
        "url": f"/d/{ticket}/{quote(name, safe='')}",
        "expires_at": expires,
        "size": size,
        "etag": etag,
    }
    if sha256 is not None:
        reply["sha256"] = sha256
    session._send(reply, request_id)


# -- GET /d/TICKET/NAME ------------------------------------------------------------


def redact_ticket_uri(uri: bytes) -> bytes:
    """``/d/TICKET...`` as logs show it: the ticket cut to its first characters."""
    if not uri.startswith(b"/d/"):
        return uri
    ticket, slash, tail = uri[3:].partition(b"/")
    if len(ticket) <= LOG_PREFIX:
        return uri
    return b"/d/" + ticket[:LOG_PREFIX] + "…".encode() + slash + tail


class _Changed(Exception):
    """The file is not the version the ticket was issued for."""


class _Pinned:
    """A folder whose file ``path`` opens only while its ETag is ``etag``:
    checked on the very download ``serve_file`` then sends, so a file
    replaced in between is refused rather than sent under the ticket."""

    def __init__(self, folder: IFolder, path: str, etag: str) -> None:
        self._folder = folder
        self._path = path
        self._etag = etag
        self._mtime: float | None = None

    async def stat(self, path: str) -> Any:
        info = await self._folder.stat(path)
        self._mtime = info.mtime
        return info

    async def open_download(self, path: str, offset: int = 0, length: int | None = None) -> Any:
        from wsfiles import httpfiles

        download: IDownload = await self._folder.open_download(path, offset, length)
        if offset == 0 and length is None and self._mtime is not None:  # the whole-file look
            sha256 = await httpfiles.recorded_sha256(download)
            # A ticket given under the weak ETag (no SHA-256 recorded then: a
            # file another program wrote, or uploaded with BLAKE3) stays good
            # when the digest is recorded later, while size and mtime hold.
            etags = {
                httpfiles.Validators.of(download.size, self._mtime, d).etag for d in (sha256, None)
            }
            if self._etag not in etags:
                download.close()
                raise _Changed()
        return download


class DownloadResource(resource.Resource):
    """``GET``/``HEAD /d/TICKET`` and ``/d/TICKET/NAME`` (NAME: the file's own
    name, so the browser and ``curl -O`` keep it)."""

    isLeaf = True

    def __init__(self, service: DownloadTickets) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: server.Request) -> Any:
        from wsfiles import httpfiles

        if not request.path.startswith(b"/d/"):
            # Reached as /%64/TICKET: Twisted decodes a segment before routing,
            # but the access log's redaction of tickets reads the raw path.
            httpfiles.answer(request, 404, errors.NOT_FOUND, "no such download")
            return server.NOT_DONE_YET

        def failed(failure: Any) -> None:
            _log.failure("GET /d/ failed", failure)
            if request.channel is not None and not request.startedWriting:
                httpfiles.answer(request, 500, errors.INTERNAL_ERROR, "logged")
            elif request.transport is not None:
                request.transport.abortConnection()

        Deferred.fromCoroutine(self._answer(request)).addErrback(failed)
        return server.NOT_DONE_YET

    render_HEAD = render_GET

    async def _answer(self, request: server.Request) -> None:
        segments = list(request.postpath)
        ticket = segments[0].decode("latin-1") if segments else ""
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-robots-tag", b"noindex, nofollow")
        outcome = await self._serve(request, ticket, segments[1:])
        peer = getattr(request.getClientAddress(), "host", "") or ""
        forwarded = (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1")
        _log.info(
            "download ticket {ticket}: {method} from {address}: {outcome}",
            ticket=short(ticket) if ticket else "-",
            method=request.method.decode("latin-1"),
            address=forwarded_client(peer, forwarded, self.service.settings.trusted_proxies),
            outcome=outcome,
        )

    async def _serve(self, request: server.Request, ticket: str, rest: list[bytes]) -> str:
        from wsfiles import httpfiles

        service = self.service
        if service.draining:
            httpfiles.answer(request, 503, errors.UNAVAILABLE, "the server is stopping")
            return "unavailable"
        record = None
        if _TICKET.fullmatch(ticket):
            try:
                record = await service.store.get(ticket)
            except StoreUnavailable:
                httpfiles.answer(
                    request,
                    503,
                    errors.UNAVAILABLE,
                    "download links are unavailable right now; retry later",
                    retry_after=b"5",
                )
                return "unavailable"
        if record is None or service.client_gone(record):
            httpfiles.answer(
                request, 404, errors.NOT_FOUND, "no such download link (expired?): ask again"
            )
            return "not_found"
        name = record.path.rpartition("/")[2]
        if rest not in ([], [b""], [name.encode("utf-8")]):
            httpfiles.not_found(request)
            return "not_found"
        folder = _Pinned(service.storage.folder(record.folder), record.path, record.etag)
        try:
            served = await httpfiles.serve_file(
                request,
                folder,  # type: ignore[arg-type]
                record.path,
                settings=service.settings,
                clock=service.clock,
            )
        except _Changed:
            httpfiles.answer(
                request,
                410,
                FILE_CHANGED,
                "the file changed after this download link was made: download it again",
            )
            return "changed"
        except StorageFailure:
            httpfiles.answer(request, 503, errors.STORAGE_ERROR, "the storage failed: retry later")
            return "storage_error"
        if request.method == b"HEAD":
            return f"head {served.status}"
        return f"{served.status} {served.sent} bytes" + ("" if served.complete else " (cut)")
