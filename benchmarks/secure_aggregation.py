"""Cost of one secure-aggregation round: plain, masked (SecAgg+), he (CKKS) and Flower's SecAgg+, side by side.

Every protocol runs in this process on the same updates (uniform in [-0.25, 0.25], the masked protocol's
clip range; integer weights 1..300) with the same clients dropping out before they send their input.
Per configuration it reports the mean client time (over the clients that sent their input; every stage
it took part in for its own input), the server time (and the key holder's, for he), for he the mean time a
committee member spent in the verify stage (checking the relayed inputs, recomputing the sum, attesting:
billed by stage, apart from its own input), the upload bytes per parameter of a client that sent its input,
and the largest error against the exact float64 weighted sum. Ratios are to plain, the insecure float
aggregation of the same updates.

Flower (the ``bench`` extra, flwr 1.42) is driven through its own SecAgg+ code: the client mod's stage
functions (``flwr.client.mod.secure_aggregation.secaggplus_mod``) for every client, and the server work
of ``SecAggPlusWorkflow`` (ring graph, forwarding, summing, share reconstruction, mask regeneration,
dequantization) re-stated here line for line without its message transport. Its graph gets the same
neighbourhood size k and threshold t as our masked protocol, and the same precision (clip 0.25, 16-bit
quantization, 32-bit modulus).

    python benchmarks/secure_aggregation.py                  # the full grid (n 10,50,100 x P 100k,1M x 0/10/30 %)
    python benchmarks/secure_aggregation.py --quick          # a smoke run: n 10, P 10k, 10 % dropout
    python benchmarks/secure_aggregation.py --clients 100 --params 1000000 --dropouts 0.1 --protocols plain,masked
    python benchmarks/secure_aggregation.py ... --before 43b798f --protocols plain,masked,masked-before,he,he-before

``--stages`` adds, after each row, each role's wall-clock seconds per server stage (a client's: the mean over all
the row's clients, the dropped ones included). ``--profile`` adds those seconds under cProfile, and the functions
that cost each party the most (cProfile, by own time; all clients of a row pooled into one "client" profile,
committee members into one "committee" profile). Bulk work
runs on worker threads (``protocols.parallel``) that cProfile does not follow; set FEDDAT_SECURE_THREADS=1 to see
it broken down rather than as waiting.

``--before REV`` loads ``protocols/`` as it was at git revision REV next to today's, as the package
``protocols_before``, so that ``masked-before`` and ``he-before`` rows (the same protocol before a change) are
measured in the same process and run as today's rows.
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import gc
import importlib
import io
import math
import pstats
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import protocols  # noqa: E402
from protocols import ProtocolError, make_protocol  # noqa: E402

OURS = ("plain", "masked", "he")
# the masked protocol bit-packed to 3 bytes a value: m = 24 fits 100 clients × weight 300 × 255 (8-bit quantization)
PACKED = {"masked-24": {"modulus_bits": 24, "quantization_bits": 8}}
ALL = (*OURS, *PACKED, "flower")
BEFORE = "-before"  # suffix of a protocol measured from the --before revision
DROP_STAGE = {"plain": "input", "masked": "masked_input", "he": "input"}
COMMITTEE_STAGE = {"he": "verify"}  # the stage whose client work is a committee member's, billed apart
COMMITTEE = "committee:"
MAX_WEIGHT = 300
PROFILE_TOP = 0  # --profile: how many functions to print per party (0: no profiling)
SERVER_BATCH_BYTES = 64 * 2**20  # the clients' answers the driver hands the server at once (receive_each)
STAGES = False  # --stages: print each role's seconds per server stage (without cProfile)
CLIP = 0.25


@dataclass
class Measurement:
    protocol: str
    clients: int
    params: int
    dropout: float
    client_s: float  # mean over the clients that sent their input
    server_s: float
    keyholder_s: float
    committee_s: float  # mean over the committee members of their verify-stage work (he only)
    committee_download_bytes_per_param: float  # mean bytes a committee member receives in the verify stage
    upload_bytes_per_param: float
    max_error: float
    server_held_mb: float = math.nan  # Python objects the server holds when its input stage closes (our protocols)


def inputs(n: int, params: int, seed: int, index: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng([seed, index])
    return rng.uniform(-CLIP, CLIP, size=params), int(rng.integers(1, MAX_WEIGHT + 1))


def dropped_clients(n: int, dropout: float, seed: int) -> set[int]:
    return set(random.Random(seed).sample(range(n), round(dropout * n)))


def exact_sum(n: int, params: int, seed: int, dropped: set[int]) -> tuple[np.ndarray, float]:
    total, weights = np.zeros(params), 0.0
    for index in range(n):
        if index not in dropped:
            x, w = inputs(n, params, seed, index)
            total += w * x
            weights += w
    return total, weights


class Meter:
    """Seconds spent inside each party, bytes each party sent, and bytes each committee member received."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)
        self.profiles: dict[str, cProfile.Profile] = {}
        self.stage = ""  # the server's stage, set by the driver: each role's seconds are also summed per stage
        self.by_stage: dict[tuple[str, str], float] = defaultdict(float)

    def call(self, party: str, function: Callable, *args):
        profile = self.profiles.setdefault(role(party), cProfile.Profile()) if PROFILE_TOP else None
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        try:
            return function(*args)
        finally:
            if profile is not None:
                profile.disable()
            elapsed = time.perf_counter() - start
            self.seconds[party] += elapsed
            self.by_stage[(role(party), self.stage)] += elapsed

    def print_profiles(self, label: str) -> None:
        """Each role's seconds per server stage (with --stages or --profile; a client's and a committee member's: the
        mean over those parties), and the ``PROFILE_TOP`` functions that took it the most own time in this row
        (profiled seconds: cProfile slows Python-heavy steps more than bulk ones)."""
        if STAGES or PROFILE_TOP:
            for name in sorted({who for who, _ in self.by_stage}):
                parties = max(1, sum(1 for party in self.seconds if role(party) == name))
                stages = ", ".join(f"{stage or 'setup'} {seconds / parties:.4f} s"
                                   for (who, stage), seconds in self.by_stage.items() if who == name)
                kind = "profiled seconds" if PROFILE_TOP else "seconds"
                print(f"    {label}, {name}{' (mean)' if parties > 1 else ''}, {kind} by server stage: {stages}")
        for name, profile in sorted(self.profiles.items()):
            stream = io.StringIO()
            pstats.Stats(profile, stream=stream).sort_stats("tottime").print_stats(PROFILE_TOP)
            lines = [line for line in stream.getvalue().splitlines() if line.strip()]
            start = next(index for index, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
            print(f"    profile {label}, {name} (own time, all calls of the row):")
            for line in lines[start:]:
                print(f"      {line}")


def role(party: str) -> str:
    """What a profile pools a party under: 'client' for every client, 'committee' for every committee member."""
    return "committee" if party.startswith(COMMITTEE) else "client" if party.startswith("client-") else party


def held_bytes(root: object) -> int:
    """Bytes of the bytes objects and owning numpy arrays reachable from ``root``: what a party holds in Python
    memory (C++ memory, e.g. TenSEAL's running sum, is not seen; it is one sum, the same size whatever n)."""
    seen, stack, total = set(), [root], 0
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, type | ModuleType):
            continue
        seen.add(id(item))
        if isinstance(item, bytes | bytearray):
            total += len(item)
        elif isinstance(item, np.ndarray):
            total += item.nbytes if item.base is None else 0
        else:
            stack.extend(gc.get_referents(item))
    return total


