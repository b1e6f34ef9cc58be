"""Cost per audit-log entry, against a plain ``json.dumps`` + ``write`` log without fsync.

Usage: ``python benchmarks/audit_log.py [--entries N] [--repeats R] [--dir FOLDER]``, or for the cost of
``audit verify`` at scale: ``python benchmarks/audit_log.py --verify-entries 100000,1000000 --heads 1000``

Every variant writes the same kind of entry (a ``message_received`` with a peer, round, stage,
a precomputed SHA-256 digest and two meta values) to a fresh file in ``--dir`` (default: a
temporary folder in the current directory, so fsync hits the same disk as run folders), in the
same process, one after the other; the table gives the median over the repeats of the mean cost
per entry, and the ratio to the baseline. Separately: hashing one message of the demo's size
(the shared adapter, 57,344 float32 values), Ed25519 signing alone, and verification per entry.
Needs only the standard library and ``cryptography`` (no torch).

``--verify-entries``: for each size, a site's log of that many entries, written with the package's own
:class:`AuditLog` (fsync off: only the file's contents matter here) and handing out ``--heads`` signed tree heads
evenly, which the server's log records (``record_peer_tree_head``), as after every round of a run. Then
``verify_path`` on the folder of both logs (what ``audit verify RUN`` does: every entry's signature and chain,
every tree head's root, each exchanged head against the site's log) runs in a fresh process, which reports its
time and peak resident memory, and, as the baseline in that same process, the time to read the logs and parse
every line as JSON. Linear verification keeps the time per entry flat: the time ratio between two sizes is the
ratio of their sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import platform
import resource
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


def _build_scale(folder: Path, entries: int, heads: int) -> dict[str, Ed25519PrivateKey]:
    """A site's log of ``entries`` entries that hands out ``heads`` signed tree heads, evenly spaced, each
    recorded by the server's log: the shape of a long run in which the server swaps heads after every round."""
    keys = {party: Ed25519PrivateKey.generate() for party in ("server", "site")}
    site = AuditLog.create(folder / "site.audit.jsonl", "site", keys["site"], fsync_every=10**9)
    server = AuditLog.create(folder / "server.audit.jsonl", "server", keys["server"], fsync_every=10**9)
    every = max(1, entries // heads)
    for i in range(heads):
        while site.size < (i + 1) * every - 1:
            site.record("message_received", round=i + 1, stage="update", peer="server", digest=DIGEST,
                        size=229_376, meta={"protocol": "plain", "kind": "update"})
        server.record_peer_tree_head("site", site.signed_tree_head(), public_key=keys["site"].public_key())
    while site.size < entries - 1:
        site.record("round_started", round=heads)
    site.close()
    server.close()
    return keys


def _verify_in_fresh_process(folder: str, public_keys: dict[str, bytes], queue) -> None:
    """Child process: the baseline (read and parse every line) and ``verify_path``, timed, with peak memory."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    roster = {party: Ed25519PublicKey.from_public_bytes(raw) for party, raw in public_keys.items()}
    start = time.perf_counter()
    lines = 0
    for path in sorted(Path(folder).glob("*.audit.jsonl")):
        with open(path, "rb") as stream:
            for line in stream:
                json.loads(line)
                lines += 1
    parse = time.perf_counter() - start
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = verify_path(folder, roster, require_closed=True)
    seconds = time.perf_counter() - start
    queue.put({"lines": lines, "parse_s": parse, "verify_s": seconds, "ok": report.ok, "summary": report.summary(),
               "peer_checks": report.peer_checks, "rss_before_kib": before,
               "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})


def verify_at_scale(sizes: list[int], heads: int, folder: Path) -> int:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    rows = []
    for entries in sizes:
        where = folder / f"verify-{entries}"
        where.mkdir()
        start = time.perf_counter()
        keys = _build_scale(where, entries, heads)
        built = time.perf_counter() - start
        raw = {party: key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for party, key in keys.items()}
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_verify_in_fresh_process, args=(str(where), raw, queue))
        child.start()
        result = queue.get()
        child.join()
        shutil.rmtree(where, ignore_errors=True)
        if not result["ok"] or result["peer_checks"] != heads:
            print(f"verification failed at {entries} entries: {result['summary']}")
            return 1
        rows.append((entries, built, result))
        print(f"{entries} entries: built in {built:.1f} s; {result['summary']}", flush=True)
    print()
    print(f"| site log entries | lines (both logs) | exchanged heads | build s | parse-only s (baseline) | "
          f"verify s | × baseline | µs per line | × time of the {sizes[0]:,}-entry run | peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    first = rows[0][2]["verify_s"]
    for entries, built, r in rows:
        print(f"| {entries:,} | {r['lines']:,} | {heads:,} | {built:.1f} | {r['parse_s']:.1f} | {r['verify_s']:.1f} | "
              f"{r['verify_s'] / r['parse_s']:.1f} | {r['verify_s'] / r['lines'] * 1e6:.1f} | "
              f"{r['verify_s'] / first:.2f} | {r['rss_peak_kib'] / 1024:.0f} |")
    return 0


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
    parser.add_argument("--verify-entries", help="comma-separated log sizes: measure verify_path at scale instead")
    parser.add_argument("--heads", type=int, default=1000, help="exchanged tree heads per log (--verify-entries)")
    args = parser.parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    folder = Path(tempfile.mkdtemp(prefix=".audit-bench-", dir=args.dir or "."))
    if args.verify_entries:
        sizes = sorted(int(size) for size in args.verify_entries.split(","))
        try:
            code = verify_at_scale(sizes, args.heads, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        print(f"\npython {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus (load average "
              f"before: {load_before}, after: {load}); logs on {_filesystem(folder.parent)}; tree head every 64")
        return code
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
