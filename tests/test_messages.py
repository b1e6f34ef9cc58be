"""The runner's own messages are signed envelopes: the model a request carries is bound to a digest the server
signed, and a site acts only on a request of its run's session, under its roster, from the server, for a round
it has not trained yet."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated_federation, small_config

from feddat_secure.federation import envelopes as E
from feddat_secure.federation.server_app import Server
from feddat_secure.federation.simulation import InMemoryChannel
from protocols import Envelope, Identity, MessageRejected, Outgoing, Roster, RosterEntry, new_session_id
from protocols.enrolment import enrol_parties
from protocols.wire import peek

STATE = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.ones(4, dtype=np.float32)}


def test_the_model_digest_depends_on_every_value_shape_and_name_and_nothing_else():
    digest = E.model_digest(STATE)
    assert digest == E.model_digest(dict(reversed(list(STATE.items()))))  # not on the order of the mapping
    assert digest == E.model_digest({k: v.astype(np.float64) for k, v in STATE.items()})  # the float32 values
    changed_value = {**STATE, "a": np.array([1, 1, 1, np.nextafter(np.float32(1), np.float32(2))], np.float32)}
    same_bytes_other_shape = {**STATE, "b": STATE["b"].reshape(3, 2)}
    swapped_names = {"a": STATE["b"].ravel()[:4].copy(), "b": np.concatenate([STATE["a"], [4, 5]]).reshape(2, 3)}
    renamed = {"a": STATE["a"], "c": STATE["b"]}
    assert same_bytes_other_shape["b"].tobytes() == STATE["b"].tobytes()
    digests = {E.model_digest(s) for s in (changed_value, same_bytes_other_shape, swapped_names, renamed)}
    assert digest not in digests and len(digests) == 4


def request(arrays, **fields) -> Envelope:
    return Envelope(E.PROTOCOL, 0, E.TRAIN, "server", "client0", fields, arrays)


def test_checked_model_returns_the_model_only_when_it_matches_its_signed_digest():
    model = E.checked_model(request(STATE, model_sha256=E.model_digest(STATE)))
    assert set(model) == set(STATE) and all(np.array_equal(model[k], STATE[k]) for k in STATE)
    tampered = {**STATE, "a": STATE["a"] + 1}
    with pytest.raises(MessageRejected, match="does not match its signed digest"):
        E.checked_model(request(tampered, model_sha256=E.model_digest(STATE)))
    with pytest.raises(MessageRejected, match="SHA-256"):
        E.checked_model(request(STATE))


def test_checked_model_refuses_nan_and_inf_even_under_a_matching_digest():
    for bad in (np.nan, np.inf):
        poisoned = {**STATE, "a": np.array([1, bad, 1, 1], np.float32)}
        with pytest.raises(MessageRejected, match="NaN or inf"):
            E.checked_model(request(poisoned, model_sha256=E.model_digest(poisoned)))


@pytest.fixture(scope="module")
def federation(foundation, tmp_path_factory):
    """A 3-site run (plain aggregation) whose session is open and which has not trained yet."""
    return simulated_federation(small_config(tmp_path_factory.mktemp("messages"),
                                             secure_aggregation={"protocol": "plain"}), foundation)


def train_fields(server, arrays) -> dict:
    return {"model_sha256": E.model_digest(arrays), "send_update": True, **server.privacy.train_terms(3)}


def train_request(stamp: E.Stamp, server, recipient: str = "client0", round_index: int = 0, arrays=None,
                  fields=None) -> bytes:
    arrays = E.state_arrays(server.global_state) if arrays is None else arrays
    return stamp.envelope(E.TRAIN, round_index, recipient, train_fields(server, arrays) if fields is None else fields,
                          arrays)


def stamp_of(identity: Identity, roster: Roster, session: str) -> E.Stamp:
    stamp = E.Stamp(identity, roster)
    stamp.session = session
    return stamp


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def with_key(roster: Roster, party: str, identity: Identity) -> Roster:
    """``roster`` with ``party`` enrolled under ``identity``'s key instead (another roster digest)."""
    return Roster([RosterEntry(e.party_id, e.role, identity.public_key if e.party_id == party else e.public_key)
                   for e in roster.entries])


def tampered_model(server) -> bytes:
    """The server's own signature over a model whose bytes differ from the digest it signs with them."""
    arrays = E.state_arrays(server.global_state)
    first = sorted(arrays)[0]
    return train_request(server.stamp, server, arrays={**arrays, first: arrays[first] + 0.5},
                         fields=train_fields(server, arrays))


