"""Server and clients talk only in bytes; only the shared adapter's update (and a shared head's) leaves a
site, and only as the input of the secure-aggregation protocol."""

from __future__ import annotations

import numpy as np
import pytest

from feddat_secure.config import TrainingConfig
from feddat_secure.data.batching import encode_split
from feddat_secure.federation.client import SERVER_ID, FederatedClient
from feddat_secure.federation.messages import Message, MessageError, decode, encode
from feddat_secure.federation.server import FederationServer
from feddat_secure.federation.transport import InProcessTransport
from feddat_secure.federation.updates import StateLayout
from feddat_secure.model.adapters import AdapterStateError
from feddat_secure.training.local_model import HEAD_PREFIX, LocalModel
from feddat_secure.training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, FedDATTrainer, Schedule
from protocols import Identity, Roster, make_protocol
from protocols.simulation import drive_round


class PlainAggregation:
    """The real plain protocol for one site: its client session and the server that adds inputs up."""

    def __init__(self, client_id: str):
        self.protocol = make_protocol("plain")
        self.server_identity, identity = Identity.generate(SERVER_ID), Identity.generate(client_id)
        self.roster = Roster.from_identities(self.server_identity, [identity])
        self.session = self.protocol.client(identity, self.roster, SERVER_ID)
        self.client_id = client_id

    def run(self, round_index: int, length: int) -> np.ndarray:
        server = self.protocol.server(self.server_identity, self.roster)
        return drive_round(server, {self.client_id: self.session}, None, round_index, length).vector


def make_site(foundation, lora, benchmark, index: int, *, head_travels: bool) -> FederatedClient:
    client = benchmark.clients[index]
    model = LocalModel(foundation, lora, (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT),
                       len(benchmark.answers), seed=index)
    trainer = FedDATTrainer(model, Schedule(TrainingConfig(local_steps=2, batch_size=8), 2),
                            head_travels=head_travels)
    splits = [encode_split(s, foundation.tokenizer, benchmark.answer_index, foundation.max_text_length,
                           foundation.image_size) for s in (client.train, client.test)]
    state = initial_state_of(model, head_travels)
    return FederatedClient(client.client_id, trainer, *splits, batch_size=8, local_steps=2, seed=index, weight=3,
                           aggregation=PlainAggregation(client.client_id).session, layout=StateLayout.of(state))


def initial_state_of(model: LocalModel, head: bool) -> dict:
    state = model.adapters.get_state(SHARED)
    if head:
        state.update(model.head_state())
    return state


def initial_state(site: FederatedClient, head: bool) -> dict:
    return initial_state_of(site.trainer.model, head)


@pytest.mark.parametrize("head_travels", [False, True])
def test_the_update_goes_only_into_the_protocol_and_is_the_change_of_the_shared_state(
        foundation, lora, tiny_benchmark, head_travels):
    site = make_site(foundation, lora, tiny_benchmark, 0, head_travels=head_travels)
    aggregation = PlainAggregation("client0")
    site.aggregation = aggregation.session
    server = FederationServer(initial_state(site, head_travels), aggregate=True)
    received = server.global_state
    [(_, train)] = server.train_messages(0, ["client0"])
    report = decode(site.handle(train))
    assert report.kind == "update" and report.tensors == {} and report.meta["num_examples"] == len(site.train)
    layout = site.layout
    trained = initial_state(site, head_travels)
    expected = layout.flatten(trained) - layout.flatten(received)
    assert np.any(expected != 0)
    summed = aggregation.run(0, layout.size)
    np.testing.assert_allclose(summed, 3 * expected, rtol=0, atol=1e-12)  # weight 3: Σ w·u
    client_adapter = layout.flatten({**site.trainer.model.adapters.get_state(CLIENT),
                                     **({k: v for k, v in trained.items() if k.startswith(HEAD_PREFIX)})})
    assert not np.allclose(summed / 3, client_adapter - layout.flatten(received))  # A_c stays home


