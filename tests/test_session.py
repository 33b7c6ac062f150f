"""CommandSession without a network: fake channels, a fake clock, real folders."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import interfaces, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from wsfiles import changes
from wsfiles.changes import ChangeHub
from wsfiles.config import Settings
from wsfiles.pairing import PairingRegistry
from wsfiles.quota import QuotaLedger
from wsfiles.session import CommandSession
from wsfiles.storage.local import LocalStorage
from wsfiles.streaming import DOWNLOAD_FRAME


@implementer(interfaces.IConsumer)
class FakeFileChannel:
    """Records what the session sends; a consumer with no flow control."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self._current: list[bytes] | None = None
        self.closed_with: int | None = None
        self.producer: Any = None
        #: Act like a peer that stops reading: pause the producer for good.
        self.pause_after_first_write = False

    def begin_message(self) -> FakeFileChannel:
        self._current = []
        return self

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        assert self._current is not None
        self._current.append(data)
        if self.pause_after_first_write and self.producer is not None:
            self.producer.pauseProducing()

    def end_message(self) -> None:
        assert self._current is not None
        self.messages.append(b"".join(self._current))
        self._current = None

    def abort(self, code: int, reason: str) -> None:
        self.closed_with = code

    def close(self) -> None:
        self.closed_with = 1000

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Harness:
    def __init__(
        self, tmp_path, max_size: int = 1000, quota: QuotaLedger | None = None, **settings: Any
    ) -> None:
        self.clock = Clock()
        self.storage = LocalStorage(str(tmp_path / "root"))
        self.registry = PairingRegistry(self.clock, channel_timeout=5)
        self.sent: list[dict[str, Any]] = []
        self._waiting: dict[str, Deferred] = {}
        self.closed_with: tuple[int, str] | None = None
        self.settings = Settings(max_size=max_size, **settings)
        self.session = CommandSession(
            "anonymous",
            self.storage.folder(None),
            self.registry,
            self.settings,
            self._record,
            clock=self.clock,
            close_connection=self._close,
            quota=quota,
        )
        self.session.start()
        self.channel = FakeFileChannel()

    def _record(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        waiter = self._waiting.pop(message["op"], None)
        if waiter is not None:
            # On the next turn, as a real peer's answer would come: the session
            # finishes what it was doing before the test reacts.
            reactor.callLater(0, waiter.callback, message)

    def _close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    def reply(self, op: str) -> Deferred:
        """The next message ``op`` (commits fsync in a thread, so it comes later)."""
        self._waiting[op] = Deferred()
        return self._waiting[op].addTimeout(10, reactor)

    def command(self, **message: Any) -> None:
        self.session.text_received(json.dumps(message).encode())

    def attach(self) -> None:
        """Redeem the ticket from the last ``channel`` message, as transfer.py does."""
        ticket = self.sent[-1]["url"].split("ticket=")[1]
        holder = self.registry.redeem(ticket)
        assert holder is self.session
        self.session.claim(self.channel)
        self.session.attach(self.channel)

    def upload(self, data: bytes, frames: int = 1) -> None:
        self.session.file_message_begin(self.channel, True)
        step = max(1, len(data) // frames)
        for i in range(0, len(data), step):
            chunk = data[i : i + step]
            if not self.session.file_frame_begin(self.channel, len(chunk)):
                return
            self.session.file_data(self.channel, chunk)
        self.session.file_message_end(self.channel)

    @property
    def ops(self) -> list[str]:
        return [m["op"] if m["op"] != "error" else "error:" + m["code"] for m in self.sent]

    @property
    def root(self):
        return self.storage.root


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.session.close()


def test_hello_first(h):
    assert h.sent[0] == {
        "op": "hello",
        "protocol": 1,
        "features": [
            "resume",
            "range",
            "checksum",
            "delete",
            "rename",
            "changed",
            "chunked",
            "pieces",
            "share",
            "download",
        ],
        "hashes": ["sha256", "blake3"],
        "client": "anonymous",
        "max_size": 1000,
        "files": [],
    }


@pytest_twisted.ensureDeferred
async def test_save_offers_channel_then_stores_atomically(h, tmp_path):
    h.command(op="save", name="a.txt", size=5, id="s1")
    assert h.sent[-1]["op"] == "channel" and h.sent[-1]["id"] == "s1"
    h.attach()
    assert h.sent[-1] == {"op": "ready", "id": "s1"}
    h.upload(b"hello", frames=2)
    ack = await h.reply("ack")
    assert ack == {
        "op": "ack",
        "id": "s1",
        "name": "a.txt",
        "size": 5,
        "sha256": hashlib.sha256(b"hello").hexdigest(),
    }
    with open(f"{h.root}/a.txt", "rb") as f:
        assert f.read() == b"hello"


def test_channel_timeout_then_a_new_ticket(h):
    h.command(op="get", name="missing")
    assert h.ops[-1] == "error:not_found"
    h.command(op="save", name="a", size=1, id=1)
    assert h.ops[-1] == "channel"
    h.clock.advance(5)
    assert h.sent[-1]["code"] == "channel_timeout" and h.sent[-1]["id"] == 1
    assert h.registry.pending_tickets == 0
    h.command(op="save", name="a", size=1, id=2)
    assert h.ops[-1] == "channel" and h.sent[-1]["id"] == 2


def test_list_is_answered_while_a_save_waits_for_data(h):
    h.command(op="save", name="a", size=3)
    h.attach()
    h.command(op="list", id="L")
    assert h.sent[-1] == {"op": "list", "id": "L", "files": []}


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"not json", "bad_request"),
        (b"[1,2]", "bad_request"),
        (b"{}", "bad_request"),
        (b'{"op": 3}', "bad_request"),
        (b'{"op": "list", "id": true}', "bad_request"),
        (b'{"op": "list", "id": 1.5}', "bad_request"),
        (b'{"op": "frobnicate"}', "unknown_op"),
        (b'{"op": "save", "name": "a"}', "bad_request"),
        (b'{"op": "save", "name": "a", "size": -1}', "bad_request"),
        (b'{"op": "save", "name": "a", "size": 1.0}', "bad_request"),
        (b'{"op": "save", "name": "a", "size": true}', "bad_request"),
        (b'{"op": "save", "name": "a", "size": 1001}', "too_large"),
        (b'{"op": "save", "name": 5, "size": 1}', "bad_request"),
        (b'{"op": "save", "name": "..", "size": 1}', "invalid_name"),
        (b'{"op": "save", "name": "a/b", "size": 1}', "invalid_name"),
        (b'{"op": "get", "name": ".wsfiles-tmp"}', "invalid_name"),
        (b'{"op": "get", "name": "\\ud800"}', "invalid_name"),
        (b"[" * 100000 + b"]" * 100000, "bad_request"),
    ],
)
def test_bad_commands_get_stable_codes_and_the_session_goes_on(h, payload, code):
    h.session.text_received(payload)
    assert h.ops[-1] == f"error:{code}"
    h.command(op="list")
    assert h.ops[-1] == "list"
    assert h.registry.pending_tickets == 0


