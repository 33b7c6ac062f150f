"""Command handling for one command channel: a plain object, no network.

The WebSocket protocols in ``command.py`` and ``transfer.py`` translate frames
into calls on a ``CommandSession``; everything the protocol *means* lives
here, so it can be tested with fakes.

Order: commands are handled one after another in the order received.  A
``list`` and the checks of a ``get``/``save`` (name, existence, size) are
answered at once; the transfers themselves queue and run one at a time on
the session's file channel.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer, interfaces
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsfiles import batch, downloads, errors, folders, hashes, shares
from wsfiles.admission import TokenBucket
from wsfiles.changes import ChangeHub
from wsfiles.config import Settings
from wsfiles.errors import ProtocolError
from wsfiles.fields import count_field as _count_field
from wsfiles.fields import flag_field as _flag_field
from wsfiles.fields import mtime_field, precondition_field
from wsfiles.metrics import Metrics
from wsfiles.names import check_file_name, check_path, parent_of
from wsfiles.pairing import PairingRegistry
from wsfiles.quota import EntryLimits, QuotaLedger
from wsfiles.ratelimit import FloodWatch
from wsfiles.storage import (
    ChecksumMismatch,
    Exists,
    FileInfo,
    IDownload,
    IFolder,
    IsAFolder,
    IUpload,
    NotAFolder,
    NotEmpty,
    NotFound,
    Precondition,
    PreconditionFailed,
    StorageFailure,
)
from wsfiles.streaming import CountingConsumer, StreamFailed
from wsfiles.timers import Deadline, RateDeadline
from wsfiles.users import UserEntry

PROTOCOL_VERSION = 1
#: What this server supports beyond protocol 1.0 (announced in ``hello``).
FEATURES = (
    "resume",
    "range",
    "checksum",
    "delete",
    "rename",
    "changed",
    "chunked",
    "pieces",
    "share",  # share links (docs/protocol.md, "Share links")
    "download",  # download tickets for plain-HTTP downloads (/d/)
)
#: WebSocket close codes for a file channel the server gives up on.
CLOSE_POLICY = 1008  # a stalled transfer
CLOSE_MESSAGE_TOO_BIG = 1009  # more data than allowed
CLOSE_INTERNAL_ERROR = 1011  # the file could not be read mid-message
#: Command channel: the file list for ``hello`` could not be read (the object
#: store is down); sent right after a ``storage_error`` (docs/protocol.md).
CLOSE_STORAGE_UNAVAILABLE = 1013
#: What a read-only user (``read_only=yes`` in the users file) may not do.
_WRITE_OPS = frozenset({"save", "save_batch", "delete", "rename", "mkdir", "rmdir"})

_log = Logger()

RequestId = str | int | None


class FileChannel(Protocol):
    """What a session needs from its file channel (see transfer.py)."""

    def begin_message(self) -> interfaces.IConsumer: ...

    def end_message(self) -> None: ...

    def abort(self, code: int, reason: str) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


@dataclass
class _Receive:
    """An upload waiting for, or receiving, its binary message."""

    upload: IUpload
    size: int  # bytes expected in this message (the rest, after a resume)
    offset: int = 0  # bytes already stored by an earlier attempt
    done: Deferred = field(default_factory=Deferred)
    started: bool = False
    announced: int = 0  # sum of the frame lengths seen so far
    received: int = 0
    finished: bool = False
    #: 1.1 ``chunked``: the data may come as several messages (browsers).
    chunked: bool = False
    #: The client's max_size when the save was accepted (a later change of
    #: the users file applies to later saves).
    limit: int = 0


@dataclass
class TransferRecord:
    """What the log (and metrics) hear about each transfer when it ends."""

    op: str
    name: str
    started: float
    size: int = 0
    offset: int = 0
    sha256: str | None = None  # the digest of ``hash`` (SHA-256 unless asked otherwise)
    hash: str = hashes.SHA256
    result: str = "unfinished"
    moved: int = 0  # bytes that crossed the wire (size - offset when complete)


@dataclass(frozen=True)
class _SaveOptions:
    """What a ``save`` asks of the stored file beyond its bytes."""

    mtime: float | None = None
    precondition: Precondition | None = None
    hash: str = hashes.SHA256


def _with_request_id(reply: bytes, request_id: RequestId) -> bytes:
    """A cached reply (the same for every id) with this command's id."""
    if request_id is None:
        return reply
    return b'%s, "id": %s}' % (reply[:-1], json.dumps(request_id).encode("utf-8"))


#: Commands waiting on one command channel up to which transfers (``get`` and
#: ``save``) are not charged to the command rate limit; past it they are.
MAX_QUEUED_TRANSFERS = 1000


#: A command as parsed once on arrival: its object and id, or why it is none.
Parsed = tuple[dict[str, Any], RequestId] | ProtocolError

#: Commands paced by the transfer queue rather than the command rate.
_TRANSFER_OPS = frozenset({"get", "save", "save_batch"})


def _parsed(payload: bytes) -> Parsed:
    try:
        return _parse_command(payload)
    except ProtocolError as e:
        return e


def _is_transfer(parsed: Parsed) -> bool:
    """Whether a command is a ``get`` or ``save`` (anything unparsable is not:
    it is charged and then refused as usual)."""
    return not isinstance(parsed, ProtocolError) and parsed[0]["op"] in _TRANSFER_OPS


def _request_id(message: dict[str, Any]) -> RequestId:
    request_id = message.get("id")
    if request_id is None or isinstance(request_id, str):
        return request_id
    if isinstance(request_id, int) and not isinstance(request_id, bool):
        return request_id
    raise ProtocolError(errors.BAD_REQUEST, "'id' must be a string or an integer")


def _parse_command(payload: bytes) -> tuple[dict[str, Any], RequestId]:
    """A command's JSON object and id; ProtocolError if it is not one."""
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        raise ProtocolError(errors.BAD_REQUEST, "a command must be a JSON object") from None
    if not isinstance(message, dict):
        raise ProtocolError(errors.BAD_REQUEST, "a command must be a JSON object")
    request_id = _request_id(message)
    if not isinstance(message.get("op"), str):
        raise ProtocolError(errors.BAD_REQUEST, "'op' must be a string", request_id)
    return message, request_id


