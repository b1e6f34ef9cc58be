"""Issue 12, items 4 and 12 (first half): distributed (Skellam) noise.

Item 4, the attacker is the server: each site's noise share is sized for ``planned_shares`` = participants −
tolerated_dropouts shares, and the masked protocol could unmask with as few as its threshold t survivors. A server
that claims dropouts (or colludes with sites) would release a sum holding fewer noise shares than the accounting
assumed. Every honest site now refuses to be unmasked among fewer survivors than the planned shares.

Item 12: conditional randomized rounding (Kairouz, Liu & Steinke 2021, Theorem 1) bounds every rounded update's
norm, so the quantized sensitivity loses most of its worst-case +1.5·√d term. Every ε here is recomputed with
dp_accounting.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import simulated_federation, small_config
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon as dp_accounting_epsilon
from hypothesis import given, settings
from hypothesis import strategies as st
from test_protocols_masked_adversarial import Harness

from feddat_secure.config import config_from_dict, load_config
from feddat_secure.federation.server_app import RoundLog
from feddat_secure.privacy import compute_epsilon
from feddat_secure.privacy.client_level import (
    ROUNDING_BETA,
    SKELLAM_RDP_ORDERS,
    clip_update,
    conditional_rounding_bound,
    quantized_sensitivity,
)
from feddat_secure.privacy.run_privacy import privacy_settings
from protocols import ConfigurationError, Identity, MessageRejected, Roster, RoundAborted, make_protocol
from protocols.masked.quantize import Quantizer
from protocols.masked.stages import COMMIT, CONSISTENCY, MASKED
from protocols.simulation import drive_round
from protocols.wire import new_session_id, peek

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "feddat_masked_dp.toml"
EXAMPLE_DIMENSION = 57344  # the example's update length (its ledger's update_dimension)


def distributed_client(sites: int, tolerated: int, dimension: int):
    """The run's client-level settings for ``sites`` sites under distributed noise, as every party derives them."""
    config = config_from_dict({"federation": {"rounds": 3, "aggregation": "uniform"}, "data": {"num_clients": sites},
                               "secure_aggregation": {"protocol": "masked"},
                               "privacy": {"client": {"placement": "distributed", "noise_multiplier": 1.0,
                                                      "clip_norm": 0.1, "tolerated_dropouts": tolerated}}})
    return privacy_settings(config, {f"site-{i}": 50 for i in range(sites)}, update_dimension=dimension).client


# ------------------------------------------------------------------- item 4: the shares a sum must hold

def masked_round(sites: int, tolerated: int, dropped: int, dimension: int = 16):
    """One masked round of ``sites`` sites that each add their Skellam share and pass what a site passes
    (``min_survivors`` = planned shares, the rounding bound); the last ``dropped`` sites' masked inputs never
    reach the server, which reports them as dropouts. Returns (result or the abort, each refusal's reason)."""
    client = distributed_client(sites, tolerated, dimension)
    protocol = make_protocol("masked", graph="complete", threshold=4, noise_bound=client.noise_bound(sites))
    server_identity = Identity.generate("server")
    identities = [Identity.generate(f"site-{i}") for i in range(sites)]
    roster = Roster.from_identities(server_identity, identities)
    session = new_session_id()
    clients = {i.party_id: protocol.client(i, roster, "server", session=session) for i in identities}
    rng = np.random.default_rng(0)
    for party in clients.values():
        update, _ = clip_update(rng.normal(0, 0.1, dimension), client.clip_norm)
        party.set_input(0, update, 1, noise=client.noise_share(sites, rng), min_survivors=client.planned_shares(sites),
                        rounding_norm_bound=client.rounding_norm_bound)
    refusals: list[str] = []  # what the sites answered the server instead of their signatures
    try:
        result = drive_round(protocol.server(server_identity, roster, session=session), clients, None, 0, dimension,
                             dropouts={f"site-{sites - 1 - i}": MASKED for i in range(dropped)},
                             on_rejection=lambda sender, reason: refusals.append(reason))
    except RoundAborted as aborted:
        return aborted, refusals
    return result, refusals


