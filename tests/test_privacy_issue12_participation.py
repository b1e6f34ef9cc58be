"""Who takes part, and when the server's client-level ledger is charged (issue 12, items 1, 5 and the server part
of 3): participation is drawn from the OS's entropy under client-level DP, a Poisson sample smaller than the
protocol's minimum is padded with zero-input fillers instead of being skipped, and the federation's ledger is
charged, durably, before anything of a round is released, so a crash after the release is charged on resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import simulated_federation, small_config
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from feddat_secure.config import INDICATOR_SCALE, config_from_dict
from feddat_secure.federation import envelopes as E
from feddat_secure.federation.runner import run
from feddat_secure.federation.server_app import RoundLog
from feddat_secure.federation.updates import StateLayout
from feddat_secure.privacy import GaussianEvent, compute_epsilon
from feddat_secure.privacy.client_level import central_noise
from feddat_secure.privacy.run_privacy import LEDGER_FILE, ServerPrivacy, privacy_settings
from protocols import MessageRejected

pytestmark = pytest.mark.slow

QUIET = RoundLog(write=lambda record: record, echo=lambda _: None)
SEED = 0
DELTA = 1e-5


def google_epsilon(accountant, q: float, sigma: float, rounds: int) -> float:
    """ε of ``rounds`` Poisson-subsampled Gaussian mechanisms, by Google's dp_accounting."""
    accountant.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), rounds))
    return accountant.get_epsilon(DELTA)


# ------------------------------------------------------------------ item 1: participation the config cannot predict

SITES = {f"site-{i}": 30 for i in range(10)}


def server_privacy(placement: str, per_round: int, reproducible: bool) -> ServerPrivacy:
    client = {"placement": placement, "noise_multiplier": 1.0, "reproducible": reproducible}
    config = config_from_dict({"federation": {"rounds": 4, "aggregation": "uniform", "clients_per_round": per_round},
                               "data": {"num_clients": len(SITES)}, "seed": SEED,
                               "secure_aggregation": {"protocol": "masked"}, "privacy": {"client": client}})
    return ServerPrivacy(privacy_settings(config, SITES, update_dimension=100).client)


def who_takes_part(privacy: ServerPrivacy, per_round: int) -> list[tuple[list[str], list[str]]]:
    """30 rounds of (participants, fillers) drawn as the server draws them: from its generator seeded by the
    configuration's seed (``Server.sampler``), which is all that an attacker holding the configuration lacks
    nothing of."""
    sampler = np.random.default_rng([SEED, 7])
    ids = list(SITES)
    draws = []
    for _ in range(30):
        participants = privacy.participants(ids, per_round, sampler)
        draws.append((participants, privacy.fillers(ids, participants, 3, sampler)))
    return draws


@pytest.mark.parametrize("placement, per_round", [("central", 2), ("distributed", 5)])
def test_under_client_level_dp_the_configuration_does_not_tell_who_took_part(placement, per_round):
    """The attacker holds the configuration (every site does) and recomputes the server's draws: under DP two
    runs of one configuration and seed sample different sites (and fillers), so the recomputation says nothing;
    with ``reproducible = true`` (tests only) the two runs and the attacker agree."""
    server, attacker = (who_takes_part(server_privacy(placement, per_round, False), per_round) for _ in range(2))
    assert [sampled for sampled, _ in server] != [sampled for sampled, _ in attacker]
    if placement == "central":  # Poisson sampling with q = 0.2: samples below 3 sites are padded with fillers
        assert [fillers for _, fillers in server] != [fillers for _, fillers in attacker]
    else:
        assert not any(fillers for _, fillers in server)
    server, attacker = (who_takes_part(server_privacy(placement, per_round, True), per_round) for _ in range(2))
    assert server == attacker


# --------------------------------------------------------- item 5: a small Poisson sample is padded, never skipped

