"""Share links: a client lends one file or one folder, read-only, for a time.

- The ops ``share``, ``unshare`` and ``shares`` (docs/protocol.md, "Share
  links") are plain functions of a :class:`~wsfiles.session.CommandSession`;
  the session's handler table names them.
- ``GET /s/ID`` (and ``/s/ID/PATH`` inside a shared folder) is
  :class:`ShareResource`.  A file is sent by ``wsfiles.httpfiles`` (Range,
  ETag, Content-Disposition...), exactly like a plain HTTP download.
- Shares are kept by a store: :class:`FileShareStore` (memory, written
  atomically to one JSON file: a single instance) or :class:`RedisShareStore`
  (``--redis``: every instance sees the same shares, counts and revocations).
  While Redis is down a share link answers 503: nothing is served from a
  possibly stale copy, so a revoked share is never served.

A share names a *path*: the link follows the name.  A file replaced under
the same name serves its new bytes (its ETag changes); a renamed or deleted
file makes the link answer 404 until something is again at that path.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import json
import os
import re
import secrets
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server

from wsfiles import errors
from wsfiles.admission import forwarded_client
from wsfiles.config import Settings
from wsfiles.errors import ProtocolError
from wsfiles.fields import count_field
from wsfiles.names import check_file_name, check_path
from wsfiles.storage import FileInfo, IsAFolder, IStorage, NotAFolder, NotFound, StorageFailure
from wsfiles.users import SCRYPT_N, SCRYPT_P, SCRYPT_R, _hash_secret, _verify

if TYPE_CHECKING:
    from wsfiles.metrics import Metrics
    from wsfiles.redisstate import RedisLink
    from wsfiles.session import CommandSession
    from wsfiles.users import UserDirectory

_log = Logger()

#: 144 random bits, 24 URL-safe characters (at least 128 bits are required).
ID_BYTES = 18
_ID = re.compile(r"[A-Za-z0-9_-]{24}")
#: What logs show of an ID: enough to tell shares apart, far too little to use.
LOG_PREFIX = 6
#: Shares one client may hold at once (expired ones do not count).
MAX_SHARES_PER_CLIENT = 1000
MAX_PASSWORD = 1024
#: Entries a shared folder's page lists at most.
PAGE_ENTRIES = 1000
#: Wrong passwords: per address, at most this many, refilled over a minute;
#: per share (from every address together), four times as many.
PASSWORD_ATTEMPTS = 5
#: scrypt checks of share passwords running at once (16 MiB and a core each).
SCRYPT_AT_ONCE = 2
#: Addresses whose request rate is remembered; beyond it, idle ones are forgotten.
MAX_TRACKED_ADDRESSES = 10_000
ANONYMOUS_KEY = "@anonymous"
DEFAULT_FILE_NAME = ".wsfiles-shares.json"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h``, ``1d``, ``2w`` as whole seconds (>= 1)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (e.g. 3600, 90m, 12h, 1d, 2w)")
    seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 1:
        raise ValueError(f"{text!r}: a duration must be at least 1 second")
    return seconds


def short(share_id: str) -> str:
    """An ID as logs show it."""
    return share_id[:LOG_PREFIX] + "…"


def new_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


@dataclass(frozen=True)
class ShareSettings:
    """The operator's options for share links (docs/configuration.md)."""

    #: Seconds a share lives when its ``share`` names no ``expires``.
    default_ttl: int = 86400
    #: The longest ``expires`` accepted.
    max_ttl: int = 30 * 86400
    #: Requests per second per address on /s/ (bursts of the same size).
    rate: float = 10.0
    #: The single-instance store's file; None: ROOT/.wsfiles-shares.json with
    #: local folders, else memory only.
    file: str | None = None