@pytest.mark.parametrize("dropped", [2, 3])
def test_a_server_that_reports_too_many_dropouts_gets_no_sum(dropped):
    """8 sites, 1 tolerated dropout: each share is sized for 7. The server reports 2 or 3 dropouts, leaving 6 or 5
    survivors, enough for the protocol (complete graph, threshold t = 4: every secret keeps t holders): without the
    sites' check it would unmask a sum with 6/7 or 5/7 of the planned noise. Every survivor refuses before it
    reveals any share."""
    outcome, refusals = masked_round(8, 1, dropped)
    assert isinstance(outcome, RoundAborted) and outcome.stage == CONSISTENCY  # no sum is released
    assert len(refusals) == 8 - dropped  # every survivor refused to sign the survivor set
    assert all(f"lists {8 - dropped} clients, fewer than the 7 this round's input needs" in reason
               for reason in refusals)


@pytest.mark.parametrize("dropped", [0, 1])
def test_a_round_that_keeps_the_planned_shares_completes(dropped):
    outcome, refusals = masked_round(8, 1, dropped)
    assert refusals == []
    assert len(outcome.counted) == 8 - dropped


def test_a_server_that_announces_fewer_survivors_than_arrived_is_refused_and_the_true_set_goes_through():
    """The server received all 6 masked inputs but announces 4 survivors (it would ask for the 2 others' mask-key
    shares and sum the inputs of 4): every honest site refuses; the genuine request is still answered."""
    h = Harness(n=6)
    for party in h.clients.values():  # the sites' inputs, with the planned shares of 6 sites tolerating 1 dropout
        party.set_input(0, np.linspace(-0.2, 0.2, h.length), 1, min_survivors=5)
    for _ in (COMMIT, "advertise", "share", MASKED):
        h.stage()
    assert h.read(next(iter(h.requests.values()))).stage == CONSISTENCY
    fewer = sorted(h.clients)[:4]
    for name in fewer:
        with pytest.raises(MessageRejected, match="lists 4 clients, fewer than the 5 this round's input needs"):
            h.clients[name].handle(h.forge("server", name, CONSISTENCY, {"survivors": fewer}))
    h.stage()  # the genuine survivor set (all 6) is accepted
    assert h.read(next(iter(h.requests.values()))).stage == "unmask"


def test_a_cohort_smaller_than_the_planned_shares_is_refused_at_once():
    h = Harness(n=5)
    h.clients["client-0"].set_input(0, np.zeros(h.length), 1, min_survivors=5)
    request = h.read(h.requests["client-0"])
    smaller = {**request.fields, "cohort": ["client-0", "client-1", "client-2", "client-3"]}
    with pytest.raises(MessageRejected, match="the cohort lists 4 clients, fewer than the 5 survivors"):
        h.clients["client-0"].handle(h.forge("server", "client-0", COMMIT, smaller))


@pytest.mark.parametrize("bad", [-1, 6, True, 2.0])
def test_min_survivors_is_validated(bad):
    h = Harness(n=5)
    with pytest.raises(ConfigurationError, match="min_survivors must be an integer in 0..5"):
        h.clients["client-0"].set_input(0, np.zeros(h.length), 1, min_survivors=bad)


