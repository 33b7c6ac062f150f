"""An S3-compatible object store behind the storage interface.

Non-blocking on the reactor: requests go out through Twisted's HTTP client
(one persistent connection pool), and botocore's SigV4 signer only signs
them.  Each client folder is a key prefix (``NAME/``, ``@anonymous/``).

- Uploads: the bytes are hashed as they arrive and buffered one part at a
  time (PART_SIZE); a file smaller than one part is a single PUT at commit, a
  larger one a multipart upload whose parts go out as they fill, with the
  sender paused while a part is in flight.  The object appears only at the
  final PUT or CompleteMultipartUpload, after size and SHA-256 checked out,
  so a save is atomic; a failed upload is aborted in the store.
- Downloads: one ranged GET, paced by the consumer: when it pauses us, we
  pause the HTTP response.
- Folders (protocol 1.2): keys ``PREFIX a/b/c``, empty folders as marker
  objects ``PREFIX a/b/``; a folder rename moves object by object under a
  journal (see S3Folder and docs/scaling.md, "Folders on S3").
- Rename is a server-side copy, then a delete: not atomic.  For a moment both
  names exist; a reader never sees a partial object under either name.
- Resumable saves are unfinished multipart uploads at a staging key (see
  S3Upload); a resume carries on from the parts the store holds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import time
import uuid
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet import defer, interfaces, protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import implementer

from wsfiles.names import MAX_PATH_DEPTH, is_valid_file_name, parent_of
from wsfiles.storage import (
    ChecksumMismatch,
    Entry,
    Exists,
    FileInfo,
    FolderInfo,
    IDownload,
    IFolder,
    IsAFolder,
    IStorage,
    IUpload,
    NotAFolder,
    NotEmpty,
    NotFound,
    Precondition,
    PreconditionFailed,
    SmallFile,
    StorageFailure,
    path_key,
)
from wsfiles.streaming import StreamEnd, StreamFailed

_log = Logger()

PART_SIZE = 8 * 1024 * 1024  # S3 needs >= 5 MiB for every part but the last
ANONYMOUS_PREFIX = "@anonymous/"
PARTIAL = ".wsfiles-partial"  # '@' is not allowed in client names
#: A plain save's multipart upload is tagged with a marker object
#: ``@uploads/INSTANCE/UPLOAD_ID`` (body: its key) while it runs, so the
#: sweeper can tell an upload abandoned by a crashed instance from a live one.
UPLOADS = "@uploads/"
#: A folder rename's journal: ``PREFIX.wsfiles-moves/ID.json`` (see S3Folder).
MOVES = ".wsfiles-moves"
#: Server-side copies a folder rename has under way at once.
COPIES_AT_ONCE = 16
#: A move's journal is rewritten at least this often (seconds) while it runs
#: (after each page, and after a batch of copies once this long has passed)...
MOVE_HEARTBEAT = 60.0
#: ...so one of another instance whose liveness nobody can tell (no Redis, or
#: Redis down) is taken for abandoned once it has not changed for this long.
MOVE_STALE_AFTER = 300.0
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
#: Seconds the object store has to answer a request before it is abandoned
#: (StorageFailure): a store that accepts connections and never answers
#: cannot hold a connecting client, a command or a shutdown for longer.  A
#: request carrying a body gets SECONDS_PER_MIB more per MiB of it.
REQUEST_TIMEOUT = 10.0
SECONDS_PER_MIB = 4.0
#: Object metadata holding a stored file's SHA-256 (hex), written at commit
#: (a rename's copy keeps it: the default x-amz-metadata-directive is COPY).
SHA256_META = "x-amz-meta-sha256"
#: Object metadata holding the modification time a ``save`` set (seconds, as
#: text); what HEAD-based answers report instead of the store's Last-Modified.
MTIME_META = "x-amz-meta-mtime"
#: Requests at once when a listing asks for every file's SHA-256 (a HEAD
#: each), or when a batch of small files is stored (a PUT each).
DESCRIBE_AT_ONCE = 16
#: The largest object a single server-side copy may write (S3's CopyObject).
COPY_LIMIT = 5 * 1024**3


class _UnsignedPayloadSigner(S3SigV4Auth):
    """SigV4 with ``X-Amz-Content-SHA256: UNSIGNED-PAYLOAD``."""

    def _should_sha256_sign_payload(self, request: Any) -> bool:
        return False


class S3Client:
    """Signed, non-blocking requests to one bucket."""

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        credentials = Credentials(access_key, secret_key)
        self._signer = S3SigV4Auth(credentials, "s3", region)
        self._unsigned = _UnsignedPayloadSigner(credentials, "s3", region)
        self._reactor = reactor
        #: See REQUEST_TIMEOUT (tests shorten it).
        self.request_timeout = REQUEST_TIMEOUT
        #: Keys per ListObjectsV2 answer (None: the store's 1000; tests shorten it).
        self.list_page: int | None = None
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self._background: set[Deferred] = set()
        self._agent = Agent(reactor, pool=self.pool)
        #: Who this process is in upload markers (the Redis instance id with --redis).
        self.instance_id = uuid.uuid4().hex
        #: Multipart uploads this process is writing now: upload id -> key.
        self.live_uploads: dict[str, str] = {}

    def url(self, key: str = "", params: dict[str, str] | None = None) -> str:
        url = f"{self.endpoint}/{self.bucket}/{quote(key, safe='/~')}"
        if params is not None:
            url += "?" + urlencode(sorted(params.items()), quote_via=quote)
        return url

    def _headers(self, method: str, url: str, body: bytes | None, extra: dict[str, str]) -> Headers:
        # Small bodies are hashed into the signature; file data is sent as
        # UNSIGNED-PAYLOAD: hashing every part a second time cost ~0.8 CPU s
        # per GiB, and the service checks the file's own SHA-256 anyway.
        request = AWSRequest(method=method, url=url, headers=dict(extra), data=body or b"")
        signer = self._unsigned if body is not None and len(body) > 65536 else self._signer
        signer.add_auth(request)
        return Headers({k.encode(): [v.encode()] for k, v in request.headers.items()})

    def send(
        self,
        method: str,
        key: str = "",
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> Deferred:
        """One request; fires with its response and body (other statuses:
        StorageFailure or NotFound).  ``close`` waits for requests under way."""
        sending = Deferred.fromCoroutine(self._send(method, key, params, body, headers, expect))
        return self.track(self._within_deadline(sending, len(body or b"")))

    def _within_deadline(self, d: Deferred, body_size: int) -> Deferred:
        """``d``, cancelled (its connection dropped) when the store takes too long."""
        seconds = self.request_timeout + body_size / 2**20 * SECONDS_PER_MIB

        def timed_out(result: Any, timeout: float) -> Any:
            raise StorageFailure(f"the object store did not answer within {timeout:g} s")

        return d.addTimeout(seconds, self._reactor, onTimeoutCancel=timed_out)

    async def _send(
        self,
        method: str,
        key: str,
        params: dict[str, str] | None,
        body: bytes | None,
        headers: dict[str, str] | None,
        expect: tuple[int, ...],
    ) -> tuple[Any, bytes]:
        url = self.url(key, params)
        signed = self._headers(method, url, body, headers or {})
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        try:
            response = await self._agent.request(method.encode(), url.encode(), signed, producer)
            content = await _read_all(response) if method != "HEAD" else b""
        except Exception as e:
            raise StorageFailure(f"the object store did not answer: {e}") from None
        if response.code == 404 and 404 not in expect:
            raise NotFound(key)
        if response.code not in expect:
            raise StorageFailure(f"the object store answered {response.code}: {content[:200]!r}")
        return response, content

    def deliver(self, response: Any, body: Any) -> None:
        """``response.deliverBody(body)``; ``close`` waits until the body has ended
        (``body.ended``), when its connection is back in the pool or gone."""
        self.track(body.ended)
        response.deliverBody(body)

    def stream(
        self, key: str, first: int, last: int | None, if_match: str | None = None
    ) -> Deferred:
        """A ranged GET whose body the caller reads with ``deliver``; with
        ``if_match`` (an S3 ETag), only of that version of the object."""
        return self.track(
            self._within_deadline(
                Deferred.fromCoroutine(self._stream(key, first, last, if_match)), 0
            )
        )

    async def _stream(self, key: str, first: int, last: int | None, if_match: str | None) -> Any:
        url = self.url(key)
        span = f"bytes={first}-" + ("" if last is None else str(last))
        extra = {"Range": span}
        if if_match is not None:
            extra["If-Match"] = if_match
        signed = self._headers("GET", url, None, extra)
        response = await self._agent.request(b"GET", url.encode(), signed, None)
        if response.code == 412:
            await _read_all(response)
            raise StorageFailure("the file was replaced while it was being opened")
        if response.code not in (200, 206):
            await _read_all(response)
            raise StorageFailure(f"the object store answered {response.code}")
        return response

    def track(self, d: Deferred) -> Deferred:
        """Remember ``d`` until it fires, so ``close`` waits for it (result untouched)."""
        self._background.add(d)

        def done(result: Any) -> Any:
            self._background.discard(d)
            return result

        return d.addBoth(done)

    def in_background(self, work: Any, what: str) -> Deferred:
        """Run work nobody has to wait for (clean-up); ``close`` still waits for it."""
        d = work if isinstance(work, Deferred) else Deferred.fromCoroutine(work)
        d.addErrback(lambda f: _log.warn("could not {what}: {e}", what=what, e=f.value))
        return self.track(d)

    async def idle(self) -> None:
        """Wait until the clean-up requests under way are done."""
        while self._background:
            await defer.gatherResults(list(self._background), consumeErrors=True)

    async def close(self) -> None:
        """Finish the clean-up requests, then close the connections."""
        await self.idle()
        await self.pool.closeCachedConnections()


def _header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)  # str in, str out
    return values[0] if values else None


def _stored_sha256(response: Any) -> str | None:
    """The SHA-256 an object's metadata records (SHA256_META), if well formed."""
    value = (_header(response, SHA256_META) or "").strip().lower()
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