@dataclass
class Share:
    id: str
    owner: str  # the client name, as in ``hello``
    folder: str | None  # the storage folder (None: the anonymous one)
    path: str  # "" is the top folder
    kind: str  # "file" or "folder"
    created: float
    expires: float
    max_downloads: int | None = None
    downloads: int = 0
    password: str | None = None  # scrypt$N$r$p$SALT$HASH
    #: The owner's token id when it shared: another token, another owner.
    token_id: str | None = None

    def public(self) -> dict[str, Any]:
        """What the owner is told (never the password's hash)."""
        return {
            "share": self.id,  # (``id`` is the request's, in every reply)
            "url": f"/s/{self.id}",
            "path": self.path,
            "kind": self.kind,
            "created_at": self.created,
            "expires_at": self.expires,
            "max_downloads": self.max_downloads,
            "downloads": self.downloads,
            "password": self.password is not None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Share:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


class StoreUnavailable(Exception):
    """The shared store (Redis) cannot be asked now: fail closed."""


#: count_download's answers.
COUNTED, USED_UP, GONE = "counted", "used_up", "gone"


def owner_key(owner: str, folder: str | None) -> str:
    return owner if folder is not None else ANONYMOUS_KEY


# -- the single-instance store ---------------------------------------------------


class FileShareStore:
    """Shares in memory, rewritten atomically to ``path`` (mode 0600) after
    each change; None keeps them in memory only.  One instance only: two
    processes writing one file would lose each other's changes."""

    def __init__(self, path: str | None, clock: IReactorTime) -> None:
        self.path = path
        self._clock = clock
        self._shares: dict[str, Share] = {}
        self._saving = False
        self._waiting: list[Deferred] = []
        if path is not None:
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            shares = [Share.from_json(item) for item in data["shares"]]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Fail closed: no share is served from a file we cannot read.
            _log.error(
                "share links: cannot read {path} ({error}); starting with none",
                path=path,
                error=str(e),
            )
            return
        self._shares = {share.id: share for share in shares}

    def _snapshot(self) -> str:
        """The live shares as the file holds them (taken on the reactor thread)."""
        now = self._clock.seconds()
        live = [asdict(s) for s in self._shares.values() if s.expires > now]
        return json.dumps({"version": 1, "shares": live})

    def _save(self) -> None:
        """Write now: a revocation must be on disk before it is answered."""
        if self.path is not None:
            self._write(self._snapshot())
            if self._saving:  # the save in flight holds an older snapshot: one more
                self._waiting.append(Deferred())

    def _save_soon(self) -> Deferred:
        """Save in a thread, one save at a time; fires once a save that holds
        this change is on disk.  Changes that come during a save are written
        by the next one, so a link requested many times a second costs a
        rewrite per save, not one each, and none on the reactor thread."""
        waiter: Deferred = Deferred()
        if self.path is None:
            waiter.callback(None)
            return waiter
        self._waiting.append(waiter)
        if not self._saving:
            self._start_save()
        return waiter

    def _start_save(self) -> None:
        self._saving = True
        covered, self._waiting = self._waiting, []
        d = threads.deferToThread(self._write, self._snapshot())

        def done(result: Any) -> None:
            self._saving = False
            for waiter in covered:
                waiter.callback(None)
            if self._waiting:
                self._start_save()

        d.addErrback(
            lambda f: _log.failure("share links: could not save {path}", f, path=self.path)
        )
        d.addBoth(done)

    def _write(self, text: str) -> None:
        assert self.path is not None
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=".wsfiles-shares-", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)  # mkstemp made it 0600
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise

    def _live(self, share_id: str) -> Share | None:
        share = self._shares.get(share_id)
        if share is not None and share.expires <= self._clock.seconds():
            del self._shares[share_id]
            return None
        return share

    async def add(self, share: Share) -> None:
        self._shares[share.id] = share
        await self._save_soon()

    async def get(self, share_id: str) -> Share | None:
        share = self._live(share_id)
        return replace(share) if share is not None else None

    async def remove(self, share_id: str, owner: str) -> bool:
        share = self._live(share_id)
        if share is None or share.owner != owner:
            return False
        del self._shares[share_id]
        self._save()
        return True

    async def list(self, owner: str) -> list[Share]:
        now = self._clock.seconds()
        for share_id in [i for i, s in self._shares.items() if s.expires <= now]:
            del self._shares[share_id]
        return [replace(s) for s in self._shares.values() if s.owner == owner]

    async def count_download(self, share_id: str) -> str:
        share = self._live(share_id)
        if share is None:
            return GONE
        if share.max_downloads is not None and share.downloads >= share.max_downloads:
            return USED_UP
        share.downloads += 1
        if share.max_downloads is not None:
            self._save_soon()  # only a limit needs the count to survive a restart
        return COUNTED


