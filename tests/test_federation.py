"""Server and clients talk only in bytes; only the shared adapter (and a shared head) leaves a site."""

from __future__ import annotations

import numpy as np
import pytest

from feddat_secure.config import TrainingConfig
from feddat_secure.data.batching import encode_split
from feddat_secure.federation.client import SERVER_ID, FederatedClient
from feddat_secure.federation.messages import Message, MessageError, decode, encode
from feddat_secure.federation.server import FederationServer, weighted_average
from feddat_secure.federation.transport import InProcessTransport
from feddat_secure.model.adapters import AdapterStateError
from feddat_secure.training.local_model import HEAD_PREFIX, LocalModel
from feddat_secure.training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, FedDATTrainer, Schedule


def test_weighted_average_uses_the_given_weights():
    states = [{"w": np.array([1.0, 0.0], dtype=np.float32)}, {"w": np.array([0.0, 4.0], dtype=np.float32)}]
    np.testing.assert_allclose(weighted_average(states, [3, 1])["w"], [0.75, 1.0])
    np.testing.assert_allclose(weighted_average(states, [1, 1])["w"], [0.5, 2.0])


def make_site(foundation, lora, benchmark, index: int, *, head_travels: bool) -> FederatedClient:
    client = benchmark.clients[index]
    model = LocalModel(foundation, lora, (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT),
                       len(benchmark.answers), seed=index)
    trainer = FedDATTrainer(model, Schedule(TrainingConfig(local_steps=2, batch_size=8), 2),
                            head_travels=head_travels)
    splits = [encode_split(s, foundation.tokenizer, benchmark.answer_index, foundation.max_text_length,
                           foundation.image_size) for s in (client.train, client.test)]
    return FederatedClient(client.client_id, trainer, *splits, batch_size=8, local_steps=2, seed=index)


def initial_state(site: FederatedClient, head: bool) -> dict:
    state = site.trainer.model.adapters.get_state(SHARED)
    if head:
        state.update(site.trainer.model.head_state())
    return state


@pytest.mark.parametrize("head_travels", [False, True])
def test_update_carries_only_the_shared_adapter_and_a_shared_head(foundation, lora, tiny_benchmark, head_travels):
    site = make_site(foundation, lora, tiny_benchmark, 0, head_travels=head_travels)
    server = FederationServer(initial_state(site, head_travels), aggregation="examples", aggregate=True)
    [(_, train)] = server.train_messages(0, ["client0"])
    update = decode(site.handle(train))
    adapters = site.trainer.model.adapters
    expected = set(adapters.get_state(SHARED))
    if head_travels:
        expected |= {k for k in site.trainer.model.head_state()}
    assert set(update.tensors) == expected
    for key, value in adapters.get_state(SHARED).items():
        np.testing.assert_array_equal(update.tensors[key], value)
    client_adapter = adapters.get_state(CLIENT)
    assert not any(np.array_equal(update.tensors[k], client_adapter[k]) for k in client_adapter
                   if np.any(client_adapter[k]))
    assert any(k.startswith(HEAD_PREFIX) for k in update.tensors) == head_travels


def test_server_averages_updates_weighted_by_examples_or_uniformly(foundation, lora, tiny_benchmark):
    reference = initial_state(make_site(foundation, lora, tiny_benchmark, 0, head_travels=False), False)
    for aggregation, expected in (("examples", 0.25 * 1 + 0.75 * 5), ("uniform", 3.0)):
        server = FederationServer(reference, aggregation=aggregation, aggregate=True)
        updates = [
            encode(Message("update", 0, cid, SERVER_ID, {k: np.full_like(v, value) for k, v in reference.items()},
                           {"num_examples": count}))
            for cid, value, count in (("client0", 1.0, 10), ("client1", 5.0, 30))
        ]
        server.receive_updates(0, ["client0", "client1"], updates)
        for value in server.global_state.values():
            np.testing.assert_allclose(value, expected, rtol=1e-6)


def update_from(cid: str, state: dict, round_index: int = 0, count: int = 4) -> bytes:
    return encode(Message("update", round_index, cid, SERVER_ID, state, {"num_examples": count}))


@pytest.mark.parametrize("problem, messages_for", [
    ("duplicate", lambda s: [update_from("client0", s), update_from("client0", s)]),
    ("not in this round", lambda s: [update_from("mallory", s)]),
    ("round 1", lambda s: [update_from("client0", s, round_index=1)]),
    ("no 'update' message from client0", lambda s: []),
    ("num_examples", lambda s: [update_from("client0", s, count=0)]),
    ("missing keys", lambda s: [update_from("client0", dict(list(s.items())[1:]))]),
])
def test_server_rejects_bad_updates_and_keeps_its_global_state(foundation, lora, tiny_benchmark, problem,
                                                               messages_for):
    reference = initial_state(make_site(foundation, lora, tiny_benchmark, 0, head_travels=False), False)
    server = FederationServer(reference, aggregation="examples", aggregate=True)
    with pytest.raises(MessageError, match=problem):
        server.receive_updates(0, ["client0"], messages_for(reference))
    for key, value in reference.items():
        np.testing.assert_array_equal(server.global_state[key], value)


def test_client_rejects_a_replayed_train_message_and_foreign_recipients(foundation, lora, tiny_benchmark):
    site = make_site(foundation, lora, tiny_benchmark, 0, head_travels=False)
    server = FederationServer(initial_state(site, False), aggregation="examples", aggregate=True)
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
