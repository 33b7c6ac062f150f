"""State shared by several wsfiles instances through Redis (``--redis URL``).

Three things stop being per-process when several instances serve the same
clients (behind one load balancer, over one shared storage):

- ``changed`` events: :class:`RedisChangeBus` publishes every change on a
  channel per folder; each instance subscribed to it runs its own coalesced
  fan-out (a local :class:`~wsfiles.changes.ChangeHub`).
- quota reservations of uploads in flight: :class:`RedisQuotaLedger` keeps
  them in one Redis hash per client and adds one only if it fits, atomically
  (a Lua script), so two instances cannot both hand out the last bytes.
- per-client connection counts: :class:`RedisConnectionCounter`.

:class:`RedisState` builds the three on one :class:`RedisLink` (the two
Redis connections: one for commands, one for subscriptions).

Crashed instances.  Every instance keeps ``PREFIX instance:ID`` alive (a key
with a TTL, ``ttl`` seconds, 30 by default, re-set every ``ttl / 3``).  Every
field an instance writes names it (``ID`` for a connection count,
``ID:N`` for a reservation), and the scripts ignore and delete fields whose
instance key is gone: what a crashed instance held stops counting at most
``ttl`` seconds after its last heartbeat.  The hashes themselves expire
``ttl`` after the last write, and each heartbeat rewrites (and so renews)
everything the instance holds, which also heals whatever a lost reply or an
outage left stale.  A graceful stop deletes the instance key at once.

Redis down.  Nothing fails: events stay local to the instance, quota is
checked against this instance's own reservations only (reservations made on
other instances are not enforced meanwhile), connection counts are local, and
:meth:`RedisLink.health` says ``{"redis": "down"}``.  Both connections are
re-established with a back-off; on return the instance re-registers, rewrites
its reservations and counts (including those made during the outage),
resubscribes to its folders' channels, and sends its local listeners a fresh
list, since changes made elsewhere meanwhile were not heard.

The scripts use keys they are not given in KEYS (the instance keys): this is
for a standalone Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import itertools
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from wsfiles import errors
from wsfiles.admission import ConnectionSlots, Limits
from wsfiles.changes import ChangeHub, ListingCache
from wsfiles.errors import ProtocolError
from wsfiles.quota import QuotaLedger, Reservation, bytes_kept
from wsfiles.storage import IFolder, IStorage

_log = Logger()

DEFAULT_PREFIX = "wsfiles:"
#: Seconds an instance's fields outlive its last heartbeat.
DEFAULT_TTL = 30.0
#: Seconds a Redis command may take before the connection is dropped and redone.
DEFAULT_REPLY_TIMEOUT = 3.0
#: Reconnection back-off: first delay and largest delay, in seconds.
DEFAULT_RETRY = (0.5, 5.0)
#: The channel name part for the anonymous folder (client names cannot start with ``@``).
ANONYMOUS_CHANNEL = "@anonymous"


class RedisUnavailable(Exception):
    """No usable connection to Redis right now."""


#: What a Redis call may fail with that makes an instance fall back on its own
#: state: no connection, a timeout, or an error reply (out of memory, a
#: read-only replica...).
SHARED_FAILURES = (RedisUnavailable, txredisapi.RedisError)


def _falling_back(what: str, error: BaseException) -> None:
    if isinstance(error, (RedisUnavailable, txredisapi.ConnectionError)):
        _log.debug("{what}: Redis unavailable ({why})", what=what, why=str(error))
    else:
        _log.warn("{what}: Redis answered {why}", what=what, why=str(error))


def _answered(d: Deferred, what: str) -> Deferred:
    """``d`` as a Deferred that fires True on success, False (logged) on failure."""
    return d.addCallbacks(lambda _: True, lambda failure: _log_failure(what)(failure) or False)


def _log_failure(what: str) -> Callable[[Failure], None]:
    def errback(failure: Failure) -> None:
        if failure.check(*SHARED_FAILURES):
            _falling_back(what, failure.value)
        else:
            _log.failure("{what}", failure, what=what)

    return errback


# -- the address ---------------------------------------------------------------


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://``: TLS)."""

    host: str = "localhost"
    port: int = 6379
    db: int | None = None
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Raise ValueError (with a message for people) when ``url`` is not usable."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"{url!r} is not a Redis URL: {e}") from None
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{url!r} is not a Redis URL (redis://HOST[:PORT][/DB])")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: query strings and fragments are not supported")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"{url!r}: the path must be a database number")
        return cls(
            host=parts.hostname or "localhost",
            port=port if port is not None else 6379,
            db=int(path) if path else None,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=parts.scheme == "rediss",
        )

    def __str__(self) -> str:
        """For logs: without the password."""
        scheme = "rediss" if self.tls else "redis"
        db = f"/{self.db}" if self.db is not None else ""
        return f"{scheme}://{self.host}:{self.port}{db}"


# -- the connections -----------------------------------------------------------


class _Factory(txredisapi.RedisFactory):
    """A one-connection txredisapi factory that reports its connection's ups and downs."""

    def __init__(
        self,
        address: RedisAddress,
        protocol: type,
        reply_timeout: float,
        retry: tuple[float, float],
        ready: Callable[[Any], None],
        lost: Callable[[Any], None],
    ) -> None:
        super().__init__(
            f"{address.host}:{address.port}",
            address.db,
            1,
            isLazy=True,
            charset="utf-8",
            password=address.password,
            replyTimeout=reply_timeout,
            convertNumbers=False,
            username=address.username,
        )
        self.protocol = protocol
        self.initialDelay, self.maxDelay = retry
        self._ready = ready
        self._lost = lost
        self.on_message: Callable[[str, str], None] = lambda channel, message: None

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self._ready(conn)

    def delConnection(self, conn: Any) -> None:
        was_ours = conn in self.pool
        super().delConnection(conn)
        if was_ours:
            self._lost(conn)


class _EventsProtocol(txredisapi.SubscriberProtocol):
    factory: _Factory

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        try:
            self.factory.on_message(channel, message)
        except Exception:
            _log.failure("could not handle a message on {channel}", channel=channel)


class RedisLink:
    """One instance's two Redis connections, its identity, and its heartbeat.

    ``up`` is true while the command connection works, ``events_up`` while
    the subscription connection does.  Components register callbacks:

    - ``on_resync``: (re)write everything this instance holds; run when the
      command connection comes up and on every heartbeat;
    - ``on_events_up``: (re)subscribe; run when the subscription connection
      comes up;
    - ``on_message(channel, message)``: a publication arrived.

    ``name`` (say ``--instance-id``) only makes the keys readable: a random
    suffix keeps every process's id its own.
    """

    def __init__(
        self,
        url: str,
        *,
        reactor: Any = None,
        prefix: str = DEFAULT_PREFIX,
        name: str | None = None,
        ttl: float = DEFAULT_TTL,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        retry: tuple[float, float] = DEFAULT_RETRY,
        connect_timeout: float = 5.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.address = RedisAddress.parse(url)
        self.prefix = prefix
        if name is not None and (":" in name or not name):
            raise ValueError(f"an instance name cannot be empty or contain ':' ({name!r})")
        # Unique to this process even when ``name`` is not: a restarted process
        # must not inherit (and so keep alive) what a crashed one held.
        self.instance_id = f"{name}-{uuid.uuid4().hex[:16]}" if name else uuid.uuid4().hex
        self.ttl = ttl
        self._reactor = reactor
        self._reply_timeout = reply_timeout
        self._retry = retry
        self._connect_timeout = connect_timeout
        self._commands: Any = None
        self._events: Any = None
        self._factories: list[_Factory] = []
        self._heartbeat = LoopingCall(self.heartbeat)
        self._heartbeat.clock = reactor
        self._up_waiters: list[Deferred] = []
        self._down_waiters: list[Deferred] = []
        self._started = False
        self._stopping = False
        self.on_resync: list[Callable[[], list[Deferred]]] = []
        self.on_events_up: list[Callable[[], object]] = []
        self.on_message: list[Callable[[str, str], None]] = []

    # -- keys ------------------------------------------------------------

    @property
    def instance_key_prefix(self) -> str:
        return f"{self.prefix}instance:"

    @property
    def instance_key(self) -> str:
        return self.instance_key_prefix + self.instance_id

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    # -- state -----------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._commands is not None

    @property
    def events_up(self) -> bool:
        return self._events is not None

    def health(self) -> dict[str, str]:
        """``{"redis": "up"}``, or ``{"redis": "down"}`` while either connection is out."""
        return {"redis": "up" if self.up and self.events_up else "down"}

    def when_up(self) -> Deferred:
        """Fires once both connections work (and their callbacks have run)."""
        if self.up and self.events_up:
            return defer.succeed(None)
        return self._waiter(self._up_waiters)

    def when_down(self) -> Deferred:
        """Fires once both connections are lost."""
        if not self.up and not self.events_up:
            return defer.succeed(None)
        return self._waiter(self._down_waiters)

    def _waiter(self, waiters: list[Deferred]) -> Deferred:
        d: Deferred = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        waiters.append(d)
        return d

    def _check_waiters(self) -> None:
        if self.up and self.events_up:
            waiters, self._up_waiters = self._up_waiters, []
        elif not self.up and not self.events_up:
            waiters, self._down_waiters = self._down_waiters, []
        else:
            return
        for d in waiters:
            d.callback(None)

    # -- start and stop --------------------------------------------------

    def start(self) -> None:
        """Connect (in the background: the service starts whether Redis answers or not)."""
        if self._started:
            return
        self._started = True
        _log.info(
            "sharing state through Redis at {address} as instance {instance}",
            address=str(self.address),
            instance=self.instance_id,
        )
        for protocol, ready, lost in (
            (txredisapi.RedisProtocol, self._commands_ready, self._commands_lost),
            (_EventsProtocol, self._events_ready, self._events_lost),
        ):
            factory = _Factory(
                self.address, protocol, self._reply_timeout, self._retry, ready, lost
            )
            factory.on_message = self._message
            self._factories.append(factory)
            factory.startConnecting(self._endpoint())
        # Say so when Redis is not there at start-up (losing it later is logged too).
        first = self._factories[0].slots[0].service.whenConnected(failAfterFailures=1)
        first.addErrback(self._first_attempt_failed)
        self._heartbeat.start(self.ttl / 3, now=False)

    def _first_attempt_failed(self, failure: Failure) -> None:
        if not self._stopping and not failure.check(defer.CancelledError):
            _log.warn(
                "Redis at {address} is unreachable ({why}): changed events, quotas and"
                " connection counts are local to this instance until it answers",
                address=str(self.address),
                why=failure.getErrorMessage(),
            )

    def _endpoint(self) -> Any:
        address = self.address
        endpoint = endpoints.HostnameEndpoint(
            self._reactor, address.host, address.port, timeout=self._connect_timeout
        )
        if address.tls:
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(address.host), endpoint)
        return endpoint

    async def stop(self) -> None:
        """Unregister this instance (its fields stop counting at once) and disconnect."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self.up:
            try:
                await self.command("DEL", self.instance_key)
            except Exception as e:  # leaving anyway: the key expires by itself
                _log.debug("could not unregister from Redis: {error}", error=e)
        await defer.gatherResults(
            [factory.disconnect() for factory in self._factories], consumeErrors=True
        )

    # -- connection events -----------------------------------------------

    def _commands_ready(self, conn: Any) -> None:
        if self._stopping:
            return
        self._commands = conn
        _log.info("Redis at {address}: connected", address=str(self.address))
        self._register()
        self._check_waiters()

    def _commands_lost(self, conn: Any) -> None:
        if self._commands is conn:
            self._commands = None
            if not self._stopping:
                _log.warn(
                    "Redis at {address} is unreachable: changed events, quotas and"
                    " connection counts are local to this instance until it returns",
                    address=str(self.address),
                )
        self._check_waiters()

    def _events_ready(self, conn: Any) -> None:
        if self._stopping:
            return
        self._events = conn
        for callback in list(self.on_events_up):
            try:
                callback()
            except Exception:
                _log.failure("could not resubscribe")
        self._check_waiters()

    def _events_lost(self, conn: Any) -> None:
        if self._events is conn:
            self._events = None
        self._check_waiters()

    def _message(self, channel: str, message: str) -> None:
        for handler in list(self.on_message):
            handler(channel, message)

    def heartbeat(self) -> Deferred:
        """Keep this instance alive and rewrite what it holds (which renews it too).

        Run every ``ttl / 3`` seconds.  The subscription connection gets a
        PING: one that died silently (no FIN, say behind a broken NAT) times
        out and is made again.  Fires (never fails) once Redis has answered:
        True if both connections did.
        """
        answers = [_answered(self.ping_events(), "Redis did not answer a PING")]
        answers.extend(self._register())
        return defer.gatherResults(answers).addCallback(lambda results: all(results[:2]))

    def ping_events(self) -> Deferred:
        conn = self._events
        if conn is None:
            return defer.fail(RedisUnavailable(f"Redis at {self.address} is unreachable"))
        return defer.maybeDeferred(conn.ping)

    def _register(self) -> list[Deferred]:
        """Set this instance's key, then have every component rewrite its fields."""
        if not self.up:
            return [defer.succeed(False)]
        set_key = self.command("SET", self.instance_key, "1", "PX", self.ttl_ms)
        answers = [_answered(set_key, "could not renew this instance's Redis key")]
        for callback in list(self.on_resync):
            try:
                answers.extend(_answered(d, "could not rewrite state in Redis") for d in callback())
            except Exception:
                _log.failure("could not rewrite this instance's state in Redis")
        return answers

    # -- commands ----------------------------------------------------------

    def command(self, *args: Any) -> Deferred:
        """Run a command; fails at once with RedisUnavailable while down."""
        conn = self._commands
        if conn is None:
            return defer.fail(RedisUnavailable(f"Redis at {self.address} is unreachable"))
        return defer.maybeDeferred(conn.execute_command, *args)

    def eval(self, script: str, keys: Iterable[str], args: Iterable[Any]) -> Deferred:
        """EVALSHA (EVAL the first time on each connection)."""
        conn = self._commands
        if conn is None:
            return defer.fail(RedisUnavailable(f"Redis at {self.address} is unreachable"))
        return defer.maybeDeferred(conn.eval, script, list(keys), [str(a) for a in args])

    def subscribe(self, channel: str) -> Deferred:
        conn = self._events
        if conn is None:
            return defer.fail(RedisUnavailable(f"Redis at {self.address} is unreachable"))
        return defer.maybeDeferred(conn.subscribe, channel)

    def unsubscribe(self, channel: str) -> Deferred:
        conn = self._events
        if conn is None:
            return defer.fail(RedisUnavailable(f"Redis at {self.address} is unreachable"))
        return defer.maybeDeferred(conn.unsubscribe, channel)


# -- Lua -----------------------------------------------------------------------

#: Sum a hash's values, skipping one field, ignoring (and deleting) fields whose
#: instance is gone.  A field is ``ID`` or ``ID:N``; instance ``ID`` is alive
#: while ``INSTANCE_PREFIX .. ID`` exists.
_LIVE_SUM = """
local function live_sum(key, skip, instance_prefix)
  local total = 0
  local entries = redis.call('HGETALL', key)
  for i = 1, #entries, 2 do
    local field = entries[i]
    if field ~= skip then
      local owner = string.match(field, '^[^:]+')
      if redis.call('EXISTS', instance_prefix .. owner) == 1 then
        total = total + tonumber(entries[i + 1])
      else
        redis.call('HDEL', key, field)
      end
    end
  end
  return total
end
"""

#: Reserve SIZE bytes as FIELD only if every live reservation of the client
#: (other than FIELD itself) plus SIZE fits in ROOM (quota minus the bytes on
#: disk).  FIELD '' only checks.  Returns {1 or 0, reserved by the others}.
RESERVE_SCRIPT = (
    _LIVE_SUM
    + """
-- KEYS[1]: the client's reservations; ARGV: field, size, room, instance prefix, ttl ms
local total = live_sum(KEYS[1], ARGV[1], ARGV[4])
if total + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  return {0, total}
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
return {1, total}
"""
)

#: Replace all of one instance's reservations in a client's hash by the given
#: field/size pairs (possibly none), and renew the hash.
RESYNC_RESERVATIONS_SCRIPT = """
-- KEYS[1]: the client's reservations; ARGV: instance id, ttl ms, field, size, field, size...
local mine = ARGV[1] .. ':'
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, #mine) == mine then
    redis.call('HDEL', KEYS[1], field)
  end
end
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

#: Set this instance's connection count for a client to COUNT only if the
#: live counts of the other instances plus COUNT stay within LIMIT.
TAKE_CONNECTION_SCRIPT = (
    _LIVE_SUM
    + """
-- KEYS[1]: the client's counts; ARGV: instance id, count, limit, instance prefix, ttl ms
local others = live_sum(KEYS[1], ARGV[1], ARGV[4])
if others + tonumber(ARGV[2]) > tonumber(ARGV[3]) then
  return {0, others}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {1, others}
"""
)

#: Set (or, at 0, remove) this instance's connection count for a client.
SET_CONNECTIONS_SCRIPT = """
-- KEYS[1]: the client's counts; ARGV: instance id, count, ttl ms
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""


# -- changed events ------------------------------------------------------------


class RedisChangeBus:
    """A ChangeHub whose changes reach the listeners of every instance.

    ``changed(folder)`` notifies this instance's listeners through its own
    hub and publishes the instance's id on the folder's channel; instances
    subscribed there notify theirs, and each ignores its own publications, so
    every connection hears of a change once (then coalesced as usual).  An
    instance subscribes to a folder's channel while it has listeners for it.
    """

    def __init__(self, storage: IStorage, clock: Any, link: RedisLink) -> None:
        self.hub = ChangeHub(storage, clock)
        self._link = link
        self._listeners: dict[str | None, list[Any]] = {}
        self._channels: dict[str, str | None] = {}
        self._ops: set[Deferred] = set()
        link.on_events_up.append(self._resubscribe)
        link.on_message.append(self._received)

    @property
    def listings(self) -> ListingCache:
        """Cached ``list`` replies: dropped by changes made here and by those
        heard from other instances (through ``hub.changed``)."""
        return self.hub.listings

    def channel(self, folder: str | None) -> str:
        return f"{self._link.prefix}changed:{ANONYMOUS_CHANNEL if folder is None else folder}"

    def subscribe(self, folder: str | None, listener: Any, *, folders: bool = False) -> None:
        listeners = self._listeners.setdefault(folder, [])
        listeners.append(listener)
        self.hub.subscribe(folder, listener, folders=folders)
        if len(listeners) == 1:
            channel = self.channel(folder)
            self._channels[channel] = folder
            if self._link.events_up:
                self._track(self._link.subscribe(channel), f"could not subscribe to {channel}")

    def unsubscribe(self, folder: str | None, listener: Any, *, folders: bool = False) -> None:
        listeners = self._listeners.get(folder, [])
        if listener not in listeners:
            return
        listeners.remove(listener)
        self.hub.unsubscribe(folder, listener, folders=folders)
        if not listeners:
            del self._listeners[folder]
            channel = self.channel(folder)
            del self._channels[channel]
            if self._link.events_up:
                self._track(self._link.unsubscribe(channel), f"could not unsubscribe {channel}")

    def changed(self, folder: str | None, path: str = "") -> None:
        """Folder ``path`` of ``folder`` changed here: tell this instance's
        listeners and the others.  The message is ``INSTANCE_ID``, then a newline
        and the path when it is not the top (paths hold no control characters)."""
        self.hub.changed(folder, path)
        if self._link.up:
            message = self._link.instance_id + (f"\n{path}" if path else "")
            self._link.command("PUBLISH", self.channel(folder), message).addErrback(
                _log_failure("could not publish a change")
            )

    def close(self) -> None:
        self.hub.close()

    def settled(self) -> Deferred:
        """Fires when the (un)subscriptions sent so far are confirmed (or failed)."""
        return defer.DeferredList(list(self._ops), consumeErrors=True).addCallback(lambda _: None)

    def _track(self, d: Deferred, what: str) -> Deferred:
        self._ops.add(d)

        def done(result: Any) -> Any:
            self._ops.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(_log_failure(what))
        return d

    def _received(self, channel: str, message: str) -> None:
        origin, _, path = message.partition("\n")
        if channel not in self._channels or origin == self._link.instance_id:
            return
        self.hub.changed(self._channels[channel], path)

    def _resubscribe(self) -> None:
        """The subscription connection is (back) up: subscribe again, then catch up.

        Changes made on other instances while it was down were not heard, so
        every folder with listeners gets a fresh list once its subscription
        is in place.
        """
        for channel, folder in list(self._channels.items()):
            d = self._link.subscribe(channel)
            d.addCallback(lambda _, folder=folder: self.hub.changed(folder))
            self._track(d, f"could not subscribe to {channel}")


# -- quotas --------------------------------------------------------------------


class SharedReservation(Reservation):
    """A reservation that also lives in Redis while Redis is there."""

    def __init__(self, ledger: RedisQuotaLedger, client: str, field: str, size: int) -> None:
        super().__init__(ledger, client, size)
        self.shared_ledger = ledger
        self.field = field
        self.client = client
        ledger._hold(self)

    def release(self) -> None:
        if self.size:
            self.shared_ledger._release(self)
            self.size = 0


class RedisQuotaLedger(QuotaLedger):
    """QuotaLedger whose reservations count on every instance.

    Each client has a hash ``PREFIX quota:CLIENT`` of reservation id to bytes.
    ``reserve`` lists the folder (files + kept partials, like QuotaLedger),
    then RESERVE_SCRIPT adds the reservation only if the live reservations of
    all instances plus this one fit in what the quota leaves; then it lists
    again and checks once more, because a save on another instance may have
    committed (and released its reservation) in between.

    ``reserved(client)`` is this instance's share.  While Redis is down,
    ``check``/``reserve`` behave like QuotaLedger with this instance's
    reservations only: reservations held on other instances are not enforced.
    """

    def __init__(
        self,
        default: int | None,
        override: Callable[[str], int | None],
        link: RedisLink,
    ) -> None:
        super().__init__(default, override)
        self._link = link
        self._live: dict[str, dict[str, int]] = {}
        self._touched: set[str] = set()
        self._serial = itertools.count(1)
        link.on_resync.append(self._resync)

    def key(self, client: str) -> str:
        return f"{self._link.prefix}quota:{client}"

    async def check(self, client: str, folder: IFolder, name: str, size: int) -> None:
        quota = self.quota_of(client)
        if quota is None:
            return
        if self._link.up:
            room = quota - await self._usage(folder, name)
            try:
                ok, others = await self._reserve_script(client, "", size, room)
            except SHARED_FAILURES as e:
                _falling_back("quota check of this instance only", e)
            else:
                if not ok:
                    raise _exceeded(quota - room + others + size, quota)
                return
        await super().check(client, folder, name, size)

    async def reserve(
        self, client: str, folder: IFolder, name: str | None, size: int
    ) -> Reservation:
        field = f"{self._link.instance_id}:{next(self._serial)}"
        reservation = SharedReservation(self, client, field, size)
        try:
            quota = self.quota_of(client)
            if quota is not None and not await self._reserve_shared(
                reservation, quota, folder, name
            ):
                await self._fits(client, folder, name, 0)  # Redis is out: this instance only
        except BaseException:
            reservation.release()
            raise
        return reservation

    async def shared_reserved(self, client: str) -> int | None:
        """Bytes reserved for ``client`` on all live instances; None while Redis is down."""
        try:
            _, total = await self._reserve_script(client, "", 0, 0)
        except SHARED_FAILURES:
            return None
        return total

    async def _reserve_shared(
        self, reservation: SharedReservation, quota: int, folder: IFolder, name: str | None
    ) -> bool:
        """Hold the reservation in Redis; False if Redis could not be asked."""
        if not self._link.up:
            return False
        client, size = reservation.client, reservation.size
        room = quota - await self._usage(folder, name)
        self._touched.add(client)
        try:
            ok, others = await self._reserve_script(client, reservation.field, size, room)
        except SHARED_FAILURES as e:
            _falling_back("quota reservation on this instance only", e)
            return False
        if not ok:
            raise _exceeded(quota - room + others + size, quota)
        # Held everywhere.  A save elsewhere may have committed between the
        # listing and the script: check again with a fresh listing.
        room = quota - await self._usage(folder, name)
        try:
            ok, others = await self._reserve_script(client, "", 0, room)
        except SHARED_FAILURES as e:
            _falling_back("quota re-check skipped", e)
            return True  # the atomic check passed; nothing better to go by
        if not ok:
            raise _exceeded(quota - room + others, quota)
        return True

    async def _usage(self, folder: IFolder, name: str | None) -> int:
        """Bytes the folder holds (files and kept partials) that a save of ``name`` keeps."""
        return await bytes_kept(folder, name)

    async def _reserve_script(
        self, client: str, field: str, size: int, room: int
    ) -> tuple[bool, int]:
        link = self._link
        ok, total = await link.eval(
            RESERVE_SCRIPT,
            [self.key(client)],
            [field, size, room, link.instance_key_prefix, link.ttl_ms],
        )
        return bool(int(ok)), int(total)

    def _hold(self, reservation: SharedReservation) -> None:
        self._reserved[reservation.client] += reservation.size
        self._live.setdefault(reservation.client, {})[reservation.field] = reservation.size

    def _release(self, reservation: SharedReservation) -> None:
        client = reservation.client
        self._reserved[client] -= reservation.size
        if self._reserved[client] <= 0:
            del self._reserved[client]
        live = self._live.get(client, {})
        live.pop(reservation.field, None)
        if not live:
            self._live.pop(client, None)
        if self._link.up and client in self._touched:
            self._link.command("HDEL", self.key(client), reservation.field).addErrback(
                _log_failure("could not release a reservation in Redis")
            )

    def _resync(self) -> list[Deferred]:
        """Rewrite this instance's reservations (after an outage, and on each heartbeat)."""
        link = self._link
        done = []
        for client in sorted(self._touched | set(self._live)):
            self._touched.add(client)
            pairs = [
                item for field_size in self._live.get(client, {}).items() for item in field_size
            ]
            d = link.eval(
                RESYNC_RESERVATIONS_SCRIPT,
                [self.key(client)],
                [link.instance_id, link.ttl_ms, *pairs],
            )
            d.addCallback(lambda _, client=client: self._forget(client))
            done.append(d.addErrback(_log_failure("could not rewrite reservations in Redis")))
        return done

    def _forget(self, client: str) -> None:
        if client not in self._live:
            self._touched.discard(client)


def _exceeded(needed: int, quota: int) -> ProtocolError:
    return ProtocolError(
        errors.QUOTA_EXCEEDED, f"this save needs {needed} bytes of a {quota}-byte quota"
    )


# -- connection counts -----------------------------------------------------------


class RedisConnectionCounter:
    """ConnectionSlots whose per-client limit counts every instance's connections.

    Total and per-IP limits stay local (``local``).  Each instance writes its
    own count for a client as field ``ID`` of hash ``PREFIX conns:CLIENT``;
    ``refusal`` sets it one higher only if the live counts of all instances
    then stay within the limit (TAKE_CONNECTION_SCRIPT).  When it answers
    None the caller must ``take`` at once (and may ``release`` right away if
    the connection is gone meanwhile).  Counts are written as absolute values,
    so a lost write is healed by the next one or the next heartbeat.  While
    Redis is down the per-client limit is per instance.
    """

    def __init__(self, local: ConnectionSlots, link: RedisLink) -> None:
        self.local = local
        self._link = link
        self._mine: Counter[str] = Counter()
        self._pending: Counter[str] = Counter()
        self._touched: set[str] = set()
        link.on_resync.append(self._resync)

    @property
    def limits(self) -> Limits:
        return self.local.limits

    @property
    def total(self) -> int:
        return self.local.total

    def key(self, client: str) -> str:
        return f"{self._link.prefix}conns:{client}"

    async def refusal(self, client: str, ip: str) -> tuple[int, str] | None:
        """The HTTP status and reason if a new connection would break a limit."""
        refusal = self.local.refusal(client, ip)
        if refusal is not None or not self._link.up:
            return refusal
        link = self._link
        self._pending[client] += 1
        self._touched.add(client)
        try:
            ok, _ = await link.eval(
                TAKE_CONNECTION_SCRIPT,
                [self.key(client)],
                [
                    link.instance_id,
                    self._mine[client] + self._pending[client],
                    self.limits.per_client,
                    link.instance_key_prefix,
                    link.ttl_ms,
                ],
            )
        except SHARED_FAILURES as e:
            _falling_back("connection counted on this instance only", e)
            return None  # the local limits said yes
        finally:
            self._pending[client] -= 1
            if self._pending[client] <= 0:
                del self._pending[client]
        if not int(ok):
            self._write(client)  # undo a pending count that the script may have written
            return 429, "too many connections for this client"
        return None

    def take(self, client: str, ip: str) -> None:
        self.local.take(client, ip)
        self._mine[client] += 1
        self._write(client)

    def release(self, client: str, ip: str) -> None:
        self.local.release(client, ip)
        self._mine[client] -= 1
        if self._mine[client] <= 0:
            del self._mine[client]
        self._write(client)

    async def shared_count(self, client: str) -> int | None:
        """Connections of ``client`` on all live instances; None while Redis is down."""
        link = self._link
        try:
            _, others = await link.eval(
                TAKE_CONNECTION_SCRIPT,
                [self.key(client)],
                ["", 0, -1, link.instance_key_prefix, link.ttl_ms],
            )
        except SHARED_FAILURES:
            return None
        return int(others)

    def _write(self, client: str, written: Callable[[], None] | None = None) -> Deferred | None:
        """Write this instance's count for ``client`` (then call ``written``)."""
        link = self._link
        if not link.up:
            return None
        self._touched.add(client)
        count = self._mine[client] + self._pending[client]
        d = link.eval(
            SET_CONNECTIONS_SCRIPT, [self.key(client)], [link.instance_id, count, link.ttl_ms]
        )
        if written is not None:
            d.addCallback(lambda _: written())
        return d.addErrback(_log_failure("could not write a connection count to Redis"))

    def _resync(self) -> list[Deferred]:
        done = []
        for client in sorted(self._touched | set(self._mine)):
            d = self._write(client, lambda client=client: self._forget(client))
            if d is not None:
                done.append(d)
        return done

    def _forget(self, client: str) -> None:
        if not self._mine[client] and not self._pending[client]:
            self._touched.discard(client)


# -- all of it -------------------------------------------------------------------


class RedisState:
    """What ``--redis URL`` adds to one instance: built, started and stopped together."""

    def __init__(
        self,
        url: str,
        *,
        storage: IStorage,
        reactor: Any,
        limits: Limits,
        quota: int | None,
        quota_override: Callable[[str], int | None],
        **link_options: Any,
    ) -> None:
        self.link = RedisLink(url, reactor=reactor, **link_options)
        self.changes = RedisChangeBus(storage, reactor, self.link)
        self.quota = RedisQuotaLedger(quota, quota_override, self.link)
        self.slots = RedisConnectionCounter(ConnectionSlots(limits), self.link)
        # An object store tags its uploads with this instance, so that a
        # sweep on any instance can tell a crashed instance's from live ones.
        share_instance = getattr(storage, "share_instance", None)
        if share_instance is not None:
            share_instance(self.link.instance_id, self.instance_alive)

    def instance_alive(self, instance_id: str) -> Deferred:
        """True while ``instance_id``'s liveness key exists, False once it is
        gone (a stop, or ``ttl`` after a crash), None while Redis is down."""

        def unknown(failure: Failure) -> None:
            _log_failure("could not ask Redis whether an instance is alive")(failure)
            return None

        key = self.link.instance_key_prefix + instance_id
        return self.link.command("EXISTS", key).addCallbacks(lambda n: bool(int(n)), unknown)

    def start(self) -> None:
        self.link.start()

    def stop(self) -> Deferred:
        self.changes.close()
        return Deferred.fromCoroutine(self.link.stop())

    def health(self) -> dict[str, str]:
        return self.link.health()