# -- the shared store ------------------------------------------------------------

_ADD = """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3 + 1])
local ttl = redis.call('PTTL', KEYS[2])
if ttl < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return 1
"""
# ARGV[3 + 1] is the value of the first field, which is always "id".

_REMOVE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

_COUNT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local max = tonumber(redis.call('HGET', KEYS[1], 'max_downloads') or '')
local n = tonumber(redis.call('HGET', KEYS[1], 'downloads') or '0')
if max and n >= max then return -2 end
return redis.call('HINCRBY', KEYS[1], 'downloads', 1)
"""

_LIST = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local fields = redis.call('HGETALL', ARGV[1] .. id)
  if #fields == 0 then
    redis.call('SREM', KEYS[1], id)
  else
    table.insert(out, cjson.encode(fields))
  end
end
return out
"""


def _to_fields(share: Share) -> list[str]:
    data = asdict(share)
    fields = ["id", share.id]
    for name, value in data.items():
        if name != "id":
            fields += [name, "" if value is None else str(value)]
    return fields


def _from_fields(flat: list[str]) -> Share:
    data = dict(zip(flat[::2], flat[1::2], strict=True))

    def number(name: str, kind: Callable[[str], Any]) -> Any:
        value = data.get(name, "")
        return kind(value) if value != "" else None

    return Share(
        id=data["id"],
        owner=data["owner"],
        folder=data.get("folder") or None,
        path=data.get("path", ""),
        kind=data["kind"],
        created=number("created", float),
        expires=number("expires", float),
        max_downloads=number("max_downloads", int),
        downloads=number("downloads", int) or 0,
        password=data.get("password") or None,
        token_id=data.get("token_id") or None,
    )


class RedisShareStore:
    """Shares as Redis hashes (``PREFIX share:ID``, expiring with the share)
    and one set of IDs per owner (``PREFIX shares:OWNER``) for listing.
    Every answer comes from Redis; while it is down, StoreUnavailable."""

    def __init__(self, link: RedisLink, clock: IReactorTime) -> None:
        self._link = link
        self._clock = clock

    def _key(self, share_id: str) -> str:
        return f"{self._link.prefix}share:{share_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self._link.prefix}shares:{owner}"

    async def _ask(self, d: Deferred) -> Any:
        from wsfiles.redisstate import SHARED_FAILURES

        try:
            return await d
        except SHARED_FAILURES as e:
            raise StoreUnavailable(f"Redis is unreachable ({e})") from None

    async def add(self, share: Share) -> None:
        ttl_ms = max(1, int((share.expires - self._clock.seconds()) * 1000))
        args = [int(share.expires * 1000), ttl_ms, *_to_fields(share)]
        await self._ask(
            self._link.eval(_ADD, [self._key(share.id), self._owner_key(share.owner)], args)
        )

    async def get(self, share_id: str) -> Share | None:
        flat = await self._ask(self._link.command("HGETALL", self._key(share_id)))
        if not flat:
            return None
        if isinstance(flat, dict):  # (txredisapi may answer a mapping)
            flat = [x for pair in flat.items() for x in pair]
        share = _from_fields(list(flat))
        return share if share.expires > self._clock.seconds() else None

    async def remove(self, share_id: str, owner: str) -> bool:
        keys = [self._key(share_id), self._owner_key(owner)]
        done = await self._ask(self._link.eval(_REMOVE, keys, [owner, share_id]))
        return int(done) == 1

    async def list(self, owner: str) -> list[Share]:
        prefix = f"{self._link.prefix}share:"
        found = await self._ask(self._link.eval(_LIST, [self._owner_key(owner)], [prefix]))
        now = self._clock.seconds()
        shares = [_from_fields(json.loads(item)) for item in found or []]
        return sorted((s for s in shares if s.expires > now), key=lambda s: s.created)

    async def count_download(self, share_id: str) -> str:
        n = int(await self._ask(self._link.eval(_COUNT, [self._key(share_id)], [])))
        return GONE if n == -1 else USED_UP if n == -2 else COUNTED


