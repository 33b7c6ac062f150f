"""CPU cost of receiving masked file data: Autobahn's unmasking against wsfiles.masking.

Run from the repository root::

    python bench/receive.py                 # 256 MiB per case, best of 5

The server's side of an upload, without the network or the disk: a bare
Autobahn ``WebSocketServerProtocol`` on an in-memory transport (Twisted's
``StringTransport``) is fed one binary message of masked frames, as a client
sends them, in 256 KiB reads (the file channel's read size), and its
``onMessageFrameData`` only counts the bytes.  For frame sizes of 128 KiB and
1 MiB it times, in CPU seconds of this process per GiB (``time.process_time``,
so other processes on a shared machine affect it little):

- ``autobahn``: Autobahn unmasks (its native NVX masker: a zeroed copy, the
  XOR, and a copy out, plus a native object per frame);
- ``wsfiles``: ``applyMask=False`` and ``wsfiles.masking.Unmasking``, as the
  file channel does (one copy and the XOR in place).

Each case is also checked: the bytes delivered are the bytes sent.  Ratios
are against ``autobahn`` at the same frame size, in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import time

from _common import MIB, header, print_result, size_argument
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.xormasker import create_xor_masker
from twisted.internet.testing import StringTransport

from wsfiles.masking import Unmasking

READ_SIZE = 256 * 1024


class Counting(WebSocketServerProtocol):
    """Counts and hashes the payload it receives, frame by frame."""

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self.received = 0
        self.digest = hashlib.sha256()

    def onMessageFrameData(self, payload: bytes) -> None:
        self.received += len(payload)
        if self.check:
            self.digest.update(payload)

    def onMessageFrameEnd(self) -> None:
        pass

    def onMessageEnd(self) -> None:
        pass


class CountingUnmasking(Unmasking, Counting):
    pass


def masked_frames(data: bytes, frame: int) -> bytes:
    """``data`` as one binary message of masked frames of ``frame`` bytes."""
    parts = []
    for start in range(0, len(data), frame):
        payload = data[start : start + frame]
        fin = start + frame >= len(data)
        opcode = 2 if start == 0 else 0
        key = os.urandom(4)
        head = bytes([(0x80 if fin else 0) | opcode])
        if len(payload) < 126:
            head += bytes([0x80 | len(payload)])
        elif len(payload) < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", len(payload))
        parts += [head, key, create_xor_masker(key, len(payload)).process(payload)]
    return b"".join(parts)


def opened(kind: type[Counting], apply_mask: bool) -> Counting:
    """A protocol past its opening handshake, on an in-memory transport."""
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(applyMask=apply_mask, webStatus=False)
    protocol = kind()
    protocol.factory = factory
    protocol.makeConnection(StringTransport())
    protocol._connectionMade()
    request = (
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    protocol.dataReceived(request)
    assert protocol.state == protocol.STATE_OPEN, "the handshake failed"
    return protocol


def feed(protocol: Counting, wire: bytes, check: bool) -> float:
    """CPU seconds to feed ``wire`` in READ_SIZE pieces."""
    protocol.check = check
    pieces = [wire[i : i + READ_SIZE] for i in range(0, len(wire), READ_SIZE)]
    start = time.process_time()
    for piece in pieces:
        protocol.dataReceived(piece)
    return time.process_time() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=size_argument, default="256M", help="bytes per case (default 256M)"
    )
    parser.add_argument("--runs", type=int, default=5, help="repetitions; the best counts")
    args = parser.parse_args(argv)
    size: int = args.size
    header()
    data = os.urandom(size)
    expected = hashlib.sha256(data).hexdigest()
    gib = size / 1024**3
    for frame in (128 * 1024, MIB):
        wire = masked_frames(data, frame)
        cases = {"autobahn": (Counting, True), "wsfiles": (CountingUnmasking, False)}
        best = {}
        for name, (kind, apply_mask) in cases.items():
            checked = opened(kind, apply_mask)
            feed(checked, wire, check=True)
            if checked.received != size or checked.digest.hexdigest() != expected:
                raise RuntimeError(f"{name}: the bytes received differ from those sent")
            protocol = opened(kind, apply_mask)
            best[name] = min(feed(protocol, wire, check=False) for _ in range(args.runs)) / gib
        ratio = best["autobahn"] / best["wsfiles"]
        print(
            f"{frame // 1024:5} KiB frames: autobahn {best['autobahn']:.3f},"
            f" wsfiles {best['wsfiles']:.3f} CPU s/GiB"
        )
        print_result(
            f"receive path CPU, {frame // 1024} KiB frames",
            f"{ratio:.2f}x less CPU than Autobahn's unmasking ({best['wsfiles']:.3f} s/GiB)",
            "> 1x",
            ratio > 1,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