def test_oversized_frame_is_refused_before_its_bytes(h):
    h.command(op="save", name="a", size=10)
    h.attach()
    h.session.file_message_begin(h.channel, True)
    assert h.session.file_frame_begin(h.channel, 11) is False
    assert h.ops[-1] == "error:size_mismatch"
    assert h.session.file_frame_begin(h.channel, 2000) is True  # discarded from now on
    h.session.file_message_end(h.channel)
    assert _temp_files(h) == []


def test_frame_beyond_max_size_is_too_large(h):
    h.command(op="save", name="a", size=10)
    h.attach()
    h.session.file_message_begin(h.channel, True)
    assert h.session.file_frame_begin(h.channel, 1001) is False
    assert h.ops[-1] == "error:too_large"


def test_short_message_is_a_size_mismatch_and_the_channel_goes_on(h):
    h.command(op="save", name="a", size=10)
    h.attach()
    h.upload(b"12345")
    assert h.ops[-1] == "error:size_mismatch"
    assert h.channel.closed_with is None
    assert _temp_files(h) == []
    h.session.file_message_begin(h.channel, True)
    assert h.ops[-1] == "error:unexpected_data"


def test_text_on_the_file_channel_is_not_executed(h):
    h.command(op="save", name="a", size=2)
    h.attach()
    h.session.file_message_begin(h.channel, False)
    h.session.file_data(h.channel, b'{"op":"list"}')
    h.session.file_message_end(h.channel)
    assert h.ops[-1] == "error:wrong_channel"
    h.upload(b"ok")  # the save still waits for its data