@pytest.mark.slow
def test_end_to_end_a_server_that_withholds_a_masked_input_applies_nothing(foundation, tmp_path):
    """The runner's own parties: 4 sites, no tolerated dropout, so each share is sized for 4. In round 1 the masked
    input of one site never reaches the server (it claims the site dropped): 3 survivors, enough for the protocol
    (threshold 2 of 3 neighbours, min_clients 3), too few for the noise. Every survivor refuses, nothing is applied;
    round 2 runs whole, distributed noise and conditional rounding included."""
    config = small_config(tmp_path, federation={"rounds": 2, "aggregation": "uniform"},
                          data={"num_clients": 4, "test_per_client": 8}, training={"local_steps": 2},
                          secure_aggregation={"protocol": "masked", "masked": {"threshold": 2}},
                          privacy={"client": {"placement": "distributed", "clip_norm": 0.05, "noise_multiplier": 1.0}})
    federation = simulated_federation(config, foundation)
    original = federation.channel.exchange

    def withhold(requests, *, deadline_s):
        replies = original(requests, deadline_s=deadline_s)
        for index, request in enumerate(requests):
            header = peek(request.data)
            if header.protocol == "masked" and header.stage == MASKED and header.round == 0 \
                    and request.recipient == "client3":
                replies[index] = type(replies[index])(request.recipient, None)
        return replies

    federation.channel.exchange = withhold
    before = {key: value.copy() for key, value in federation.server.global_state.items()}
    federation.server.run(RoundLog(write=lambda record: record, echo=lambda line: None))
    attacked, honest = federation.server.history
    assert "aborted" in attacked["aggregation"] and attacked["aggregation"]["counted"] == []
    assert attacked["aggregation"]["aborted"].startswith("aborted at stage 'consistency_check'")
    for name in ("client0", "client1", "client2"):  # each survivor refused, as its own audit log records
        entries = [json.loads(line) for line in federation.sites[name].audit.log.path.read_text().splitlines()]
        assert any(entry["event"] == "message_rejected" and "lists 3 clients, fewer than the 4 this round's input "
                   "needs" in entry["meta"]["reason"] for entry in entries), name
    assert honest["aggregation"]["counted"] == ["client0", "client1", "client2", "client3"]
    assert any(not np.array_equal(before[key], value) for key, value in federation.server.global_state.items())


# ------------------------------------------------------------------- item 12: conditional randomized rounding

GRID = Quantizer(clip_range=1.0, bits=8)  # a coarse grid, where rounding matters: step = 2/255


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 64), st.floats(0.01, 1.0), st.integers(0, 2**32 - 1), st.booleans())
def test_no_conditionally_rounded_update_leaves_above_the_norm_bound(dimension, clip, seed, flat):
    """The bound holds for every rounding that leaves, checked in exact integers: ‖2q − L‖² <= 4B²."""
    rng = np.random.default_rng(seed)
    direction = np.sign(rng.normal(size=dimension)) if flat else rng.normal(size=dimension)  # flat: the worst case
    vector, _ = clip_update(direction * 10, clip)
    bound = conditional_rounding_bound(clip, GRID.scale, dimension)
    rounded = GRID.quantize(vector, rng, bound)
    doubled = 2 * rounded - GRID.levels
    assert int(np.dot(doubled, doubled)) <= 4 * bound**2
    assert rounded.min() >= 0 and rounded.max() <= GRID.levels


def test_an_input_above_the_clip_norm_is_refused_not_rounded_forever():
    bound = conditional_rounding_bound(0.1, GRID.scale, 32)
    with pytest.raises(ConfigurationError, match="conditional rounding: no rounding of this input"):
        GRID.quantize(np.full(32, 0.5), np.random.default_rng(0), bound)


