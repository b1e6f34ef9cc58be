"""The per-core floor of the masked protocol's bulk work (issue 16): AES-CTR keystream and SHA-256 throughput, and
how much a second thread adds to each (which tells whether the library releases the GIL while it works).

    python benchmarks/keystream.py [--seconds S]

Prints GB/s for AES-256-CTR (the masks' PRG), AES-128-CTR (for comparison only), SHA-256 (the wire's payload hash
list), and for each the ratio of two threads' throughput to one thread's, measured in this process back to back.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PIECE = 1 << 18  # the piece size protocols/masked/prg.py and the wire's hash list work in


def aes_worker(key_bytes: int) -> Callable[[float], int]:
    def work(seconds: float) -> int:
        encryptor = Cipher(algorithms.AES(os.urandom(key_bytes)), modes.CTR(bytes(16))).encryptor()
        zeros, out, done, end = bytes(PIECE), bytearray(PIECE + 15), 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            encryptor.update_into(zeros, out)
            done += PIECE
        return done
    return work


def sha256_worker(seconds: float) -> int:
    data, done, end = os.urandom(PIECE), 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        hashlib.sha256(data).digest()
        done += PIECE
    return done


def throughput(work: Callable[[float], int], threads: int, seconds: float) -> float:
    """Bytes per second of ``threads`` threads each running ``work`` for ``seconds``."""
    totals = [0] * threads

    def run(index: int) -> None:
        totals[index] = work(seconds)

    started = time.perf_counter()
    workers = [threading.Thread(target=run, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(totals) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()
    print(f"CPUs usable: {len(os.sched_getaffinity(0))}; load average before: {os.getloadavg()[0]:.2f}")
    for name, work in (("AES-256-CTR", aes_worker(32)), ("AES-128-CTR", aes_worker(16)), ("SHA-256", sha256_worker)):
        one = throughput(work, 1, args.seconds)
        two = throughput(work, 2, args.seconds)
        print(f"{name:12s} 1 thread {one / 1e9:6.2f} GB/s   2 threads {two / 1e9:6.2f} GB/s   "
              f"2 threads / 1 thread {two / one:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
