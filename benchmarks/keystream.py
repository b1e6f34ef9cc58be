"""The per-core floor of the masked protocol's work (issue 16): AES-CTR keystream, payload hashing and Ed25519
signing and verification, and how much a second thread adds to each (which tells whether the library releases the GIL).

    python benchmarks/keystream.py [--seconds S]

Prints GB/s for AES-256-CTR (the masks' PRG), AES-128-CTR (for comparison only), BLAKE3 (the wire's payload digest
since v4) and SHA-256 (v3's), hashing 4 MiB inputs (a masked vector), and for each the ratio of two threads'
throughput to one thread's; then microseconds per Ed25519 verification and per signature of a 600-byte message
with OpenSSL (cryptography) and with libsodium (PyNaCl, what the roster verifies and an identity signs with), and
their ratios; last, milliseconds to decode a relay of 100 signed commitments (what a masked client checks at its
advertise stage) one by one with ``wire.decode`` and together with ``wire.decode_each`` (signatures on the worker
threads), and their ratio. All measured in this process, back to back.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from collections.abc import Callable

import blake3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from nacl.signing import SigningKey, VerifyKey

from protocols import Envelope, Identity, Roster, decode, encode, new_session_id, parallel
from protocols.wire import decode_each

PIECE = 1 << 18  # the piece size protocols/masked/prg.py works in
MESSAGE = 1 << 22  # a masked vector of 1M values, 4 bytes each


def aes_worker(key_bytes: int) -> Callable[[float], int]:
    def work(seconds: float) -> int:
        encryptor = Cipher(algorithms.AES(os.urandom(key_bytes)), modes.CTR(bytes(16))).encryptor()
        zeros, out, done, end = bytes(PIECE), bytearray(PIECE + 15), 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            encryptor.update_into(zeros, out)
            done += PIECE
        return done
    return work


def hash_worker(hash_once: Callable[[bytes], bytes]) -> Callable[[float], int]:
    def work(seconds: float) -> int:
        data, done, end = os.urandom(MESSAGE), 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            hash_once(data)
            done += MESSAGE
        return done
    return work


def microseconds_per_call(call: Callable[[], object], seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        count += 1
    return (time.perf_counter() - started) / count * 1e6


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
    workers = (("AES-256-CTR", aes_worker(32)), ("AES-128-CTR", aes_worker(16)),
               ("BLAKE3", hash_worker(lambda data: blake3.blake3(data).digest())),
               ("SHA-256", hash_worker(lambda data: hashlib.sha256(data).digest())))
    for name, work in workers:
        one = throughput(work, 1, args.seconds)
        two = throughput(work, 2, args.seconds)
        print(f"{name:12s} 1 thread {one / 1e9:6.2f} GB/s   2 threads {two / 1e9:6.2f} GB/s   "
              f"2 threads / 1 thread {two / one:.2f}")
    key, message = Ed25519PrivateKey.generate(), os.urandom(600)
    signature, public = key.sign(message), key.public_key()
    sodium = VerifyKey(public.public_bytes_raw())
    openssl_us = microseconds_per_call(lambda: public.verify(signature, message), args.seconds)
    sodium_us = microseconds_per_call(lambda: sodium.verify(message, signature), args.seconds)
    print(f"Ed25519 verify: OpenSSL {openssl_us:.1f} us, libsodium {sodium_us:.1f} us, "
          f"OpenSSL / libsodium {openssl_us / sodium_us:.2f}")
    signer = SigningKey(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption()))
    openssl_us = microseconds_per_call(lambda: key.sign(message), args.seconds)
    sodium_us = microseconds_per_call(lambda: signer.sign(message), args.seconds)
    print(f"Ed25519 sign:   OpenSSL {openssl_us:.1f} us, libsodium {sodium_us:.1f} us, "
          f"OpenSSL / libsodium {openssl_us / sodium_us:.2f}")
    relay, roster, session = signed_relay(100)
    one_by_one = microseconds_per_call(lambda: [decode(data, roster, session=session) for data in relay],
                                       args.seconds) / 1e3
    together = microseconds_per_call(lambda: decode_each(relay, roster, session=session), args.seconds) / 1e3
    print(f"relay of {len(relay)} signed messages: decode one by one {one_by_one:.2f} ms, decode_each "
          f"({parallel.worker_count()} threads) {together:.2f} ms, "
          f"one by one / decode_each {one_by_one / together:.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def signed_relay(count: int) -> tuple[list[bytes], Roster, str]:
    """``count`` commit messages as a masked client's advertise request relays them, each signed by its own client."""
    server, clients = Identity.generate("server"), [Identity.generate(f"client-{i}") for i in range(count)]
    roster, session = Roster.from_identities(server, clients), new_session_id()
    fields = {"view": "0" * 64, "commitment": "1" * 64}
    return [encode(Envelope("masked", 0, "commit", client.party_id, "server", fields, session=session,
                            roster=roster.digest), client) for client in clients], roster, session


if __name__ == "__main__":
    main()