def test_the_quantized_sensitivity_bounds_every_pair_of_roundings_on_small_dimensions():
    """Brute force over every rounding on the real grid (bits = 4: L = 15, step = 2/15, zero at 7.5): for inputs of
    norm C (flat ones of every sign pattern, axis-aligned ones, random directions), (1) at least 1 − β of the
    probability mass lies within B (Theorem 1 on this grid), (2) every accepted rounding a of x and every rounding
    b of the zero update satisfy ‖a − b‖ <= Δ2 of quantized_sensitivity, which is (3) below the worst-case
    C/step + 1.5√d; the brute-force worst pair is reported close to Δ2."""
    grid = Quantizer(clip_range=1.0, bits=4)
    assert (0 + grid.clip_range) / grid.scale == grid.levels / 2 == 7.5  # zero lies halfway between two points
    rng = np.random.default_rng(7)
    for dimension, clip in [(1, 0.3), (2, 0.3), (3, 0.5), (4, 0.25), (6, 0.4)]:
        bound = conditional_rounding_bound(clip, grid.scale, dimension)
        l2, _ = quantized_sensitivity(clip, grid.scale, dimension)
        zero_roundings = np.array(list(itertools.product((-0.5, 0.5), repeat=dimension)))
        inputs = [np.array(signs) for signs in itertools.product((-1.0, 1.0), repeat=dimension)]
        inputs += list(np.eye(dimension)) + list(rng.normal(size=(40, dimension)))
        worst = 0.0
        for direction in inputs:
            x = direction / np.linalg.norm(direction) * clip
            position = (x + grid.clip_range) / grid.scale  # on the grid 0..L, as Quantizer.quantize computes it
            low, up = np.floor(position) - grid.levels / 2, position - np.floor(position)  # from the centre
            accepted_mass = 0.0
            for choice in itertools.product((0, 1), repeat=dimension):
                a = low + np.array(choice)
                probability = float(np.prod(np.where(np.array(choice) == 1, up, 1 - up)))
                if np.linalg.norm(a) > bound:
                    continue
                accepted_mass += probability
                if probability > 0:
                    worst = max(worst, float(np.linalg.norm(a - zero_roundings, axis=1).max()))
            assert accepted_mass >= 1 - ROUNDING_BETA - 1e-12
            outputs = {tuple(grid.quantize(x, np.random.default_rng(seed), bound)) for seed in range(50)}
            assert all(np.linalg.norm(np.array(q) - grid.levels / 2) <= bound for q in outputs)  # the real rounding
        assert worst <= l2 + 1e-9 < clip / grid.scale + 1.5 * math.sqrt(dimension)
        assert worst >= 0.85 * l2, (dimension, worst, l2)


def test_the_examples_epsilon_recomputes_with_dp_accounting_and_the_noise_is_smaller():
    """examples/feddat_masked_dp.toml (5 sites, 1 tolerated dropout: 4 planned shares, target ε = 10 over 5 rounds):
    the ledger's ε equals dp_accounting's conversion of the Skellam RDP bound (Agarwal et al. 2021, Thm 3.5) at the
    integer orders, and equals dp_accounting's RDP of the Gaussian events the ledger records. The noise standard
    deviation σ·Δ2 is below what the worst-case rounding term needed for the same ε."""
    config = load_config(EXAMPLE)
    client = privacy_settings(config, {f"client{i}": 200 for i in range(5)},
                              update_dimension=EXAMPLE_DIMENSION).client
    rounds, sites = config.federation.rounds, 5
    events = client.round_events(participants=sites) * rounds
    ledger = compute_epsilon(events, client.delta, "rdp", rdp_orders=SKELLAM_RDP_ORDERS)
    assert ledger <= client.target_epsilon

    l2, l1 = quantized_sensitivity(client.clip_norm, client.quantization_step, EXAMPLE_DIMENSION)
    mu = (client.noise_multiplier * l2) ** 2  # the 4 planned shares add up to Sk(μ)
    skellam = [rounds * (a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu)))
               for a in SKELLAM_RDP_ORDERS]
    recomputed, _ = dp_accounting_epsilon(SKELLAM_RDP_ORDERS, skellam, client.delta)
    assert recomputed <= ledger <= recomputed * 1.01
    gaussian = RdpAccountant(orders=list(SKELLAM_RDP_ORDERS))
    gaussian.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(events[0].noise_multiplier), rounds))
    assert gaussian.get_epsilon(client.delta) == pytest.approx(ledger, rel=1e-3)

    worst_case_l2 = client.clip_norm / client.quantization_step + 1.5 * math.sqrt(EXAMPLE_DIMENSION)
    assert l2 < worst_case_l2
    # σ_eff = σ to 6 digits on this grid, so the same ε with the worst-case Δ2 needs σ·Δ2 larger by worst_case_l2 / l2
    assert events[0].noise_multiplier == pytest.approx(client.noise_multiplier, rel=1e-5)