def test_binary_on_the_command_channel(h):
    h.session.binary_received()
    assert h.ops[-1] == "error:wrong_channel"


def test_file_channel_lost_mid_upload_removes_the_temp_file(h):
    h.command(op="save", name="a", size=10, id=4)
    h.attach()
    h.session.file_message_begin(h.channel, True)
    h.session.file_frame_begin(h.channel, 10)
    h.session.file_data(h.channel, b"12345")
    assert len(_temp_files(h)) == 1
    h.session.detach(h.channel)
    assert h.sent[-1]["code"] == "channel_closed" and h.sent[-1]["id"] == 4
    assert _temp_files(h) == []
    h.command(op="save", name="a", size=1)
    assert h.ops[-1] == "channel"


def test_closing_the_session_revokes_tickets_and_aborts(h):
    h.command(op="save", name="a", size=10)
    assert h.registry.pending_tickets == 1
    h.session.close()
    assert h.registry.pending_tickets == 0
    assert h.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_get_streams_one_message_and_its_hash(h):
    data = bytes(range(256)) * 2000
    with open(f"{h.root}/f.bin", "wb") as f:
        f.write(data)
    h.command(op="get", name="f.bin", id=1)
    sent = h.reply("sent")
    h.attach()
    assert (await sent)["sha256"] == hashlib.sha256(data).hexdigest()
    assert {"op": "sending", "id": 1, "name": "f.bin", "size": len(data)} in h.sent
    assert h.channel.messages == [data]


def _temp_files(h: Harness) -> list[str]:
    import os

    return os.listdir(os.path.join(h.root, ".wsfiles-tmp"))


# -- hardening: idle, stall, rate limit, quota --------------------------------


def test_idle_command_channel_is_closed_but_pings_do_not_count(tmp_path):
    h = Harness(tmp_path, idle_timeout=300)
    h.clock.advance(299)
    h.command(op="list")  # activity restarts the deadline
    h.clock.advance(299)
    assert h.closed_with is None
    h.clock.advance(1)
    assert h.closed_with == (1000, "idle timeout")
    h.session.close()


def test_no_idle_timeout_while_a_transfer_runs(tmp_path):
    h = Harness(tmp_path, idle_timeout=300, stall_timeout=30, min_rate=0)
    h.command(op="save", name="a", size=40)
    h.attach()
    h.session.file_message_begin(h.channel, True)
    h.session.file_frame_begin(h.channel, 40)
    for _ in range(40):  # 400 s of slow but steady progress
        h.clock.advance(10)
        h.session.file_data(h.channel, b"x")
    assert h.closed_with is None
    assert h.ops[-1] == "ready"  # not stalled: --min-rate 0 takes any byte
    h.session.close()


@pytest_twisted.ensureDeferred
async def test_an_upload_that_trickles_below_min_rate_is_stalled_and_frees_its_quota(tmp_path):
    ledger = QuotaLedger(1000, lambda _: None)
    h = Harness(tmp_path, quota=ledger, stall_timeout=30, min_rate=10)  # 300 bytes per 30 s
    offered = h.reply("channel")  # the quota is checked in a thread (the folder's usage)
    h.command(op="save", name="a", size=900, id=4)
    await offered
    ready = h.reply("ready")
    h.attach()
    await ready
    h.session.file_message_begin(h.channel, True)
    h.session.file_frame_begin(h.channel, 900)
    assert ledger.reserved("anonymous") == 900
    for _ in range(14):  # one byte every two seconds: 14 bytes in 28 s
        h.clock.advance(2)
        h.session.file_data(h.channel, b"x")
    assert h.ops[-1] == "ready"
    h.clock.advance(2)
    assert h.sent[-1]["code"] == "stalled" and h.sent[-1]["id"] == 4
    assert "fewer than 300 bytes moved in 30 s" in h.sent[-1]["message"]
    assert h.channel.closed_with == 1008
    assert ledger.reserved("anonymous") == 0
    h.session.close()


def test_an_upload_at_the_min_rate_goes_on_window_after_window(tmp_path):
    h = Harness(tmp_path, stall_timeout=30, min_rate=10)
    h.command(op="save", name="a", size=900, id=5)
    h.attach()
    h.session.file_message_begin(h.channel, True)
    h.session.file_frame_begin(h.channel, 900)
    for _ in range(3):  # 300 bytes in each 30 s: just enough, three windows running
        h.clock.advance(29)
        h.session.file_data(h.channel, b"x" * 300)
    h.session.file_message_end(h.channel)
    assert not [m for m in h.sent if m.get("code") == "stalled"]
    h.session.close()