def federation_of(tmp_path, foundation, privacy: dict, **federation):
    """3 sites, masked aggregation (at least 3 inputs a round), short rounds."""
    config = small_config(tmp_path, federation={"rounds": 2, "aggregation": "uniform", **federation},
                          data={"test_per_client": 8}, training={"local_steps": 2},
                          secure_aggregation={"protocol": "masked"}, privacy=privacy)
    return simulated_federation(config, foundation)


def test_a_small_poisson_sample_runs_with_zero_input_fillers_and_releases_exactly_its_noisy_clipped_sum(
        foundation, tmp_path):
    """Central noise, q = 1/3 of 3 sites, masked aggregation (needs 3 inputs), adaptive clipping, and record-level
    DP at every site: every round aggregates (no skip); the fillers input zero (their clipping-count slot too)
    and charge nothing; the applied aggregate is the sampled sites' clipped updates plus the central noise; and
    the federation's ledger holds one plain subsampled Gaussian (σ, q = 1/3) per round, which dp_accounting
    recomputes."""
    client = {"placement": "central", "clip_norm": 0.5, "noise_multiplier": 1.0, "adaptive_clipping": True,
              "count_noise_std": 2.0, "reproducible": True}
    federation = federation_of(tmp_path, foundation, {"client": client, "record": {"enabled": True,
                                                                                   "noise_multiplier": 1.0}},
                               clients_per_round=1)
    server = federation.server
    inputs: dict[tuple[int, str], np.ndarray] = {}
    for cid, site in federation.sites.items():
        def set_input(round_index, vector, weight, *args, cid=cid, original=site.aggregation.set_input, **kwargs):
            inputs[round_index, cid] = np.array(vector, copy=True)
            return original(round_index, vector, weight, *args, **kwargs)

        site.aggregation.set_input = set_input
    applied = []
    aggregate_to_apply, settings = server.privacy.aggregate_to_apply, server.privacy.client

    def recorded(vector, total_weight, rng):
        replay = np.random.default_rng()  # the reproducible noise: the server's generator, replayed
        replay.bit_generator.state = rng.bit_generator.state
        noise = central_noise(len(vector) - 1, clip_norm=server.privacy.clip_norm,
                              noise_multiplier=settings.update_noise_multiplier, rounding_l2=settings.rounding_l2,
                              rng=replay)
        applied.append((np.array(vector, copy=True), noise, StateLayout.of(server.global_state).flatten(
            server.global_state)))
        return aggregate_to_apply(vector, total_weight, rng)

    server.privacy.aggregate_to_apply = recorded
    server.run(QUIET)

    layout = StateLayout.of(server.global_state)
    assert any(0 < len(r["participants"]) < 3 for r in server.history)  # the case at hand: samples below 3
    for index, record in enumerate(server.history):
        sampled, fillers = record["participants"], record["fillers"]
        assert sorted(sampled + fillers) == ["client0", "client1", "client2"] and not set(sampled) & set(fillers)
        assert "skipped" not in record["aggregation"] and record["aggregation"]["counted_sites"] == 3
        for cid in fillers:
            np.testing.assert_array_equal(inputs[index, cid], 0.0)  # update and clipping-count slot
        for cid in sampled:
            update, indicator = inputs[index, cid][:-1], inputs[index, cid][-1]
            assert np.linalg.norm(update) <= 0.5 and abs(indicator) == 0.5 * INDICATOR_SCALE
        summed, noise, before = applied[index]
        expected = sum((inputs[index, cid] for cid in sampled), np.zeros_like(summed))
        np.testing.assert_allclose(summed, expected, atol=1e-4)  # the masked sum, up to its quantization
        after = layout.flatten(server.global_state) if index == len(applied) - 1 else applied[index + 1][2]
        step = (expected[:-1] + noise) / settings.expected_participants  # DP-FedAvg's fixed denominator: 1
        np.testing.assert_allclose(after - before, step, atol=2e-4)
    finished = [json.loads(line) for line in server.audit.log.path.read_text().splitlines()
                if json.loads(line)["event"] == "round_finished"]
    assert finished == []  # no round was skipped or aborted
    for cid, site in federation.sites.items():  # a filler trains nothing and charges nothing
        sampled_rounds = [index for index, record in enumerate(server.history) if cid in record["participants"]]
        assert site.privacy.record_accountant.spent_rounds == sampled_rounds

    [ledger] = server.privacy.accountants
    assert ledger.events == [GaussianEvent(settings.noise_multiplier, 1 / 3, 1)] * 2
    assert ledger.epsilon("rdp") == pytest.approx(google_epsilon(RdpAccountant(), 1 / 3, 1.0, 2), rel=0.01)
    pld = google_epsilon(PLDAccountant(), 1 / 3, 1.0, 2)
    assert pld - 0.01 <= ledger.epsilon("prv") <= pld * 1.02