def test_server_applies_the_weighted_mean_update_from_the_aggregate_only(foundation, lora, tiny_benchmark):
    reference = initial_state(make_site(foundation, lora, tiny_benchmark, 0, head_travels=False), False)
    server = FederationServer(reference, aggregate=True)
    layout = StateLayout.of(reference)
    summed = np.full(layout.size, 8.0)  # e.g. 10 examples × 0.2 + 30 examples × 0.2
    server.apply_aggregate(layout, summed, total_weight=40.0)
    for key, value in server.global_state.items():
        np.testing.assert_allclose(value, reference[key] + 0.2, rtol=1e-6)


def update_from(cid: str, state: dict, round_index: int = 0, count: int = 4) -> bytes:
    return encode(Message("update", round_index, cid, SERVER_ID, state, {"num_examples": count}))


def report_from(cid: str, round_index: int = 0, count: int = 4) -> bytes:
    return update_from(cid, {}, round_index, count)


@pytest.mark.parametrize("problem, messages_for", [
    ("duplicate", lambda s: [report_from("client0"), report_from("client0")]),
    ("not in this round", lambda s: [report_from("mallory")]),
    ("round 1", lambda s: [report_from("client0", round_index=1)]),
    ("no 'update' message from client0", lambda s: []),
    ("num_examples", lambda s: [report_from("client0", count=0)]),
    ("only through the secure-aggregation protocol", lambda s: [update_from("client0", s)]),
])
def test_server_rejects_bad_update_reports_and_keeps_its_global_state(foundation, lora, tiny_benchmark, problem,
                                                                      messages_for):
    reference = initial_state(make_site(foundation, lora, tiny_benchmark, 0, head_travels=False), False)
    server = FederationServer(reference, aggregate=True)
    with pytest.raises(MessageError, match=problem):
        server.receive_updates(0, ["client0"], messages_for(reference))
    for key, value in reference.items():
        np.testing.assert_array_equal(server.global_state[key], value)


def test_client_rejects_a_replayed_train_message_and_foreign_recipients(foundation, lora, tiny_benchmark):
    site = make_site(foundation, lora, tiny_benchmark, 0, head_travels=False)
    server = FederationServer(initial_state(site, False), aggregate=True)
    [(_, train)] = server.train_messages(0, ["client0"])
    site.handle(train)
    with pytest.raises(MessageError, match="already trained"):
        site.handle(train)
    [(_, other)] = server.train_messages(1, ["client1"])
    with pytest.raises(MessageError, match="not for this client"):
        site.handle(other)


def test_client_refuses_a_global_state_of_the_wrong_shape(foundation, lora, tiny_benchmark):
    site = make_site(foundation, lora, tiny_benchmark, 0, head_travels=False)
    state = {k: np.zeros((1, 1), dtype=np.float32) for k in site.trainer.model.adapters.get_state(SHARED)}
    before = site.trainer.model.adapters.get_state(SHARED)
    with pytest.raises(AdapterStateError, match="shape"):
        site.handle(encode(Message("train", 0, SERVER_ID, "client0", state)))
    for key, value in site.trainer.model.adapters.get_state(SHARED).items():
        np.testing.assert_array_equal(value, before[key])


def test_transport_carries_bytes_only():
    transport = InProcessTransport()
    with pytest.raises(TypeError, match="bytes only"):
        transport.send("server", {"tensors": 1})
    transport.send("server", b"abc")
    assert transport.receive("server") == [b"abc"] and transport.bytes_received["server"] == 3


def test_a_bad_adapter_in_the_global_state_leaves_the_shared_head_untouched(foundation, lora, tiny_benchmark):
    site = make_site(foundation, lora, tiny_benchmark, 0, head_travels=True)
    head_before = site.trainer.model.head_state()
    state = {k: np.zeros((1, 1), dtype=np.float32) for k in site.trainer.model.adapters.get_state(SHARED)}
    state.update({k: np.ones_like(v) for k, v in head_before.items()})
    with pytest.raises(AdapterStateError, match="global adapter"):
        site.trainer.load_global(state)
    for key, value in site.trainer.model.head_state().items():
        np.testing.assert_array_equal(value, head_before[key])