def test_stalled_upload_fails_and_removes_its_temp_file(tmp_path):
    h = Harness(tmp_path, stall_timeout=30)
    h.command(op="save", name="a", size=10, id=3)
    h.attach()
    h.session.file_message_begin(h.channel, True)
    h.session.file_frame_begin(h.channel, 10)
    h.session.file_data(h.channel, b"12345")
    h.clock.advance(29)
    assert h.ops[-1] == "ready"
    h.clock.advance(1)
    assert h.sent[-1]["code"] == "stalled" and h.sent[-1]["id"] == 3
    assert h.channel.closed_with == 1008
    assert _temp_files(h) == []
    h.session.close()


def test_stalled_download_fails(tmp_path):
    h = Harness(tmp_path, stall_timeout=30)
    with open(f"{h.root}/f", "wb") as f:
        f.write(b"x" * (3 * DOWNLOAD_FRAME))  # more than one write
    h.channel.pause_after_first_write = True
    h.command(op="get", name="f", id=9)
    h.attach()
    assert h.ops[-1] == "sending"
    h.clock.advance(30)
    assert h.sent[-1]["code"] == "stalled" and h.sent[-1]["id"] == 9
    assert h.channel.closed_with == 1008
    h.session.close()


def test_rate_limit_answers_each_excess_command_in_order(tmp_path):
    h = Harness(tmp_path, rate_limit=5)
    for i in range(8):
        h.command(op="list", id=i)
    replies = h.sent[1:]
    assert [r["op"] for r in replies] == ["list"] * 5 + ["error"] * 3
    assert [r["id"] for r in replies] == list(range(8))
    assert {r["code"] for r in replies[5:]} == {"rate_limited"}
    h.clock.advance(1)  # the bucket refills
    h.command(op="list", id="later")
    assert h.sent[-1]["op"] == "list"
    assert h.closed_with is None
    h.session.close()


def test_transfers_are_charged_once_1000_wait_in_the_transfer_queue(tmp_path):
    """Pipelined saves skip the command rate limit only while fewer than 1000
    commands wait (docs/protocol.md): a client that never sends their data
    must not grow the server's transfer queue without bound."""
    h = Harness(tmp_path, rate_limit=5)
    for i in range(1100):
        h.command(op="save", name=f"f{i}", size=1, id=i)
    refused = [m["id"] for m in h.sent if m.get("code") == "rate_limited"]
    assert refused and min(refused) >= 1000
    h.session.close()


def test_transfers_refused_before_they_queue_are_charged_to_the_rate_limit(tmp_path):
    """A get of a missing name is answered at once: exempt from the rate limit
    only as a transfer, a stream of them would be unthrottled work."""
    h = Harness(tmp_path, rate_limit=5)
    for i in range(5):
        h.command(op="get", name="missing", id=i)
    assert [m.get("code") for m in h.sent if m.get("op") == "error"] == ["not_found"] * 5
    h.command(op="list", id="after")  # the bucket was spent by the refusals
    assert [m.get("code") for m in h.sent if m.get("id") == "after"] == ["rate_limited"]
    for i in range(10 * 5):
        h.command(op="get", name="missing", id=f"more{i}")
    assert h.closed_with == (1008, "too many commands")
    h.session.close()


def test_a_command_flood_closes_the_connection(tmp_path):
    h = Harness(tmp_path, rate_limit=5)
    for _ in range(5 + 10 * 5 + 1):
        h.command(op="list")
    assert h.closed_with == (1008, "too many commands")
    h.session.close()


def test_binary_messages_count_against_the_rate_limit(tmp_path):
    """Each refused binary message is a reply: past the rate they are answered
    rate_limited, and a flood of them closes the connection like one of commands."""
    h = Harness(tmp_path, rate_limit=5)
    for _ in range(7):
        h.session.binary_received()
    assert h.ops[-7:] == ["error:wrong_channel"] * 5 + ["error:rate_limited"] * 2
    h.clock.advance(1)  # the bucket refills
    h.session.binary_received()
    assert h.ops[-1] == "error:wrong_channel"
    assert h.closed_with is None
    for _ in range(5 + 10 * 5 + 1):
        h.session.binary_received()
    assert h.closed_with == (1008, "too many commands")
    h.session.close()


