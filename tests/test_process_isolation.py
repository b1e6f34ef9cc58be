"""Each party of a federation in an OS process of its own (issue 9's acceptance test).

A 3-site round is run twice on the same configuration: once with every party in one process (the
simulation ``feddat-secure run`` uses), once with the server, each site and (for HE) the key holder each in
a spawned process, where each made its own key, the parent built the roster from public enrolment files
only, and the parties spoke only signed bytes over pipes (``process_parties``). The processes must reach the
simulation's global model, leave audit logs that verify and reconcile, and never open another party's key.
The first tests specify the pipe channel itself: its framing and its deadlines.
"""

from __future__ import annotations

import os
import threading
from itertools import count
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
from conftest import small_config
from process_parties import (
    PipeChannel,
    ProcessRun,
    one_torch_thread,
    pack_reply,
    run_in_processes,
    unpack_reply,
    unpack_request,
)
from safetensors.numpy import load_file

from audits import reconcile, verify_path
from feddat_secure.config import config_from_dict, to_dict
from feddat_secure.federation.channel import Reply
from feddat_secure.federation.runner import RunResult, run
from protocols import MessageRejected, Outgoing, load_roster
from protocols.enrolment import IDENTITY_FILE

# How close the processes' global state must be to the simulation's, and why:
# - masked: exactly. Both runs train bit-identical site updates (every site's model, batches and torch
#   generator come from seeds of its own), quantize them with rounding drawn from seeded generators, and
#   the pairwise and self masks (fresh randomness in each run) cancel exactly modulo 2^32, so the server
#   decodes the same integers into the same sum.
# - he: within 2^-16. CKKS encryption is randomised in each run, and the key holder releases the sum rounded
#   to a multiple of 2^-16; the two releases differ by at most that one step (where a coordinate's sum lies
#   within the CKKS noise of a rounding boundary); the mean over 3 sites divides that by 3, which leaves room
#   for rounding the new state to float32.
TOLERANCE = {"masked": 0.0, "he": 2.0**-16}
# Generous: this test is not about dropouts, and 2 shared cores can be slow. A party that missed a deadline
# would show up as a round that did not count every site.
DEADLINE_S = 180  # for each reply
TIMEOUT_S = 300  # for the whole run of processes


def tiny_run(folder: Path, protocol: str) -> dict:
    """The configuration (as a TOML-like dict) of one masked or HE round among 3 sites, uniformly weighted."""
    return to_dict(small_config(folder, federation={"rounds": 1, "aggregation": "uniform"},
                                secure_aggregation={"protocol": protocol}))


def quiet_run(raw: dict) -> RunResult:
    return run(config_from_dict(raw), progress=False, echo=lambda line: None)


# ---------------------------------------------------------------------------------- the pipe channel


def echo_party(connection: Connection, release: threading.Event) -> None:
    """A party that answers each request with one message to the server; its first answer waits for ``release``."""
    for number in count():
        try:
            sequence, data = unpack_request(connection.recv_bytes())
        except EOFError:
            return
        if number == 0:
            release.wait()
        connection.send_bytes(pack_reply(sequence, [Outgoing("server", b"re:" + data)]))


def test_a_reply_frame_carries_each_message_and_its_recipient_and_nothing_else():
    messages = (Outgoing("server", b"\x00signed bytes"), Outgoing("client1", b""))
    frame = pack_reply(7, messages)
    assert unpack_reply(frame, "client0") == (7, messages)
    for broken in (frame[:-1], frame + b"\x00", frame[:12] + b"\x00\x02\xff\xfe" + frame[16:]):
        with pytest.raises(MessageRejected, match="client0"):
            unpack_reply(broken, "client0")


