"""A malicious server or malicious sites, played through the runner's own parties and signed messages (issue 10,
items 4, 6, 7 and 9 on the runner's side): they can deny service, but they cannot make the server aggregate
updates computed from different models, corrupt the global state, or crash the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import simulated_federation, small_config

from feddat_secure.federation import envelopes as E
from feddat_secure.federation.runner import run
from feddat_secure.federation.server_app import MAX_CONSECUTIVE_FAILED_ROUNDS, RoundLog
from protocols import AggregateResult, MessageRejected, Outgoing, RoundAborted
from protocols.plain import PlainServer
from protocols.wire import peek

pytestmark = pytest.mark.slow

CENTRAL_DP = {"client": {"placement": "central", "clip_norm": 0.5, "noise_multiplier": 1.0, "reproducible": True}}


def federation_of(tmp_path, foundation, protocol: str = "plain", rounds: int = 2, **sections):
    """3 sites with uniform weights (client-level DP needs them), short rounds."""
    sections.setdefault("secure_aggregation", {"protocol": protocol})
    config = small_config(tmp_path, federation={"rounds": rounds, "aggregation": "uniform"},
                          data={"test_per_client": 8}, training={"local_steps": 2}, **sections)
    return simulated_federation(config, foundation)


class RoundLogLines(RoundLog):
    """The round log, keeping what it prints."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        super().__init__(write=lambda record: record, echo=self.lines.append)


def audit_entries(party) -> list[dict]:
    return [json.loads(line) for line in party.audit.log.path.read_text().splitlines()]


def snapshot(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: value.copy() for key, value in state.items()}


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)


# ------------------------------------------------------------------------- item 4: one model for every site

def test_a_server_that_sends_the_sites_different_models_gets_no_masked_sum(foundation, tmp_path):
    """The attack: the server sends two sites an all-zero model (their updates from it would be ~0) and the
    victim the real one, so that the sum would be the victim's update. Every site signs the digest of the model
    it verified into the masked protocol, the server announces its own: the sites that got another model refuse,
    too few remain, the round aborts and nothing is applied. The next, honest round aggregates as usual."""
    federation = federation_of(tmp_path, foundation, "masked")
    server, victim = federation.server, "client0"
    honest_envelope = server.stamp.envelope

    def inconsistent_models(stage, round_index, recipient, fields=None, arrays=None, **kwargs):
        if stage == E.TRAIN and round_index == 0 and recipient != victim:
            arrays = {name: np.zeros_like(value) for name, value in arrays.items()}
            fields = {**fields, "model_sha256": E.model_digest(arrays)}  # well signed: the site accepts the model
        return honest_envelope(stage, round_index, recipient, fields, arrays, **kwargs)

    server.stamp.envelope = inconsistent_models
    before = snapshot(server.global_state)
    server.run(RoundLogLines())

    attacked, honest = server.history
    assert attacked["trained"] == ["client0", "client1", "client2"]
    assert "aborted" in attacked["aggregation"] and attacked["aggregation"]["counted"] == []
    assert honest["aggregation"]["counted"] == ["client0", "client1", "client2"]
    assert "aborted" not in honest["aggregation"]
    assert not np.array_equal(E.model_digest(server.global_state), E.model_digest(before))  # round 2 applied
    aggregates = [e for e in audit_entries(server) if e["event"] == "aggregate_computed"]
    assert [e["round"] for e in aggregates] == [2]  # nothing of round 1 was ever computed or applied


# ------------------------------------------------------------------ item 6: a failed round never crashes the run

def forged(vector=lambda v: v, weight=lambda w: w):
    """A result the session returns instead of the honest one: its vector and total weight changed."""
    return lambda honest: AggregateResult(vector(honest.vector), honest.counted, weight(honest.total_weight))


FAILURES = {  # where round 1's protocol run on the server goes wrong, how → what its record says
    "the protocol aborts": ("advance", RoundAborted("input", "injected abort"), "aborted at stage 'input'"),
    "a protocol step raises": ("advance", ValueError("total weight 0"), "ValueError: total weight 0"),
    "the aggregate has a zero total weight": ("result", forged(weight=lambda w: 0.0), "total weight 0.0"),
    "the aggregate has a negative total weight": ("result", forged(weight=lambda w: -w), "not a positive number"),
    "the aggregate is not finite": ("result", forged(vector=lambda v: v * np.nan), "not a finite vector"),
    "the aggregate has the wrong length": ("result", forged(vector=lambda v: v[:-1]), "not a finite vector"),
}


