"""Cost per audit-log entry, against a plain ``json.dumps`` + ``write`` log without fsync.

Usage: ``python benchmarks/audit_log.py [--entries N] [--repeats R] [--dir FOLDER]``

Every variant writes the same kind of entry (a ``message_received`` with a peer, round, stage,
a precomputed SHA-256 digest and two meta values) to a fresh file in ``--dir`` (default: a
temporary folder in the current directory, so fsync hits the same disk as run folders), in the
same process, one after the other; the table gives the median over the repeats of the mean cost
per entry, and the ratio to the baseline. Separately: hashing one message of the demo's size
(the shared adapter, 57,344 float32 values), Ed25519 signing alone, and verification per entry.
Needs only the standard library and ``cryptography`` (no torch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from audits import AuditLog, verify_path

DEMO_MESSAGE_BYTES = 57_344 * 4
DIGEST = hashlib.sha256(b"a message").hexdigest()


def _baseline(path: Path, n: int) -> float:
    start = time.perf_counter()
    with open(path, "a") as stream:
        for i in range(n):
            stream.write(json.dumps({"time": time.time(), "party": "server", "event": "message_received",
                                     "round": i, "stage": "update", "peer": "client_0", "digest": DIGEST,
                                     "size": 229_376, "meta": {"protocol": "plain", "kind": "update"}}) + "\n")
    return (time.perf_counter() - start) / n


def _audit(path: Path, n: int, key: Ed25519PrivateKey, fsync_every: int) -> float:
    log = AuditLog.create(path, "server", key, fsync_every=fsync_every)
    start = time.perf_counter()
    for i in range(n):
        log.record("message_received", round=i, stage="update", peer="client_0", digest=DIGEST, size=229_376,
                   meta={"protocol": "plain", "kind": "update"})
    log.sync()
    elapsed = time.perf_counter() - start
    log.close()
    return elapsed / n


def _per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def _filesystem(folder: Path) -> str:
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "unknown"
    resolved = str(folder.resolve())
    best = max((m for m in mounts if resolved.startswith(m[1].rstrip("/") + "/") or resolved == m[1]),
               key=lambda m: len(m[1]), default=None)
    return f"{best[2]} ({best[0]} on {best[1]})" if best else "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1000, help="entries per variant and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", help="folder to write the logs in (default: a temporary folder here)")
    args = parser.parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    folder = Path(tempfile.mkdtemp(prefix=".audit-bench-", dir=args.dir or "."))
    key = Ed25519PrivateKey.generate()
    variants = {
        "baseline: json.dumps + write, no fsync": lambda p: _baseline(p, args.entries),
        "AuditLog, fsync every entry (default)": lambda p: _audit(p, args.entries, key, 1),
        "AuditLog, batched fsync (fsync_every=16)": lambda p: _audit(p, args.entries, key, 16),
        "AuditLog, batched fsync (fsync_every=64)": lambda p: _audit(p, args.entries, key, 64),
        "AuditLog, signing and hashing only (no fsync)": lambda p: _audit(p, args.entries, key, 10**9),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for repeat in range(args.repeats):
            for i, (name, run) in enumerate(variants.items()):
                results[name].append(run(folder / f"{repeat}-{i}.audit.jsonl"))
        verify_cost = []
        for repeat in range(args.repeats):
            path = folder / f"{repeat}-1.audit.jsonl"
            entries = sum(1 for _ in open(path, "rb"))
            roster = {"server": key.public_key()}
            verify_cost.append(_per_call(lambda path=path, roster=roster: verify_path(path, roster), 1) / entries)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    message = os.urandom(DEMO_MESSAGE_BYTES)
    sign = statistics.median(_per_call(lambda: key.sign(b"x" * 400), 2000) for _ in range(args.repeats))
    digest = statistics.median(_per_call(lambda: hashlib.sha256(message).digest(), 200) for _ in range(args.repeats))

    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus (load average before "
          f"the run: {load_before}, after: {load}); logs on {_filesystem(folder.parent)}; {args.entries} entries x "
          f"{args.repeats} repeats, tree head every 64")
    print()
    print("| variant | µs per entry (median) | min – max over repeats | × baseline |")
    print("|---|---:|---:|---:|")
    base = statistics.median(results["baseline: json.dumps + write, no fsync"])
    for name, values in results.items():
        cost = statistics.median(values)
        print(f"| {name} | {cost * 1e6:.1f} | {min(values) * 1e6:.1f} – {max(values) * 1e6:.1f} | {cost / base:.1f} |")
    print()
    print("| component | µs |")
    print("|---|---:|")
    print(f"| Ed25519 signature of a 400-byte entry | {sign * 1e6:.1f} |")
    print(f"| SHA-256 of one demo-sized message ({DEMO_MESSAGE_BYTES:,} bytes) | {digest * 1e6:.1f} |")
    print(f"| verification (`verify_path`) per entry | {statistics.median(verify_cost) * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
