"""The physical limits bench/throughput.py compares wsfiles with, one per run.

    python bench/_limits.py disk SOURCE DEST    # the durable write rate
    python bench/_limits.py loopback SIZE       # the loopback copy rate

``disk``: one Python process copies SOURCE (already in the page cache, as
it is for every client) into ``DEST.tmp`` on the disk under test, 1 MiB at a
time from one reused buffer, fsyncs it and renames it to DEST: what any
server must do at least to store an upload durably, with no network, no
hash and no protocol.  ``loopback``: one process sends SIZE bytes from one
1 MiB buffer over a TCP connection on 127.0.0.1 to a receiving thread that
reads them into another (no disk, no hash): the most a loopback transfer
could move.  Each prints one JSON line, ``{"seconds": ..., "cpu": ...}``
(``disk`` adds ``fsync_seconds``), timed inside the process so its start-up
does not count.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

BLOCK = 1024 * 1024


def disk(source: str, dest: str) -> dict[str, float]:
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    start, cpu = time.perf_counter(), time.process_time()
    temp = dest + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with open(source, "rb", buffering=0) as f:
            while n := f.readinto(buffer):
                written = 0
                while written < n:
                    written += os.write(fd, view[written:n])
        synced = time.perf_counter()
        os.fsync(fd)
        fsync_seconds = time.perf_counter() - synced
    finally:
        os.close(fd)
    os.rename(temp, dest)
    return {
        "seconds": time.perf_counter() - start,
        "cpu": time.process_time() - cpu,
        "fsync_seconds": fsync_seconds,
    }


def loopback(size: int) -> dict[str, float]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    received = [0]

    def receive() -> None:
        buffer = bytearray(BLOCK)
        while received[0] < size:
            n = receiver.recv_into(buffer)
            if not n:
                break
            received[0] += n

    block = memoryview(bytearray(BLOCK))
    with sender, receiver:
        start, cpu = time.perf_counter(), time.process_time()
        thread = threading.Thread(target=receive)
        thread.start()
        remaining = size
        while remaining:
            sender.sendall(block[: min(BLOCK, remaining)])
            remaining -= min(BLOCK, remaining)
        thread.join(600)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if received[0] != size:
        raise RuntimeError(f"loopback: received {received[0]} of {size} bytes")
    return {"seconds": seconds, "cpu": cpu}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] == "disk":
        result = disk(argv[2], argv[3])
    elif len(argv) == 3 and argv[1] == "loopback":
        result = loopback(int(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