IMPOSTOR = Identity.generate("server")
FORGERIES = {  # train requests for client0 that it must refuse: how to make one, and the reason it must give
    "another session": (lambda s: train_request(stamp_of(s.identity, s.roster, new_session_id()), s),
                        "this party is in session"),
    "another roster, signed by the real server": (
        lambda s: train_request(stamp_of(s.identity, with_key(s.roster, "client1", Identity.generate("client1")),
                                         s.stamp.session), s), "signed under roster"),
    "an impostor server's roster": (
        lambda s: train_request(stamp_of(IMPOSTOR, with_key(s.roster, "server", IMPOSTOR), s.stamp.session), s),
        "signed under roster"),
    "an impostor server under the real roster": (
        lambda s: train_request(stamp_of(IMPOSTOR, s.roster, s.stamp.session), s), "bad signature"),
    "a bad signature": (lambda s: flip_last_byte(train_request(s.stamp, s)), "bad signature"),
    "addressed to another site": (lambda s: train_request(s.stamp, s, recipient="client1"), "addressed to 'client1'"),
    "bytes that differ from the signed digest": (tampered_model, "does not match its signed digest"),
}


def snapshot(site) -> dict:
    model = site.trainer.model
    return {"shared": site.trainer.shared_state(), "head": model.head_state(),
            **{name: model.adapters.get_state(name) for name in site.trainer.kept}}


def assert_unchanged(site, before: dict, *, last_trained_round: int = -1) -> None:
    after = snapshot(site)
    for part, state in before.items():
        for key, value in state.items():
            np.testing.assert_array_equal(after[part][key], value, err_msg=f"{part}/{key}")
    assert site.last_trained_round == last_trained_round


@pytest.mark.parametrize("case", FORGERIES)
def test_a_site_refuses_a_train_request_it_must_not_act_on_and_changes_nothing(federation, case):
    forge, reason = FORGERIES[case]
    site = federation.sites["client0"]
    before = snapshot(site)
    with pytest.raises(MessageRejected, match=reason):
        site.handle(forge(federation.server))
    assert_unchanged(site, before)


def test_a_site_takes_requests_from_the_server_only(federation):
    site = federation.sites["client0"]
    before = snapshot(site)
    with pytest.raises(MessageRejected, match="only the server sends requests"):
        site.handle(train_request(federation.sites["client1"].stamp, federation.server))  # signed by client1
    assert_unchanged(site, before)


def test_a_refused_request_gets_no_answer_and_is_recorded_in_the_sites_own_log(federation):
    site = federation.sites["client0"]
    data = FORGERIES["another session"][0](federation.server)
    before = snapshot(site)
    [reply] = federation.channel.exchange([Outgoing("client0", data)], deadline_s=1.0)
    assert reply.party == "client0" and reply.messages == ()
    assert_unchanged(site, before)
    entries = [json.loads(line) for line in site.folder.audit_log.read_text().splitlines()]
    # One outcome, written after the decision; the request is the server's signed message, so it is attributed
    assert entries[-1]["event"] == "message_rejected" and entries[-1]["peer"] == "server"
    assert entries[-2]["event"] != "message_received"
    assert "session" in entries[-1]["meta"]["reason"]
    assert not site.folder.audit_log.with_name("server.audit.jsonl").exists()  # no other party's log here


def test_a_site_trains_a_round_once_and_refuses_its_replay(foundation, tmp_path):
    federation = simulated_federation(small_config(tmp_path, secure_aggregation={"protocol": "plain"}), foundation)
    server, site = federation.server, federation.sites["client0"]
    data = train_request(server.stamp, server)
    reply = server.stamp.open(site.handle(data)[0].data, session=server.stamp.session)
    assert reply.stage == E.UPDATE and reply.fields["refused"] is None and site.last_trained_round == 0
    trained = snapshot(site)
    for replay in (data, train_request(server.stamp, server)):  # the same bytes, and a fresh signature
        with pytest.raises(MessageRejected, match="replay"):
            site.handle(replay)
    assert_unchanged(site, trained, last_trained_round=0)