def inject(session, where: str, failure) -> None:
    """Make the server's protocol session fail in its first round at ``where``: raise ``failure`` when the
    round is done, or (``result``) return ``failure(honest result)``."""
    method, failed = getattr(session, where), []

    def failing(*args, **kwargs):
        value = method(*args, **kwargs)
        if failed or not session.round_done:
            return value
        failed.append(True)
        if isinstance(failure, Exception):
            raise failure
        return failure(value)

    setattr(session, where, failing)


@pytest.mark.parametrize("case", FAILURES)
def test_a_failed_round_is_recorded_applies_nothing_and_the_next_round_runs(foundation, tmp_path, case):
    where, failure, reason = FAILURES[case]
    federation = federation_of(tmp_path, foundation)
    server = federation.server
    inject(server.session, where, failure)
    before = snapshot(server.global_state)
    log = RoundLogLines()
    server.run(log)

    failed, succeeded = server.history
    assert reason in failed["aggregation"]["aborted"] and failed["aggregation"]["counted"] == []
    assert [line for line in log.lines if "failed, nothing applied" in line] == \
        [f"feddat-secure: round 1 failed, nothing applied: {failed['aggregation']['aborted']}"]
    finished = [e for e in audit_entries(server) if e["event"] == "round_finished"]
    assert [(e["round"], e["meta"]["outcome"]) for e in finished] == [(1, "aborted")]
    assert reason in finished[0]["meta"]["reason"]
    assert succeeded["aggregation"]["counted"] == ["client0", "client1", "client2"]
    assert server.stopped is None and server.failures == []
    applied = [e["round"] for e in audit_entries(server) if e["event"] == "adapter_applied"]
    assert applied == [2]  # round 1 applied nothing; round 2 its aggregate
    assert E.model_digest(server.global_state) != E.model_digest(before)


def test_an_aborted_round_in_which_sites_sent_input_is_charged_to_the_client_level_ledger(foundation, tmp_path):
    federation = federation_of(tmp_path, foundation, privacy=CENTRAL_DP)
    server = federation.server
    inject(server.session, "advance", RoundAborted("input", "injected abort"))
    server.run(RoundLogLines())
    failed, succeeded = server.history
    assert "aborted" in failed["aggregation"]
    assert failed["aggregation"]["sent_protocol_messages"] == ["client0", "client1", "client2"]
    assert failed["privacy"]["client:federation"] > 0  # charged: the server may have seen a sum before the abort
    assert succeeded["privacy"]["client:federation"] > failed["privacy"]["client:federation"]
    [ledger] = server.privacy.ledger()["ledgers"]
    assert len(ledger["rounds"]) == 2


def test_a_site_that_sends_garbage_into_the_masked_sum_fails_the_round_and_the_run_goes_on(foundation, tmp_path):
    """A malicious site replaces its encoded input with values anywhere modulo 2^m: the decoded sum is out of the
    range the counted cohort can produce, the round aborts with nothing applied, and the next round (the site
    behaving again) succeeds."""
    federation = federation_of(tmp_path, foundation, "masked", privacy=CENTRAL_DP)
    server, cheat = federation.server, federation.sites["client1"].aggregation
    honest_set_input, rng = cheat.set_input, np.random.default_rng(5)

    def garbage(round_index, vector, weight, **kwargs):
        clipped = honest_set_input(round_index, vector, weight, **kwargs)
        if round_index == 0:
            modulus = 1 << cheat.options.modulus_bits
            cheat._round.encoded[:] = rng.integers(0, modulus, len(vector), dtype=np.uint64).astype(np.int64)
        return clipped

    cheat.set_input = garbage
    before = snapshot(server.global_state)
    server.run(RoundLogLines())
    failed, succeeded = server.history
    assert "aborted" in failed["aggregation"] and failed["privacy"]["client:federation"] > 0
    assert succeeded["aggregation"]["counted"] == ["client0", "client1", "client2"]
    assert E.model_digest(server.global_state) != E.model_digest(before)