def _allow_frames(channel: FileChannel, limit: int) -> None:
    """Let ``channel`` carry an upload of ``limit`` bytes: a user's own max_size
    may be above ``--max-size``, the file channel's frame and message limits
    (see transfer.py).  Never lowers them: the session checks each transfer."""
    for option in ("maxFramePayloadSize", "maxMessagePayloadSize"):
        current = getattr(channel, option, 0)
        if 0 < current < limit:
            setattr(channel, option, limit)


class CommandSession:
    """The state of one command channel and its (optional) file channel."""

    #: While the command channel's send buffer is full (its client is not
    #: reading what we send), commands wait their turn unanswered and
    #: ``changed`` events are held, only the latest (each is the whole listing).
    _backed_up: bool = False
    _caught_up: Deferred | None = None
    _held_event: bytes | None = None
    _held_folder_events: dict[str, bytes] | None = None
    #: This connection's refusals, made at its first (the bucket may be shared).
    _flood: FloodWatch | None = None

    def __init__(
        self,
        client: str,
        folder: IFolder,
        registry: PairingRegistry,
        settings: Settings,
        send: Callable[[dict[str, Any]], None],
        *,
        send_raw: Callable[[bytes], None] | None = None,
        clock: IReactorTime,
        close_connection: Callable[[int, str], None],
        quota: QuotaLedger | None = None,
        entry_limits: EntryLimits | None = None,
        changes: ChangeHub | None = None,
        folder_key: str | None = None,
        metrics: Metrics | None = None,
        bucket: TokenBucket | None = None,
        folders: bool = False,
        permissions: Callable[[], UserEntry | None] | None = None,
        shares: Any = None,
    ) -> None:
        self.client = client
        #: Protocol 1.2 (the client offered ``wsfiles.v1.2``): paths and folders.
        self.folders = folders
        #: The site's share links (shares.ShareService); None: no share ops.
        self.shares = shares
        self.folder = folder
        self._changes = changes
        self._folder_key = folder_key
        self.registry = registry
        self.max_size = settings.max_size
        #: The client's users-file line now (read_only, max_size), or None.
        self._permissions = permissions
        self.quota = quota
        self.entry_limits = entry_limits
        self._send_json = send
        self._send_raw = send_raw or (lambda payload: send(json.loads(payload)))
        self._close_connection = close_connection
        self._clock = clock
        self._metrics = metrics
        self.draining = False
        self._quiet_waiters: list[Deferred] = []
        self._idle = Deadline(clock, settings.idle_timeout, self._idle_expired)
        self._stall_timeout = settings.stall_timeout
        self._min_rate = settings.min_rate
        self._stall_deadline: RateDeadline | None = None  # made by the first transfer
        #: Shared by the client's connections (ratelimit.ClientBuckets), or our own.
        self._bucket = bucket or TokenBucket(settings.rate_limit, clock)
        self._stalled = False
        self._commands: Deferred = defer.succeed(None)
        #: Commands accepted and not yet finished (the one running included).
        self._unfinished = 0
        #: Transfers waiting to run; a deque only while there are some (an
        #: idle connection does not pay for one).
        self._transfers: deque[Callable[[], Awaitable[None]]] | None = None
        self._transferring = False
        self._file_channel: FileChannel | None = None
        self._claimed_by: FileChannel | None = None
        self._channel_waiter: Deferred | None = None
        self._receive: _Receive | None = None
        self._download: IDownload | None = None
        self._discarding = False
        self.closed = False

    @property
    def _stall(self) -> RateDeadline:
        if self._stall_deadline is None:
            self._stall_deadline = RateDeadline(
                self._clock,
                self._stall_timeout,
                int(self._min_rate * self._stall_timeout),
                self._stall_expired,
            )
        return self._stall_deadline

    # -- sending ---------------------------------------------------------

    def _send(self, message: dict[str, Any], request_id: RequestId = None) -> None:
        if self.closed:
            return
        if request_id is not None:
            message["id"] = request_id
        self._send_json(message)

    def _send_error(self, code: str, text: str, request_id: RequestId = None) -> None:
        _log.info("refused a command of {client}: {code}", client=self.client, code=code)
        if self._metrics is not None:
            self._metrics.refusals.labels(code).inc()
        self._send({"op": "error", "code": code, "message": text}, request_id)

    # -- the command channel ---------------------------------------------

    def start(self) -> Deferred:
        """Greet the client with its file list; commands wait for this."""

        async def hello() -> None:
            try:
                if self.folders:
                    top = await folders.listing(self.folder, {})
                else:
                    files = await self.folder.list()
            except StorageFailure as e:
                self._storage_unavailable(e)
                return
            read_only, max_size = self._account()
            greeting: dict[str, Any] = {
                "op": "hello",
                "protocol": PROTOCOL_VERSION,
                "features": list(FEATURES),
                "client": self.client,
                "max_size": max_size,
                "hashes": list(self._accepted_hashes),
            }
            if read_only:  # (absent: the client may change its files)
                greeting["read_only"] = True
            if self.folders:
                greeting.update(folders.hello_fields())
                greeting["features"].append("folders")
                greeting["files"] = top["files"]
                if "cursor" in top:
                    greeting["cursor"] = top["cursor"]
            else:
                greeting["files"] = [info.as_json() for info in files]
            self._send(greeting)

        if self._changes is not None:
            self._changes.subscribe(self._folder_key, self._listener, folders=self.folders)
        self._idle.reset()
        return self._in_order(hello, None)

    def _storage_unavailable(self, error: StorageFailure) -> None:
        """No file list for ``hello``: say why, then close (1013), so the client
        reconnects later instead of waiting for a greeting that will not come.
        How long the store may take to answer is the backend's deadline."""
        _log.warn(
            "closing {client}'s command channel: cannot list its files: {error}",
            client=self.client,
            error=str(error),
        )
        if self._metrics is not None:
            self._metrics.refusals.labels(errors.STORAGE_ERROR).inc()
        self._send(
            {
                "op": "error",
                "code": errors.STORAGE_ERROR,
                "message": f"the file store is unavailable ({error}); reconnect later",
            }
        )
        self._close_connection(CLOSE_STORAGE_UNAVAILABLE, "storage unavailable")

    def text_received(self, payload: bytes) -> None:
        """A command arrived: handle it after the ones before it."""
        if not self._busy:
            self._idle.reset()
        # Waiting: commands not yet handled, and transfers handled but queued
        # (a handled save leaves _unfinished at once, its transfer waits).
        waiting = self._unfinished + len(self._transfers or ())
        parsed = _parsed(payload)  # once: every path below takes this
        if waiting < MAX_QUEUED_TRANSFERS and _is_transfer(parsed):
            # Paced by the transfer queue (one at a time, each waiting for its
            # data), not by the command rate: a sync saving 10,000 small
            # files must not be throttled like a client listing in a loop.
            self._in_order(lambda: self._dispatch(parsed, uncharged=True), None)
            return
        self._rate_limited(
            lambda: (
                self._answered_from_cache(parsed)
                or self._in_order(lambda: self._dispatch(parsed), None)
            ),
            lambda: self._in_order(lambda: self._refuse_rate_limited(parsed), None),
        )

    def _answered_from_cache(self, parsed: Parsed) -> bool:
        """Answer a ``list`` whose reply is cached right away, when nothing is
        before it: no coroutines (the common case of a client polling a
        folder).  False leaves the command to ``_dispatch``."""
        if (
            isinstance(parsed, ProtocolError)  # _dispatch reports it
            or parsed[0]["op"] != "list"
            or self._unfinished
            or self._backed_up
            or self._changes is None
            or self.closed
        ):
            return False
        message, request_id = parsed
        key = self._listing_key(message)
        cached = self._changes.listings.get(key) if key is not None else None
        if cached is None:
            return False
        self._send_raw(_with_request_id(cached, request_id))
        return True

    def binary_received(self) -> None:
        """Data on the command channel: refused, nothing stored.  It counts
        against the rate limit like a command: every refusal is a reply, and
        a client that never reads them would otherwise grow our send buffer."""
        self._rate_limited(
            lambda: self._send_error(
                errors.WRONG_CHANNEL, "binary data belongs on the file channel; nothing was stored"
            ),
            lambda: self._send_error(errors.RATE_LIMITED, self._rate_limited_message),
        )

    def _rate_limited(self, run: Callable[[], object], refuse: Callable[[], object]) -> None:
        """``run`` within the rate limit, ``refuse`` past it; close on a flood."""
        if self._bucket.take():
            run()
            return
        if self._flood is None:
            self._flood = FloodWatch(self._bucket.rate, self._clock)
        if self._flood.refused():
            _log.warn("closing {client}'s command channel: command flood", client=self.client)
            self._close_connection(1008, "too many commands")
        else:
            refuse()

    @property
    def _rate_limited_message(self) -> str:
        return f"more than {self._bucket.rate:g} commands per second; this one was not run"

    async def _refuse_rate_limited(self, parsed: Parsed) -> None:
        request_id = parsed.request_id if isinstance(parsed, ProtocolError) else parsed[1]
        self._send_error(errors.RATE_LIMITED, self._rate_limited_message, request_id)

    @property
    def _busy(self) -> bool:
        return self._transferring or bool(self._transfers)

    def _idle_expired(self) -> None:
        _log.info("closing {client}'s idle command channel", client=self.client)
        self._close_connection(1000, "idle timeout")

    def _in_order(self, handler: Callable[[], Awaitable[None]], request_id: RequestId) -> Deferred:
        async def guarded() -> None:
            try:
                if self._backed_up:
                    if self._caught_up is None:
                        self._caught_up = Deferred()
                    await self._caught_up
                    if self.closed:
                        return
                await self._reporting_errors(handler, request_id)
            finally:
                self._unfinished -= 1

        self._unfinished += 1
        if self._unfinished > 1:  # behind an earlier command: wait for it
            self._commands.addCallback(lambda _: Deferred.fromCoroutine(guarded()))
            return self._commands
        # Nothing before it: run it now.  Most commands (a list, a refusal)
        # finish without waiting for anything, and then no Deferred is needed.
        command = guarded()
        try:
            command.send(None)
        except StopIteration:
            return self._commands  # fired: the chain stays idle
        self._commands = Deferred.fromCoroutine(command)  # resumes where it waits
        return self._commands

    async def _reporting_errors(
        self, handler: Callable[[], Awaitable[None]], request_id: RequestId
    ) -> bool:
        """Run ``handler``; any failure becomes an error reply.  True if one was sent."""
        try:
            await handler()
            return False
        except ProtocolError as e:
            self._send_error(e.code, e.message, request_id)
        except (NotFound, NotAFolder, IsAFolder, NotEmpty, Exists, PreconditionFailed) as e:
            refused = folders.refusal(e, str(e))
            assert refused is not None
            self._send_error(refused.code, refused.message, request_id)
        except StorageFailure as e:
            self._send_error(errors.STORAGE_ERROR, str(e), request_id)
        except Exception:
            _log.failure("unexpected error handling a command of {client}", client=self.client)
            self._send_error(errors.INTERNAL_ERROR, "internal error (logged)", request_id)
        return True

    async def _dispatch(self, parsed: Parsed, *, uncharged: bool = False) -> None:
        """Run one command's handler; every failure becomes an error reply."""
        if isinstance(parsed, ProtocolError):
            self._send_error(parsed.code, parsed.message, parsed.request_id)
            return
        message, request_id = parsed
        # No log line per command: twistd writes every level, and the commands
        # that change stored files log their outcome (transfers, delete, rename).
        op = message["op"]
        handler = self._handlers.get(op)
        if handler is None and self.folders:
            handler = self._folder_handlers.get(op)
        if handler is None:
            self._send_error(errors.UNKNOWN_OP, f"unknown op {op[:64]!r}", request_id)
            return
        if op in _WRITE_OPS and self._account()[0]:
            self._send_error(
                errors.FORBIDDEN, f"{self.client} is read-only: list and get only", request_id
            )
            return
        refused = await self._reporting_errors(
            lambda: handler(self, message, request_id), request_id
        )
        if refused and uncharged:
            # A transfer refused before it queued (a get of a missing name, a
            # save over quota) cost the server like any command: it is
            # charged now, so a stream of them is limited (and a flood closed).
            self._rate_limited(lambda: None, lambda: None)

    async def _list(self, message: dict[str, Any], request_id: RequestId) -> None:
        """A listing, from the cache when the folder has not changed since it
        was last read (wsfiles.changes.ListingCache)."""
        cache = self._changes.listings if self._changes is not None else None
        key = self._listing_key(message) if cache is not None else None
        if cache is None or key is None:
            self._send(await self._read_listing(message), request_id)
            return
        payload = cache.get(key)
        if payload is None:
            generation = cache.generation
            reply = await self._read_listing(message)
            payload = json.dumps(reply).encode("utf-8")
            if reply.get("path", "") == key[1]:  # cached under the path it answers
                cache.put(key, payload, generation)
        if self.closed:
            return
        self._send_raw(_with_request_id(payload, request_id))

    async def _read_listing(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.folders:
            return await folders.listing(self.folder, message)
        files = await self.folder.list()
        return {"op": "list", "files": [info.as_json() for info in files]}

    def _listing_key(self, message: dict[str, Any]) -> tuple[str | None, str, str] | None:
        """The cache key of a plain listing (1.1, or a 1.2 folder's first page);
        None for anything else (a tree, a later page, a field to refuse)."""
        if not self.folders:
            return (self._folder_key, "", "1.1")
        path = message.get("path", "")
        limit = message.get("limit", folders.MAX_LIST)
        if (
            not isinstance(path, str)
            or message.get("recursive", False) is not False
            or message.get("sha256", False) is not False
            or message.get("cursor") not in (None, "")
            or type(limit) is not int
            or limit < 1
        ):
            return None
        return (self._folder_key, path, f"1.2 {min(limit, folders.MAX_LIST)}")

    async def _stat(self, name: str) -> FileInfo:
        try:
            return await self.folder.stat(name)
        except (NotFound, NotAFolder):
            raise ProtocolError(errors.NOT_FOUND, f"no file named {name!r}") from None
        except IsAFolder:
            if not self.folders:  # 1.1: folders do not exist
                raise ProtocolError(errors.NOT_FOUND, f"no file named {name!r}") from None
            raise

    @property
    def _accepted_hashes(self) -> tuple[str, ...]:
        """What ``hash`` may name here: what the storage backend can keep."""
        return tuple(getattr(self.folder, "accepted_hashes", (hashes.SHA256,)))

    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise ProtocolError(
                errors.UNAVAILABLE, "the server is shutting down; try again in a moment"
            )

    async def _get(self, message: dict[str, Any], request_id: RequestId) -> None:
        self._refuse_while_draining()
        name = self._check_name(message.get("name"))
        offset = _count_field(message, "offset", 0)
        length = _count_field(message, "length") if "length" in message else None
        algorithm = hashes.hash_field(message, self._accepted_hashes)
        info = await self._stat(name)
        if offset > info.size:
            raise ProtocolError(
                errors.BAD_REQUEST, f"offset {offset} is beyond the file's {info.size} bytes"
            )
        ranged = "offset" in message
        self._enqueue(
            "get",
            name,
            lambda record: self._run_get(
                name, offset, ranged, length, request_id, record, algorithm
            ),
            request_id,
        )

    async def _save(self, message: dict[str, Any], request_id: RequestId) -> None:
        self._refuse_while_draining()
        name = self._check_name(message.get("name"))
        size = _count_field(message, "size")
        algorithm = hashes.hash_field(message, self._accepted_hashes)
        sha256 = hashes.digest_field(message, algorithm)  # declared: "sha256" or "blake3"
        resume = _flag_field(message, "resume")
        chunked = _flag_field(message, "chunked")
        mtime = mtime_field(message)
        precondition = precondition_field(message)
        max_size = self._account()[1]
        if size > max_size:
            raise ProtocolError(errors.TOO_LARGE, f"{size} bytes is over the limit of {max_size}")
        kind = await self.folder.kind(name)
        if kind == "folder":  # a parent that is a file: NotAFolder
            if not self.folders:  # refused now, not after the data at commit
                raise ProtocolError(
                    errors.EXISTS, f"{name!r} is taken by a folder (protocol 1.2 shows folders)"
                )
            raise IsAFolder(name)
        await self._check_precondition(name, kind, precondition)  # before any data is sent
        if self.quota is not None:
            await self.quota.check(self.client, self.folder, name, size)
        if self.entry_limits is not None:
            await self.entry_limits.check(self.client, self.folder, name)
        self._enqueue(
            "save",
            name,
            lambda record: self._run_save(
                name,
                size,
                sha256,
                resume,
                chunked,
                request_id,
                record,
                max_size,
                _SaveOptions(mtime, precondition, algorithm),
            ),
            request_id,
        )

    async def _check_precondition(
        self, name: str, kind: str | None, precondition: Precondition | None
    ) -> None:
        """Refuse a conditional save early; ``kind``: what is at ``name`` now.
        Only ``if_sha256`` over a stored file needs its digest (which may
        mean hashing it); whether a file is there is known already."""
        if precondition is None:
            return
        if kind is not None and precondition.absent:
            raise PreconditionFailed(name)  # a file is there
        stored = None
        if kind is not None:
            described = (await self.folder.described([name])).get(name)
            stored = None if described is None else described.sha256
        if not precondition.holds(stored):
            raise PreconditionFailed(name)

    async def _delete(self, message: dict[str, Any], request_id: RequestId) -> None:
        name = self._check_name(message.get("name"))
        precondition = precondition_field(message)
        if precondition is not None and precondition.absent:
            raise ProtocolError(errors.BAD_REQUEST, "'if_absent' makes no sense on a delete")
        try:
            await self.folder.delete(name, precondition)
        except (NotFound, NotAFolder):
            raise ProtocolError(errors.NOT_FOUND, f"no file named {name!r}") from None
        except IsAFolder:
            if not self.folders:
                raise ProtocolError(errors.NOT_FOUND, f"no file named {name!r}") from None
            raise ProtocolError(
                errors.IS_A_FOLDER, f"{name!r} is a folder; use rmdir to remove it"
            ) from None
        _log.info("deleted {name!r} of {client}", name=name, client=self.client)
        self._send({"op": "deleted", "name": name}, request_id)
        self._announce_change(name)

    async def _rename(self, message: dict[str, Any], request_id: RequestId) -> None:
        name = self._check_name(message.get("name"))
        to = self._check_name(message.get("to"))
        overwrite = _flag_field(message, "overwrite")
        folders.check_move(name, to)
        if self.folders and await self.folder.kind(name) == "folder":
            await folders.check_move_fits(self.folder, name, to)
        if self.folders and self.entry_limits is not None and parent_of(to) != parent_of(name):
            await self.entry_limits.check(self.client, self.folder, to, moving=True)
        elif not self.folders and await self._is_folder_11(name):
            raise ProtocolError(errors.NOT_FOUND, f"no file named {name!r}")  # unseen in 1.1
        made = await self._missing_ancestor(to)
        try:
            await self.folder.rename(name, to, overwrite)
        except NotFound:
            raise ProtocolError(errors.NOT_FOUND, f"no file named {name!r}") from None
        except Exists:
            if overwrite or await self._is_folder(name, to):
                raise ProtocolError(
                    errors.EXISTS, f"{to!r} exists, and a folder never replaces or is replaced"
                ) from None
            raise ProtocolError(
                errors.EXISTS, f'{to!r} exists; send "overwrite": true to replace it'
            ) from None
        _log.info("renamed {name!r} of {client} to {to!r}", name=name, client=self.client, to=to)
        self._send({"op": "renamed", "name": name, "to": to}, request_id)
        self._announce_change(name, to, *made)

    async def _missing_ancestor(self, path: str) -> list[str]:
        """The outermost folder above ``path`` that does not exist yet, if any:
        the operation will create it, so the folder holding it changes too."""
        if not self.folders:
            return []
        outermost: list[str] = []
        parent = parent_of(path)
        while parent and await self.folder.kind(parent) is None:  # bounded by the depth
            outermost = [parent]
            parent = parent_of(parent)
        return outermost

    async def _is_folder_11(self, name: str) -> bool:
        """Whether a 1.1 channel's name is a folder there: 1.1 cannot see folders."""
        with contextlib.suppress(NotFound, NotAFolder):
            return await self.folder.kind(name) == "folder"
        return False

    async def _is_folder(self, *paths: str) -> bool:
        """Whether any of ``paths`` is a folder (to word a refusal)."""
        if not self.folders:
            return False
        for path in paths:
            with contextlib.suppress(NotFound, NotAFolder):
                if await self.folder.kind(path) == "folder":
                    return True
        return False

    async def _mkdir(self, message: dict[str, Any], request_id: RequestId) -> None:
        if self.entry_limits is not None:  # a folder is an entry too
            path = check_path(message.get("path"), field="path")
            await self.entry_limits.check(self.client, self.folder, path)
        made = await self._missing_ancestor(check_path(message.get("path"), field="path"))
        path = await folders.make_folder(self.folder, message)
        _log.info("made folder {path!r} of {client}", path=path, client=self.client)
        self._send({"op": "created", "path": path}, request_id)
        self._announce_change(path, *made)

    async def _rmdir(self, message: dict[str, Any], request_id: RequestId) -> None:
        path = await folders.remove_folder(self.folder, message)
        _log.info("removed folder {path!r} of {client}", path=path, client=self.client)
        self._send({"op": "removed", "path": path}, request_id)
        self._announce_change(path)

    _handlers = {
        "list": _list,
        "get": _get,
        "save": _save,
        "delete": _delete,
        "rename": _rename,
        # Share links (wsfiles/shares.py), on 1.1 and 1.2 channels.
        "share": shares.share_command,
        "unshare": shares.unshare_command,
        "shares": shares.shares_command,
        # Download URLs for the browser's download manager (wsfiles/downloads.py).
        "download": downloads.download_command,
    }

    async def _save_batch(self, message: dict[str, Any], request_id: RequestId) -> None:
        """Many small files in one message (wsfiles/batch.py)."""
        self._refuse_while_draining()
        max_size = self._account()[1]
        entries = batch.parse_batch(message, self._check_name, max_size)
        self._enqueue(
            "save_batch",
            f"{len(entries)} files",
            lambda record: self._run_save_batch(entries, request_id, record),
            request_id,
        )

    #: Protocol 1.2 only; a 1.1 channel gets unknown_op.
    _folder_handlers = {"mkdir": _mkdir, "rmdir": _rmdir, "save_batch": _save_batch}

    # -- live updates ------------------------------------------------------

    def _announce_change(self, *paths: str) -> None:
        """The folders holding ``paths`` changed (each once)."""
        if self._changes is not None:
            for parent in dict.fromkeys(parent_of(path) for path in paths):
                self._changes.changed(self._folder_key, parent)

    # -- per-user permissions (the users file) --------------------------------

    def _account(self) -> tuple[bool, int]:
        """(read-only, largest upload) for this client now: a users-file change
        applies from the next command on, without closing the connection."""
        if self._permissions is None:
            return False, self.max_size
        entry = self._permissions()
        if entry is None:  # removed or expired: its channels are closing (4401)
            return True, self.max_size
        return entry.read_only, self.max_size if entry.max_size is None else entry.max_size

    def _check_name(self, name: object) -> str:
        """A path on a 1.2 channel, a single name on a 1.1 one."""
        return check_path(name) if self.folders else check_file_name(name)

    @property
    def _listener(self) -> Callable[..., None]:
        return self._folder_event if self.folders else self._folder_changed

    def _folder_changed(self, payload: bytes) -> None:
        if self.closed:
            return
        if self._backed_up:
            self._held_event = payload
        else:
            self._send_raw(payload)

    def _folder_event(self, path: str, payload: bytes) -> None:
        """A 1.2 event: while backed up, only the latest per folder is kept."""
        if self.closed:
            return
        if self._backed_up:
            if self._held_folder_events is None:
                self._held_folder_events = {}
            self._held_folder_events.pop(path, None)  # keep the order of the latest
            self._held_folder_events[path] = payload
        else:
            self._send_raw(payload)

    def client_backed_up(self) -> None:
        """Our replies are piling up unread: answer nothing more until they drain."""
        self._backed_up = True

    def client_caught_up(self) -> None:
        """The replies drained: go on with the commands, and send the latest
        ``changed`` held meanwhile, if any."""
        self._backed_up = False
        payload, self._held_event = self._held_event, None
        if payload is not None:
            self._folder_changed(payload)
        held, self._held_folder_events = self._held_folder_events, None
        for path, event in (held or {}).items():
            self._folder_event(path, event)
        waiter, self._caught_up = self._caught_up, None
        if waiter is not None:
            waiter.callback(None)  # may back us up again at once: each command checks

    def close(self) -> None:
        """The command channel is gone: stop everything that belongs to it."""
        if self.closed:
            return
        self.closed = True
        if self._changes is not None:
            self._changes.unsubscribe(self._folder_key, self._listener, folders=self.folders)
        self._idle.cancel()
        if self._stall_deadline is not None:
            self._stall_deadline.cancel()
        self._transfers = None
        self.registry.revoke(self)
        if self._channel_waiter is not None:
            waiter, self._channel_waiter = self._channel_waiter, None
            waiter.errback(ProtocolError(errors.CHANNEL_CLOSED, "the command channel closed"))
        self._fail_receive(errors.CHANNEL_CLOSED, "the command channel closed", keep=True)
        if self._download is not None:
            self._download.stop()
        if self._file_channel is not None:
            self._file_channel.close()
        waiter, self._caught_up = self._caught_up, None
        if waiter is not None:
            waiter.callback(None)  # the commands waiting for a reader end unanswered

    # -- transfers -------------------------------------------------------

    def _enqueue(
        self,
        op: str,
        name: str,
        transfer: Callable[[TransferRecord], Awaitable[None]],
        request_id: RequestId,
    ) -> None:
        self._refuse_while_draining()  # it may have begun while this command waited

        async def run() -> None:
            record = TransferRecord(op, name, self._clock.seconds())
            if self._metrics is not None:
                self._metrics.transfer_started(op)
            try:
                await transfer(record)
                record.result = "ok"
            except ProtocolError as e:
                record.result = e.code
                raise
            except StorageFailure:
                record.result = errors.STORAGE_ERROR
                raise
            except Exception:
                record.result = errors.INTERNAL_ERROR
                raise
            finally:
                self._log_transfer(record)
                if self._metrics is not None:
                    self._metrics.transfer_ended(
                        op,
                        record.result,
                        record.moved,
                        record.size,
                        self._clock.seconds() - record.started,
                    )

        if self._transfers is None:
            self._transfers = deque()
        self._transfers.append(lambda: self._reporting_errors(run, request_id))
        self._idle.cancel()  # a command channel never idles out while it transfers
        if not self._transferring:
            Deferred.fromCoroutine(self._run_transfers())

    def _log_transfer(self, record: TransferRecord) -> None:
        _log.info(
            "{op} {name!r} by {client}: {result}, {size} bytes"
            " (from offset {offset}) in {duration:.3f} s, {hash} {sha256}",
            op=record.op,
            name=record.name,
            client=self.client,
            result=record.result,
            size=record.size,
            offset=record.offset,
            duration=self._clock.seconds() - record.started,
            sha256=record.sha256,
            hash=record.hash,
            transfer=True,
        )

    async def _run_transfers(self) -> None:
        self._transferring = True
        try:
            while self._transfers and not self.closed:
                await self._transfers.popleft()()
        finally:
            self._transferring = False
            self._transfers = None  # empty, or closed
            if not self.closed:
                self._idle.reset()
            waiters, self._quiet_waiters = self._quiet_waiters, []
            for waiter in waiters:
                if not waiter.called:  # a grace period may have given up on it
                    waiter.callback(None)

    def begin_drain(self) -> Deferred:
        """The service is stopping: refuse new transfers; fire when none is left."""
        self.draining = True
        if not self._busy or self.closed:
            return defer.succeed(None)
        waiter: Deferred = Deferred()
        self._quiet_waiters.append(waiter)
        return waiter

    async def _file_channel_ready(self, request_id: RequestId) -> FileChannel:
        """The file channel, set up first if this session has none."""
        if self._file_channel is not None:
            return self._file_channel
        ticket = self.registry.issue(self)
        waiter = self._channel_waiter = Deferred()
        # Held locally: sending may re-enter (a close) and clear the attribute.
        self._send({"op": "channel", "url": f"/file?ticket={ticket}"}, request_id)
        return await waiter

    async def _run_get(
        self,
        name: str,
        offset: int,
        ranged: bool,
        length: int | None,
        request_id: RequestId,
        record: TransferRecord,
        algorithm: str = hashes.SHA256,
    ) -> None:
        """Send the file from ``offset``; with ``length``, only that piece of it,
        whose own SHA-256 ``sent`` then carries as ``range_sha256``.  With
        ``algorithm`` BLAKE3, ``sent`` carries ``blake3`` (``range_blake3``)."""
        channel = await self._file_channel_ready(request_id)
        record.hash = algorithm
        chosen = {} if algorithm == hashes.SHA256 else {"hash": algorithm}
        try:
            download = await self.folder.open_download(name, offset, length, **chosen)
        except NotFound:
            raise ProtocolError(errors.NOT_FOUND, f"no file named {name!r}") from None
        except ValueError as e:  # the file shrank below the offset meanwhile
            raise ProtocolError(errors.BAD_REQUEST, str(e)) from None
        self._download = download
        try:
            prefix = hashes.new(algorithm) if length is not None else await download.prefix_sha256()
            if channel is not self._file_channel:  # it closed while we prepared
                raise ProtocolError(errors.CHANNEL_CLOSED, "the file channel closed")
            sending = {"op": "sending", "name": name, "size": download.size}
            if ranged:
                sending["offset"] = offset
            if length is not None:
                sending["offset"], sending["length"] = offset, download.length
            self._send(sending, request_id)
            consumer = CountingConsumer(channel.begin_message(), progress=self._stall.progress)
            self._stalled = False
            self._stall.start()
            try:
                await download.stream_to(consumer, prefix)
                record.moved = consumer.written
            except StreamFailed as e:
                if self._stalled:
                    self._abandon_file_channel(channel, CLOSE_POLICY, "transfer stalled")
                    raise ProtocolError(errors.STALLED, self._stall_message) from None
                if e.consumer_gone or channel is not self._file_channel:
                    raise ProtocolError(
                        errors.CHANNEL_CLOSED, "the file channel closed during the transfer"
                    ) from None
                # Part of a message is out: the channel cannot carry on.
                self._abandon_file_channel(channel, CLOSE_INTERNAL_ERROR, "storage error")
                raise ProtocolError(errors.STORAGE_ERROR, str(e)) from None
            channel.end_message()
            record.size, record.offset = download.size, offset
            record.sha256 = prefix.hexdigest()
            sent: dict[str, Any] = {"op": "sent", "name": name, "size": download.size}
            if length is None:
                sent[algorithm] = record.sha256
            else:
                sent.update(offset=offset, length=download.length)
                sent["range_" + algorithm] = record.sha256
            self._send(sent, request_id)
        finally:
            self._stall.cancel()
            self._download = None
            download.close()

    async def _run_save(
        self,
        name: str,
        size: int,
        sha256: str | None,
        resume: bool,
        chunked: bool,
        request_id: RequestId,
        record: TransferRecord,
        max_size: int,
        options: _SaveOptions,
    ) -> None:
        channel = await self._file_channel_ready(request_id)
        _allow_frames(channel, max_size)
        made = await self._missing_ancestor(name)
        async with self._room([name], size, replacing=name):
            chosen = {} if options.hash == hashes.SHA256 else {"hash": options.hash}
            upload = await self.folder.begin_upload(
                name,
                size,
                sha256,
                resume,
                mtime=options.mtime,
                precondition=options.precondition,
                **chosen,
            )
            if channel is not self._file_channel:  # it closed while we prepared
                upload.interrupt()
                raise ProtocolError(errors.CHANNEL_CLOSED, "the file channel closed")
            receive = _Receive(
                upload, size - upload.offset, upload.offset, chunked=chunked, limit=max_size
            )
            record.size, record.offset = size, upload.offset
            upload.on_superseded = lambda: self._superseded(receive)
            ready: dict[str, Any] = {"op": "ready"}
            if resume:
                ready["offset"] = upload.offset
            digest = await self._received(receive, ready, request_id, record)
        record.sha256, record.hash = digest, options.hash
        ack: dict[str, Any] = {"op": "ack", "name": name, "size": size, options.hash: digest}
        if options.mtime is not None:
            ack["mtime"] = options.mtime
        self._send(ack, request_id)
        self._announce_change(name, *made)

    async def _run_save_batch(
        self, entries: list[batch.BatchEntry], request_id: RequestId, record: TransferRecord
    ) -> None:
        names = [entry.name for entry in entries]
        upload = batch.BatchUpload(self.folder, entries)
        total = upload.size
        channel = await self._file_channel_ready(request_id)
        _allow_frames(channel, total)
        made: set[str] = set()
        for name in {parent_of(name): name for name in names}.values():  # one per folder
            made.update(await self._missing_ancestor(name))
        async with self._room(names, total):  # what the files replace is not subtracted
            if channel is not self._file_channel:  # it closed while we prepared
                raise ProtocolError(errors.CHANNEL_CLOSED, "the file channel closed")
            record.size = total
            upload.begin()
            try:
                outcomes = await self._received(
                    _Receive(upload, total, 0, limit=total), {"op": "ready"}, request_id, record
                )
            except ProtocolError as e:  # answered once the files before the cut are in
                stored = await upload.settle()
                cut = e.message.removesuffix("; nothing was stored")
                raise ProtocolError(
                    e.code, f"{cut}; {stored} of the batch's files were stored"
                ) from None
            finally:
                # Files stored before a cut are there: listeners hear of them
                # either way (a batch refused before this stored nothing).
                self._announce_change(*names, *made)
        self._send({"op": "saved", "files": outcomes}, request_id)

    @contextlib.asynccontextmanager
    async def _room(
        self, names: list[str], size: int, *, replacing: str | None = None
    ) -> AsyncIterator[None]:
        """Room for a store while it runs: ``names`` held against the entry
        limits, ``size`` bytes reserved against the quota (less what
        ``replacing`` holds now); both let go when it ends, stored or not."""
        release_entries = None
        if self.entry_limits is not None:
            release_entries = await self.entry_limits.hold(self.client, self.folder, names)
        reservation = None
        try:
            if self.quota is not None:
                reservation = await self.quota.reserve(self.client, self.folder, replacing, size)
            yield
        finally:
            if reservation is not None:
                reservation.release()
            if release_entries is not None:
                release_entries()

    async def _received(
        self,
        receive: _Receive,
        ready: dict[str, Any],
        request_id: RequestId,
        record: TransferRecord,
    ) -> Any:
        """Tell the client to send (``ready``) and wait for the upload's bytes and
        its commit, under the stall deadline: what the commit fires with."""
        self._receive = receive
        try:
            self._stall.start()  # armed before the client hears it may send
            self._send(ready, request_id)
            return await receive.done
        finally:
            record.moved = receive.received
            self._stall.cancel()
            if self._receive is receive:
                self._receive = None

    def _superseded(self, receive: _Receive) -> None:
        if self._receive is receive:
            self._fail_receive(
                errors.SUPERSEDED, "a resumed upload of this file took over", keep=True
            )

    @property
    def _stall_message(self) -> str:
        stall = self._stall
        if stall.min_bytes <= 1:
            return f"no progress for {stall.seconds:g} s; the transfer was abandoned"
        return (
            f"fewer than {stall.min_bytes} bytes moved in {stall.seconds:g} s"
            " (--min-rate); the transfer was abandoned"
        )

    def _stall_expired(self) -> None:
        self._stalled = True
        channel = self._file_channel
        if self._receive is not None and not self._receive.finished:
            if channel is not None:
                self._abandon_file_channel(channel, CLOSE_POLICY, "transfer stalled")
            self._fail_receive(errors.STALLED, self._stall_message, keep=True)
        elif self._download is not None:
            self._download.stop()

    def _fail_receive(self, code: str, text: str, *, keep: bool = False) -> None:
        """End the upload with an error; ``keep`` what arrived if it was cut, not refused."""
        receive = self._receive
        if receive is None or receive.finished:
            return
        receive.finished = True
        if keep:
            receive.upload.interrupt()
        else:
            receive.upload.abort()
        self._discarding = receive.started
        receive.done.errback(ProtocolError(code, text))

    # -- the file channel ------------------------------------------------

    def ticket_expired(self, ticket: str) -> None:
        waiter, self._channel_waiter = self._channel_waiter, None
        if waiter is not None:
            waiter.errback(
                ProtocolError(
                    errors.CHANNEL_TIMEOUT,
                    f"no file channel attached within {self.registry.channel_timeout:g} s",
                )
            )

    def claim(self, channel: FileChannel) -> None:
        """A file channel presented our ticket; it is still handshaking."""
        self._claimed_by = channel

    def attach(self, channel: FileChannel) -> None:
        """The file channel is open: pair it and go on with the transfer."""
        self._claimed_by = None
        if self.closed:
            channel.close()
            return
        self._file_channel = channel
        self.registry.pair(self, channel)
        waiter, self._channel_waiter = self._channel_waiter, None
        if waiter is not None:
            waiter.callback(channel)

    def _abandon_file_channel(self, channel: FileChannel, code: int, reason: str) -> None:
        """Close a file channel that cannot carry on, and stop using it at once.

        Until its TCP connection is gone it may still deliver frames; those
        are ignored, and the next transfer is offered a new channel.
        """
        if channel is self._file_channel:
            self._file_channel = None
            self.registry.unpair(self, channel)
        channel.abort(code, reason)

    def detach(self, channel: FileChannel) -> None:
        """The file channel closed; a transfer on it fails, the next asks anew."""
        if channel is self._claimed_by:
            self._claimed_by = None
            waiter, self._channel_waiter = self._channel_waiter, None
            if waiter is not None:
                waiter.errback(
                    ProtocolError(errors.CHANNEL_CLOSED, "the file channel failed to open")
                )
            return
        if channel is not self._file_channel:
            return
        self._file_channel = None
        self.registry.unpair(self, channel)
        self._discarding = False
        self._fail_receive(
            errors.CHANNEL_CLOSED, "the file channel closed during the upload", keep=True
        )
        if self._download is not None:
            self._download.stop()

    def file_message_begin(self, channel: FileChannel, is_binary: bool) -> None:
        if channel is not self._file_channel:
            return  # an abandoned channel's last frames
        receive = self._receive
        if not is_binary:
            self._discarding = True
            self._send_error(
                errors.WRONG_CHANNEL,
                "commands belong on the command channel; the text message was not executed",
            )
        elif receive is None or receive.started or receive.finished:
            self._discarding = True
            self._send_error(
                errors.UNEXPECTED_DATA,
                "no save is waiting for data; the message was discarded",
            )
        else:
            self._discarding = False
            receive.started = True

    def _receiving(self, channel: FileChannel) -> _Receive | None:
        """The upload that data from ``channel`` now belongs to, if any."""
        receive = self._receive
        if (
            channel is not self._file_channel
            or self._discarding
            or receive is None
            or receive.finished
        ):
            return None
        return receive

    def file_frame_begin(self, channel: FileChannel, length: int) -> bool:
        """A frame of ``length`` bytes is coming; False: the channel was cut (1009)."""
        receive = self._receiving(channel)
        if receive is None:
            return True
        receive.announced += length
        # The channel is dropped before the error goes out: a transfer queued
        # behind this one must be offered a new channel, not this dying one.
        if receive.offset + receive.announced > receive.limit:
            self._abandon_file_channel(channel, CLOSE_MESSAGE_TOO_BIG, "more than max_size")
            self._fail_receive(
                errors.TOO_LARGE,
                f"the data exceeds the limit of {receive.limit} bytes; nothing was stored",
            )
            return False
        if receive.announced > receive.size:
            self._abandon_file_channel(channel, CLOSE_MESSAGE_TOO_BIG, "more than declared")
            self._fail_receive(
                errors.SIZE_MISMATCH,
                f"more data than the declared {receive.size} bytes; nothing was stored",
            )
            return False
        return True

    def file_data(self, channel: FileChannel, data: bytes) -> None:
        receive = self._receiving(channel)
        if receive is None:
            return
        self._stall.progress(receive.received + len(data))
        try:
            pending = receive.upload.write(data)
        except StorageFailure as e:
            self._fail_receive(errors.STORAGE_ERROR, str(e))
            return
        receive.received += len(data)
        if pending is not None:
            # The backend is busy (an object store uploading a part): stop
            # reading the socket until it can take more.
            channel.pause_reading()

            def failed(failure: Failure) -> None:
                if self._receive is receive:  # not a later upload's
                    self._fail_receive(errors.STORAGE_ERROR, str(failure.value))

            pending.addErrback(failed)
            pending.addBoth(lambda _: channel.resume_reading())

    def file_message_end(self, channel: FileChannel) -> None:
        if channel is not self._file_channel:
            return
        receive = self._receive
        if self._discarding or receive is None or receive.finished:
            self._discarding = False
            return
        if receive.chunked and receive.received < receive.size:
            receive.started = False  # the next message carries on
            return
        if receive.received != receive.size:
            self._fail_receive(
                errors.SIZE_MISMATCH,
                f"received {receive.received} bytes, declared {receive.size}; nothing was stored",
            )
            self._discarding = False
            return
        receive.finished = True
        self._stall.cancel()

        def failed(failure: Failure) -> None:
            if failure.check(ChecksumMismatch):
                error = ProtocolError(
                    errors.CHECKSUM_MISMATCH,
                    f"{failure.value}, not the declared one; nothing was stored",
                )
            elif failure.check(PreconditionFailed):
                error = ProtocolError(errors.CONFLICT, errors.conflict_message(str(failure.value)))
            else:
                error = ProtocolError(errors.STORAGE_ERROR, str(failure.value))
            receive.done.errback(error)

        receive.upload.commit().addCallbacks(receive.done.callback, failed)