def options_for(name: str, dropout: float) -> dict:
    """The masked protocol sizes its graph for the dropout rate it is told to expect (default 10 %)."""
    return {"dropout_rate": max(dropout, 0.1), **PACKED.get(name, {})} if name.startswith("masked") else {}


def load_before(revision: str) -> ModuleType:
    """``protocols/`` as it was at git ``revision``, imported as the package ``protocols_before`` (its modules import
    each other relatively, so the copy is self-contained)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "protocols"], check=True,
                             capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="protocols-before-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "protocols").rename(folder / "protocols_before")
    sys.path.insert(0, str(folder))
    return importlib.import_module("protocols_before")


def run_ours(name: str, n: int, params: int, dropout: float, seed: int, package: ModuleType = protocols
             ) -> tuple[Measurement, np.ndarray]:
    """One round of our protocol ``name`` from ``package`` (today's ``protocols`` or an older copy), every party
    timed separately. Returns the measurement and Σ w·x."""
    Identity, Roster = package.Identity, package.Roster
    SERVER_ID, KEYHOLDER_ID = package.identity.SERVER_ID, package.identity.KEYHOLDER_ID
    protocol = package.make_protocol(name.split("-")[0], seed=seed, **options_for(name, dropout))
    protocol.check(n, params)
    names = [f"client-{index}" for index in range(n)]
    server_identity = Identity.generate(SERVER_ID)
    client_identities = [Identity.generate(client) for client in names]
    keyholder_identity = Identity.generate(KEYHOLDER_ID) if protocol.needs_keyholder else None
    roster = Roster.from_identities(server_identity, client_identities, keyholder_identity)
    session = package.wire.new_session_id()
    server = protocol.server(server_identity, roster, session=session)
    clients = {identity.party_id: protocol.client(identity, roster, SERVER_ID, session=session)
               for identity in client_identities}
    keyholder = protocol.keyholder(keyholder_identity, roster, session=session) if keyholder_identity else None
    meter = Meter()
    dropped = dropped_clients(n, dropout, seed)
    vanish_at = {names[index]: server.stages.index(DROP_STAGE[name.split("-")[0]]) for index in dropped}

    def take_in(batch: list[bytes]) -> None:
        if not hasattr(server, "receive_each"):  # a --before copy older than it
            for data in batch:
                server.receive(data)
            return
        for rejection in server.receive_each(batch):
            if rejection is not None:
                raise rejection

    def route(outgoing, sender: str, gone: set[str]) -> None:
        # depth first (an answer is delivered before the next request); the answers to the server are handed over
        # together, as a transport's grid does, up to SERVER_BATCH_BYTES at a time (one or a few inputs in flight)
        queue = deque((sender, message) for message in outgoing)
        batch: list[bytes] = []
        batch_bytes = 0
        while queue or batch:
            if batch and (not queue or batch_bytes >= SERVER_BATCH_BYTES):
                meter.call(SERVER_ID, take_in, batch)
                batch, batch_bytes = [], 0
                continue
            source, message = queue.popleft()
            recipient = message.recipient
            if recipient in gone:
                continue
            meter.sent[source] += len(message.data)
            if recipient == SERVER_ID:
                batch.append(message.data)
                batch_bytes += len(message.data)
                answers = []
            elif recipient == KEYHOLDER_ID:
                answers = meter.call(recipient, keyholder.handle, message.data)
            elif server.stage == COMMITTEE_STAGE.get(name):
                meter.received[COMMITTEE + recipient] += len(message.data)
                answers = meter.call(COMMITTEE + recipient, clients[recipient].handle, message.data)
            else:
                answers = meter.call(recipient, clients[recipient].handle, message.data)
            queue.extendleft(reversed([(recipient, answer) for answer in answers]))

    if keyholder is not None:
        route(meter.call(KEYHOLDER_ID, keyholder.setup, names), KEYHOLDER_ID, set())
    for index, client in enumerate(names):
        x, w = inputs(n, params, seed, index)
        meter.call(client, clients[client].set_input, 0, x, float(w))
        del x
    outgoing = meter.call(SERVER_ID, server.begin_round, 0, names, params)
    held = math.nan
    while True:
        gone = {client for client, index in vanish_at.items() if server.stages.index(server.stage) >= index}
        meter.stage = server.stage
        route(outgoing, SERVER_ID, gone)
        if server.round_done:
            break
        if server.stage == DROP_STAGE[name.split("-")[0]]:  # every input is in: what does the server hold?
            held = held_bytes(server) / 2**20
        outgoing = meter.call(SERVER_ID, server.advance)
        if server.round_done and not outgoing:
            break
    result = meter.call(SERVER_ID, server.result)
    survivors = [names[index] for index in range(n) if index not in dropped]
    members = [seconds for party, seconds in meter.seconds.items() if party.startswith(COMMITTEE)]
    measurement = Measurement(
        name, n, params, dropout,
        client_s=float(np.mean([meter.seconds[client] for client in survivors])),
        server_s=meter.seconds[SERVER_ID], keyholder_s=meter.seconds.get(KEYHOLDER_ID, 0.0),
        committee_s=float(np.mean(members)) if members else 0.0,
        committee_download_bytes_per_param=float(np.mean(list(meter.received.values()))) / params
        if meter.received else 0.0,
        upload_bytes_per_param=float(np.mean([meter.sent[client] for client in survivors])) / params,
        max_error=math.nan, server_held_mb=held)
    meter.print_profiles(f"{name}{'' if package is protocols else BEFORE} n={n} P={params}")
    return measurement, result.vector


def run_flower(n: int, params: int, dropout: float, seed: int, shares: int, threshold: int
               ) -> tuple[Measurement, np.ndarray]:
    """One SecAgg+ round with Flower's own client code and its workflow's server computation.

    Returns Flower's output, the weighted *average* (its workflow divides by the total weight).
    """
    from flwr.client.mod.secure_aggregation.secaggplus_mod import (
        SecAggPlusState,
        _collect_masked_vectors,
        _setup,
        _share_keys,
        _unmask,
    )
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    quantization_range, mod_range = 2**16, 2**32
    meter = Meter()
    nids = list(range(1, n + 1))
    dropped = {nids[index] for index in dropped_clients(n, dropout, seed)}
    states = {}
    for nid in nids:
        states[nid] = SecAggPlusState()
        states[nid].nid = nid

    def client(nid: int, function: Callable, *args):
        return meter.call(f"client-{nid}", function, states[nid], *args)

    def server(function: Callable, *args):
        return meter.call("server", function, *args)

    # Stage 0, setup: the server draws the ring; every client makes its two key pairs.
    def build_graph():
        order = list(nids)
        random.Random(seed).shuffle(order)
        half = shares >> 1
        return {nid: {order[(index + offset) % n] for offset in range(-half, half + 1)}
                for index, nid in enumerate(order)}

    neighbours = server(build_graph)
    setup = {Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold, Key.CLIPPING_RANGE: CLIP,
             Key.TARGET_RANGE: quantization_range, Key.MOD_RANGE: mod_range, Key.MAX_WEIGHT: float(MAX_WEIGHT)}
    public_keys = {}
    for nid in nids:
        answer = client(nid, _setup, dict(setup))
        public_keys[nid] = [answer[Key.PUBLIC_KEY_1], answer[Key.PUBLIC_KEY_2]]
        meter.sent[f"client-{nid}"] += sum(map(len, public_keys[nid]))

    # Stage 1, share keys: each client Shamir-shares its mask seed and key, encrypted to each neighbour.
    forward = {nid: ([], []) for nid in nids}  # destination -> (ciphertexts, sources)
    for nid in nids:
        answer = client(nid, _share_keys, {str(m): public_keys[m] for m in neighbours[nid]})
        meter.sent[f"client-{nid}"] += sum(map(len, answer[Key.CIPHERTEXT_LIST]))

        def relay(answer=answer, source=nid):
            for destination, ciphertext in zip(answer[Key.DESTINATION_LIST], answer[Key.CIPHERTEXT_LIST]):
                forward[destination][0].append(ciphertext)
                forward[destination][1].append(source)
        server(relay)

    # Stage 2, collect masked vectors: the dropped clients vanish here, after sharing their keys.
    active = [nid for nid in nids if nid not in dropped]
    total: list[np.ndarray] | None = None
    for index, nid in enumerate(nids):
        if nid in dropped:
            continue
        x, w = inputs(n, params, seed, index)
        parameters = meter.call(f"client-{nid}", ndarrays_to_parameters, [x])  # the client app's fit result
        del x
        answer = client(nid, _collect_masked_vectors, {Key.CIPHERTEXT_LIST: forward[nid][0],
                                                       Key.SOURCE_LIST: forward[nid][1]}, w, parameters)
        masked = answer[Key.MASKED_PARAMETERS]
        meter.sent[f"client-{nid}"] += sum(map(len, masked))

        def add(masked=masked):
            nonlocal total
            vector = [bytes_to_ndarray(b) for b in masked]
            total = vector if total is None else parameters_addition(total, vector)
        server(add)
    total = server(parameters_mod, total, mod_range)

    # Stage 3, unmask: survivors send shares (of survivors' mask seeds, of dropped clients' keys).
    collected: dict[int, list[bytes]] = {nid: [] for nid in nids}
    active_set, dead_set = set(active), set(dropped)
    for nid in active:
        answer = client(nid, _unmask, {Key.ACTIVE_NODE_ID_LIST: list(neighbours[nid] & active_set),
                                       Key.DEAD_NODE_ID_LIST: list(neighbours[nid] & dead_set)})
        meter.sent[f"client-{nid}"] += sum(map(len, answer[Key.SHARE_LIST]))
        for owner, share in zip(answer[Key.NODE_ID_LIST], answer[Key.SHARE_LIST]):
            collected[owner].append(share)

    def unmask(vector):
        for nid, share_list in collected.items():
            if len(share_list) < threshold:
                raise RuntimeError(f"Flower SecAgg+: not enough shares for node {nid}")
            secret = combine_shares(share_list)
            if nid in active_set:
                vector = parameters_subtraction(vector, pseudo_rand_gen(secret, mod_range,
                                                                        get_parameters_shape(vector)))
            else:
                for neighbour in neighbours[nid] - {nid}:
                    shared_key = generate_shared_key(bytes_to_private_key(secret),
                                                     bytes_to_public_key(public_keys[neighbour][0]))
                    mask = pseudo_rand_gen(shared_key, mod_range, get_parameters_shape(vector))
                    vector = (parameters_addition if nid > neighbour else parameters_subtraction)(vector, mask)
        q_total_ratio, recon = factor_extract(parameters_mod(vector, mod_range))
        average = dequantize(recon, CLIP, quantization_range)
        for part in average:
            part += -(len(active) - 1) * CLIP
            part *= quantization_range / q_total_ratio
        return average[0]

    average = server(unmask, total)
    measurement = Measurement(
        "flower", n, params, dropout,
        client_s=float(np.mean([meter.seconds[f"client-{nid}"] for nid in active])),
        server_s=meter.seconds["server"], keyholder_s=0.0, committee_s=0.0, committee_download_bytes_per_param=0.0,
        upload_bytes_per_param=float(np.mean([meter.sent[f"client-{nid}"] for nid in active])) / params,
        max_error=math.nan)
    meter.print_profiles(f"flower n={n} P={params}")
    return measurement, average


def measure(names: Sequence[str], n: int, params: int, dropout: float, seed: int,
            before: ModuleType | None = None) -> list[Measurement]:
    dropped = dropped_clients(n, dropout, seed)
    exact, total_weight = exact_sum(n, params, seed, dropped)
    failures = (ProtocolError, RuntimeError, ValueError) + ((before.ProtocolError,) if before else ())
    rows = []
    for name in names:
        gc.collect()
        try:
            if name == "flower":
                masked = make_protocol("masked", seed=seed, **options_for("masked", dropout))
                graph = masked.options.graph_parameters(n)
                shares = graph.neighbours + 1 if graph.neighbours % 2 == 0 else graph.neighbours + 2
                row, average = run_flower(n, params, dropout, seed, shares, graph.threshold)
                row.max_error = float(np.max(np.abs(average * total_weight - exact)))
            elif name.endswith(BEFORE):
                row, vector = run_ours(name.removesuffix(BEFORE), n, params, dropout, seed, before)
                row.protocol = name
                row.max_error = float(np.max(np.abs(vector - exact)))
            else:
                row, vector = run_ours(name, n, params, dropout, seed)
                row.max_error = float(np.max(np.abs(vector - exact)))
        except failures as error:
            print(f"  {name:7s} n={n:<4d} P={params:<8d} dropout={dropout:.0%}: FAILED: {error}", flush=True)
            rows.append(Measurement(name, n, params, dropout, *[math.nan] * 7))
            continue
        rows.append(row)
        print(f"  {name:7s} n={n:<4d} P={params:<8d} dropout={dropout:.0%}: client {row.client_s:.4f} s, "
              f"server {row.server_s:.4f} s, key holder {row.keyholder_s:.4f} s, committee {row.committee_s:.4f} s, "
              f"{row.upload_bytes_per_param:.2f} B/param up, {row.committee_download_bytes_per_param:.1f} B/param "
              f"down per committee member, max error {row.max_error:.2e}, server holds {row.server_held_mb:.1f} MiB "
              "after the input stage", flush=True)
    return rows


def table(rows: Sequence[Measurement]) -> str:
    """Markdown; a round is a mean client's time plus the server's, the key holder's and a mean committee
    member's verify stage (clients run in parallel, members too, after the server's input stage)."""
    plain = {(r.clients, r.params, r.dropout): r for r in rows if r.protocol == "plain"}
    lines = ["| n | P | dropout | protocol | client s (mean) | server s | key holder s | committee s | upload B/param "
             "| member download B/param | client × plain | server × plain | round × plain | bytes × plain "
             "| max abs error | server MiB held after inputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = plain.get((r.clients, r.params, r.dropout))
        if math.isnan(r.client_s):
            lines.append(f"| {r.clients} | {r.params:,} | {r.dropout:.0%} | {r.protocol} | aborted |" + " – |" * 11)
            continue

        def ratio(value: float, reference: float | None) -> str:
            return f"{value / reference:.1f}" if reference else "–"

        round_s = r.client_s + r.server_s + r.keyholder_s + r.committee_s
        base_round = base and base.client_s + base.server_s + base.keyholder_s + base.committee_s
        lines.append(
            f"| {r.clients} | {r.params:,} | {r.dropout:.0%} | {r.protocol} | {r.client_s:.3f} | {r.server_s:.3f} | "
            f"{r.keyholder_s:.3f} | {r.committee_s:.3f} | {r.upload_bytes_per_param:.2f} | "
            f"{r.committee_download_bytes_per_param:.1f} | "
            f"{ratio(r.client_s, base and base.client_s)} | {ratio(r.server_s, base and base.server_s)} | "
            f"{ratio(round_s, base_round)} | "
            f"{ratio(r.upload_bytes_per_param, base and base.upload_bytes_per_param)} | {r.max_error:.1e} | "
            + ("–" if math.isnan(r.server_held_mb) else f"{r.server_held_mb:.1f}") + " |")
    return "\n".join(lines)


def versus_flower(rows: Sequence[Measurement]) -> str:
    """How many times faster than Flower's SecAgg+ each of our secure rounds ran (same n, P, dropout, same run)."""
    def round_s(r: Measurement) -> float:
        return r.client_s + r.server_s + r.keyholder_s + r.committee_s

    flower = {(r.clients, r.params, r.dropout): r for r in rows
              if r.protocol == "flower" and not math.isnan(r.client_s)}
    lines = [f"- n={r.clients}, P={r.params:,}, dropout {r.dropout:.0%}: {r.protocol} round {round_s(r):.3f} s, "
             f"Flower's {round_s(base):.3f} s: {round_s(base) / round_s(r):.1f}× faster; server "
             f"{base.server_s / r.server_s:.1f}×, client {base.client_s / r.client_s:.1f}×"
             for r in rows if r.protocol not in ("plain", "flower") and not math.isnan(r.client_s)
             for base in [flower.get((r.clients, r.params, r.dropout))] if base]
    return "\n".join(["", "Against Flower's SecAgg+ in this run:", *lines]) if lines else ""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: n 10, P 10,000, 10%% dropout")
    parser.add_argument("--clients", default="10,50,100", help="comma-separated client counts")
    parser.add_argument("--params", default="100000,1000000", help="comma-separated vector lengths")
    parser.add_argument("--dropouts", default="0,0.1,0.3", help="comma-separated dropout fractions")
    parser.add_argument("--protocols", default=",".join(ALL), help=f"comma-separated, from {','.join(ALL)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", nargs="?", type=int, const=12, default=0, metavar="TOP",
                        help="print each party's TOP costliest functions after each row (default 12)")
    parser.add_argument("--stages", action="store_true",
                        help="print each role's seconds per server stage after each row")
    parser.add_argument("--before", metavar="REV", help="also measure '<protocol>-before' rows: protocols/ at this git "
                        "revision, in the same process")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params, args.dropouts = "10", "10000", "0.1"
    global PROFILE_TOP, STAGES
    PROFILE_TOP, STAGES = args.profile, args.stages
    names = args.protocols.split(",")
    known = {*ALL, *(f"{name}{BEFORE}" for name in OURS)} if args.before else set(ALL)
    unknown = sorted(set(names) - known)
    if unknown:
        parser.error(f"unknown protocols {unknown}; choose from {', '.join(sorted(known))}"
                     + ("" if args.before else f" (the '{BEFORE}' ones need --before REV)"))
    if "plain" not in names:
        names.insert(0, "plain")  # the reference every ratio is taken to
    before = load_before(args.before) if args.before else None
    rows = []
    started = time.perf_counter()
    for n in map(int, args.clients.split(",")):
        for params in map(int, args.params.split(",")):
            for dropout in map(float, args.dropouts.split(",")):
                rows.extend(measure(names, n, params, dropout, args.seed, before))
    print(f"\nwall time {time.perf_counter() - started:.0f} s\n")
    print(table(rows))
    print(versus_flower(rows))


if __name__ == "__main__":
    main()