# -- rates -----------------------------------------------------------------------


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class AddressBuckets:
    """A token bucket per key: ``burst`` tokens, refilled at ``rate`` per
    second.  At most MAX_TRACKED_ADDRESSES are remembered: past that, the
    longest unused are dropped (they would have refilled anyway, mostly)."""

    def __init__(self, rate: float, burst: float, clock: IReactorTime) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _bucket(self, key: str) -> _Bucket:
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
            while len(self._buckets) > MAX_TRACKED_ADDRESSES:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        return bucket

    def take(self, key: str) -> bool:
        bucket = self._bucket(key)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        return False

    def empty(self, key: str) -> bool:
        return self._bucket(key).tokens < 1

    def give_back(self, key: str) -> None:
        bucket = self._bucket(key)
        bucket.tokens = min(self.burst, bucket.tokens + 1)

    def __len__(self) -> int:
        return len(self._buckets)


# -- passwords -------------------------------------------------------------------


def hash_password(password: str) -> str:
    """scrypt, as the users file hashes tokens (wsfiles.users)."""
    salt = secrets.token_bytes(16)
    digest = _hash_secret(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


class PasswordChecks:
    """Checks share passwords: scrypt in a thread, two at once, wrong
    attempts limited per address and per share; a password that verified
    is remembered (an HMAC under a per-process key) so a browser that sends
    it with every request does not cost a scrypt each time."""

    def __init__(self, clock: IReactorTime) -> None:
        self._key = secrets.token_bytes(32)
        self._good: OrderedDict[bytes, str] = OrderedDict()
        self._slots = DeferredSemaphore(SCRYPT_AT_ONCE)
        self.by_address = AddressBuckets(PASSWORD_ATTEMPTS / 60, PASSWORD_ATTEMPTS, clock)
        self.by_share = AddressBuckets(4 * PASSWORD_ATTEMPTS / 60, 4 * PASSWORD_ATTEMPTS, clock)

    def take(self, share: Share, address: str) -> bool:
        """Take a guess from both budgets before checking (so checks in flight
        count); False, taking nothing: too many wrong passwords lately."""
        if self.by_address.empty(address) or self.by_share.empty(share.id):
            return False
        self.by_address.take(address)
        self.by_share.take(share.id)
        return True

    def refund(self, share: Share, address: str) -> None:
        """The guess was right: it costs nothing."""
        self.by_address.give_back(address)
        self.by_share.give_back(share.id)

    async def check(self, share: Share, password: str, address: str) -> bool:
        assert share.password is not None
        digest = hmac.new(
            self._key, f"{share.id}\0{password}".encode("utf-8", "surrogatepass"), hashlib.sha256
        ).digest()
        if self._good.get(digest) == share.password:
            self._good.move_to_end(digest)
            return True
        hashed = share.password
        ok = await self._slots.run(threads.deferToThread, _verify, password, hashed)
        if ok:
            self._good[digest] = hashed
            while len(self._good) > 1024:
                self._good.popitem(last=False)
        return bool(ok)


# -- the service -----------------------------------------------------------------


class ShareService:
    """One site's shares: the store, the policy, the counters."""

    def __init__(
        self,
        settings: ShareSettings,
        storage: IStorage,
        users: UserDirectory | None,
        clock: IReactorTime,
        metrics: Metrics | None = None,
        site_settings: Settings | None = None,
    ) -> None:
        self.settings = settings
        #: The site's settings: the transfer-rate rule, trusted proxies.
        self.site_settings = site_settings or Settings()
        self.storage = storage
        self.users = users
        self.clock = clock
        self.trusted_proxies = self.site_settings.trusted_proxies
        path = settings.file
        if path is None and isinstance(getattr(storage, "root", None), str):
            path = os.path.join(storage.root, DEFAULT_FILE_NAME)  # local folders
        self.store: FileShareStore | RedisShareStore = FileShareStore(path, clock)
        self.requests = AddressBuckets(settings.rate, max(1.0, settings.rate), clock)
        self.passwords = PasswordChecks(clock)
        self.outcomes: Any = None
        if metrics is not None:
            from prometheus_client import Counter

            self.outcomes = Counter(
                "wsfiles_share_requests",
                "Requests for share links (/s/), by outcome",
                ["outcome"],
                registry=metrics.registry,
            )

    def use_redis(self, link: RedisLink) -> None:
        """--redis: shares live in Redis, seen by every instance."""
        self.store = RedisShareStore(link, self.clock)

    def counted(self, outcome: str) -> None:
        if self.outcomes is not None:
            self.outcomes.labels(outcome).inc()

    def owner_gone(self, share: Share) -> bool:
        """The share's client is gone, so are its links: removed from the users
        file, its token rotated (a link made with a leaked token dies with it), the
        name added again for someone else; and a link made by the anonymous client
        of a server that now has users (its folder, ROOT, holds every user's),
        or by a user of one that now has none."""
        if self.users is None:
            return share.folder is not None
        if share.folder is None:
            return True
        token_id = self.users.token_id_of(share.owner)
        return token_id is None or token_id != share.token_id


def _service(session: CommandSession) -> ShareService:
    service = session.shares
    if service is None:
        raise ProtocolError(errors.UNKNOWN_OP, "this server has no share links")
    return service


def _unavailable(e: StoreUnavailable) -> ProtocolError:
    return ProtocolError(errors.UNAVAILABLE, f"share links are unavailable: {e}; retry later")


# -- the ops ---------------------------------------------------------------------


async def share_command(session: CommandSession, message: dict[str, Any], request_id: Any) -> None:
    """``share``: a link to one file or folder of the client's own."""
    service = _service(session)
    settings = service.settings
    if session.folders:
        path = check_path(message.get("path"), field="path", top=True)
    else:
        path = check_file_name(message.get("path"))
    expires = count_field(message, "expires", settings.default_ttl)
    if not 1 <= expires <= settings.max_ttl:
        raise ProtocolError(
            errors.BAD_REQUEST,
            f"'expires' must be 1 to {settings.max_ttl} seconds (--share-max-ttl)",
        )
    max_downloads = None
    if message.get("max_downloads") is not None:
        max_downloads = count_field(message, "max_downloads")
        if max_downloads < 1:
            raise ProtocolError(errors.BAD_REQUEST, "'max_downloads' must be at least 1")
    password = message.get("password")
    if password is not None and (
        not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD
    ):
        raise ProtocolError(
            errors.BAD_REQUEST, f"'password' must be a string of 1 to {MAX_PASSWORD} characters"
        )
    try:
        kind = await session.folder.kind(path) if path else "folder"
    except NotAFolder:
        kind = None
    if kind is None or (kind == "folder" and not session.folders):
        raise ProtocolError(errors.NOT_FOUND, f"nothing to share at {path!r}")
    folder_key = session.client if service.users is not None else None
    owner = session.client
    try:
        if len(await service.store.list(owner)) >= MAX_SHARES_PER_CLIENT:
            raise ProtocolError(
                errors.QUOTA_EXCEEDED,
                f"at most {MAX_SHARES_PER_CLIENT} share links at once; unshare some first",
            )
        hashed = await threads.deferToThread(hash_password, password) if password else None
        now = service.clock.seconds()
        share = Share(
            id=new_id(),
            owner=owner,
            folder=folder_key,
            path=path,
            kind=kind,
            created=now,
            expires=now + expires,
            max_downloads=max_downloads,
            password=hashed,
            token_id=service.users.token_id_of(owner) if service.users else None,
        )
        await service.store.add(share)
    except StoreUnavailable as e:
        raise _unavailable(e) from None
    _log.info(
        "{client} shared {kind} {path!r} as {share} until {expires:.0f}",
        client=owner,
        kind=kind,
        path=path,
        share=short(share.id),
        expires=share.expires,
    )
    session._send({"op": "shared", **share.public()}, request_id)


def _share_id(message: dict[str, Any]) -> str:
    share_id = message.get("share")
    if not isinstance(share_id, str):
        raise ProtocolError(errors.BAD_REQUEST, "'share' must be a share's id (a string)")
    return share_id


async def unshare_command(
    session: CommandSession, message: dict[str, Any], request_id: Any
) -> None:
    """``unshare``: revoke one of the client's own shares, at once."""
    service = _service(session)
    share_id = _share_id(message)
    try:
        removed = bool(_ID.fullmatch(share_id)) and await service.store.remove(
            share_id, session.client
        )
    except StoreUnavailable as e:
        raise _unavailable(e) from None
    if not removed:
        raise ProtocolError(errors.NOT_FOUND, "no share of yours with that id (expired?)")
    _log.info("{client} revoked share {share}", client=session.client, share=short(share_id))
    session._send({"op": "unshared", "share": share_id}, request_id)


async def shares_command(session: CommandSession, message: dict[str, Any], request_id: Any) -> None:
    """``shares``: the client's own live shares, oldest first."""
    service = _service(session)
    try:
        found = await service.store.list(session.client)
    except StoreUnavailable as e:
        raise _unavailable(e) from None
    found.sort(key=lambda s: s.created)
    session._send(
        {
            "op": "shares",
            "shares": [share.public() for share in found],
            "default_expires": service.settings.default_ttl,
            "max_expires": service.settings.max_ttl,
        },
        request_id,
    )


# -- GET /s/ID -------------------------------------------------------------------

_PAGE_CSP = (
    b"default-src 'none'; style-src 'unsafe-inline'; base-uri 'none';"
    b" form-action 'none'; frame-ancestors 'none'"
)


def redact_share_uri(uri: bytes) -> bytes:
    """``/s/ID...`` as logs show it: the ID cut to its first characters."""
    if not uri.startswith(b"/s/"):
        return uri
    rest = uri[3:]
    share_id, slash, tail = rest.partition(b"/")
    if len(share_id) <= LOG_PREFIX:
        return uri
    return b"/s/" + share_id[:LOG_PREFIX] + "…".encode() + slash + tail


class _Refused(Exception):
    def __init__(self, status: int, text: str, outcome: str, headers: dict | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.outcome = outcome
        self.headers = headers or {}


def _basic_password(request: server.Request) -> str | None:
    """The password of ``Authorization: Basic`` (any user name), if sent."""
    import base64
    import binascii

    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2]


class ShareResource(resource.Resource):
    """``/s/ID`` and ``/s/ID/PATH``: what a share link opens, for anyone who has it."""

    isLeaf = True

    def __init__(self, service: ShareService) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: server.Request) -> Any:
        if not request.path.startswith(b"/s/"):
            # Reached as /%73/ID: Twisted decodes a segment before routing, but
            # the access log's redaction of IDs reads the raw path.  One way in.
            request.setResponseCode(404)
            return b"not found\n"
        Deferred.fromCoroutine(self._answer(request))
        return server.NOT_DONE_YET

    render_HEAD = render_GET

    def _address(self, request: server.Request) -> str:
        peer = getattr(request.getClientAddress(), "host", "")
        forwarded = request.getHeader(b"x-forwarded-for")
        return forwarded_client(
            peer, forwarded.decode("latin-1") if forwarded else None, self.service.trusted_proxies
        )

    async def _answer(self, request: server.Request) -> None:
        service = self.service
        address = self._address(request)
        segments = list(request.postpath)
        share_id = segments[0].decode("latin-1") if segments else ""
        label = short(share_id) if share_id else "-"
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-robots-tag", b"noindex, nofollow")
        request.setHeader(b"x-content-type-options", b"nosniff")
        try:
            if not service.requests.take(address):
                raise _Refused(
                    429,
                    f"more than {service.settings.rate:g} requests per second from your address",
                    "rate_limited",
                    {b"retry-after": b"1"},
                )
            outcome = await self._serve(request, share_id, segments[1:], address)
        except _Refused as refused:
            outcome = refused.outcome
            if not request.finished and not request._disconnected:
                request.setResponseCode(refused.status)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.setHeader(b"cache-control", b"no-store")
                for name, value in refused.headers.items():
                    request.setHeader(name, value)
                request.write((refused.text + "\n").encode())
                request.finish()
        except Exception:
            outcome = "error"
            _log.failure("share link {share}: unexpected error", share=label)
            if not request.finished and not request._disconnected and not request.startedWriting:
                request.setResponseCode(500)
                request.write(b"internal error (logged)\n")
                request.finish()
        service.counted(outcome)
        _log.info(
            "share {share}: {method} from {address}: {outcome}",
            share=label,
            method=request.method.decode("latin-1"),
            address=address,
            outcome=outcome,
        )

    async def _serve(
        self, request: server.Request, share_id: str, rest: list[bytes], address: str
    ) -> str:
        service = self.service
        if not _ID.fullmatch(share_id):
            raise _Refused(404, "no such share link", "not_found")
        try:
            share = await service.store.get(share_id)
        except StoreUnavailable:
            raise _Refused(
                503,
                "share links are unavailable right now; retry later",
                "unavailable",
                {b"retry-after": b"5"},
            ) from None
        if share is None or service.owner_gone(share):
            raise _Refused(404, "no such share link (expired or revoked?)", "not_found")
        if share.password is not None:
            await self._check_password(request, share, address)
        folder = service.storage.folder(share.folder)
        try:
            relative = self._relative(rest)
        except ProtocolError:
            raise _Refused(404, "nothing at that path in this share", "not_found") from None
        if share.kind == "folder" and relative is None:
            await self._folder_page(request, share, folder)
            return "page"
        if share.kind == "folder":
            path = f"{share.path}/{relative}" if share.path else relative
        else:
            name = share.path.rpartition("/")[2]
            if relative is not None and relative != name:
                raise _Refused(404, "nothing at that path in this share", "not_found")
            path = share.path
        try:
            await folder.stat(path)  # (a missing file does not count as a download)
        except (NotFound, NotAFolder, IsAFolder):
            raise _Refused(404, "nothing at that path in this share", "not_found") from None
        except StorageFailure:
            raise _Refused(
                503, "the file store is unavailable; retry later", "unavailable"
            ) from None
        if request.method == b"GET":
            try:
                counted = await service.store.count_download(share.id)
            except StoreUnavailable:
                raise _Refused(
                    503, "share links are unavailable right now", "unavailable"
                ) from None
            if counted == GONE:
                raise _Refused(404, "no such share link (expired or revoked?)", "not_found")
            if counted == USED_UP:
                raise _Refused(410, "this link has been used up (its download limit)", "used_up")
        served = await serve_shared_file(request, folder, path, service)
        if request.method == b"HEAD":
            return "head"
        return "download" if served.complete else "download_cut"

    @staticmethod
    def _relative(rest: list[bytes]) -> str | None:
        """The path below the share, checked (None: the share itself)."""
        if not rest or rest == [b""]:
            return None
        try:
            text = b"/".join(rest).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(errors.INVALID_NAME, "not UTF-8") from None
        return check_path(text)

    async def _check_password(self, request: server.Request, share: Share, address: str) -> None:
        checks = self.service.passwords
        ask = {b"www-authenticate": b'Basic realm="wsfiles share", charset="UTF-8"'}
        given = _basic_password(request)
        if given is None:
            raise _Refused(401, "this share link needs its password", "password_needed", ask)
        if not checks.take(share, address):
            raise _Refused(
                429,
                "too many wrong passwords; wait a minute",
                "password_throttled",
                {b"retry-after": b"60"},
            )
        if await checks.check(share, given, address):
            checks.refund(share, address)
        else:
            _log.info(
                "share {share}: wrong password from {address}",
                share=short(share.id),
                address=address,
            )
            raise _Refused(401, "wrong password for this share link", "wrong_password", ask)

    async def _folder_page(self, request: server.Request, share: Share, folder: Any) -> None:
        try:
            entries = await folder.entries(share.path, True, None, PAGE_ENTRIES)
        except (NotFound, NotAFolder):
            raise _Refused(404, "this shared folder is gone", "not_found") from None
        except StorageFailure:
            raise _Refused(
                503, "the file store is unavailable; retry later", "unavailable"
            ) from None
        body = folder_page(share, entries).encode("utf-8")
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", _PAGE_CSP)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", str(len(body)).encode())
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


