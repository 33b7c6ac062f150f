"""What SHA-256 costs next to moving the same bytes, measured in one run.

    python bench/hashing.py [--size 1G]

Prints MB/s for: copying buffers (the cheapest thing a transfer does),
writing them to a temp file (page cache), and SHA-256 over them, in the
128 KiB chunks the service uses, plus SHA-256 in two threads at once
(hashlib releases the GIL on buffers over 2 KiB). Ratios are against the
copy baseline of the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import threading
import time

CHUNK = 128 * 1024


def rate(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="bytes to process (K/M/G suffixes)")
    args = parser.parse_args()
    from wsfiles.sizes import parse_size

    size = parse_size(args.size)
    chunk = os.urandom(CHUNK)
    count = size // CHUNK

    start = time.perf_counter()
    for _ in range(count):
        bytes(bytearray(chunk))
    copy = rate(size, time.perf_counter() - start)

    with tempfile.TemporaryFile() as sink:
        start = time.perf_counter()
        for _ in range(count):
            sink.write(chunk)
        sink.flush()
        write = rate(size, time.perf_counter() - start)

    start = time.perf_counter()
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(chunk)
    sha = rate(size, time.perf_counter() - start)

    def hash_half() -> None:
        digest = hashlib.sha256()
        for _ in range(count // 2):
            digest.update(chunk)

    workers = [threading.Thread(target=hash_half) for _ in range(2)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    sha_two = rate(size, time.perf_counter() - start)

    print(f"{size} bytes in {CHUNK // 1024} KiB chunks, MB = 10^6 bytes")
    print(f"copy (baseline)     {copy:8.0f} MB/s  1.00x")
    print(f"write to temp file  {write:8.0f} MB/s  {write / copy:.2f}x")
    print(f"sha256, 1 thread    {sha:8.0f} MB/s  {sha / copy:.2f}x")
    print(f"sha256, 2 threads   {sha_two:8.0f} MB/s  {sha_two / copy:.2f}x  (GIL released)")


if __name__ == "__main__":
    main()
