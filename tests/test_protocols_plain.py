"""The insecure reference protocol and the generic machinery it exercises (driver, registry, rejections)."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import (
    ConfigurationError,
    Identity,
    MessageRejected,
    ProtocolError,
    Roster,
    RoundAborted,
    drive_round,
    make_protocol,
    new_session_id,
    registered_protocols,
    simulate_round,
)


def updates(n: int, length: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=length) for _ in range(n)]


def test_plain_returns_the_weighted_sum():
    xs, ws = updates(4), [1.0, 2.5, 3.0, 0.5]
    np.testing.assert_allclose(simulate_round("plain", xs, ws), sum(w * x for w, x in zip(ws, xs)))


def test_plain_counts_only_clients_that_answered():
    xs = updates(3)
    np.testing.assert_allclose(simulate_round("plain", xs, dropouts={1: "input"}), xs[0] + xs[2])


def test_plain_aborts_when_nobody_answers():
    with pytest.raises(RoundAborted, match="stage 'input'") as caught:
        simulate_round("plain", updates(2), dropouts={0: "input", 1: "input"})
    assert caught.value.stage == "input"


def test_plain_is_labelled_insecure():
    assert make_protocol("plain").insecure
    assert registered_protocols() == ("plain", "masked", "he")


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.array([np.inf, 0.0])])
def test_nan_or_inf_input_is_refused_on_the_client(bad):
    with pytest.raises(ProtocolError, match="NaN or infinite"):
        simulate_round("plain", [np.zeros(2), bad])


def test_unknown_protocol_option_or_stage_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="unknown protocol"):
        make_protocol("magic")
    with pytest.raises(ConfigurationError):
        make_protocol("plain", colour="red")
    with pytest.raises(ConfigurationError, match="unknown stage"):
        simulate_round("plain", updates(2), dropouts={0: "tea-break"})
    with pytest.raises(ConfigurationError, match="do not exist"):
        simulate_round("plain", updates(2), dropouts={5: "input"})


class Parties:
    def __init__(self, n: int = 2, session: str | None = None):
        self.protocol = make_protocol("plain")
        self.session = session or new_session_id()
        self.server_id = Identity.generate("server")
        self.ids = [Identity.generate(f"client-{i}") for i in range(n)]
        self.roster = Roster.from_identities(self.server_id, self.ids)
        self.server = self.protocol.server(self.server_id, self.roster, session=self.session)
        self.clients = {i.party_id: self.protocol.client(i, self.roster, session=self.session) for i in self.ids}


def test_driver_reports_every_message_and_rejection():
    parties = Parties()
    for client in parties.clients.values():
        client.set_input(5, np.ones(3), 1.0)
    seen, rejected = [], []
    result = drive_round(parties.server, parties.clients, None, 5, 3, deliver=lambda s, r, d: seen.append((s, r)),
                         on_rejection=lambda s, reason: rejected.append((s, reason)))
    assert sorted(seen) == sorted([("server", "client-0"), ("server", "client-1"), ("client-0", "server"),
                                   ("client-1", "server")])
    assert not rejected
    assert result.counted == ("client-0", "client-1") and result.total_weight == 2.0


def test_replays_duplicates_and_strangers_are_rejected_without_changing_state():
    parties = Parties()
    request = {o.recipient: o.data for o in parties.server.begin_round(1, ["client-0", "client-1"], 3)}
    client = parties.clients["client-0"]
    client.set_input(1, np.ones(3), 2.0)
    answer = client.handle(request["client-0"])[0].data
    with pytest.raises(MessageRejected, match="no input is waiting"):
        client.handle(request["client-0"])  # the same request again
    with pytest.raises(MessageRejected, match="recipient"):
        parties.clients["client-1"].handle(request["client-0"])
    parties.server.receive(answer)
    with pytest.raises(MessageRejected, match="duplicate"):
        parties.server.receive(answer)
    parties.server.advance()
    np.testing.assert_allclose(parties.server.result().vector, 2 * np.ones(3))
    # the same signed answer offered in the next round is stale
    parties.server.begin_round(2, ["client-0"], 3)
    with pytest.raises(MessageRejected, match="unexpected round 1, expected 2"):
        parties.server.receive(answer)


def test_wrong_vector_length_is_rejected_by_the_client():
    parties = Parties()
    request = {o.recipient: o.data for o in parties.server.begin_round(0, ["client-0"], 4)}
    parties.clients["client-0"].set_input(0, np.ones(3), 1.0)
    with pytest.raises(MessageRejected, match="length 3"):
        parties.clients["client-0"].handle(request["client-0"])


def test_server_refuses_clients_not_on_the_roster():
    parties = Parties()
    with pytest.raises(ConfigurationError, match="not enrolled"):
        parties.server.begin_round(0, ["client-0", "client-7"], 3)


def test_a_party_reads_only_messages_of_its_own_session():
    parties = Parties()
    other_run = parties.protocol.server(parties.server_id, parties.roster, session=new_session_id())
    request = {o.recipient: o.data for o in other_run.begin_round(0, ["client-0"], 3)}["client-0"]
    client = parties.clients["client-0"]
    client.set_input(0, np.ones(3), 1.0)
    with pytest.raises(MessageRejected, match="this party is in session"):
        client.handle(request)  # same server, same key, same round: only the session differs
    answer = client.handle({o.recipient: o.data for o in parties.server.begin_round(0, ["client-0"], 3)}["client-0"])
    assert answer[0].recipient == "server"


def test_a_party_reads_only_messages_signed_under_its_roster():
    parties = Parties(session=new_session_id())
    larger = Roster.from_identities(parties.server_id, [*parties.ids, Identity.generate("client-9")])
    server = parties.protocol.server(parties.server_id, larger, session=parties.session)
    request = {o.recipient: o.data for o in server.begin_round(0, ["client-0"], 3)}["client-0"]
    parties.clients["client-0"].set_input(0, np.ones(3), 1.0)
    with pytest.raises(MessageRejected, match=f"signed under roster {larger.digest}"):
        parties.clients["client-0"].handle(request)


def test_a_session_id_must_be_well_formed():
    parties = Parties()
    with pytest.raises(ConfigurationError, match="invalid session id"):
        parties.protocol.client(parties.ids[0], parties.roster, session="run-1")


def test_an_input_larger_than_the_round_can_carry_is_refused_before_parsing():
    server_identity, client = Identity.generate("server"), Identity.generate("client-0")
    roster = Roster.from_identities(server_identity, [client])
    server = make_protocol("plain").server(server_identity, roster, session=new_session_id())
    server.begin_round(0, ["client-0"], 6)
    with pytest.raises(MessageRejected, match="oversized message"):
        server.receive(b"FDSP" + bytes(8 << 20))  # 8 MiB for a 6-value round
