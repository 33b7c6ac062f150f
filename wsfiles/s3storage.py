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
- Rename is a server-side copy, then a delete: not atomic.  For a moment both
  names exist; a reader never sees a partial object under either name.
- Not yet: resumable uploads (a resume always starts at offset 0, which the
  protocol allows) and partials.
"""

from __future__ import annotations

import hashlib
import io
import xml.etree.ElementTree as ElementTree
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
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from wsfiles.storage import (
    ChecksumMismatch,
    Exists,
    FileInfo,
    IDownload,
    IFolder,
    IStorage,
    IUpload,
    NotFound,
    StorageFailure,
)
from wsfiles.streaming import StreamFailed

_log = Logger()

PART_SIZE = 8 * 1024 * 1024  # S3 needs >= 5 MiB for every part but the last
ANONYMOUS_PREFIX = "@anonymous/"  # '@' is not allowed in client names
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


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
        self._signer = S3SigV4Auth(Credentials(access_key, secret_key), "s3", region)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self._agent = Agent(reactor, pool=self.pool)

    def url(self, key: str = "", params: dict[str, str] | None = None) -> str:
        url = f"{self.endpoint}/{self.bucket}/{quote(key, safe='/~')}"
        if params is not None:
            url += "?" + urlencode(sorted(params.items()), quote_via=quote)
        return url

    def _headers(self, method: str, url: str, body: bytes | None, extra: dict[str, str]) -> Headers:
        # botocore hashes the body itself (X-Amz-Content-SHA256) and signs it.
        request = AWSRequest(method=method, url=url, headers=dict(extra), data=body or b"")
        self._signer.add_auth(request)
        return Headers({k.encode(): [v.encode()] for k, v in request.headers.items()})

    async def send(
        self,
        method: str,
        key: str = "",
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> tuple[Any, bytes]:
        """One request; its response and body.  Other statuses: StorageFailure or NotFound."""
        url = self.url(key, params)
        signed = self._headers(method, url, body, headers or {})
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        try:
            response = await self._agent.request(method.encode(), url.encode(), signed, producer)
            content = await readBody(response) if method != "HEAD" else b""
        except Exception as e:
            raise StorageFailure(f"the object store did not answer: {e}") from None
        if response.code == 404 and 404 not in expect:
            raise NotFound(key)
        if response.code not in expect:
            raise StorageFailure(f"the object store answered {response.code}: {content[:200]!r}")
        return response, content

    async def stream(self, key: str, first: int, last: int | None) -> Any:
        """A ranged GET whose body the caller reads with ``deliverBody``."""
        url = self.url(key)
        span = f"bytes={first}-" + ("" if last is None else str(last))
        signed = self._headers("GET", url, None, {"Range": span})
        response = await self._agent.request(b"GET", url.encode(), signed, None)
        if response.code not in (200, 206):
            await readBody(response)
            raise StorageFailure(f"the object store answered {response.code}")
        return response

    def close(self) -> Deferred:
        return self.pool.closeCachedConnections()


def _header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)  # str in, str out
    return values[0] if values else None


@implementer(IStorage)
class S3Storage:
    def __init__(self, client: S3Client) -> None:
        self.client = client

    def folder(self, client: str | None) -> S3Folder:
        return S3Folder(self.client, f"{client}/" if client else ANONYMOUS_PREFIX)

    def free_bytes(self) -> float:
        return float("nan")  # an object store does not say

    def check(self, min_free: int) -> Deferred:
        async def probe() -> dict[str, Any]:
            await self.client.send("GET", params={"list-type": "2", "max-keys": "1"})
            return {"storage": "s3", "bucket": self.client.bucket}

        return Deferred.fromCoroutine(probe())

    def close(self) -> Deferred:
        return self.client.close()


@implementer(IFolder)
class S3Folder:
    def __init__(self, client: S3Client, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    def list(self) -> Deferred:
        return Deferred.fromCoroutine(self._list())

    async def _list(self) -> list[FileInfo]:
        files: list[FileInfo] = []
        params = {"list-type": "2", "prefix": self._prefix}
        while True:
            _, body = await self._client.send("GET", params=params)
            root = ElementTree.fromstring(body)
            for item in root.iter(f"{_NS}Contents"):
                name = item.findtext(f"{_NS}Key", "")[len(self._prefix) :]
                if not name or "/" in name:
                    continue
                stamp = datetime.fromisoformat(
                    item.findtext(f"{_NS}LastModified", "").replace("Z", "+00:00")
                )
                size = int(item.findtext(f"{_NS}Size", "0"))
                files.append(FileInfo(name, size, stamp.timestamp()))
            token = root.findtext(f"{_NS}NextContinuationToken")
            if root.findtext(f"{_NS}IsTruncated") != "true" or not token:
                break
            params = {**params, "continuation-token": token}
        files.sort(key=lambda info: info.name)
        return files

    async def _stat(self, name: str) -> FileInfo:
        response, _ = await self._client.send("HEAD", self._prefix + name)
        modified = _header(response, "Last-Modified")
        mtime = parsedate_to_datetime(modified).timestamp() if modified else 0.0
        return FileInfo(name, int(_header(response, "Content-Length") or 0), mtime)

    def stat(self, name: str) -> Deferred:
        return Deferred.fromCoroutine(self._stat(name))

    def open_download(self, name: str, offset: int = 0) -> Deferred:
        async def open_it() -> S3Download:
            info = await self._stat(name)
            if offset > info.size:
                raise ValueError(f"offset {offset} is beyond the size {info.size}")
            return S3Download(self._client, self._prefix + name, info.size, offset)

        return Deferred.fromCoroutine(open_it())

    def begin_upload(
        self, name: str, size: int, sha256: str | None = None, resume: bool = False
    ) -> Deferred:
        return defer.succeed(S3Upload(self._client, self._prefix + name, size, sha256))

    def partial_bytes(self) -> Deferred:
        return defer.succeed({})

    def delete(self, name: str) -> Deferred:
        async def delete_it() -> None:
            await self._stat(name)
            await self._client.send("DELETE", self._prefix + name, expect=(200, 204))

        return Deferred.fromCoroutine(delete_it())

    def rename(self, name: str, to: str, overwrite: bool) -> Deferred:
        async def rename_it() -> None:
            await self._stat(name)
            if name == to:
                return
            if not overwrite:
                try:
                    await self._stat(to)
                except NotFound:
                    pass
                else:
                    raise Exists(to)
            source = f"/{self._client.bucket}/{quote(self._prefix + name, safe='/~')}"
            await self._client.send("PUT", self._prefix + to, headers={"x-amz-copy-source": source})
            await self._client.send("DELETE", self._prefix + name, expect=(200, 204))

        return Deferred.fromCoroutine(rename_it())


@implementer(IUpload)
class S3Upload:
    """One object being written: a single PUT, or a multipart upload part by part."""

    offset = 0

    def __init__(self, client: S3Client, key: str, size: int, sha256: str | None) -> None:
        self._client = client
        self._key = key
        self._size = size
        self._expected = sha256
        self._sha256 = hashlib.sha256()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[tuple[int, str]] = []
        self._in_flight: Deferred | None = None
        self._error: Exception | None = None
        self._aborted = False
        self.on_superseded = None

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
        self._in_flight = Deferred.fromCoroutine(self._send_part(part))
        return self._in_flight

    def _take_buffer(self) -> bytes:
        part = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        return part

    async def _send_part(self, part: bytes) -> None:
        try:
            if self._upload_id is None:
                _, body = await self._client.send("POST", self._key, params={"uploads": ""})
                self._upload_id = ElementTree.fromstring(body).findtext(f"{_NS}UploadId")
            number = len(self._parts) + 1
            response, _ = await self._client.send(
                "PUT",
                self._key,
                params={"partNumber": str(number), "uploadId": str(self._upload_id)},
                body=part,
            )
            self._parts.append((number, _header(response, "ETag") or ""))
        except Exception as e:
            self._error = e
            raise

    def commit(self) -> Deferred:
        return Deferred.fromCoroutine(self._commit())

    async def _commit(self) -> str:
        if self._in_flight is not None:
            await self._in_flight
        digest = self._sha256.hexdigest()
        if self._expected is not None and digest != self._expected.lower():
            self.abort()
            raise ChecksumMismatch(f"the data's SHA-256 is {digest}")
        try:
            if self._upload_id is None:
                await self._client.send("PUT", self._key, body=self._take_buffer())
                return digest
            if self._buffered:
                await self._send_part(self._take_buffer())
            parts = "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
                for n, etag in self._parts
            )
            body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
            _, answer = await self._client.send(
                "POST", self._key, params={"uploadId": self._upload_id}, body=body
            )
            if b"<Error>" in answer:  # S3 may fail a completion with a 200
                raise StorageFailure(f"the object store refused the upload: {answer[:200]!r}")
        except Exception:
            self.abort()
            raise
        return digest

    def interrupt(self) -> Deferred:
        self.abort()  # not resumable yet: see the module docstring
        return defer.succeed(None)

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        self._buffer, self._buffered = [], 0
        if self._upload_id is not None:
            d = Deferred.fromCoroutine(
                self._client.send(
                    "DELETE", self._key, params={"uploadId": self._upload_id}, expect=(204, 200)
                )
            )
            d.addErrback(lambda f: _log.warn("could not abort an upload: {e}", e=f.value))


class _Body(protocol.Protocol):
    def __init__(self, download: S3Download) -> None:
        self._download = download

    def dataReceived(self, data: bytes) -> None:
        self._download._received(data)

    def connectionLost(self, reason: Any) -> None:
        self._download._ended(reason)


@implementer(interfaces.IPushProducer, IDownload)
class S3Download:
    def __init__(self, client: S3Client, key: str, size: int, offset: int) -> None:
        self._client = client
        self._key = key
        self.size = size
        self.offset = offset
        self._consumer: interfaces.IConsumer | None = None
        self._sha256: Any = None
        self._done: Deferred | None = None
        self._body: _Body | None = None
        self._remaining = size - offset

    def prefix_sha256(self) -> Deferred:
        async def hash_prefix() -> Any:
            digest = hashlib.sha256()
            if self.offset:
                response = await self._client.stream(self._key, 0, self.offset - 1)
                digest.update(await readBody(response))  # up to the offset, in memory
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
            response = await self._client.stream(self._key, self.offset, None)
            self._body = _Body(self)
            response.deliverBody(self._body)

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

    def close(self) -> None:
        pass
