"""Sessions export their state as plain values and are rebuilt from it, at any point of a round.

The strongest use is a deployment that handles every message in a fresh process: ``Restarting`` stands
for one party and rebuilds it from the previous instance's ``state_dict()`` (through JSON and numpy's
own serialization, as a checkpoint would keep it) before every single call. A round run that way
must give the uninterrupted round's result.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from protocols import (
    ConfigurationError,
    Identity,
    MessageRejected,
    Roster,
    drive_round,
    make_protocol,
    new_session_id,
    setup_keyholder,
)

SMALL_HE = {"poly_modulus_degree": 4096}


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through JSON (plain values) and ``np.save`` (arrays), refusing anything else: str, int, float,
    bool, None, lists, dicts with str keys and numeric numpy arrays are all a checkpoint can keep."""
    arrays: list[bytes] = []

    def split(node: Any) -> Any:
        if isinstance(node, np.ndarray):
            assert node.dtype.kind in "biuf", f"an array of {node.dtype}"
            buffer = io.BytesIO()
            np.save(buffer, node, allow_pickle=False)
            arrays.append(buffer.getvalue())
            return {"__array__": len(arrays) - 1}
        if isinstance(node, dict):
            assert all(isinstance(key, str) for key in node), f"non-string keys in {list(node)}"
            return {key: split(value) for key, value in node.items()}
        if isinstance(node, list):
            return [split(value) for value in node]
        assert node is None or type(node) in (bool, int, float, str), f"not a plain value: {type(node).__name__}"
        return node

    def join(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__array__"}:
                return np.load(io.BytesIO(arrays[node["__array__"]]), allow_pickle=False)
            return {key: join(value) for key, value in node.items()}
        if isinstance(node, list):
            return [join(value) for value in node]
        return node

    return join(json.loads(json.dumps(split(state), allow_nan=False)))


class Restarting:
    """Stands for one party: before every use it is rebuilt from the state its previous instance left behind,
    as if each message were handled in a fresh process."""

    def __init__(self, build: Callable[[dict[str, Any] | None], Any], party: Any):
        self._build = build
        self._state = round_trip(party.state_dict())
        self.rebuilds = 0

    def __getattr__(self, name: str) -> Any:
        party = self._build(self._state)
        self.rebuilds += 1
        value = getattr(party, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            finally:  # also after a rejection, which must leave the state as it was
                self._state = round_trip(party.state_dict())

        return call


class Federation:
    """One session's parties with fresh identities; ``restarting()`` wraps each in ``Restarting``."""

    def __init__(self, name: str, n: int, **options: Any):
        self.protocol = make_protocol(name, **options)
        self.session = new_session_id()
        self.identities = {party: Identity.generate(party) for party in
                           ["server", *(f"client-{i}" for i in range(n))]
                           + (["keyholder"] if self.protocol.needs_keyholder else [])}
        clients = [self.identities[f"client-{i}"] for i in range(n)]
        self.roster = Roster.from_identities(self.identities["server"], clients, self.identities.get("keyholder"))

    def server(self, state=None):
        return self.protocol.server(self.identities["server"], self.roster, session=self.session, state=state)

    def client(self, name: str, state=None):
        return self.protocol.client(self.identities[name], self.roster, session=self.session, state=state)

    def keyholder(self, state=None):
        return self.protocol.keyholder(self.identities["keyholder"], self.roster, session=self.session, state=state)

    def parties(self, *, restarting: bool):
        server = self.server()
        clients = {name: self.client(name) for name in self.identities if name.startswith("client-")}
        keyholder = self.keyholder() if self.protocol.needs_keyholder else None
        if restarting:
            server = Restarting(self.server, server)
            clients = {name: Restarting(lambda state, name=name: self.client(name, state), client)
                       for name, client in clients.items()}
            keyholder = None if keyholder is None else Restarting(self.keyholder, keyholder)
        return server, clients, keyholder

    def run(self, inputs, weights, *, restarting: bool, dropouts=None, round_id: int = 0):
        server, clients, keyholder = self.parties(restarting=restarting)
        if keyholder is not None:
            setup_keyholder(keyholder, clients)
        for client, vector, weight in zip(clients.values(), inputs, weights):
            client.set_input(round_id, vector, weight)
        messages = []
        result = drive_round(server, clients, keyholder, round_id, len(inputs[0]), dropouts=dropouts,
                             deliver=lambda sender, recipient, data: messages.append(recipient))
        rebuilds = sum(party.rebuilds for party in [server, *clients.values(), keyholder]
                       if isinstance(party, Restarting))
        return result, messages, rebuilds


def inputs(n: int, length: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.2, 0.2, size=length) for _ in range(n)]


@pytest.mark.parametrize("stage", ["masked_input", "unmask"])
def test_a_masked_round_with_a_dropout_gives_the_same_sum_when_every_party_restarts_before_every_message(stage):
    # before masked_input: the others reveal the dropped client's mask key; before unmask: its self-mask share
    federation = Federation("masked", 5, graph="complete", threshold=3, seed=4)
    xs, ws = inputs(5, 24), [3, 1, 4, 1, 5]
    dropouts = {"client-2": stage}
    expected, _, _ = federation.run(xs, ws, restarting=False, dropouts=dropouts)
    result, messages, rebuilds = federation.run(xs, ws, restarting=True, dropouts=dropouts)
    assert rebuilds > len(messages) > 20
    assert result.counted == expected.counted and result.total_weight == expected.total_weight
    np.testing.assert_array_equal(result.integer_sum, expected.integer_sum)
    np.testing.assert_array_equal(result.vector, expected.vector)


def test_an_he_round_with_a_dropout_gives_the_same_sum_when_every_party_restarts_before_every_message():
    # client-1 drops before its input: it is not counted, so never drawn into the committee (all three others)
    federation = Federation("he", 4, **SMALL_HE)
    xs, ws = inputs(4, 2100), [2.0, 7.0, 1.0, 3.0]  # two ciphertexts per input
    dropouts = {"client-1": "input"}
    expected, _, _ = federation.run(xs, ws, restarting=False, dropouts=dropouts)
    result, messages, rebuilds = federation.run(xs, ws, restarting=True, dropouts=dropouts)
    assert rebuilds > len(messages) >= 20
    assert result.counted == expected.counted == ("client-0", "client-2", "client-3")
    step = federation.protocol.options.output_step  # fresh keys, fresh noise: equal up to the released rounding
    assert result.total_weight == pytest.approx(expected.total_weight, abs=step)
    np.testing.assert_allclose(result.vector, expected.vector, rtol=0, atol=step)
    np.testing.assert_allclose(result.vector, ws[0] * xs[0] + ws[2] * xs[2] + ws[3] * xs[3], rtol=0, atol=step)


def test_a_plain_round_gives_the_same_sum_when_every_party_restarts_before_every_message():
    federation = Federation("plain", 3)
    xs, ws = inputs(3, 10), [1.0, 2.0, 3.0]
    expected, _, _ = federation.run(xs, ws, restarting=False)
    result, _, _ = federation.run(xs, ws, restarting=True)
    np.testing.assert_array_equal(result.vector, expected.vector)


def test_parties_keep_their_state_across_rounds_when_restarted_between_them():
    federation = Federation("masked", 3, graph="complete", threshold=2)
    server = federation.server()
    clients = {name: federation.client(name) for name in ("client-0", "client-1", "client-2")}
    for round_id in (1, 2):
        for client in clients.values():
            client.set_input(round_id, np.full(4, 0.01 * round_id), 1)
        result = drive_round(server, clients, None, round_id, 4)
        np.testing.assert_allclose(result.vector, np.full(4, 0.03 * round_id), atol=1e-4)
        server = federation.server(round_trip(server.state_dict()))
        clients = {name: federation.client(name, round_trip(client.state_dict())) for name, client in clients.items()}
        np.testing.assert_array_equal(server.result().vector, result.vector)  # the finished round's result too


def refusal(party: Any, method: str, data: bytes) -> str:
    with pytest.raises(MessageRejected) as caught:
        getattr(party, method)(data)
    return str(caught.value)


def test_a_restored_masked_party_refuses_a_replay_exactly_like_the_original():
    federation = Federation("masked", 3, graph="complete", threshold=2)
    server, clients, _ = federation.parties(restarting=False)
    for client in clients.values():
        client.set_input(0, np.zeros(4), 1)
    requests = {o.recipient: o.data for o in server.begin_round(0, list(clients), 4)}
    answer = clients["client-0"].handle(requests["client-0"])[0].data
    server.receive(answer)
    client_copy = federation.client("client-0", round_trip(clients["client-0"].state_dict()))
    server_copy = federation.server(round_trip(server.state_dict()))
    assert refusal(client_copy, "handle", requests["client-0"]) == refusal(clients["client-0"], "handle",
                                                                          requests["client-0"])
    assert "duplicate" in refusal(server_copy, "receive", answer) == refusal(server, "receive", answer)


def he_round_to_the_draw(federation: Federation, values: list[float]):
    """An HE round driven by hand up to the key holder's committee announcement (every client counted);
    returns the parties and the messages a replay could reuse."""
    server, clients, keyholder = federation.parties(restarting=False)
    for client, value in zip(clients.values(), values):
        client.set_input(0, np.full(8, value), 1.0)
    [setup] = server.begin_round(0, list(clients), 8)
    contexts = {o.recipient: o.data for o in keyholder.handle(setup.data)}
    server.receive(contexts["server"])
    for name, client in clients.items():
        server.receive(client.handle(contexts[name])[0].data)
    for request in server.advance():  # the committed list; every client reveals against it
        server.receive(clients[request.recipient].handle(request.data)[0].data)
    [draw] = server.advance()
    [announcement] = keyholder.handle(draw.data)
    server.receive(announcement.data)
    return server, clients, keyholder, {"setup": setup.data, "contexts": contexts, "draw": draw.data,
                                        "announcement": announcement.data}


def he_round_to_the_aggregate(server, clients) -> bytes:
    """The committee attests (every member forwarded what the server relays); returns the aggregate request."""
    for message in server.advance():
        for answer in clients[message.recipient].handle(message.data):
            server.receive(answer.data)
    [aggregate] = server.advance()
    return aggregate.data


def test_a_restored_he_party_refuses_a_replay_exactly_like_the_original():
    federation = Federation("he", 3, **SMALL_HE)
    server, clients, keyholder, sent = he_round_to_the_draw(federation, [0.1, 0.1, 0.1])
    keyholder_copy = federation.keyholder(round_trip(keyholder.state_dict()))
    assert "already been drawn" in refusal(keyholder_copy, "handle", sent["draw"]) == refusal(keyholder, "handle",
                                                                                               sent["draw"])
    assert "is not after round 0" in refusal(keyholder_copy, "handle", sent["setup"])
    client_copy = federation.client("client-0", round_trip(clients["client-0"].state_dict()))
    assert refusal(client_copy, "handle", sent["contexts"]["client-0"]) == refusal(clients["client-0"], "handle",
                                                                                   sent["contexts"]["client-0"])
    aggregate = he_round_to_the_aggregate(server, clients)  # client-0 is a member (the committee is all three)
    member_copy = federation.client("client-0", round_trip(clients["client-0"].state_dict()))
    assert "no round 0 is open" in refusal(member_copy, "handle", sent["announcement"]) == refusal(
        clients["client-0"], "handle", sent["announcement"])  # it attested once; a replayed announcement finds nothing
    keyholder.handle(aggregate)
    keyholder_copy = federation.keyholder(round_trip(keyholder.state_dict()))
    assert "no key is open" in refusal(keyholder_copy, "handle", aggregate) == refusal(keyholder, "handle", aggregate)


def test_a_restored_key_holder_decrypts_with_the_secret_key_and_committee_it_saved_mid_round():
    federation = Federation("he", 3, **SMALL_HE)
    server, clients, keyholder, sent = he_round_to_the_draw(federation, [0.25, 0.5, 0.75])
    saved = round_trip(keyholder.state_dict())  # this round's CKKS secret key, seal key and drawn committee
    restored = federation.keyholder(saved)
    assert "already been drawn" in refusal(restored, "handle", sent["draw"])
    [released] = federation.keyholder(saved).handle(he_round_to_the_aggregate(server, clients))
    server.receive(released.data)
    np.testing.assert_allclose(server.result().vector, np.full(8, 1.5), atol=1e-4)


def test_a_state_is_a_snapshot_that_later_messages_do_not_change():
    federation = Federation("masked", 3, graph="complete", threshold=2)
    server, clients, _ = federation.parties(restarting=False)
    for client in clients.values():
        client.set_input(0, np.full(4, 0.1), 1)
    outgoing = server.begin_round(0, list(clients), 4)
    for _ in range(3):  # commit, advertise_keys, share_keys: the next requests ask for masked input
        for message in outgoing:
            server.receive(clients[message.recipient].handle(message.data)[0].data)
        outgoing = server.advance()
    answers = [clients[message.recipient].handle(message.data)[0].data for message in outgoing]
    server.receive(answers[0])
    snapshot = server.state_dict()
    total = snapshot["state"]["round"]["total"].copy()
    server.receive(answers[1])  # adds into the server's running sum
    np.testing.assert_array_equal(snapshot["state"]["round"]["total"], total)


@pytest.mark.parametrize(("change", "message"), [
    (lambda state, f: {**state, "session": new_session_id()}, "saved with session"),
    (lambda state, f: {**state, "party": "client-1"}, "saved with party 'client-1'"),
    (lambda state, f: {**state, "roster": "0" * 64}, "saved with roster digest"),
    (lambda state, f: {**state, "options": {**state["options"], "modulus_bits": 24}},
     "other protocol options \\(modulus_bits differ\\)"),
    (lambda state, f: f.server().state_dict(), "it is the state of a masked server"),
    (lambda state, f: {**state, "state": {"round": {"round_id": 0}}}, "the state is malformed \\(KeyError"),
    (lambda state, f: {"weights": [1, 2]}, "not a protocol state"),
])
def test_a_state_is_restored_only_into_the_party_session_roster_and_options_it_was_saved_with(change, message):
    federation = Federation("masked", 3)
    client = federation.client("client-0")
    client.set_input(0, np.zeros(4), 1)
    with pytest.raises(ConfigurationError, match=message):
        federation.client("client-0", change(client.state_dict(), federation))