def test_changed_events_are_held_while_the_client_is_not_reading(tmp_path):
    """Each ``changed`` carries the whole listing: while the command channel's
    send buffer is full, only the latest is kept, and it goes out on release."""
    clock = Clock()
    storage = LocalStorage(str(tmp_path / "root"))
    hub = ChangeHub(storage, clock)
    events: list[bytes] = []
    session = CommandSession(
        "anonymous",
        storage.folder(None),
        PairingRegistry(clock, channel_timeout=5),
        Settings(max_size=1000),
        lambda message: None,
        send_raw=events.append,
        clock=clock,
        close_connection=lambda code, reason: None,
        changes=hub,
    )
    session.start()
    session.client_backed_up()
    for name in ("a", "b"):
        (tmp_path / "root" / name).write_bytes(b"x")
        hub.changed(None)
        clock.advance(1)
    assert events == []
    session.client_caught_up()
    assert [[f["name"] for f in json.loads(e)["files"]] for e in events] == [["a", "b"]]
    session.client_caught_up()
    assert len(events) == 1
    (tmp_path / "root" / "c").write_bytes(b"x")
    hub.changed(None)
    clock.advance(1)  # not held any more: sent at once
    assert [f["name"] for f in json.loads(events[-1])["files"]] == ["a", "b", "c"]
    session.close()


def test_commands_wait_unanswered_while_the_client_is_backed_up(h):
    h.session.client_backed_up()
    h.command(op="list", id=1)
    h.command(op="list", id=2)
    assert h.sent[1:] == []  # nothing but hello
    h.session.client_caught_up()
    assert [(m["op"], m["id"]) for m in h.sent[1:]] == [("list", 1), ("list", 2)]


def test_commands_waiting_for_a_reader_end_unanswered_when_the_channel_closes(h):
    h.session.client_backed_up()
    h.command(op="save", name="a", size=1, id=1)
    h.session.close()
    assert h.sent[1:] == []
    assert h.registry.pending_tickets == 0  # the save was not run: no channel offered
    assert h.session._unfinished == 0  # and nothing is left waiting


async def _answer_to(h: Harness, answer: str, **command: Any) -> dict[str, Any]:
    """Send ``command``; its ``answer`` (quota checks read the tree in a thread)."""
    waiting = h.reply(answer)
    h.command(**command)
    return await waiting


@pytest_twisted.ensureDeferred
async def test_quota_counts_replacements_and_uploads_in_flight(tmp_path):
    ledger = QuotaLedger(100, lambda _: None)
    h = Harness(tmp_path, quota=ledger)
    with open(f"{h.root}/old", "wb") as f:
        f.write(b"o" * 60)
    refused = await _answer_to(h, "error", op="save", name="new", size=41, id=1)
    assert refused["code"] == "quota_exceeded"
    # Replacing: only the difference counts.
    await _answer_to(h, "channel", op="save", name="old", size=100, id=2)
    ready = h.reply("ready")
    h.attach()
    await ready
    assert ledger.reserved("anonymous") == 100
    refused = await _answer_to(h, "error", op="save", name="other", size=1, id=3)
    assert refused["code"] == "quota_exceeded"  # the reservation holds
    h.session.close()
    assert ledger.reserved("anonymous") == 0


@pytest_twisted.ensureDeferred
async def test_quota_can_be_reached_exactly(tmp_path):
    h = Harness(tmp_path, quota=QuotaLedger(100, lambda _: None))
    await _answer_to(h, "channel", op="save", name="all", size=100)
    h.session.close()


def test_tickets_carry_the_instance_id(tmp_path):
    from twisted.internet.task import Clock

    registry = PairingRegistry(Clock(), 5, instance_id="b")
    other = PairingRegistry(Clock(), 5, instance_id="a")
    ticket = registry.issue(object())  # type: ignore[arg-type]
    assert ticket.startswith("b.") and len(ticket) > 20
    assert other.redeem(ticket) is None  # another instance never pairs it
    assert registry.redeem(ticket) is not None