@pytest.mark.parametrize("privacy", [{}, {"client": {"placement": "central", "clip_norm": 0.5,
                                                     "noise_multiplier": 1.0}}],
                         ids=["without client-level DP", "central, every site every round"])
def test_a_site_refuses_zero_input_outside_central_poisson_sampling(foundation, tmp_path, privacy):
    """A malicious server would silence a site's contribution with a zero-input request; outside central Poisson
    sampling (whose server is trusted anyway) the site refuses it, and trains nothing."""
    federation = federation_of(tmp_path, foundation, privacy, rounds=1)
    server, site = federation.server, federation.sites["client0"]
    arrays = E.state_arrays(server.global_state)
    fields = {"model_sha256": E.model_digest(arrays), "send_update": True, "zero_input": True,
              **server.privacy.train_terms(3)}
    with pytest.raises(MessageRejected, match="'zero_input' is taken only under central client-level DP"):
        site.handle(server.stamp.envelope(E.TRAIN, 0, "client0", fields, arrays))
    assert site.last_trained_round == -1


# ------------------------------------------------- item 3 (server): charged before the release, kept across a crash

def test_a_round_released_before_a_server_crash_is_charged_after_resume_and_the_budget_gate_counts_it(tmp_path):
    """The server crashes after round 2's aggregate was applied and logged, before its checkpoint. Its ledger
    file was written (fsynced) before the release, so the resumed server holds both releases (round 1 and
    round 2's first attempt); the budget, between the ε of two and of three rounds, then refuses round 2's
    retry. A server charging after the release would have resumed from round 1's checkpoint with one charge and
    released round 2 a second time, uncharged."""
    sigma = 2.0
    two, three = (compute_epsilon([GaussianEvent(sigma, 1.0, rounds)], DELTA, "rdp") for rounds in (2, 3))
    config = small_config(tmp_path, federation={"rounds": 2, "aggregation": "uniform"}, training={"local_steps": 1},
                          secure_aggregation={"protocol": "plain"},
                          privacy={"client": {"placement": "central", "clip_norm": 0.5, "noise_multiplier": sigma,
                                              "budget_epsilon": (two + three) / 2}})

    def crash_in_round_2(text: str) -> None:
        if text.startswith("round   2"):  # round 2 released and logged, not yet checkpointed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(config, progress=False, echo=crash_in_round_2)
    resumed = run(config, resume=True, progress=False, echo=lambda _: None)

    assert resumed.stopped is not None and resumed.stopped.startswith("stopped before round 2: client-level ledger")
    assert [r["round"] for r in resumed.history] == [1]
    [ledger] = json.loads((resumed.run_dir / "parties" / "server" / LEDGER_FILE).read_text())["ledgers"]
    assert [r["round"] for r in ledger["rounds"]] == [0, 1]  # round 1, and round 2's interrupted release
    events = [GaussianEvent.from_json(e) for r in ledger["rounds"] for e in r["events"]]
    assert events == [GaussianEvent(sigma, 1.0, 1)] * 2
    assert compute_epsilon(events, DELTA, "rdp") == pytest.approx(
        google_epsilon(RdpAccountant(), 1.0, sigma, 2), rel=0.01)