def test_a_party_that_misses_its_deadline_has_dropped_out_and_its_late_reply_is_discarded():
    server_end, party_end = Pipe()
    release = threading.Event()
    party = threading.Thread(target=echo_party, args=(party_end, release), daemon=True)
    party.start()
    channel = PipeChannel({"client0": server_end})
    assert channel.exchange([Outgoing("client0", b"first"), Outgoing("client0", b"second")], deadline_s=0.05) == [
        Reply("client0", None), Reply("client0", None)]
    release.set()  # the answer to "first" now arrives, late: the next exchange must not take it for its own
    assert channel.exchange([Outgoing("client0", b"third"), Outgoing("nobody", b"fourth")], deadline_s=60) == [
        Reply("client0", (Outgoing("server", b"re:third"),)), Reply("nobody", None)]
    server_end.close()
    party.join()


def test_a_party_whose_process_has_gone_has_dropped_out():
    server_end, party_end = Pipe()
    party_end.close()
    channel = PipeChannel({"client0": server_end})
    assert channel.exchange([Outgoing("client0", b"train")], deadline_s=60) == [Reply("client0", None)]
    assert channel.gone == {"client0"}


# ------------------------------------------------------------------------------- one process per party


@pytest.fixture(scope="module", params=["masked", "he"])
def runs(request, tmp_path_factory) -> tuple[str, RunResult, ProcessRun]:
    """(protocol, the in-process simulation's run, the run with one process per party) of the same round."""
    protocol = request.param
    with one_torch_thread():  # as in each party's process
        simulated = quiet_run(tiny_run(tmp_path_factory.mktemp(f"{protocol}-simulated"), protocol))
    parties = [(entry.party_id, entry.role) for entry in load_roster(simulated.run_dir / "roster.json").entries]
    processes = run_in_processes(tiny_run(tmp_path_factory.mktemp(f"{protocol}-processes"), protocol), parties,
                                 deadline_s=DEADLINE_S, timeout_s=TIMEOUT_S)
    return protocol, simulated, processes


@pytest.mark.slow
def test_every_party_ran_in_a_process_of_its_own(runs):
    protocol, _, processes = runs
    expected = {"server", "client0", "client1", "client2", *(["keyholder"] if protocol == "he" else [])}
    assert set(processes.reports) == expected
    pids = {report["pid"] for report in processes.reports.values()}
    assert len(pids) == len(expected) and os.getpid() not in pids


@pytest.mark.slow
def test_the_round_aggregates_every_site_to_the_simulations_global_model(runs):
    protocol, simulated, processes = runs
    (record,) = processes.reports["server"]["history"]
    assert record["aggregation"]["counted"] == ["client0", "client1", "client2"]
    assert simulated.history[0]["aggregation"]["counted"] == ["client0", "client1", "client2"]
    expected = load_file(str(simulated.run_dir / "global_adapter" / "adapter_model.safetensors"))
    state = processes.global_state
    assert set(state) == set(expected)  # the head stays local: the global state is the shared adapter alone
    for name, value in expected.items():
        np.testing.assert_allclose(state[name], value, rtol=0, atol=TOLERANCE[protocol], err_msg=name)


@pytest.mark.slow
def test_every_partys_own_audit_log_verifies_and_reconciles(runs):
    _, _, processes = runs
    roster = load_roster(processes.run_dir / "roster.json")
    keys = {entry.party_id: entry.public_key for entry in roster.entries}
    parties = processes.run_dir / "parties"
    assert sorted(path.parent.name for path in parties.glob("*/*.audit.jsonl")) == sorted(processes.reports)
    verification = verify_path(parties, keys, require_closed=True)
    assert verification.ok, verification.summary()
    reconciliation = reconcile(parties)
    assert reconciliation.ok, reconciliation.summary()


@pytest.mark.slow
def test_no_process_opens_any_private_key_but_its_own(runs):
    _, _, processes = runs
    for party, report in processes.reports.items():
        own = (processes.run_dir / "parties" / party / IDENTITY_FILE).resolve()
        opened = [(Path(path).resolve(), how) for path, how in report["pem_opens"]]
        assert {path for path, _ in opened} == {own}, party
        assert (own, "read") in opened, party  # the party loaded its key through the watched open
