"""Server and sites talk only in signed bytes; only the shared adapter's update (and a shared head's) leaves a
site, and only as the input of the secure-aggregation protocol; the server applies nothing but the protocol's
aggregate, and only from sites whose reports it accepted."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from conftest import simulated_federation, small_config

from feddat_secure.federation import envelopes as E
from feddat_secure.federation.server_app import RoundLog
from feddat_secure.federation.updates import StateLayout, apply_mean_update
from feddat_secure.model.adapters import AdapterStateError
from feddat_secure.training.local_model import HEAD_PREFIX
from feddat_secure.training.trainers import CLIENT, SHARED
from protocols import MessageRejected, Outgoing, drive_round
from protocols.wire import peek

QUIET = RoundLog(write=lambda record: record, echo=lambda _: None)


def federation_of(tmp_path, foundation, *, head: str = "local", **sections):
    """3 sites, one short round, plain aggregation (the sum is exact, so results compare to the last bit)."""
    sections.setdefault("secure_aggregation", {"protocol": "plain"})
    config = small_config(tmp_path, model={"head": head}, federation={"rounds": 1}, data={"test_per_client": 8},
                          training={"local_steps": 2}, **sections)
    return simulated_federation(config, foundation)


def train_request(federation, cid: str = "client0", round_index: int = 0, arrays=None) -> bytes:
    server = federation.server
    arrays = E.state_arrays(server.global_state) if arrays is None else arrays
    fields = {"model_sha256": E.model_digest(arrays), "send_update": True,
              **server.privacy.train_terms(len(federation.sites))}
    return server.stamp.envelope(E.TRAIN, round_index, cid, fields, arrays)


def record_protocol_inputs(federation) -> dict[str, tuple[np.ndarray, int]]:
    """Each site's input to its secure-aggregation session (update, weight), as the site hands it over."""
    inputs = {}
    for cid, site in federation.sites.items():
        def set_input(round_index, vector, weight, *args, cid=cid, original=site.aggregation.set_input, **kwargs):
            inputs[cid] = (np.array(vector, copy=True), weight)
            return original(round_index, vector, weight, *args, **kwargs)

        site.aggregation.set_input = set_input
    return inputs


@pytest.mark.parametrize("head", ["local", "shared"])
def test_the_update_goes_only_into_the_protocol_and_is_the_change_of_the_shared_state(foundation, tmp_path, head):
    federation = federation_of(tmp_path, foundation, head=head)
    server, site = federation.server, federation.sites["client0"]
    received = E.state_arrays(server.global_state)
    assert any(k.startswith(HEAD_PREFIX) for k in received) == (head == "shared")

    [answer] = site.handle(train_request(federation))
    report = server.stamp.open(answer.data, session=server.stamp.session)
    assert (report.stage, report.recipient, report.arrays, report.blobs) == (E.UPDATE, "server", {}, {})
    assert set(report.fields) == {"refused", "num_examples", "losses", "epsilon", "clipped"}
    assert report.fields["refused"] is None and report.fields["num_examples"] == len(site.train)
    assert report.fields["clipped"] == 0  # plain aggregation clips nothing

    layout = StateLayout.of(received)
    expected = layout.flatten(site.trainer.shared_state()) - layout.flatten(received)
    assert np.any(expected != 0)
    # the round's context is the digest of the model the site trained from: the server announces the same
    summed = drive_round(server.session, {"client0": site.aggregation}, None, 0, layout.size,
                         round_context=E.model_digest(received)).vector
    assert site.weight == len(site.train)  # aggregation by examples
    np.testing.assert_allclose(summed, site.weight * expected, rtol=0, atol=1e-12)  # Σ w·u over this one site
    client_adapter = {**site.trainer.model.adapters.get_state(CLIENT),
                      **{k: v for k, v in site.trainer.shared_state().items() if k.startswith(HEAD_PREFIX)}}
    # A_c stays home: what travels is not the change of the client adapter
    assert not np.allclose(summed / site.weight, layout.flatten(client_adapter) - layout.flatten(received))