@contextlib.contextmanager
def eavesdropping():
    """Every request the server sends while inside, as (recipient, bytes): what a network attacker records."""
    recorded: list[tuple[str, bytes]] = []
    exchange = InMemoryChannel.exchange

    def record(self, requests, *, deadline_s):
        recorded.extend((r.recipient, r.data) for r in requests)
        return exchange(self, requests, deadline_s=deadline_s)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(InMemoryChannel, "exchange", record)
        yield recorded


def recorded_request(recorded, recipient: str, stage: str, round_index: int | None = None) -> bytes:
    return next(data for to, data in recorded if to == recipient and peek(data).stage == stage
                and (round_index is None or peek(data).round == round_index))


def config_with_keys_folder(tmp_path):
    """Two runs of this configuration use the same keys (what --overwrite gives)."""
    keys = tmp_path / "keys"
    enrol_parties(keys, [("server", "server"), ("client0", "client"), ("client1", "client"), ("client2", "client")])
    return small_config(tmp_path, secure_aggregation={"protocol": "masked", "keys": str(keys)})


def test_a_replayed_open_from_another_run_binds_no_site_and_cannot_lock_the_real_server_out(foundation, tmp_path):
    # An attacker who recorded run A's signed `open` and `train` bytes delivers them to run B's fresh site before
    # B's server speaks.
    config = config_with_keys_folder(tmp_path)
    with eavesdropping() as recorded:
        run_a = simulated_federation(config, foundation)
    old_open = recorded_request(recorded, "client0", E.OPEN)
    old_train = train_request(run_a.server.stamp, run_a.server)
    shutil.rmtree(Path(config.output_dir) / config.name)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Server, "open", lambda self, *, resume: None)  # B's parties are up; its server not yet
        run_b = simulated_federation(config, foundation)
    site = run_b.sites["client0"]
    before = snapshot(site)
    [answer] = site.handle(old_open)  # answered with a fresh nonce that run A's server never signs
    assert peek(answer.data).stage == E.OPENED
    with pytest.raises(MessageRejected, match="no (confirmed )?run session"):
        site.handle(old_train)
    assert_unchanged(site, before)
    run_b.server.open(resume=False)  # the real server's open replaces the unconfirmed one
    assert site.stamp.session == run_b.server.stamp.session != run_a.server.stamp.session
    with pytest.raises(MessageRejected):  # and once confirmed, nothing of run A is accepted
        site.handle(old_open)


def test_an_open_injected_during_the_handshake_cannot_displace_the_real_one(foundation, tmp_path):
    config = config_with_keys_folder(tmp_path)
    with eavesdropping() as recorded:
        run_a = simulated_federation(config, foundation)
    old_open = recorded_request(recorded, "client0", E.OPEN)
    shutil.rmtree(Path(config.output_dir) / config.name)
    request = Server._request

    def inject_before_confirm(self, stage, round_index, parties, fields, arrays):
        if stage == E.CONFIRM:  # between the real open and its confirm, the attacker's open reaches client0
            self.link.channel.endpoints["client0"].handle(old_open)
        return request(self, stage, round_index, parties, fields, arrays)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Server, "_request", inject_before_confirm)
        run_b = simulated_federation(config, foundation)
    site = run_b.sites["client0"]
    assert site.opening.confirmed and site.stamp.session == run_b.server.stamp.session != run_a.server.stamp.session


def test_a_request_recorded_before_a_crash_is_refused_after_the_resume(tmp_path):
    from feddat_secure.federation.runner import run

    config = small_config(tmp_path, secure_aggregation={"protocol": "masked"})

    def crash_in_round_2(text: str) -> None:
        if text.startswith("round   2"):  # round 2 ran and is logged; the server has not checkpointed it
            raise KeyboardInterrupt

    with eavesdropping() as recorded, pytest.raises(KeyboardInterrupt):
        run(config, progress=False, echo=crash_in_round_2)
    old_train = recorded_request(recorded, "client0", E.TRAIN, round_index=1)
    outcome = []
    server_run = Server.run

    def replay_then_run(self, log):
        try:  # the attacker replays round 2's signed train request to the resumed site before the server speaks
            self.link.channel.endpoints["client0"].party.handle(old_train)
            outcome.append("accepted")
        except MessageRejected as rejection:
            outcome.append(rejection.reason)
        return server_run(self, log)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Server, "run", replay_then_run)
        resumed = run(config, resume=True, progress=False, echo=lambda _: None)
    assert outcome and outcome[0] != "accepted" and "session" in outcome[0]
    assert resumed.history[-1]["trained"] == ["client0", "client1", "client2"]  # the real round 2 ran at every site
