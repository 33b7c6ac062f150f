"""wsfiles.masking: the file channel's own unmasking gives exactly what Autobahn's would."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import struct
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.testing import StringTransport

from wsfiles import masking

HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(6))})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


@pytest.fixture(params=["native", "python"])
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param == "native":
        if not masking.NATIVE:
            pytest.skip("Autobahn's native masker is not installed")
        return True
    monkeypatch.setattr(masking, "_lib", None)
    return False


def test_masking_matches_autobahn_across_uneven_pieces_and_frames(native: bool) -> None:
    rng = random.Random(8)
    masker = masking.Masker()
    for size in (1, 3, 4, 5, 127, 4096, 100_003):
        key = os.urandom(4)
        data = os.urandom(size)
        masker.rekey(key)
        ours = b"".join(bytes(masker.process(piece)) for piece in pieces(data, rng))
        assert ours == create_xor_masker(key, size).process(data)
        # XOR is its own inverse: masking twice gives the data back.
        masker.rekey(key)
        assert bytes(masker.process(ours)) == data


def test_a_native_masker_that_disagrees_with_the_reference_is_not_used(monkeypatch) -> None:
    """Should Autobahn's private masker change, wsfiles masks in Python instead."""
    if not masking.NATIVE:
        pytest.skip("Autobahn's native masker is not installed")

    class Broken:
        def __getattr__(self, name: str) -> Any:
            real = getattr(masking._lib, name)
            return (lambda *args: None) if name == "nvx_xormask_process" else real

    monkeypatch.setattr(masking, "_lib", Broken())
    assert masking._native_agrees() is False
    assert masking._lib is None  # every Masker made from now on uses Python
    key = os.urandom(4)
    data = os.urandom(1000)
    masker = masking.Masker(key)
    assert bytes(masker.process(data)) == create_xor_masker(key, len(data)).process(data)


def test_a_key_must_be_four_bytes() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        masking.Masker(b"abc")


class Recorder(masking.Unmasking, WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))


class Transport(StringTransport):
    def unregisterProducer(self) -> None:  # Autobahn unregisters on close, registered or not
        self.producer = None


def frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked frame, as a client sends it."""
    key = os.urandom(4)
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
    body = create_xor_masker(key, len(payload)).process(payload) if payload else b""
    return head + key + body


def opened() -> tuple[Recorder, Transport]:
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(applyMask=False, webStatus=False, failByDrop=False)
    protocol = Recorder()
    protocol.messages = []
    protocol.factory = factory
    transport = Transport()
    protocol.makeConnection(transport)
    protocol._connectionMade()
    protocol.dataReceived(HANDSHAKE)
    assert protocol.state == protocol.STATE_OPEN
    transport.clear()
    return protocol, transport


def test_unmasking_delivers_binary_text_and_fragmented_messages() -> None:
    protocol, _ = opened()
    data = os.urandom(300_000)
    wire = frame(2, data[:70_000], fin=False) + frame(0, data[70_000:], fin=True)
    wire += frame(1, "héllo".encode()) + frame(2, b"")
    for start in range(0, len(wire), 65_536):  # as TCP delivers it, in pieces
        protocol.dataReceived(wire[start : start + 65_536])
    assert protocol.messages == [(data, True), ("héllo".encode(), False), (b"", True)]
    assert protocol.state == protocol.STATE_OPEN


def test_control_frames_between_fragments_are_unmasked_and_the_message_survives() -> None:
    protocol, transport = opened()
    data = os.urandom(70_000)  # a 2-byte length frame, then an 8-byte one
    wire = frame(2, data[:1000], fin=False) + frame(9, b"ping in between")
    wire += frame(0, data[1000:], fin=False) + frame(0, b"", fin=True)
    protocol.dataReceived(wire)
    assert protocol.messages == [(data, True)]
    assert bytes([0x8A, len(b"ping in between")]) + b"ping in between" in transport.value()


def test_unmasking_answers_a_ping_with_its_payload_and_reads_a_close_reason() -> None:
    protocol, transport = opened()
    protocol.dataReceived(frame(9, b"are you there"))
    assert transport.value() == bytes([0x8A, len(b"are you there")]) + b"are you there"
    transport.clear()
    protocol.dataReceived(frame(8, struct.pack("!H", 1000) + b"bye"))
    assert protocol.remoteCloseCode == 1000
    assert protocol.remoteCloseReason == "bye"


def test_invalid_utf8_in_a_text_message_is_still_refused() -> None:
    protocol, transport = opened()
    protocol.dataReceived(frame(1, b"\xff\xfe"))
    assert protocol.messages == []
    # Autobahn fails the connection with 1007 (invalid frame payload data).
    assert struct.pack("!H", 1007) in transport.value()


@pytest_twisted.ensureDeferred
async def test_a_tuned_client_uploads_in_1_mib_frames_masked_by_wsfiles_and_they_arrive_intact(
    server, monkeypatch
):
    """The client masks its own frames (wsfiles.masking); with malloc tuned
    (wsfiles.tuning, as the wsfiles command does) its frames are 1 MiB."""
    import wsfiles.client
    from wsfiles.session import CommandSession

    frames: list[int] = []
    real = CommandSession.file_frame_begin

    def spying(self: Any, channel: Any, length: int) -> bool:
        frames.append(length)
        return real(self, channel, length)

    monkeypatch.setattr(CommandSession, "file_frame_begin", spying)
    client = await server.connect()
    data = os.urandom(3 * 1024 * 1024 + 5)
    for tuned, frame_size in ((False, 128 * 1024), (True, 1024 * 1024)):
        monkeypatch.setattr(wsfiles.client, "malloc_tuned", lambda tuned=tuned: tuned)
        frames.clear()
        ack = await client.upload(f"tuned-{tuned}.bin", data)
        assert ack["sha256"] == hashlib.sha256(data).hexdigest()
        assert await server.read(f"tuned-{tuned}.bin") == data
        payload = [length for length in frames if length]
        assert max(payload) == frame_size
        assert sum(payload) == len(data)


def test_tune_malloc_is_idempotent_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsfiles import tuning

    monkeypatch.setattr(tuning, "_tuned", False)  # other tests keep the default frames
    assert tuning.tune_malloc() is True  # glibc: the only C library we run on
    assert tuning.tune_malloc() is True
    assert tuning.malloc_tuned() is True
