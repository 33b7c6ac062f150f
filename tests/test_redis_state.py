"""Several instances sharing state through a real Redis (wsfiles/redisstate.py).

Each test runs Debian's ``redis-server`` on a free loopback port as a child
process and builds two (or three) "instances" in this process: a RedisState
each, on their own connections, over one storage double (the shared disk).
"""

from __future__ import annotations

import itertools
import json
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor
from twisted.internet.defer import Deferred

from wsfiles import errors
from wsfiles.admission import Limits
from wsfiles.errors import ProtocolError
from wsfiles.storage import FileInfo, NotFound

txredisapi = pytest.importorskip("txredisapi")

from wsfiles.redisstate import RedisAddress, RedisLink, RedisState  # noqa: E402

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (apt-get install redis-server)"
)

WAIT = 5.0  # seconds any single awaited step may take
IP = "192.0.2.1"
LIMITS = Limits(total=100, per_client=3, per_ip=100)
QUOTA = 1000


def _within(d: Any, seconds: float = WAIT) -> Deferred:
    return defer.ensureDeferred(d).addTimeout(seconds, reactor)


# -- the Redis server ----------------------------------------------------------


# -- doubles ---------------------------------------------------------------------


class FakeFolder:
    def __init__(self) -> None:
        self.files: dict[str, int] = {}
        self.partials: dict[str, int] = {}
        #: Runs after each listing: lets a test change the folder in between.
        self.after_list: Callable[[], None] | None = None

    def list(self) -> Deferred:
        files = [FileInfo(name, size, 0.0) for name, size in sorted(self.files.items())]
        if self.after_list is not None:
            self.after_list()
        return defer.succeed(files)

    def partial_bytes(self) -> Deferred:
        return defer.succeed(dict(self.partials))

    def usage(self) -> Deferred:
        """(bytes, entries) of the tree: a flat folder here."""
        usage = (sum(self.files.values()), len(self.files))
        if self.after_list is not None:
            self.after_list()
        return defer.succeed(usage)

    def stat(self, name: str) -> Deferred:
        if name not in self.files:
            return defer.fail(NotFound(name))
        return defer.succeed(FileInfo(name, self.files[name], 0.0))


class FakeStorage:
    """The disk the instances share."""

    def __init__(self) -> None:
        self.folders: dict[str | None, FakeFolder] = {}

    def folder(self, client: str | None) -> FakeFolder:
        return self.folders.setdefault(client, FakeFolder())


class Inbox:
    """A ``changed`` listener that remembers what it got and can be waited on."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiters: list[tuple[int, Deferred]] = []

    def __call__(self, payload: bytes) -> None:
        self.events.append(json.loads(payload))
        for waiter in list(self._waiters):
            if len(self.events) >= waiter[0]:
                self._waiters.remove(waiter)
                waiter[1].callback(self.events[waiter[0] - 1])

    def event(self, number: int) -> Deferred:
        """The ``number``-th event (1-based), once it has arrived."""
        if len(self.events) >= number:
            return defer.succeed(self.events[number - 1])
        d: Deferred = Deferred()
        self._waiters.append((number, d))
        return d.addTimeout(WAIT, reactor)


def count_hub_calls(state: RedisState) -> list[str | None]:
    """Record every folder the instance's local hub is told about."""
    calls: list[str | None] = []
    hub = state.changes.hub
    original = hub.changed

    def changed(folder: str | None, path: str = "") -> None:
        calls.append(folder)
        original(folder, path)

    hub.changed = changed  # type: ignore[method-assign]
    return calls


# -- instances -----------------------------------------------------------------


@pytest.fixture
def storage() -> FakeStorage:
    return FakeStorage()