def test_the_weighted_mean_update_is_applied_from_the_aggregate_only(foundation, tmp_path):
    reference = {"w": np.zeros((2, 3), np.float32), "v": np.ones(4, np.float32)}
    layout = StateLayout.of(reference)
    summed = np.full(layout.size, 8.0)  # e.g. 10 examples × 0.2 + 30 examples × 0.2
    for key, value in apply_mean_update(layout, reference, summed, total_weight=40.0).items():
        np.testing.assert_allclose(value, reference[key] + 0.2, rtol=1e-6)
    with pytest.raises(ValueError, match="no weight"):
        apply_mean_update(layout, reference, summed, total_weight=0.0)

    federation = federation_of(tmp_path, foundation)
    for weight, site in enumerate(federation.sites.values(), start=1):
        site.weight = weight  # unequal weights, so that the weighted and the plain mean differ
    inputs = record_protocol_inputs(federation)
    before = {k: v.copy() for k, v in federation.server.global_state.items()}
    federation.server.run(QUIET)
    assert sorted(inputs) == ["client0", "client1", "client2"]
    total = sum(weight for _, weight in inputs.values())
    mean = sum(weight * update for update, weight in inputs.values()) / total
    layout = StateLayout.of(before)
    after = layout.flatten(federation.server.global_state)
    np.testing.assert_allclose(after, layout.flatten(before) + mean, rtol=0, atol=1e-7)
    assert not np.allclose(after, layout.flatten(before) + np.mean([u for u, _ in inputs.values()], axis=0),
                           rtol=0, atol=1e-7)


class Tampering:
    """client0's end of the channel: its real party answers, and ``forge`` turns its update report (the reply to
    ``train``) into what a misbehaving site sends instead; every other reply goes out unchanged."""

    def __init__(self, served, forge: Callable[[Outgoing], list[Outgoing]]):
        self.served, self.forge = served, forge
        self.party_id = served.party_id

    def handle(self, data: bytes) -> list[Outgoing]:
        answers = self.served.handle(data)
        if peek(data).stage != E.TRAIN:
            return answers
        [report] = answers
        return self.forge(report)


def resigned(site, report: Outgoing, *, round_index: int = 0, recipient: str = "server", arrays=None,
             **fields) -> Outgoing:
    """``report`` with ``fields`` changed, signed by ``site`` (its real key)."""
    content = {**peek(report.data).fields, **fields}
    return Outgoing(recipient, site.stamp.envelope(E.UPDATE, round_index, recipient, content, arrays or {}))


def changed(**fields) -> Callable:
    """client0 signs a report with ``fields`` changed: well signed, but no honest site sends it."""
    return lambda sites, report: [resigned(sites["client0"], report, **fields)]


# (sites, client0's report) → what client0 answers; the server's audit event and reason; counted? A report the
# server refuses, for its signature or its content, is one message_rejected entry, written after the decision.
DROPPED = {
    "sent twice": (lambda sites, report: [report, report], "message_rejected", "expected one 'update' reply", True),
    "signed by another site": (lambda sites, report: [resigned(sites["client1"], report)], "message_rejected",
                               "from 'client0'", False),
    "of another round": (changed(round_index=1), "message_rejected", "reply of round 1 from", False),
    "addressed to another party": (changed(recipient="client1"), "message_rejected", "addressed to 'client1'",
                                   False),
    "missing": (lambda sites, report: [], None, None, False),
    "with no examples": (changed(num_examples=0), "message_rejected", "num_examples must be a positive integer", False),
    "with a boolean count": (changed(num_examples=True), "message_rejected", "num_examples must be a positive integer",
                             False),
    "carrying an update": (changed(arrays={"update": np.ones(3, np.float32)}), "message_rejected",
                           "only through the secure-aggregation protocol", False),
    "with unknown fields": (changed(extra=1), "message_rejected", "has fields", False),
}


@pytest.mark.parametrize("case", DROPPED)
def test_a_refused_update_report_leaves_its_site_out_of_the_aggregate(foundation, tmp_path, case):
    forge, event, reason, counted = DROPPED[case]
    federation = federation_of(tmp_path, foundation)
    federation.channel.endpoints["client0"] = Tampering(federation.channel.endpoints["client0"],
                                                        lambda report: forge(federation.sites, report))
    inputs = record_protocol_inputs(federation)
    before = {k: v.copy() for k, v in federation.server.global_state.items()}
    server = federation.server
    server.run(QUIET)

    [record] = server.history
    expected_sites = ["client0", "client1", "client2"] if counted else ["client1", "client2"]
    assert record["trained"] == expected_sites and record["aggregation"]["counted"] == expected_sites
    layout = StateLayout.of(before)
    weights = sum(inputs[cid][1] for cid in expected_sites)
    mean = sum(inputs[cid][1] * inputs[cid][0] for cid in expected_sites) / weights
    np.testing.assert_allclose(layout.flatten(server.global_state), layout.flatten(before) + mean, rtol=0, atol=1e-7)
    refusals = [e for e in audit_entries(server) if e["event"] in ("message_rejected", "party_dropped")]
    if event is None:
        assert refusals == []
    else:
        [refusal] = refusals
        assert (refusal["event"], refusal["peer"]) == (event, "client0") and reason in refusal["meta"]["reason"]