def _mtime(response: Any) -> float:
    """A HEAD's modification time: the one a save set (MTIME_META), else the
    store's Last-Modified."""
    with contextlib.suppress(TypeError, ValueError):
        mtime = float(_header(response, MTIME_META))  # type: ignore[arg-type]
        if math.isfinite(mtime):
            return mtime
    modified = _header(response, "Last-Modified")
    return parsedate_to_datetime(modified).timestamp() if modified else 0.0


async def _hash_key(client: S3Client, key: str) -> str:
    """Read an object back and hash it (one without a recorded SHA-256)."""
    digest = hashlib.sha256()
    response = await client.stream(key, 0, None)
    finished: Deferred = Deferred()
    client.deliver(response, _Hasher(digest, finished))
    await finished
    return digest.hexdigest()


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def _constant(value: Any) -> Any:
    return value


async def _all(*coroutines: Any) -> list[Any]:
    """Run requests side by side; their results in order once all have ended,
    or the first failure (after the others ended: nothing left under way)."""
    results = await defer.DeferredList(
        [Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True
    )
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


#: Answers whether another instance is alive: True, False, or None when
#: nobody can tell (no Redis, or Redis is down).
InstanceAlive = Callable[[str], Deferred]


class _Moves:
    """Folder renames of one storage: the journals this process is carrying
    out, and the client prefixes whose journals were looked at since start."""

    def __init__(self, client: S3Client) -> None:
        self.client = client
        self.moving: set[str] = set()
        self.checked: set[str] = set()
        self.instance_alive: InstanceAlive | None = None
        self.clock: Callable[[], float] = time.time

    async def abandoned(self, record: dict[str, Any], written: float) -> bool:
        """Whether no live process is carrying out the move of ``record``, whose
        journal was last written at ``written`` (the store's clock).  When
        nobody can tell (no Redis, or Redis down), a journal that has not
        changed for MOVE_STALE_AFTER: a live mover rewrites it more often, and
        running one move twice at once could overwrite a file saved meanwhile."""
        instance = record.get("instance")
        if instance == self.client.instance_id:
            return True  # ours: it failed (or is an earlier run's)
        alive = None if self.instance_alive is None else await self.instance_alive(str(instance))
        if alive is None:
            return self.clock() - written > MOVE_STALE_AFTER
        return not alive


@implementer(IStorage)
class S3Storage:
    def __init__(self, client: S3Client) -> None:
        self.client = client
        #: Interrupted uploads still saving their record: a resume waits for them.
        self.settling: dict[str, Deferred] = {}
        self.instance_alive: InstanceAlive | None = None
        self.moves = _Moves(client)

    def share_instance(self, instance_id: str, alive: InstanceAlive) -> None:
        """Tag uploads with ``instance_id`` (this instance's Redis liveness key),
        and ask ``alive`` whether another instance is before taking its uploads
        for abandoned (RedisState calls this)."""
        self.client.instance_id = instance_id
        self.instance_alive = alive
        self.moves.instance_alive = alive

    def folder(self, client: str | None) -> S3Folder:
        prefix = f"{client}/" if client else ANONYMOUS_PREFIX
        return S3Folder(self.client, prefix, self.settling, self.moves)

    def free_bytes(self) -> float:
        return float("nan")  # an object store does not say

    def check(self, min_free: int) -> Deferred:
        async def probe() -> dict[str, Any]:
            await self.client.send("GET", params={"list-type": "2", "max-keys": "1"})
            return {"storage": "s3", "bucket": self.client.bucket}

        return Deferred.fromCoroutine(probe())

    def close(self) -> Deferred:
        return Deferred.fromCoroutine(self.client.close())

    def sweep_partials(self, max_age: float, now: float | None = None) -> Deferred:
        """Abort interrupted resumable uploads idle for more than ``max_age`` s,
        and plain saves' multipart uploads abandoned by a crash (see
        ``_sweep_abandoned``).  Fires with the number of resumable ones removed;
        never fails: a sweep the store does not let finish is one warning, and
        the next sweep tries again."""

        async def sweep() -> int:
            when = time.time() if now is None else now
            try:
                markers: list[tuple[str, float]] = []
                removed = await self._sweep(max_age, when, markers)
                abandoned = await self._sweep_abandoned(max_age, when, markers)
            except Exception as e:
                _log.warn("could not sweep unfinished uploads from the object store: {e}", e=e)
                return 0
            if abandoned:
                _log.info("aborted {count} abandoned multipart uploads", count=abandoned)
            return removed

        return Deferred.fromCoroutine(sweep())

    async def _sweep(self, max_age: float, now: float, markers: list[tuple[str, float]]) -> int:
        removed = 0
        params = {"list-type": "2"}
        while True:
            _, body = await self.client.send("GET", params=params)
            root = ElementTree.fromstring(body)
            for item in root.iter(f"{_NS}Contents"):
                key = item.findtext(f"{_NS}Key", "")
                stamp = _timestamp(item.findtext(f"{_NS}LastModified", ""))
                if key.startswith(UPLOADS):
                    markers.append((key, stamp))
                    continue
                if key.split("/")[1:2] == [MOVES] and key not in self.moves.moving:
                    client_prefix = key[: key.index("/") + 1]
                    mover = S3Folder(self.client, client_prefix, self.settling, self.moves)
                    await mover._resume_move(key, stamp)  # a folder rename left unfinished
                    continue
                if f"/{PARTIAL}/" not in f"/{key}" or not key.endswith(".json"):
                    continue
                staging = key[: -len(".json")]
                if now - stamp <= max_age or staging in self.settling:
                    continue
                folder = S3Folder(self.client, "", self.settling)
                with contextlib.suppress(NotFound):
                    _, record_body = await self.client.send("GET", key)
                    record = json.loads(record_body or b"{}")
                    await folder._discard_partial(staging, key, record.get("upload_id"))
                    removed += 1
            token = root.findtext(f"{_NS}NextContinuationToken")
            if root.findtext(f"{_NS}IsTruncated") != "true" or not token:
                return removed
            params = {**params, "continuation-token": token}

    async def _sweep_abandoned(
        self, max_age: float, now: float, markers: list[tuple[str, float]]
    ) -> int:
        """Abort the multipart uploads of plain saves that nobody will finish.

        A tagged upload (see UPLOADS) is abandoned when its instance is not
        alive: this one no longer writes it, or Redis says the other's liveness
        key is gone; when nobody can tell (no Redis), when it is older than
        ``max_age``.  An untagged one (its instance died before tagging it)
        goes once older than ``max_age``.  Resumable uploads (staging keys) are
        left to their records and ``--partial-ttl``.
        """
        client = self.client
        removed = 0
        tagged: set[str] = set()
        alive: dict[str, bool | None] = {}
        for marker, stamp in markers:
            instance, _, upload_id = marker[len(UPLOADS) :].partition("/")
            tagged.add(upload_id)
            if upload_id in client.live_uploads:
                continue
            if instance != client.instance_id:
                if instance not in alive:
                    alive[instance] = await self._alive(instance)
                if alive[instance] or (alive[instance] is None and now - stamp <= max_age):
                    continue
            try:
                _, body = await client.send("GET", marker)
            except NotFound:
                continue  # finished meanwhile
            key = json.loads(body or b"{}").get("key")
            if key:
                await client.send(
                    "DELETE", key, params={"uploadId": upload_id}, expect=(200, 204, 404)
                )
                removed += 1
            await client.send("DELETE", marker, expect=(200, 204, 404))
        async for key, upload_id, initiated in self._multipart_uploads():
            if upload_id in tagged or upload_id in client.live_uploads:
                continue
            if f"/{PARTIAL}/" in f"/{key}" or now - initiated <= max_age:
                continue
            await client.send("DELETE", key, params={"uploadId": upload_id}, expect=(200, 204, 404))
            removed += 1
        return removed

    async def _alive(self, instance: str) -> bool | None:
        if self.instance_alive is None:
            return None
        return await self.instance_alive(instance)

    async def _multipart_uploads(self) -> Any:
        """Every unfinished multipart upload in the bucket: (key, upload id, started)."""
        params = {"uploads": ""}
        while True:
            _, body = await self.client.send("GET", params=params)
            root = ElementTree.fromstring(body)
            for item in root.iter(f"{_NS}Upload"):
                yield (
                    item.findtext(f"{_NS}Key", ""),
                    item.findtext(f"{_NS}UploadId", ""),
                    _timestamp(item.findtext(f"{_NS}Initiated", "")),
                )
            if root.findtext(f"{_NS}IsTruncated") != "true":
                return
            params = {
                "uploads": "",
                "key-marker": root.findtext(f"{_NS}NextKeyMarker", ""),
                "upload-id-marker": root.findtext(f"{_NS}NextUploadIdMarker", ""),
            }


#: Characters a name may hold that sort before '/': a folder ``n`` (keys
#: ``n/...``) comes after ``n.txt`` or ``n-2`` in the store's key order, but
#: before them in a listing's (``path_key``).
_BEFORE_SLASH = frozenset(chr(c) for c in range(0x20, 0x2F))


@dataclass(frozen=True)
class _Object:
    """One item of a ListObjectsV2 page: a key, or a common prefix (size -1)."""

    key: str
    size: int
    mtime: float


def _tree_entries(rel: str, size: int, mtime: float, max_depth: int) -> list[Entry]:
    """The entries a key below the listed folder stands for: the folders on its
    way (a folder exists while a key is below it), then itself, up to its first
    segment no command could address (reserved ``.wsfiles-`` keys, other tools')."""
    segments = rel.split("/")
    marker = segments[-1] == ""  # "a/b/": the marker of the (empty) folder a/b
    if marker:
        segments.pop()
    found: list[Entry] = []
    for i, segment in enumerate(segments[:max_depth]):
        if not is_valid_file_name(segment):
            break
        path = "/".join(segments[: i + 1])
        if i == len(segments) - 1 and not marker:
            found.append(FileInfo(path, size, mtime))
        else:
            found.append(FolderInfo(path, 0.0))
    return found


def _page_entries(rel: str, item: _Object) -> list[Entry]:
    """The entry one item of a folder's (delimited) page stands for."""
    if item.size < 0:  # a common prefix "n/": folder n
        name = rel[:-1]
        return [FolderInfo(name, 0.0)] if is_valid_file_name(name) else []
    if rel and is_valid_file_name(rel):  # "" is the folder's own marker
        return [FileInfo(rel, item.size, item.mtime)]
    return []


def _folders_in_doubt(last: str, start: int) -> list[str]:
    """The folders whose keys the store lists after ``last`` although they may
    sort before it in a listing (``path_key``), shortest first (``last`` and
    the folders relative to the listed folder; keys of the scan share
    ``last[:start]``).

    The store sorts keys as strings, a listing by path segments; they differ
    only where '/' meets a character below it: keys below a folder F whose
    name is a prefix of ``last`` followed by such a character (``last``
    "a b/c", F "a") come later in the store but sort from F on.
    """
    return [last[:i] for i in range(max(start, 1), len(last)) if last[i] in _BEFORE_SLASH]


@implementer(IFolder)
class S3Folder:
    """One client's folder: the keys under its prefix.

    A path ``a/b/c`` is the key ``PREFIX a/b/c``.  A folder exists while any
    key is below it (``PREFIX a/b/...``), or as an empty marker object
    ``PREFIX a/b/`` (mkdir, and a folder emptied by a delete, a move or an
    rmdir inside it, as a local folder stays); a save writes no markers.  Keys
    whose path has a segment no command could address (the reserved
    ``.wsfiles-`` ones: resumable partials, move journals) are never listed.
    S3 keeps no time for a folder: its mtime is 0.
    """

    def __init__(
        self,
        client: S3Client,
        prefix: str,
        settling: dict[str, Deferred],
        moves: _Moves | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._settling = settling
        self._moves = moves if moves is not None else _Moves(client)

    def list(self) -> Deferred:
        return Deferred.fromCoroutine(self._list())

    async def _list(self) -> list[FileInfo]:
        await self._settle_moves()
        files: list[FileInfo] = []
        # The delimiter keeps folders' contents out: the top level's files only.
        async for page in self._pages(self._prefix, delimiter=True):
            for item in page:
                name = item.key[len(self._prefix) :]
                if item.size >= 0 and is_valid_file_name(name):  # e.g. not other tools' keys
                    files.append(FileInfo(name, item.size, item.mtime))
        files.sort(key=lambda info: info.name)
        return files

    async def _pages(
        self,
        prefix: str,
        start_after: str | None = None,
        *,
        delimiter: bool = False,
        max_keys: int | None = None,
    ) -> Any:
        """The keys (and with ``delimiter``, the common prefixes) under ``prefix``
        after ``start_after``, a page (one ListObjectsV2 answer) at a time, in
        the store's order."""
        params = {"list-type": "2", "prefix": prefix}
        if start_after is not None:
            params["start-after"] = start_after
        if delimiter:
            params["delimiter"] = "/"
        if max_keys is not None or self._client.list_page is not None:
            params["max-keys"] = str(max_keys or self._client.list_page)
        while True:
            _, body = await self._client.send("GET", params=params)
            root = ElementTree.fromstring(body)
            page = [
                _Object(
                    item.findtext(f"{_NS}Key", ""),
                    int(item.findtext(f"{_NS}Size", "0")),
                    _timestamp(item.findtext(f"{_NS}LastModified", "")),
                )
                for item in root.iter(f"{_NS}Contents")
            ]
            page += [
                _Object(item.findtext(f"{_NS}Prefix", ""), -1, 0.0)
                for item in root.iter(f"{_NS}CommonPrefixes")
            ]
            page.sort(key=lambda item: item.key)
            yield page
            token = root.findtext(f"{_NS}NextContinuationToken")
            if root.findtext(f"{_NS}IsTruncated") != "true" or not token or max_keys:
                return
            params = {**params, "continuation-token": token}

    # -- paths (protocol 1.2) ----------------------------------------------

    async def _exists(self, key: str) -> bool:
        try:
            await self._client.send("HEAD", key)
        except NotFound:
            return False
        return True

    async def _has_below(self, path: str) -> bool:
        """Whether any key is below folder ``path`` (its marker included)."""
        async for page in self._pages(f"{self._prefix}{path}/", max_keys=1):
            return bool(page)
        return False

    async def _kind(self, path: str) -> str | None:
        parent = parent_of(path)
        is_file, is_folder, parent_is_folder = await _all(
            self._exists(self._prefix + path),
            self._has_below(path),
            self._has_below(parent) if parent else _constant(True),
        )
        if is_folder:  # (a folder hides a file of the same name other tools made)
            return "folder"
        if is_file:
            return "file"
        if not parent_is_folder:
            await self._no_file_above(path)
        return None

    async def _no_file_above(self, path: str) -> None:
        """Fail with NotAFolder if a folder on the way to ``path`` is a file."""
        segments = path.split("/")
        above = ["/".join(segments[:i]) for i in range(1, len(segments))]
        found = await _all(*(self._exists(self._prefix + folder) for folder in above))
        for folder, is_file in zip(above, found, strict=True):
            if is_file:
                raise NotAFolder(folder)

    def kind(self, path: str) -> Deferred:
        async def kind_now() -> str | None:
            await self._settle_moves()
            return await self._kind(path)

        return Deferred.fromCoroutine(kind_now())

    def entries(self, path: str, recursive: bool, after: str | None, limit: int) -> Deferred:
        return Deferred.fromCoroutine(self._entries(path, recursive, after, limit))

    async def _entries(
        self, path: str, recursive: bool, after: str | None, limit: int
    ) -> list[Entry]:
        await self._settle_moves()
        base = f"{self._prefix}{path}/" if path else self._prefix
        cursor = after.split("/") if after else []
        if not recursive:
            cursor = cursor[:1]
        # Scan the folders on the cursor's way, deepest first: after ``a/b/c``
        # come what follows c in a/b (and what is below c), then what follows
        # b in a, then what follows a; each scan starts at its cursor's key.
        scans = [
            ("/".join(cursor[: j - 1]) + "/" if j > 1 else "", "/".join(cursor[:j]))
            for j in range(len(cursor), 0, -1)
        ] or [("", None)]
        after_key = path_key(after) if after else None
        depth = max(1, MAX_PATH_DEPTH - (path.count("/") + 1 if path else 0))
        wanted = limit + 1
        found: dict[str, Entry] = {}
        probed: dict[str, bool] = {}  # folders in doubt (_is_final): whether they exist

        def ordered() -> list[Entry]:
            return sorted(found.values(), key=lambda entry: path_key(entry.name))

        for within, start in scans:
            start_after = None if start is None else base + start
            async for page in self._pages(base + within, start_after, delimiter=not recursive):
                for item in page:
                    rel = item.key[len(base) :]
                    if recursive:
                        derived = _tree_entries(rel, item.size, item.mtime, depth)
                    else:
                        derived = _page_entries(rel, item)
                    for entry in derived:
                        if after_key is not None and path_key(entry.name) <= after_key:
                            continue
                        if not isinstance(found.get(entry.name), FolderInfo):
                            found[entry.name] = entry  # a folder hides a same-named file
                if not page:
                    continue
                last = page[-1].key[len(base) :]
                kept = ordered()
                if len(kept) >= wanted and await self._is_final(
                    path_key(kept[wanted - 1].name), last, len(within), base, probed
                ):
                    return kept[:wanted]
                if len(kept) > 4 * wanted:  # what sorts after the first `wanted` is not needed
                    found = {entry.name: entry for entry in kept[:wanted]}
            if len(found) >= wanted:  # this scan's entries all come before the next one's
                return ordered()[:wanted]
        if not found and path:  # an empty folder, or none
            kind = await self._kind(path)
            if kind == "file":
                raise NotAFolder(path)
            if kind is None:
                raise NotFound(path)
        return ordered()[:wanted]

    async def _is_final(
        self, key: tuple[str, ...], last: str, start: int, base: str, probed: dict[str, bool]
    ) -> bool:
        """Whether an entry of ``path_key`` ``key`` is in its final place once the
        store has listed every key up to ``last`` (relative to ``base``; keys of
        the scan share ``last[:start]``): no key still to come sorts before it.

        Only keys below a folder in doubt (``_folders_in_doubt``) can; one that
        does not exist is ruled out by one request (cached in ``probed`` for the
        listing), rather than by reading on past it: for names like
        ``log-00001.txt`` that would read to the end of the folder on every page.
        """
        for folder in _folders_in_doubt(last, start):
            if key < path_key(folder):
                return True  # sorts before all of this folder's keys, and longer ones'
            if folder not in probed:
                probed[folder] = await self._has_below(base[len(self._prefix) :] + folder)
            if probed[folder]:
                return False  # its keys come later and may sort before ``key``
        return key <= path_key(last)

    def usage(self) -> Deferred:
        async def usage_now() -> tuple[int, int]:
            await self._settle_moves()
            size = files = 0
            folders: set[str] = set()
            async for page in self._pages(self._prefix):
                for item in page:
                    rel = item.key[len(self._prefix) :]
                    for entry in _tree_entries(rel, item.size, item.mtime, MAX_PATH_DEPTH):
                        if isinstance(entry, FileInfo):
                            size, files = size + entry.size, files + 1
                        else:
                            folders.add(entry.name)
            return size, files + len(folders)

        return Deferred.fromCoroutine(usage_now())

    async def _stat(self, name: str) -> FileInfo:
        info, _ = await self._head(name)
        return info

    async def _head(self, name: str) -> tuple[FileInfo, Any]:
        """The file's FileInfo, and the HEAD response (its metadata, its ETag)."""
        try:
            response, _ = await self._client.send("HEAD", self._prefix + name)
        except NotFound:
            if await self._kind(name) == "folder":
                raise IsAFolder(name) from None
            raise
        return FileInfo(name, int(_header(response, "Content-Length") or 0), _mtime(response)), (
            response
        )

    async def _digest(self, name: str, response: Any) -> str:
        """A stored file's SHA-256, from its HEAD ``response``: its metadata,
        or the object read back and hashed."""
        return _stored_sha256(response) or await _hash_key(self._client, self._prefix + name)

    async def _check(
        self, name: str, precondition: Precondition | None, response: Any = None
    ) -> None:
        """PreconditionFailed unless ``precondition`` holds for what is at
        ``name`` now (``response``: its HEAD, when the caller just made it)."""
        if precondition is None:
            return
        if response is None:
            try:
                response, _ = await self._client.send("HEAD", self._prefix + name)
            except NotFound:
                if precondition.holds(None):
                    return
                raise PreconditionFailed(name) from None
        # A file is there: if_absent fails without reading it.
        if precondition.absent or not precondition.holds(await self._digest(name, response)):
            raise PreconditionFailed(name)

    def described(self, paths: list[str]) -> Deferred:
        async def describe_one(path: str) -> FileInfo | None:
            try:
                info, response = await self._head(path)
            except (NotFound, IsAFolder):
                return None
            return FileInfo(path, info.size, info.mtime, await self._digest(path, response))

        async def describe() -> dict[str, FileInfo]:
            await self._settle_moves()
            found: dict[str, FileInfo] = {}
            for start in range(0, len(paths), DESCRIBE_AT_ONCE):
                batch = paths[start : start + DESCRIBE_AT_ONCE]
                for info in await _all(*(describe_one(path) for path in batch)):
                    if info is not None:
                        found[info.name] = info
            return found

        return Deferred.fromCoroutine(describe())

    def stat(self, name: str) -> Deferred:
        async def stat_now() -> FileInfo:
            await self._settle_moves()
            return await self._stat(name)

        return Deferred.fromCoroutine(stat_now())

    def mkdir(self, path: str, parents: bool) -> Deferred:
        async def mkdir_now() -> None:
            await self._settle_moves()
            kind = await self._kind(path)  # NotAFolder: a file on the way
            if kind == "folder" and parents:
                return
            if kind is not None:
                raise Exists(path)
            parent = parent_of(path)
            if parent and not parents and await self._kind(parent) != "folder":
                raise NotFound(parent)
            await self._client.send("PUT", f"{self._prefix}{path}/", body=b"")

        return Deferred.fromCoroutine(mkdir_now())

    def rmdir(self, path: str, recursive: bool) -> Deferred:
        async def rmdir_now() -> None:
            await self._settle_moves()
            kind = await self._kind(path)
            if kind is None:
                raise NotFound(path)
            if kind == "file":
                raise NotAFolder(path)
            below = f"{self._prefix}{path}/"
            if recursive:
                async for page in self._pages(below):
                    await self._delete_keys([item.key for item in page])
            else:
                async for page in self._pages(below, max_keys=2):
                    if any(item.key != below for item in page):
                        raise NotEmpty(path)
                await self._client.send("DELETE", below, expect=(200, 204, 404))
            await self._keep_folder(parent_of(path))

        return Deferred.fromCoroutine(rmdir_now())

    async def _delete_keys(self, keys: list[str]) -> None:
        """Delete up to 1000 keys in one DeleteObjects request."""
        if not keys:
            return
        objects = "".join(f"<Object><Key>{_xml_escape(key)}</Key></Object>" for key in keys)
        body = f"<Delete><Quiet>true</Quiet>{objects}</Delete>".encode()
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        _, answer = await self._client.send(
            "POST", params={"delete": ""}, body=body, headers={"Content-MD5": md5}
        )
        failed = ElementTree.fromstring(answer).findall(f"{_NS}Error") if answer else []
        if failed:
            why = failed[0].findtext(f"{_NS}Code", "")
            raise StorageFailure(f"the object store kept {len(failed)} of the keys ({why})")

    def open_download(self, name: str, offset: int = 0, length: int | None = None) -> Deferred:
        async def open_it() -> S3Download:
            await self._settle_moves()
            info, response = await self._head(name)
            if offset > info.size:
                raise ValueError(f"offset {offset} is beyond the size {info.size}")
            download = S3Download(self._client, self._prefix + name, info.size, offset, length)
            download.stored_sha256 = _stored_sha256(response)
            download.version = _header(response, "ETag")
            return download

        return Deferred.fromCoroutine(open_it())

    def _partial_keys(self, name: str) -> tuple[str, str]:
        """Where a resumable upload of ``name`` lives: its object and its record.

        Both keys hold a '/' after the prefix, so no listing shows them.
        """
        key = hashlib.sha256(name.encode("utf-8")).hexdigest()
        return f"{self._prefix}{PARTIAL}/{key}", f"{self._prefix}{PARTIAL}/{key}.json"

    def begin_upload(
        self,
        name: str,
        size: int,
        sha256: str | None = None,
        resume: bool = False,
        *,
        mtime: float | None = None,
        precondition: Precondition | None = None,
    ) -> Deferred:
        if not resume:
            upload = S3Upload(self._client, self._prefix + name, size, sha256)
            d = defer.succeed(upload)
        else:
            d = Deferred.fromCoroutine(self._begin_resumable(name, size, sha256))

        def settings(upload: S3Upload) -> S3Upload:
            async def check_target() -> None:
                await self._free_for_a_file(name)
                await self._check(name, precondition)  # just before the object appears

            upload.mtime = mtime
            upload.check_target = check_target
            return upload

        return d.addCallback(settings)

    def write_files(self, files: list[SmallFile]) -> Deferred:
        async def write_one(file: SmallFile) -> str | Exception:
            try:
                upload = await self.begin_upload(
                    file.name,
                    len(file.data),
                    file.sha256,
                    mtime=file.mtime,
                    precondition=file.precondition,
                )
                try:
                    pending = upload.write(file.data) if file.data else None
                    if pending is not None:
                        await pending
                except BaseException:
                    upload.abort()
                    raise
                return await upload.commit()  # one PUT: small files are below PART_SIZE
            except (IsAFolder, NotAFolder, PreconditionFailed, ChecksumMismatch) as e:
                return e
            except (NotFound, StorageFailure) as e:
                return StorageFailure(str(e))

        async def write_all() -> list[str | Exception]:
            outcomes: list[str | Exception] = []
            for start in range(0, len(files), DESCRIBE_AT_ONCE):
                outcomes += await _all(
                    *(write_one(f) for f in files[start : start + DESCRIBE_AT_ONCE])
                )
            return outcomes

        return Deferred.fromCoroutine(write_all())

    async def _free_for_a_file(self, name: str) -> None:
        """Fail unless a file may appear at ``name``: not a folder (IsAFolder),
        no file on its way (NotAFolder).  A save checks this just before its
        object appears, so it never makes a file and a folder of one name."""
        is_folder, _ = await _all(
            self._has_below(name),
            self._no_file_above(name) if "/" in name else _constant(None),
        )
        if is_folder:
            raise IsAFolder(name)

    async def _begin_resumable(self, name: str, size: int, sha256: str | None) -> S3Upload:
        """Carry on an unfinished multipart upload of the same size and hash, if any.

        The store's own list of parts (ListParts) says what is durable.
        """
        staging, record_key = self._partial_keys(name)
        settling = self._settling.get(staging)
        if settling is not None:
            waiter: Deferred = Deferred()
            settling.addBoth(lambda result: (waiter.callback(None), result)[1])
            await waiter
        record = await self._read_record(record_key)
        upload = S3Upload(self._client, self._prefix + name, size, sha256)
        upload.resumable_at(staging, record_key, self._settling)
        if record is not None and record.get("size") == size and record.get("sha256") == sha256:
            upload_id = record["upload_id"]
            try:
                parts = await self._stored_parts(staging, upload_id)
            except (NotFound, StorageFailure):
                parts = []
            if parts:
                upload.carry_on(upload_id, parts)
        elif record is not None:
            await self._discard_partial(staging, record_key, record.get("upload_id"))
        return upload

    async def _read_record(self, key: str) -> dict[str, Any] | None:
        try:
            _, body = await self._client.send("GET", key)
        except NotFound:
            return None
        try:
            record = json.loads(body)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    async def _stored_parts(self, staging: str, upload_id: str) -> list[tuple[int, str, int]]:
        """The parts 1..n the store holds, in order, stopping at the first gap."""
        _, body = await self._client.send("GET", staging, params={"uploadId": upload_id})
        found = {}
        for part in ElementTree.fromstring(body).iter(f"{_NS}Part"):
            number = int(part.findtext(f"{_NS}PartNumber", "0"))
            etag = part.findtext(f"{_NS}ETag", "")
            found[number] = (number, etag, int(part.findtext(f"{_NS}Size", "0")))
        parts = []
        while len(parts) + 1 in found:
            parts.append(found[len(parts) + 1])
        return parts

    async def _discard_partial(self, staging: str, record_key: str, upload_id: Any) -> None:
        if upload_id:
            with contextlib.suppress(NotFound, StorageFailure):
                await self._client.send(
                    "DELETE", staging, params={"uploadId": upload_id}, expect=(204, 200)
                )
        with contextlib.suppress(NotFound, StorageFailure):
            await self._client.send("DELETE", record_key, expect=(204, 200))

    def partial_bytes(self) -> Deferred:
        async def scan() -> dict[str, int]:
            _, body = await self._client.send(
                "GET", params={"list-type": "2", "prefix": f"{self._prefix}{PARTIAL}/"}
            )
            found: dict[str, int] = {}
            for item in ElementTree.fromstring(body).iter(f"{_NS}Key"):
                if item.text and item.text.endswith(".json"):
                    record = await self._read_record(item.text)
                    if record is not None:
                        found[record.get("name", item.text)] = int(record.get("stored", 0))
            return found

        return Deferred.fromCoroutine(scan())

    def delete(self, name: str, precondition: Precondition | None = None) -> Deferred:
        async def delete_it() -> None:
            await self._settle_moves()
            _, response = await self._head(name)
            await self._check(name, precondition, response)  # then the delete: not atomic on S3
            await self._client.send("DELETE", self._prefix + name, expect=(200, 204))
            await self._keep_folder(parent_of(name))

        return Deferred.fromCoroutine(delete_it())

    async def _keep_folder(self, path: str) -> None:
        """Folder ``path`` lost an entry: if nothing is left below it, write its
        marker, so it stays (empty) as a local folder would."""
        if path and not await self._has_below(path):
            await self._client.send("PUT", f"{self._prefix}{path}/", body=b"")

    def rename(self, name: str, to: str, overwrite: bool) -> Deferred:
        async def rename_it() -> None:
            await self._settle_moves()
            kind = await self._kind(name)
            if kind is None:
                raise NotFound(name)
            if name == to:
                return
            target = await self._kind(to)  # NotAFolder: a file on the way
            if target is not None and (kind == "folder" or target == "folder" or not overwrite):
                raise Exists(to)  # a folder replaces nothing; nothing replaces a folder
            if kind == "file":
                await self._copy(self._prefix + name, self._prefix + to)
                await self._client.send("DELETE", self._prefix + name, expect=(200, 204))
            else:
                await self._move_folder(name, to)
            await self._keep_folder(parent_of(name))

        return Deferred.fromCoroutine(rename_it())

    async def _copy(self, source: str, target: str) -> None:
        """A server-side copy; NotFound when ``source`` is gone."""
        header = f"/{self._client.bucket}/{quote(source, safe='/~')}"
        await self._client.send("PUT", target, headers={"x-amz-copy-source": header})

    # -- folder moves: copy and delete per object, under a journal -----------

    async def _move_folder(self, name: str, to: str) -> None:
        """Move every key below ``name/`` to ``to/``.

        The journal ``PREFIX.wsfiles-moves/ID.json`` (from, to, instance,
        moved, cutoff) is written before the first copy and removed after the
        last delete; while it exists the move is unfinished, and the next
        operation on this client's folder (or a sweep) carries it out to the
        end.  Only keys no newer than the journal's first write (``cutoff``, the
        store's clock) move: a file saved below ``name`` after the move began
        stays there, as it would after an (atomic) rename of a local folder,
        also when an interrupted move is finished later.
        """
        journal = f"{self._prefix}{MOVES}/{uuid.uuid4().hex}.json"
        record: dict[str, Any] = {
            "from": name,
            "to": to,
            "instance": self._client.instance_id,
            "moved": 0,
        }
        self._moves.moving.add(journal)  # before a sweep could see it
        try:
            await self._client.send("PUT", journal, body=json.dumps(record).encode())
            async for page in self._pages(journal, max_keys=1):
                if page and page[0].key == journal:
                    record["cutoff"] = page[0].mtime
        except BaseException:
            self._moves.moving.discard(journal)
            raise
        await self._carry_out(journal, record)

    async def _carry_out(self, journal: str, record: dict[str, Any]) -> None:
        self._moves.moving.add(journal)
        try:
            source = f"{self._prefix}{record['from']}/"
            target = f"{self._prefix}{record['to']}/"
            cutoff = float(record.get("cutoff", float("inf")))
            written = time.monotonic()

            async def write_journal() -> None:
                nonlocal written
                await self._client.send("PUT", journal, body=json.dumps(record).encode())
                written = time.monotonic()

            moved = 0
            for _ in range(3):  # and again for keys the store listed late
                moved = 0
                async for listed in self._pages(source):
                    page = [item for item in listed if item.mtime <= cutoff]
                    for i in range(0, len(page), COPIES_AT_ONCE):
                        await _all(
                            *(
                                self._copy_if_there(item.key, target + item.key[len(source) :])
                                for item in page[i : i + COPIES_AT_ONCE]
                            )
                        )
                        if time.monotonic() - written > MOVE_HEARTBEAT:
                            await write_journal()  # still alive (see _Moves.abandoned)
                    if not page:
                        continue
                    await self._delete_keys([item.key for item in page])
                    moved += len(page)
                    record["moved"] = int(record.get("moved", 0)) + len(page)
                    await write_journal()
                if not moved:
                    break
            if moved:
                _log.warn(
                    "the move of {source!r} to {target!r} ended with keys still arriving "
                    "below the source: they stay there",
                    source=record["from"],
                    target=record["to"],
                )
            await self._client.send("DELETE", journal, expect=(200, 204, 404))
        except BaseException:
            # Left unfinished: the next operation on this folder looks again.
            self._moves.checked.discard(self._prefix)
            raise
        finally:
            self._moves.moving.discard(journal)

    async def _copy_if_there(self, source: str, target: str) -> None:
        with contextlib.suppress(NotFound):  # moved already (an earlier attempt)
            await self._copy(source, target)

    async def _settle_moves(self) -> None:
        """Finish the folder renames left unfinished in this client's folder (a
        crash, a store that failed half-way), once per process, and again after
        a move of this process failed; each operation on the folder waits for it."""
        if self._prefix in self._moves.checked:
            return
        self._moves.checked.add(self._prefix)
        try:
            async for page in self._pages(f"{self._prefix}{MOVES}/"):
                for item in page:
                    if item.key not in self._moves.moving:
                        await self._resume_move(item.key, item.mtime)
        except BaseException:
            self._moves.checked.discard(self._prefix)
            raise

    async def _resume_move(self, journal: str, written: float) -> None:
        """Carry out the move of ``journal`` (last written at ``written``, the
        store's clock) unless a live instance is doing it.  A journal without a
        cutoff (its move failed before reading it back) moves the keys no newer
        than the journal: nothing the client saved after the failure."""
        record = await self._read_record(journal)
        if record is None or not {"from", "to"} <= record.keys():
            await self._client.send("DELETE", journal, expect=(200, 204, 404))
            return
        if not await self._moves.abandoned(record, written):
            self._moves.checked.discard(self._prefix)  # look again later
            return
        _log.info(
            "finishing the move of {source!r} to {target!r} left unfinished",
            source=record["from"],
            target=record["to"],
        )
        record["instance"] = self._client.instance_id
        record.setdefault("cutoff", written)
        await self._carry_out(journal, record)
        await self._keep_folder(parent_of(str(record["from"])))


@implementer(IUpload)
class S3Upload:
    """One object being written: a single PUT, or a multipart upload part by part.

    A resumable upload goes to a staging key, with a small JSON record beside
    it (upload id, size, hash): a later resume carries on its multipart
    upload from the parts the store holds.  At commit it is completed there,
    read back to hash the whole object when part of it came from an earlier
    attempt (the store cannot hand back an unfinished upload's parts), then
    copied to its name and the staging object deleted.
    """

    offset = 0

    def __init__(self, client: S3Client, key: str, size: int, sha256: str | None) -> None:
        self._client = client
        self._key = key
        self._target = key
        self._record_key: str | None = None
        self._settling: dict[str, Deferred] = {}
        self._name = key.rsplit("/", 1)[-1]
        self._size = size
        self._expected = sha256
        self._sha256 = hashlib.sha256()
        self._hash_complete = True  # False once bytes from an earlier attempt are kept
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[tuple[int, str, int]] = []
        self._in_flight: Deferred | None = None
        self._error: Exception | None = None
        self._aborted = False
        self._completed = False
        self.mtime: float | None = None
        self.on_superseded = None
        #: Checked before the object appears (S3Folder: not onto a folder).
        self.check_target: Callable[[], Any] | None = None

    def resumable_at(self, staging: str, record_key: str, settling: dict[str, Deferred]) -> None:
        self._key, self._record_key, self._settling = staging, record_key, settling

    def carry_on(self, upload_id: str, parts: list[tuple[int, str, int]]) -> None:
        """Resume an earlier attempt's multipart upload after its stored parts."""
        self._upload_id, self._parts = upload_id, list(parts)
        self.offset = sum(size for _, _, size in parts)
        self._hash_complete = False

    def write(self, data: bytes) -> Deferred | None:
        if self._error is not None:
            raise StorageFailure(str(self._error))
        self._sha256.update(data)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered < PART_SIZE:
            return None
        # A full part: send it, and hold the sender until it is stored.
        part = self._take_buffer()
        self._in_flight = self._client.track(Deferred.fromCoroutine(self._send_part(part)))
        return self._in_flight

    def _take_buffer(self) -> bytes:
        part = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        return part

    async def _send_part(self, part: bytes) -> None:
        try:
            if self._upload_id is None:
                _, body = await self._client.send(
                    "POST", self._key, params={"uploads": ""}, headers=self._declared_meta()
                )
                self._upload_id = ElementTree.fromstring(body).findtext(f"{_NS}UploadId")
                self._client.live_uploads[str(self._upload_id)] = self._key
                if self._aborted:  # aborted while the upload was being created
                    self._aborted = False
                    self.abort()
                    raise StorageFailure("the upload was aborted")
                if self._record_key is None:
                    await self._write_marker()
                else:
                    await self._write_record()
            number = len(self._parts) + 1
            response, _ = await self._client.send(
                "PUT",
                self._key,
                params={"partNumber": str(number), "uploadId": str(self._upload_id)},
                body=part,
            )
            self._parts.append((number, _header(response, "ETag") or "", len(part)))
        except Exception as e:
            self._error = e
            raise

    def commit(self) -> Deferred:
        return Deferred.fromCoroutine(self._commit())

    def _declared_meta(self) -> dict[str, str]:
        """A declared SHA-256 goes into the object's metadata from the start (the
        object only appears once the bytes have been checked against it)."""
        return self._meta(self._expected.lower() if self._expected is not None else None)

    def _meta(self, digest: str | None) -> dict[str, str]:
        """The object's metadata: its SHA-256 when known, and the mtime a save set."""
        meta = {SHA256_META: digest} if digest is not None else {}
        if self.mtime is not None:
            meta[MTIME_META] = repr(float(self.mtime))
        return meta

    async def _record_digest(self, digest: str, etag: str | None) -> None:
        """Give a completed multipart object without a declared hash its SHA-256
        (SHA256_META): copied onto itself with new metadata, if it is still the
        object we wrote (``etag``).  The file is stored either way; without the
        record it just has no strong HTTP ETag (logged)."""
        if self._size > COPY_LIMIT or etag is None:
            return
        source = f"/{self._client.bucket}/{quote(self._key, safe='/~')}"
        try:
            await self._client.send(
                "PUT",
                self._key,
                headers={
                    "x-amz-copy-source": source,
                    "x-amz-copy-source-if-match": etag,
                    "x-amz-metadata-directive": "REPLACE",
                    **self._meta(digest),
                },
            )
        except (NotFound, StorageFailure) as e:
            _log.warn("could not record the SHA-256 of {key!r}: {error}", key=self._key, error=e)

    @property
    def _marker(self) -> str:
        return f"{UPLOADS}{self._client.instance_id}/{self._upload_id}"

    async def _write_marker(self) -> None:
        """Tag a plain save's multipart upload with this instance (see UPLOADS)."""
        body = json.dumps({"key": self._key}).encode()
        await self._client.send("PUT", self._marker, body=body)

    def _done_with_upload(self) -> None:
        """No longer writing the multipart upload: it is not live here any more."""
        self._client.live_uploads.pop(str(self._upload_id), None)

    async def _write_record(self) -> None:
        if self._record_key is None:
            return
        record = {
            "name": self._name,
            "size": self._size,
            "sha256": self._expected,
            "upload_id": self._upload_id,
            "stored": sum(size for _, _, size in self._parts),
        }
        await self._client.send("PUT", self._record_key, body=json.dumps(record).encode())

    async def _commit(self) -> str:
        if self._in_flight is not None:
            with contextlib.suppress(Exception):
                await self._in_flight
        if self._error is not None:  # a part failed: never complete without it
            self.abort()
            raise StorageFailure(f"a part could not be stored: {self._error}")
        digest = self._sha256.hexdigest()
        if self._hash_complete:
            self._check(digest)
        if self.check_target is not None:
            try:
                await self.check_target()
            except Exception:
                self.abort()
                raise
        completed: str | None = None
        try:
            if self._upload_id is None:
                await self._client.send(
                    "PUT", self._key, body=self._take_buffer(), headers=self._meta(digest)
                )
            else:
                completed = await self._complete()
                self._done_with_upload()
                if self._record_key is None:
                    marker = self._marker
                    self._client.in_background(
                        self._client.send("DELETE", marker, expect=(204, 200, 404)),
                        "drop an upload marker",
                    )
            self._completed = True
            if self._upload_id is not None and self._key == self._target and not self._expected:
                await self._record_digest(digest, completed)
            if self._key != self._target:  # a resumable upload's staging object
                if not self._hash_complete:
                    digest = await self._hash_object(self._key)
                    self._check(digest)
                source = f"/{self._client.bucket}/{quote(self._key, safe='/~')}"
                await self._client.send(
                    "PUT",
                    self._target,
                    headers={
                        "x-amz-copy-source": source,
                        "x-amz-metadata-directive": "REPLACE",
                        **self._meta(digest),
                    },
                )
                await self._client.send("DELETE", self._key, expect=(204, 200))
                if self._record_key is not None:
                    await self._client.send("DELETE", self._record_key, expect=(204, 200))
        except Exception:
            self.abort()
            raise
        return digest

    def _check(self, digest: str) -> None:
        if self._expected is not None and digest != self._expected.lower():
            self.abort()
            raise ChecksumMismatch(f"the data's SHA-256 is {digest}")

    async def _hash_object(self, key: str) -> str:
        return await _hash_key(self._client, key)

    async def _complete(self) -> str | None:
        """Complete the multipart upload; the new object's S3 ETag."""
        if self._buffered:
            await self._send_part(self._take_buffer())
        parts = "".join(
            f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
            for n, etag, _ in self._parts
        )
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        _, answer = await self._client.send(
            "POST", self._key, params={"uploadId": self._upload_id}, body=body
        )
        if b"<Error>" in answer:  # S3 may fail a completion with a 200
            raise StorageFailure(f"the object store refused the upload: {answer[:200]!r}")
        return ElementTree.fromstring(answer).findtext(f"{_NS}ETag") if answer else None

    def interrupt(self) -> Deferred:
        """Cut: a resumable upload keeps its stored parts (the buffer is lost)."""
        if self._record_key is None:
            self.abort()
            return defer.succeed(None)

        async def keep() -> None:
            if self._in_flight is not None:
                with contextlib.suppress(Exception):
                    await self._in_flight
            self._done_with_upload()
            self._buffer, self._buffered = [], 0
            if self._upload_id is not None:
                await self._write_record()

        d = self._client.in_background(keep(), "keep an interrupted upload")
        self._settling[self._key] = d

        def settled(result: Any) -> Any:
            if self._settling.get(self._key) is d:
                del self._settling[self._key]
            return result

        d.addBoth(settled)
        return d

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        self._buffer, self._buffered = [], 0
        client = self._client
        if self._completed and self._key != self._target:  # a staging object to drop
            client.in_background(
                client.send("DELETE", self._key, expect=(204, 200, 404)), "drop a staged object"
            )
        elif self._upload_id is not None:
            self._done_with_upload()
            upload_id, marker = self._upload_id, self._marker

            async def abort_upload() -> None:
                await client.send(
                    "DELETE", self._key, params={"uploadId": upload_id}, expect=(204, 200)
                )
                if self._record_key is None:  # only once the upload is gone
                    await client.send("DELETE", marker, expect=(204, 200, 404))

            client.in_background(abort_upload(), "abort an upload")
        if self._record_key is not None:
            client.in_background(
                client.send("DELETE", self._record_key, expect=(204, 200, 404)),
                "drop an upload record",
            )


class _Collector(protocol.Protocol):
    """Gathers a (small) response body; fires ``finished`` with it."""

    def __init__(self, finished: Deferred) -> None:
        self._chunks: list[bytes] = []
        self._finished = finished
        self.ended: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def stop(self) -> None:
        """Given up on (a deadline): drop the connection."""
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:
        self.ended.callback(None)
        if self._finished.called:  # cancelled
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._chunks))
        else:
            self._finished.errback(StorageFailure("the object store stopped sending"))