@pytest.fixture
def instances(redis_server, storage):
    """``await instances()`` makes a started instance; all are stopped at teardown."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    made: list[RedisState] = []

    async def make(
        url: str | None = None, wait: bool = True, name: str | None = None
    ) -> RedisState:
        state = RedisState(
            url or redis_server.url,
            storage=storage,
            reactor=reactor,
            limits=LIMITS,
            quota=QUOTA,
            quota_override=lambda _: None,
            prefix=prefix,
            retry=(0.05, 0.2),
            name=name,
        )
        made.append(state)
        state.start()
        if wait:
            await _within(state.link.when_up())
        return state

    yield make
    for state in made:
        pytest_twisted.blockon(_within(state.stop()))


@pytest_twisted.async_yield_fixture
async def pair(instances):
    yield await instances(name="a"), await instances(name="b")


async def settled(*states: RedisState) -> None:
    for state in states:
        await _within(state.changes.settled())


async def try_connect(state: RedisState, client: str) -> tuple[int, str] | None:
    """What the command channel does: ask, and take the slot at once if allowed."""
    refusal = await state.slots.refusal(client, IP)
    if refusal is None:
        state.slots.take(client, IP)
    return refusal


def next_failure(service: Any) -> Deferred:
    """The next failed attempt of a txredisapi slot's ClientService.

    Delivered in a later reactor turn: resuming the test inside the service's
    state machine would make anything that stops the service reentrant.
    """
    outcome: Deferred = Deferred()
    attempt = service.whenConnected(failAfterFailures=1)
    attempt.addBoth(lambda result: reactor.callLater(0, outcome.callback, result))
    return outcome


def outcomes(results: list[tuple[bool, Any]]) -> tuple[list[Any], list[Any]]:
    granted = [value for ok, value in results if ok]
    refused = [failure.value for ok, failure in results if not ok]
    return granted, refused


# -- the URL -------------------------------------------------------------------


def test_redis_urls_are_parsed_and_shown_without_the_password():
    address = RedisAddress.parse("redis://:s%40cret@cache.example:6380/2")
    assert (address.host, address.port, address.db, address.password) == (
        "cache.example",
        6380,
        2,
        "s@cret",
    )
    assert str(address) == "redis://cache.example:6380/2"
    assert RedisAddress.parse("redis://localhost") == RedisAddress()
    assert RedisAddress.parse("rediss://u:p@h").tls
    for bad in ("http://localhost", "redis://h:port", "redis://h/x", "redis://h/?db=1"):
        with pytest.raises(ValueError):
            RedisAddress.parse(bad)


def test_instance_ids_are_unique_per_process_even_with_a_name():
    first, second = (RedisLink("redis://localhost", name="web-1") for _ in range(2))
    assert first.instance_id.startswith("web-1-")
    assert first.instance_id != second.instance_id
    assert first.instance_key == f"wsfiles:instance:{first.instance_id}"
    with pytest.raises(ValueError):
        RedisLink("redis://localhost", name="web:1")


# -- changed events --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_change_reaches_every_listener_of_every_instance_once(pair, storage):
    a, b = pair
    storage.folder("alice").files["notes.txt"] = 5
    alice_a, alice_b1, alice_b2, bob_a, bob_b = (Inbox() for _ in range(5))
    a.changes.subscribe("alice", alice_a)
    b.changes.subscribe("alice", alice_b1)
    b.changes.subscribe("alice", alice_b2)
    a.changes.subscribe("bob", bob_a)
    b.changes.subscribe("bob", bob_b)
    await settled(a, b)
    calls_a, calls_b = count_hub_calls(a), count_hub_calls(b)

    a.changes.changed("alice")
    expected = {"op": "changed", "files": [{"name": "notes.txt", "size": 5, "mtime": 0.0}]}
    for inbox in (alice_a, alice_b1, alice_b2):
        assert await inbox.event(1) == expected

    # A later change from the other side: Redis delivers in order, so anything
    # more about alice (A hearing its own publication, say) would be in by then.
    b.changes.changed("bob")
    await bob_a.event(1)
    await bob_b.event(1)
    assert [len(inbox.events) for inbox in (alice_a, alice_b1, alice_b2, bob_a, bob_b)] == [1] * 5
    assert calls_a == ["alice", "bob"]
    assert calls_b == ["alice", "bob"]


@pytest_twisted.ensureDeferred
async def test_an_instance_listens_to_a_folder_while_it_has_listeners_there(pair):
    a, b = pair
    channel = a.changes.channel(None)
    assert channel.endswith("changed:@anonymous")

    async def subscribers() -> int:
        await settled(a, b)
        return int((await _within(a.link.command("PUBSUB", "NUMSUB", channel)))[1])

    first, second, here = Inbox(), Inbox(), Inbox()
    b.changes.subscribe(None, first)
    b.changes.subscribe(None, second)
    a.changes.subscribe(None, here)
    assert await subscribers() == 2
    b.changes.unsubscribe(None, first)
    assert await subscribers() == 2
    b.changes.unsubscribe(None, second)
    assert await subscribers() == 1

    b.changes.changed(None)  # b has no listener left, a still hears it
    assert (await here.event(1))["files"] == []
    a.changes.unsubscribe(None, here)
    assert await subscribers() == 0
    assert first.events == second.events == []


# -- quotas ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_concurrent_reservations_on_two_instances_never_exceed_the_quota(pair, storage):
    a, b = pair
    folder = storage.folder("carol")
    folder.files["old"] = 100
    folder.partials["interrupted"] = 50  # kept partials count too: 850 bytes are left
    attempts = [
        Deferred.fromCoroutine(state.quota.reserve("carol", folder, f"f{i}", 200))
        for i, state in zip(range(12), itertools.cycle([a, b]))
    ]
    granted, refused = outcomes(await _within(defer.DeferredList(attempts, consumeErrors=True)))

    assert len(granted) == 4  # 4 x 200 <= 850 < 5 x 200
    assert len(refused) == 8
    assert all(isinstance(e, ProtocolError) for e in refused)
    assert {e.code for e in refused} == {errors.QUOTA_EXCEEDED}
    assert a.quota.reserved("carol") + b.quota.reserved("carol") == 800
    assert await a.quota.shared_reserved("carol") == 800
    assert await b.quota.shared_reserved("carol") == 800

    # check() sees the other instance's reservations too
    with pytest.raises(ProtocolError):
        await b.quota.check("carol", folder, "new", 51)
    await a.quota.check("carol", folder, "new", 50)
    await b.quota.check("carol", folder, "old", 150)  # replacing counts the difference only

    # a release on one instance makes room on the other
    released = granted[0]
    owner = a if released.shared_ledger is a.quota else b
    released.release()
    released.release()  # only once
    assert await owner.quota.shared_reserved("carol") == 600  # same connection: after the HDEL
    other = b if owner is a else a
    more = await other.quota.reserve("carol", folder, "g", 250)
    assert await other.quota.shared_reserved("carol") == 850
    for reservation in [*granted, more]:
        reservation.release()
    await a.quota.shared_reserved("carol")  # behind a's releases; then b's query is behind all
    assert await b.quota.shared_reserved("carol") == 0


@pytest_twisted.ensureDeferred
async def test_a_save_committed_elsewhere_during_a_reservation_is_counted(pair, storage):
    a, b = pair
    folder = storage.folder("dave")
    held = await b.quota.reserve("dave", folder, "first", 600)

    def commit_elsewhere() -> None:  # after the first listing, before the second
        folder.after_list = None
        folder.files["landed"] = 300

    folder.after_list = commit_elsewhere
    with pytest.raises(ProtocolError) as refused:
        await a.quota.reserve("dave", folder, "second", 300)
    assert refused.value.code == errors.QUOTA_EXCEEDED
    assert a.quota.reserved("dave") == 0
    assert await a.quota.shared_reserved("dave") == 600
    held.release()


@pytest_twisted.ensureDeferred
async def test_a_crashed_instances_reservations_and_connections_stop_counting(instances, storage):
    a = await instances()
    crashed = await instances()
    folder = storage.folder("erin")
    await crashed.quota.reserve("erin", folder, "big", 900)
    assert await try_connect(crashed, "erin") is None
    assert await try_connect(crashed, "erin") is None
    with pytest.raises(ProtocolError):
        await a.quota.check("erin", folder, "small", 200)
    assert await try_connect(a, "erin") is None
    assert await try_connect(a, "erin") == (429, "too many connections for this client")

    # Every key has an expiry: the instance key (renewed by the heartbeat) and the hashes.
    for key in (crashed.link.instance_key, crashed.quota.key("erin"), crashed.slots.key("erin")):
        assert 0 < await a.link.command("PTTL", key) <= crashed.link.ttl_ms

    # The crashed instance's key expires (here: now) and what it held stops counting.
    await a.link.command("DEL", crashed.link.instance_key)
    await a.quota.check("erin", folder, "small", 1000)
    assert await try_connect(a, "erin") is None
    assert await try_connect(a, "erin") is None
    assert await a.slots.shared_count("erin") == 3
    assert await a.link.command("HKEYS", a.quota.key("erin")) == []  # cleaned away
    assert await a.link.command("HKEYS", a.slots.key("erin")) == [a.link.instance_id]


@pytest_twisted.ensureDeferred
async def test_the_heartbeat_renews_the_instance_and_heals_what_it_holds(pair, storage):
    a, b = pair
    folder = storage.folder("lee")
    listener = Inbox()
    b.changes.subscribe("lee", listener)
    a.changes.subscribe("lee", Inbox())
    await settled(a, b)
    held = await a.quota.reserve("lee", folder, "f", 100)
    assert await try_connect(a, "lee") is None

    # What a lost write, an eviction or a late heartbeat can leave behind:
    await b.link.command("DEL", a.link.instance_key, a.quota.key("lee"))
    await b.link.command("HSET", a.slots.key("lee"), a.link.instance_id, "3")

    assert await _within(a.link.heartbeat()) is True  # both connections answered
    assert 0 < await b.link.command("PTTL", a.link.instance_key) <= a.link.ttl_ms
    assert await b.quota.shared_reserved("lee") == 100
    assert await b.slots.shared_count("lee") == 1
    a.changes.changed("lee")  # the PINGed subscription connection still delivers
    await listener.event(1)
    held.release()
    a.slots.release("lee", IP)


# -- connection counts -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_per_client_are_counted_across_instances(pair):
    a, b = pair
    assert await try_connect(a, "frank") is None
    assert await try_connect(a, "frank") is None
    assert await try_connect(b, "frank") is None
    assert await try_connect(b, "frank") == (429, "too many connections for this client")
    assert await try_connect(a, "frank") == (429, "too many connections for this client")
    assert await try_connect(b, "someone-else") is None
    assert (a.slots.total, b.slots.total) == (2, 2)
    assert await b.slots.shared_count("frank") == 3

    a.slots.release("frank", IP)
    assert await a.slots.shared_count("frank") == 2  # same connection: after the write
    assert await try_connect(b, "frank") is None
    assert await b.slots.shared_count("frank") == 3

    # Concurrent handshakes on both instances: the limit holds exactly.
    attempts = [
        Deferred.fromCoroutine(try_connect(state, "gina"))
        for _, state in zip(range(8), itertools.cycle([a, b]))
    ]
    results = await _within(defer.DeferredList(attempts, consumeErrors=True))
    answers = [value for ok, value in results if ok]
    assert len(answers) == 8
    assert answers.count(None) == 3
    assert await a.slots.shared_count("gina") == 3
    assert await b.slots.shared_count("gina") == 3


# -- Redis going away and coming back --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_instances_keep_serving_while_redis_is_down_and_resync_when_it_returns(
    pair, storage, redis_server
):
    a, b = pair
    folder = storage.folder("ivy")
    on_a, on_b = Inbox(), Inbox()
    a.changes.subscribe("ivy", on_a)
    b.changes.subscribe("ivy", on_b)
    await settled(a, b)
    assert a.health() == b.health() == {"redis": "up"}

    redis_server.stop()
    await _within(a.link.when_down())
    await _within(b.link.when_down())
    assert a.health() == b.health() == {"redis": "down"}
    assert await _within(a.link.heartbeat()) is False
    calls_b = count_hub_calls(b)

    # Changes: local only.
    folder.files["during"] = 1
    a.changes.changed("ivy")
    assert (await on_a.event(1))["files"] == [{"name": "during", "size": 1, "mtime": 0.0}]
    assert on_b.events == [] and calls_b == []

    # Quota: each instance enforces its own reservations only.
    on_instance_a = await a.quota.reserve("ivy", folder, "x", 900)
    with pytest.raises(ProtocolError):
        await a.quota.reserve("ivy", folder, "y", 200)
    on_instance_b = await b.quota.reserve("ivy", folder, "z", 900)  # not enforced across

    # Connections: per-client limits per instance (2 + 2 > 3 goes unnoticed).
    for _ in range(2):
        assert await try_connect(a, "jack") is None
        assert await try_connect(b, "jack") is None

    # Redis returns on the same port.
    redis_server.start()
    await _within(a.link.when_up())
    await _within(b.link.when_up())
    await settled(a, b)
    assert a.health() == b.health() == {"redis": "up"}
    # Both resubscribed and sent their listeners a fresh list (changes made
    # elsewhere during the outage were not heard).
    assert (await on_b.event(1))["files"] == [{"name": "during", "size": 1, "mtime": 0.0}]
    await on_a.event(2)

    # What was held during the outage is in Redis again (asking through both
    # connections: each is behind its own instance's rewrite).
    await b.quota.shared_reserved("ivy")
    assert await a.quota.shared_reserved("ivy") == 1800
    await b.slots.shared_count("jack")
    assert await a.slots.shared_count("jack") == 4
    assert await try_connect(b, "jack") == (429, "too many connections for this client")
    with pytest.raises(ProtocolError):
        await b.quota.check("ivy", folder, "w", 1)

    # Events cross instances again.
    folder.files["after"] = 2
    a.changes.changed("ivy")
    assert [f["name"] for f in (await on_b.event(2))["files"]] == ["after", "during"]
    await on_a.event(3)
    on_instance_a.release()
    assert await a.quota.shared_reserved("ivy") == 900
    on_instance_b.release()
    assert await b.quota.shared_reserved("ivy") == 0
    for state in (a, b):
        for _ in range(2):
            state.slots.release("jack", IP)
    await b.slots.shared_count("jack")
    assert await a.slots.shared_count("jack") == 0


@pytest_twisted.ensureDeferred
async def test_an_instance_starts_without_redis_and_connects_when_it_comes(
    instances, storage, redis_server
):
    redis_server.stop()
    a = await instances(wait=False)
    for factory in a.link._factories:  # both connections have been refused at least once
        with pytest.raises(error.ConnectionRefusedError):
            await _within(next_failure(factory.slots[0].service))
    assert a.health() == {"redis": "down"}
    listener = Inbox()
    a.changes.subscribe("kim", listener)
    held = await a.quota.reserve("kim", storage.folder("kim"), "k", 10)
    assert await try_connect(a, "kim") is None

    redis_server.start()
    await _within(a.link.when_up())
    await settled(a)
    await listener.event(1)  # a fresh list once subscribed
    assert await a.quota.shared_reserved("kim") == 10  # rewritten on reconnection
    assert await a.slots.shared_count("kim") == 1
    b = await instances()
    assert await b.quota.shared_reserved("kim") == 10
    assert await try_connect(b, "kim") is None
    assert await b.slots.shared_count("kim") == 2
    b.slots.release("kim", IP)
    held.release()
    a.slots.release("kim", IP)


# -- which instances are alive (for an object store's sweep) ----------------------


@pytest_twisted.ensureDeferred
async def test_an_object_store_is_told_the_instance_id_and_who_is_alive(
    instances, storage, redis_server
):
    told: dict[str, Any] = {}
    storage.share_instance = lambda instance_id, alive: told.update(id=instance_id, alive=alive)
    a = await instances(name="a")
    assert told["id"] == a.link.instance_id  # its uploads are tagged with this
    b = await instances(name="b")
    assert told["id"] == b.link.instance_id
    alive = told["alive"]  # b asking
    assert await _within(alive(a.link.instance_id)) is True
    assert await _within(alive("a-0123456789abcdef")) is False  # never was, or expired
    await _within(a.stop())  # a stop deletes the key at once (a crash: after the ttl)
    assert await _within(alive(a.link.instance_id)) is False
    redis_server.stop()
    await _within(b.link.when_down())
    assert await _within(alive(a.link.instance_id)) is None  # nobody can tell