def test_a_run_stops_cleanly_after_too_many_failed_rounds_in_a_row(tmp_path, monkeypatch):
    advance = PlainServer.advance

    def always_aborts(self):
        advance(self)
        raise RoundAborted("input", "a malicious party denies service")

    monkeypatch.setattr(PlainServer, "advance", always_aborts)
    config = small_config(tmp_path, secure_aggregation={"protocol": "plain"},
                          federation={"rounds": MAX_CONSECUTIVE_FAILED_ROUNDS + 2}, training={"local_steps": 1})
    lines: list[str] = []
    result = run(config, progress=False, echo=lines.append)
    assert len(result.history) == MAX_CONSECUTIVE_FAILED_ROUNDS
    assert result.stopped.startswith(f"stopped after round {MAX_CONSECUTIVE_FAILED_ROUNDS}: "
                                     f"{MAX_CONSECUTIVE_FAILED_ROUNDS} rounds in a row failed")
    assert "a malicious party denies service" in result.stopped
    assert any(line == f"feddat-secure: {result.stopped}" for line in lines)
    assert json.loads((result.run_dir / "manifest.json").read_text())["finished"].startswith("stopped early")
    for log in (result.run_dir / "parties").glob("*/*.audit.jsonl"):  # every party closed its log
        assert json.loads(log.read_text().splitlines()[-1])["event"] == "tree_head"
        assert "run_stopped" in log.read_text()


# ------------------------------------------------------------------------------ item 7: the protocol's input range

def test_the_input_range_is_the_client_level_clip_norm_unless_configured(foundation, tmp_path):
    derived = federation_of(tmp_path / "derived", foundation, "masked", privacy=CENTRAL_DP)
    assert derived.server.protocol.options.clip_range == CENTRAL_DP["client"]["clip_norm"]
    configured = federation_of(tmp_path / "configured", foundation, "masked", privacy=CENTRAL_DP,
                               secure_aggregation={"protocol": "masked", "masked": {"clip_range": 0.125}})
    assert configured.server.protocol.options.clip_range == 0.125
    without_dp = federation_of(tmp_path / "plain-dp", foundation, "masked")
    assert without_dp.server.protocol.options.clip_range == 0.25  # no bound known: the option's default
    for federation in (derived, configured):  # every party builds the same protocol from the same plan
        assert federation.sites["client0"].protocol.options == federation.server.protocol.options


def test_the_count_of_clipped_entries_reaches_the_rounds_record_and_a_warning(foundation, tmp_path):
    federation = federation_of(tmp_path, foundation, rounds=1)
    site = federation.sites["client2"]
    honest_set_input = site.aggregation.set_input
    site.aggregation.set_input = lambda *args, **kwargs: honest_set_input(*args, **kwargs) + 7
    log = RoundLogLines()
    federation.server.run(log)
    [record] = federation.server.history
    assert record["clipped"] == {"client0": 0, "client1": 0, "client2": 7}
    assert any("warning: round 1: the protocol clipped" in line and "client2: 7" in line for line in log.lines)


# -------------------------------------------------------------------------------- item 9: per-stage size limits

def test_an_oversized_update_reply_is_refused_before_parsing_and_its_site_did_not_answer(foundation, tmp_path):
    federation = federation_of(tmp_path, foundation, rounds=1)
    sites, served = federation.sites, federation.channel.endpoints["client0"]

    class Oversized:
        party_id = "client0"

        def handle(self, data: bytes) -> list[Outgoing]:
            answers = served.handle(data)
            if peek(data).stage != E.TRAIN:
                return answers
            padding = {"padding": np.zeros(E.SMALL_MESSAGE_BYTES // 4, np.float32)}  # well signed, 1 MiB too long
            return [Outgoing("server", sites["client0"].stamp.envelope(E.UPDATE, 0, "server",
                                                                       peek(answers[0].data).fields, padding))]

    federation.channel.endpoints["client0"] = Oversized()
    server = federation.server
    server.run(RoundLogLines())
    [record] = server.history
    assert record["trained"] == ["client1", "client2"]
    [refusal] = [e for e in audit_entries(server) if e["event"] in ("message_rejected", "party_dropped")]
    assert refusal["event"] == "message_rejected" and "oversized message" in refusal["meta"]["reason"]


def test_a_site_refuses_a_train_request_larger_than_the_model_it_expects(foundation, tmp_path):
    federation = federation_of(tmp_path, foundation, rounds=1)
    server, site = federation.server, federation.sites["client0"]
    arrays = {**E.state_arrays(server.global_state), "extra": np.zeros(E.SMALL_MESSAGE_BYTES // 4, np.float32)}
    fields = {"model_sha256": E.model_digest(arrays), "send_update": True, **server.privacy.train_terms(3)}
    with pytest.raises(MessageRejected, match="oversized message"):
        site.handle(server.stamp.envelope(E.TRAIN, 0, "client0", fields, arrays))
    assert site.last_trained_round == -1