def _read_all(response: Any) -> Deferred:
    collector: _Collector | None = None
    finished: Deferred = Deferred(lambda _: collector.stop() if collector else None)
    collector = _Collector(finished)
    response.deliverBody(collector)  # (tracked by the caller's send)
    return finished


class _Hasher(protocol.Protocol):
    """Hashes a response body; fires ``finished`` at its end."""

    def __init__(self, digest: Any, finished: Deferred) -> None:
        self._digest = digest
        self._finished = finished
        self.ended: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._digest.update(data)

    def connectionLost(self, reason: Any) -> None:
        self.ended.callback(None)
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(None)
        else:
            self._finished.errback(StorageFailure("the object store stopped sending"))


class _Body(protocol.Protocol):
    def __init__(self, download: S3Download) -> None:
        self._download = download
        self.ended: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self._download._received(data)

    def connectionLost(self, reason: Any) -> None:
        self.ended.callback(None)
        self._download._ended(reason)


@implementer(interfaces.IPushProducer, IDownload)
class S3Download(StreamEnd):
    def __init__(
        self, client: S3Client, key: str, size: int, offset: int, length: int | None = None
    ) -> None:
        self._client = client
        self._key = key
        self.size = size
        self.offset = offset
        self.length = size - offset if length is None else min(length, size - offset)
        self._consumer: interfaces.IConsumer | None = None
        self._sha256: Any = None
        self._done: Deferred | None = None
        self._body: _Body | None = None
        self._remaining = self.length
        #: The SHA-256 the object's metadata records (None: not recorded).
        self.stored_sha256: str | None = None
        #: The object's S3 ETag when it was opened: the GET reads that version only.
        self.version: str | None = None

    def prefix_sha256(self) -> Deferred:
        async def hash_prefix() -> Any:
            digest = hashlib.sha256()
            if self.offset:
                response = await self._client.stream(self._key, 0, self.offset - 1, self.version)
                finished: Deferred = Deferred()
                self._client.deliver(response, _Hasher(digest, finished))  # streamed
                await finished
            return digest

        return Deferred.fromCoroutine(hash_prefix())

    def stream_to(self, consumer: interfaces.IConsumer, sha256: Any) -> Deferred:
        self._consumer, self._sha256 = consumer, sha256
        self._done = Deferred()
        done = self._done
        consumer.registerProducer(self, True)
        if self._remaining == 0:
            self._finish(None)
            return done

        async def start() -> None:
            last = self.offset + self.length - 1 if self.offset + self.length < self.size else None
            response = await self._client.stream(self._key, self.offset, last, self.version)
            self._body = _Body(self)
            self._client.deliver(response, self._body)
            if self._done is None:  # stopped while the GET was on its way
                self._body.transport.stopProducing()

        Deferred.fromCoroutine(start()).addErrback(
            lambda f: self._finish(StreamFailed(str(f.value)))
        )
        return done

    def _received(self, data: bytes) -> None:
        if self._done is None or self._consumer is None:
            return
        self._sha256.update(data)
        self._remaining -= len(data)
        self._consumer.write(data)

    def _ended(self, reason: Any) -> None:
        if self._remaining == 0:
            self._finish(None)
        else:
            self._finish(StreamFailed("the object store stopped sending"))

    def _transport(self) -> Any:
        return getattr(self._body, "transport", None)

    def pauseProducing(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport = self._transport()
        if transport is not None:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        self._stop(consumer_gone=True)

    def stop(self) -> None:
        self._stop(consumer_gone=False)

    def _stop(self, consumer_gone: bool) -> None:
        transport = self._transport()
        if transport is not None:
            transport.stopProducing()
        self._finish(StreamFailed("the transfer was stopped", consumer_gone=consumer_gone))

    def close(self) -> None:
        pass