def test_a_transfer_queued_behind_an_oversized_upload_gets_a_new_channel(h):
    h.command(op="save", name="a", size=10, id=1)
    h.command(op="save", name="b", size=5, id=2)
    h.attach()
    h.session.file_message_begin(h.channel, True)
    assert h.session.file_frame_begin(h.channel, 20) is False
    replies = [m for m in h.sent if m.get("id") == 2]
    assert replies[-1]["op"] == "channel", replies  # not "ready" on the dying channel


class SlowListFolder:
    """A folder whose listings wait until the test releases them."""

    def __init__(self, folder: Any) -> None:
        self._folder = folder
        self.waiting: list[tuple[Deferred, Deferred]] = []

    def list(self) -> Deferred:
        release: Deferred = Deferred()
        listing: Deferred = release.addCallback(lambda _: self._folder.list())
        self.waiting.append((release, listing))
        return listing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._folder, name)


def test_commands_behind_a_waiting_one_are_answered_in_order(tmp_path):
    clock = Clock()
    storage = LocalStorage(str(tmp_path / "root"))
    folder = SlowListFolder(storage.folder(None))
    sent: list[dict[str, Any]] = []
    session = CommandSession(
        "anonymous",
        folder,
        PairingRegistry(clock, channel_timeout=5),
        Settings(),
        sent.append,
        clock=clock,
        close_connection=lambda code, reason: None,
    )
    session.start()
    assert sent == []  # hello waits for its listing
    session.text_received(b'{"op": "list", "id": 1}')
    session.text_received(b'{"op": "nonsense", "id": 2}')
    assert sent == []  # nothing overtakes hello
    folder.waiting.pop(0)[0].callback(None)  # hello's listing arrives
    assert [(m["op"], m.get("id")) for m in sent] == [("hello", None)]
    folder.waiting.pop(0)[0].callback(None)  # list 1's listing arrives
    assert [(m["op"], m.get("id")) for m in sent] == [
        ("hello", None),
        ("list", 1),
        ("error", 2),
    ]
    session.text_received(b'{"op": "bad", "id": 3}')  # nothing before it: answered at once
    assert sent[-1]["id"] == 3
    session.close()


def test_list_is_read_once_per_change(tmp_path):
    """``list`` answers from the folder's cached listing until a change is heard
    (any session's, through the hub); a file another program puts in the folder
    shows once the cache's LISTING_TTL has passed."""
    clock = Clock()
    storage = LocalStorage(str(tmp_path / "root"))
    hub = ChangeHub(storage, clock)
    replies: list[dict[str, Any]] = []
    session = CommandSession(
        "anonymous",
        storage.folder(None),
        PairingRegistry(clock, channel_timeout=5),
        Settings(max_size=1000),
        replies.append,
        send_raw=lambda payload: replies.append(json.loads(payload)),
        clock=clock,
        close_connection=lambda code, reason: None,
        changes=hub,
    )
    session.start()

    def listed(request_id: Any) -> list[str]:
        session.text_received(json.dumps({"op": "list", "id": request_id}).encode())
        assert replies[-1]["op"] == "list" and replies[-1]["id"] == request_id
        return [f["name"] for f in replies[-1]["files"]]

    assert listed(1) == []
    (tmp_path / "root" / "a").write_bytes(b"x")
    assert listed("two") == []  # the cached listing, with this request's id
    hub.changed(None)  # what a save, delete or rename announces, before its reply
    assert listed(3) == ["a"]
    (tmp_path / "root" / "b").write_bytes(b"x")
    clock.advance(changes.LISTING_TTL)
    assert listed(4) == ["a", "b"]
    session.close()


def test_the_listing_cache_forgets_folders_nobody_hears_and_sweeps_the_expired():
    from wsfiles.changes import ListingCache

    clock = Clock()
    cache = ListingCache(clock, ttl=1.0, budget=10_000)
    cache.put(("alice", "", "1.1"), b"x" * 100, cache.generation)
    cache.put(("bob", "", "1.1"), b"y" * 100, cache.generation)
    # Its last listener left (with Redis, its channel too): changes would go unheard.
    cache.forget("alice")
    assert cache.get(("alice", "", "1.1")) is None
    assert cache.get(("bob", "", "1.1")) == b"y" * 100
    charged = cache._bytes
    assert charged > 100  # an entry costs more than its payload
    clock.advance(2)  # bob's is stale now; nobody asks for it again
    cache.put(("carol", "", "1.1"), b"z" * 100, cache.generation)
    assert cache._bytes == charged  # bob's went when carol's came: expired go first
