"""Per-input cost of HE at P = 1M (issue 16): the server's ``receive`` of one client's input and a committee member's
``handle`` of one relayed input, today's ``protocols`` against ``protocols/`` at git revision REV, loaded into the
same process and timed input by input in alternating order, so that both see the same load.

    python benchmarks/he_per_input.py REV [CLIENTS]

Prints medians and minima in ms and their ratios today/before.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import secure_aggregation as bench  # noqa: E402  (puts the repository on the path)

import protocols  # noqa: E402


def setup(package, n: int, params: int):
    """A round of ``package``'s HE protocol up to the clients' inputs: (server, key holder, clients, inputs)."""
    Identity, Roster = package.Identity, package.Roster
    protocol = package.make_protocol("he")
    names = [f"client-{i}" for i in range(n)]
    sid, kid = Identity.generate("server"), Identity.generate("keyholder")
    cids = [Identity.generate(c) for c in names]
    roster = Roster.from_identities(sid, cids, kid)
    session = package.wire.new_session_id()
    server = protocol.server(sid, roster, session=session)
    keyholder = protocol.keyholder(kid, roster, session=session)
    clients = {i.party_id: protocol.client(i, roster, "server", session=session) for i in cids}
    rng = np.random.default_rng(0)
    for c in clients.values():
        c.set_input(0, rng.uniform(-0.25, 0.25, params), 1.0)
    [req] = server.begin_round(0, names, params)
    ctx = {m.recipient: m.data for m in keyholder.handle(req.data)}
    server.receive(ctx["server"])
    for name, client in clients.items():
        [answer] = client.handle(ctx[name])
        server.receive(answer.data)
    reqs = {m.recipient: m.data for m in server.advance()}
    inputs = [clients[name].handle(reqs[name])[0].data for name in names]
    return server, keyholder, clients, inputs

def timed(call, data: bytes) -> float:
    started = time.perf_counter()
    call(data)
    return time.perf_counter() - started


def main() -> None:
    n, params = int(sys.argv[2]) if len(sys.argv) > 2 else 8, 1_000_000
    runs = {"before": setup(bench.load_before(sys.argv[1]), n, params), "today": setup(protocols, n, params)}
    orders = [("today", "before"), ("before", "today")]  # alternating, so that neither always goes first
    server_s: dict[str, list[float]] = {name: [] for name in runs}
    for index in range(n):
        for name in orders[index % 2]:
            server, _, _, inputs = runs[name]
            server_s[name].append(timed(server.receive, inputs[index]))
    member_s: dict[str, list[float]] = {name: [] for name in runs}
    relays = {}
    for name, (server, keyholder, clients, _) in runs.items():  # draw; the first member gets the announcement
        [draw] = server.advance()
        [announcement] = keyholder.handle(draw.data)
        server.receive(announcement.data)
        outgoing = server.advance()
        member = sorted({message.recipient for message in outgoing})[0]
        mine = [message.data for message in outgoing if message.recipient == member]
        clients[member].handle(mine[0])
        relays[name] = (clients[member], mine[1:1 + n])
    for index in range(n):
        for name in orders[index % 2]:
            member, messages = relays[name]
            member_s[name].append(timed(member.handle, messages[index]))
    print(f"input message {len(runs['today'][3][0]) / 1e6:.1f} MB, n = {n}, before = {sys.argv[1]}")
    for what, table in (("server receive(input)", server_s), ("member handle(relayed input)", member_s)):
        median = {name: statistics.median(times) * 1000 for name, times in table.items()}
        low = {name: min(times) * 1000 for name, times in table.items()}
        print(f"{what}: median ms before {median['before']:.0f}, today {median['today']:.0f} "
              f"(today/before {median['today'] / median['before']:.2f}); min before {low['before']:.0f}, "
              f"today {low['today']:.0f} ({low['today'] / low['before']:.2f})")


if __name__ == "__main__":
    main()