def _human(size: int) -> str:
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"


def folder_page(share: Share, entries: list[Any]) -> str:
    """A shared folder's page: every file of its tree, each a download link."""
    title = share.path.rpartition("/")[2] or "Shared folder"
    prefix = f"{share.path}/" if share.path else ""
    rows = []
    for entry in entries[:PAGE_ENTRIES]:
        relative = entry.name[len(prefix) :] if entry.name.startswith(prefix) else entry.name
        shown = html.escape(relative)
        if isinstance(entry, FileInfo):
            href = f"/s/{share.id}/" + "/".join(quote(p, safe="") for p in relative.split("/"))
            rows.append(
                f'<li><a href="{html.escape(href)}" download>{shown}</a>'
                f" <small>{_human(entry.size)}</small></li>"
            )
        else:
            rows.append(f"<li>{shown}/</li>")
    more = (
        f"<p>Only the first {PAGE_ENTRIES} entries are shown.</p>"
        if len(entries) > PAGE_ENTRIES
        else ""
    )
    listing = "\n".join(rows) if rows else "<li>(empty)</li>"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} (shared)</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:48rem;margin:1rem auto;"
        "padding:0 1rem;line-height:1.5}li{overflow-wrap:anywhere}small{color:#555}</style>"
        "</head><body><main>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>Shared with you until {_utc(share.expires)} UTC. Select a file to download it.</p>"
        f"<ul>\n{listing}\n</ul>{more}</main></body></html>\n"
    )