def test_nothing_is_applied_when_no_update_report_passes(foundation, tmp_path):
    federation = federation_of(tmp_path, foundation)
    for cid in federation.sites:
        federation.channel.endpoints[cid] = Tampering(
            federation.channel.endpoints[cid], lambda report, cid=cid: [resigned(federation.sites[cid], report,
                                                                                  num_examples=0)])
    server = federation.server
    before = {k: v.copy() for k, v in server.global_state.items()}
    server.run(QUIET)
    [record] = server.history
    assert record["trained"] == [] and record["aggregation"]["counted"] == [] and "skipped" in record["aggregation"]
    for key, value in before.items():
        np.testing.assert_array_equal(server.global_state[key], value)


def audit_entries(party) -> list[dict]:
    return [json.loads(line) for line in party.folder.audit_log.read_text().splitlines()]


WRONG_MODELS = {  # a global state a site must not load, even signed by the server with its matching digest
    "of the wrong shape": (lambda state, head: {k: np.zeros((1, 1), np.float32) for k in state}, "shape"),
    "missing a tensor": (lambda state, head: dict(sorted(state.items())[1:]), "missing"),
    "with a head that stays local": (lambda state, head: {**state, **head}, "head"),
}


@pytest.mark.parametrize("case", WRONG_MODELS)
def test_a_site_refuses_a_global_state_that_does_not_fit_and_keeps_its_own(foundation, tmp_path, case):
    make, reason = WRONG_MODELS[case]
    federation = federation_of(tmp_path, foundation)  # heads stay local
    site = federation.sites["client0"]
    before = {**site.trainer.model.adapters.get_state(SHARED), **site.trainer.model.head_state()}
    wrong = make(site.trainer.shared_state(), site.trainer.model.head_state())
    with pytest.raises(MessageRejected, match=reason):
        site.handle(train_request(federation, arrays=wrong))
    after = {**site.trainer.model.adapters.get_state(SHARED), **site.trainer.model.head_state()}
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
    assert site.last_trained_round == -1


def test_parties_act_on_bytes_only_and_the_server_counts_the_bytes_of_each_direction(foundation, tmp_path):
    federation = federation_of(tmp_path, foundation)
    site, server = federation.sites["client0"], federation.server
    with pytest.raises(MessageRejected, match="not a readable message"):
        site.handle({"tensors": 1})
    with pytest.raises(MessageRejected, match="must be bytes"):
        server.stamp.open({"tensors": 1}, session=server.stamp.session)

    sent, received = {}, {}
    original = federation.channel.exchange

    def exchange(requests, *, deadline_s):
        replies = original(requests, deadline_s=deadline_s)
        for request in requests:
            sent[request.recipient] = sent.get(request.recipient, 0) + len(request.data)
        for reply in replies:
            for message in reply.messages or ():
                received[reply.party] = received.get(reply.party, 0) + len(message.data)
        return replies

    opened = dict(server.link.bytes_sent), dict(server.link.bytes_received)  # the session's opening
    federation.channel.exchange = exchange
    server.run(QUIET)
    for cid in federation.sites:
        assert server.link.bytes_sent[cid] - opened[0].get(cid, 0) == sent[cid]
        assert server.link.bytes_received[cid] - opened[1].get(cid, 0) == received[cid]
    [record] = server.history  # the round's tree heads travel with its evaluation: the record counts every byte
    assert 0 < record["bytes_to_server_total"] == sum(server.link.bytes_received.values())
    assert 0 < record["bytes_to_clients_total"] == sum(server.link.bytes_sent.values())


def test_a_bad_adapter_in_the_global_state_leaves_the_shared_head_untouched(foundation, tmp_path):
    site = federation_of(tmp_path, foundation, head="shared").sites["client0"]
    head_before = site.trainer.model.head_state()
    state = {k: np.zeros((1, 1), dtype=np.float32) for k in site.trainer.model.adapters.get_state(SHARED)}
    state.update({k: np.ones_like(v) for k, v in head_before.items()})
    with pytest.raises(AdapterStateError, match="global adapter"):
        site.trainer.load_global(state)
    for key, value in site.trainer.model.head_state().items():
        np.testing.assert_array_equal(value, head_before[key])