def _utc(seconds: float) -> str:
    import datetime

    moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M")


async def serve_shared_file(
    request: server.Request, folder: Any, path: str, service: ShareService
) -> Any:
    """Send one stored file with the HTTP semantics of plain downloads
    (wsfiles.httpfiles: Range, ETag, If-Range, Content-Disposition, flow
    control and the transfer-rate rule); its ``Served`` answer."""
    from wsfiles import httpfiles

    return await httpfiles.serve_file(
        request, folder, path, settings=service.site_settings, clock=service.clock
    )


# -- options (twistd wsfiles) -------------------------------------------------------

#: [name, short, default, help] rows for tap.Options.optParameters.
OPTIONS = [
    ["share-default-ttl", None, "1d", "How long a share link lives when none is asked for."],
    ["share-max-ttl", None, "30d", "The longest a share link may live (s, m, h, d, w)."],
    [
        "share-rate",
        None,
        "10",
        "Requests per second per address on share links /s/ (bursts of the same size).",
    ],
    [
        "shares-file",
        None,
        None,
        "Where one instance keeps share links (default: ROOT/.wsfiles-shares.json;"
        " with --redis they live in Redis).",
    ],
]


def settings_from_options(options: Any) -> ShareSettings:
    """The share options of ``twistd wsfiles``, checked (usage errors)."""
    from twisted.python import usage

    try:
        default_ttl = parse_duration(options["share-default-ttl"])
        max_ttl = parse_duration(options["share-max-ttl"])
    except ValueError as e:
        raise usage.UsageError(f"--share-default-ttl/--share-max-ttl: {e}") from None
    if default_ttl > max_ttl:
        raise usage.UsageError("--share-default-ttl is longer than --share-max-ttl")
    try:
        rate = float(options["share-rate"])
    except ValueError:
        raise usage.UsageError("--share-rate must be a number") from None
    if not 0 < rate < float("inf"):
        raise usage.UsageError("--share-rate must be a positive number")
    path = options["shares-file"] or os.path.join(options["root"], DEFAULT_FILE_NAME)
    return ShareSettings(default_ttl, max_ttl, rate, os.path.abspath(path))
