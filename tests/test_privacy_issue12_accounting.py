"""Issue 12, items 6, 7 and 12: ε is never negative and never decreases; the central noise covers the rounding
the protocol applies before it; a target ε is calibrated with the accountant the user chose.

Every ε these tests claim is recomputed with Google's dp_accounting (RDP and PLD)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import small_config
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from feddat_secure.config import config_from_dict
from feddat_secure.federation.parties import build_protocol, plan_run
from feddat_secure.model.adapters import LoraSettings
from feddat_secure.privacy import GaussianEvent, PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon
from feddat_secure.privacy.accounting import PRV_EPS_ERROR
from feddat_secure.privacy.run_privacy import ServerPrivacy, privacy_settings
from protocols.simulation import simulate_round

SITES = {"site-0": 40, "site-1": 30, "site-2": 20, "site-3": 20}
CLIP = 0.05


def google_event(q: float, sigma: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def google_rdp(q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(google_event(q, sigma, steps))
    return accountant.get_epsilon(delta)


def google_pld(q: float, sigma: float, steps: int, delta: float) -> float:
    accountant = PLDAccountant()
    accountant.compose(google_event(q, sigma, steps))
    return accountant.get_epsilon(delta)


def run_config(protocol: str, *, masked: dict | None = None, **client):
    return config_from_dict({
        "federation": {"rounds": 4, "aggregation": "uniform"}, "data": {"num_clients": len(SITES)},
        "training": {"local_steps": 2, "batch_size": 8},
        "secure_aggregation": {"protocol": protocol, **({"masked": masked} if masked else {})},
        "privacy": {"client": {"placement": "central", "clip_norm": CLIP, "noise_multiplier": 1.3,
                               "reproducible": True, **client}}})


# ---------------------------------------------------------------- item 7: ε never negative, never decreasing

@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_ledger_never_reports_a_negative_epsilon(accountant):
    """Large noise and a large δ: Opacus's RDP conversion gave ε = −0.0100 for this record-level ledger (it
    tends to ln(1 − δ)), PRV's a negative upper bound too. ε < 0 claims more than perfect privacy."""
    sigma, q, delta = 20.0, 0.01, 0.01
    book = PrivacyAccountant(level="record", client="site-0", accountant=accountant, delta=delta, budget_epsilon=1.0,
                             per_round=[GaussianEvent(sigma, q, 1)])
    assert book.spend(book.planned_events(0), 0) == 0.0
    for name in ("rdp", "prv"):
        assert compute_epsilon(book.events, delta, name) == 0.0  # what the report's other figures come from
        assert book.epsilon(name) == 0.0 and book.epsilon_history(name) == [(0, 0.0)]
    assert google_rdp(q, sigma, 1, delta) == 0.0 and google_pld(q, sigma, 1, delta) == 0.0


def test_a_prv_ledger_never_reports_less_after_more_rounds():
    """PRV's ε of 3 and 4 rounds of (σ 3, q 0.001) was below that of 2 rounds (0.01157 → 0.01154 → 0.01135):
    its discretisation error, as composing more mechanisms never costs less. The ledger reports the running
    maximum, an upper bound of the true ε (dp_accounting's PLD) within PRV's error at every round."""
    sigma, q, delta = 3.0, 0.001, 1e-5
    book = PrivacyAccountant(level="record", client="site-0", accountant="prv", delta=delta, budget_epsilon=0.0,
                             per_round=[GaussianEvent(sigma, q, 1)])
    raw = [compute_epsilon([GaussianEvent(sigma, q, rounds)], delta, "prv") for rounds in (2, 3, 4)]
    assert raw[1] < raw[0] and raw[2] < raw[1]  # what PRV itself says: the drop this ledger must not pass on
    reported = [book.spend(book.planned_events(r), r) for r in range(5)]
    history = [epsilon for _, epsilon in book.epsilon_history()]
    assert reported == history
    assert all(a <= b for a, b in zip(history, history[1:]))
    assert history[2] == history[3] == raw[0]  # rounds 3 and 4 keep round 2's bound
    for rounds, epsilon in enumerate(history, start=1):
        pld = google_pld(q, sigma, rounds, delta)
        assert pld <= epsilon <= pld + PRV_EPS_ERROR + 1e-3
    assert book.epsilon(extra=book.planned_events(5)) >= history[-1]  # the budget gate's view never drops either


# ---------------------------------------------------------------- item 6: rounding before central noise

def released_difference(protocol: str, update: np.ndarray, others: list[np.ndarray], **options) -> np.ndarray:
    """What one site's whole contribution changes in the sum the protocol releases to the server (the sum the
    central noise is added to): the round with the site against the same round without it."""
    with_site = simulate_round(protocol, [*others, update], seed=3, **options)
    without = simulate_round(protocol, others, seed=3, **options)
    return with_site - without


def test_masked_rounding_moves_the_sum_by_more_than_the_clip_norm_but_never_more_than_c_plus_r():
    """An update of norm at most C with all its weight on one value, k steps. Zero is no grid point (the grid's
    values are odd multiples of step/2, as r/step = L/2 with L odd), so each of the other d − 1 values is
    rounded to ±step/2 whatever the draws, and the quantized contribution has norm at least
    √((k − ½)² + (d − 1)/4)·step > C. The
    sensitivity the server's noise is calibrated to, C + r, covers it, and covers the site's zero update
    instead of no update (the other neighbouring sum)."""
    bits, dimension = 8, 4096
    config = run_config("masked", masked={"quantization_bits": bits})
    client = privacy_settings(config, SITES, update_dimension=dimension).client
    step = 2 * CLIP / (2**bits - 1)  # the grid build_protocol gives the protocol: clip_range narrowed to C
    assert client.rounding_per_value == pytest.approx(1.5 * step)
    assert client.rounding_l2 == pytest.approx(1.5 * step * math.sqrt(dimension))
    update = np.zeros(dimension)
    update[0] = math.floor(CLIP / step) * step  # 127 steps ≤ C = 127.5 steps
    rng = np.random.default_rng(0)
    others = [np.clip(rng.normal(0, 0.01, dimension), -CLIP, CLIP) for _ in range(3)]
    options = {"clip_range": CLIP, "quantization_bits": bits}
    removed = released_difference("masked", update, others, **options)
    zeroed = simulate_round("masked", [*others, update], seed=3, **options) \
        - simulate_round("masked", [*others, np.zeros(dimension)], seed=3, **options)
    norm = float(np.linalg.norm(removed))
    assert norm >= math.sqrt(126.5**2 + (dimension - 1) / 4) * step * (1 - 1e-9) > 1.02 * CLIP  # the defect
    assert norm <= CLIP + client.rounding_l2
    assert float(np.linalg.norm(zeroed)) <= CLIP + client.rounding_l2
    description = client.describe()
    assert description["rounding_l2_sensitivity"] == client.rounding_l2
    assert description["effective_l2_sensitivity"] == CLIP + client.rounding_l2


def test_he_rounding_of_the_decrypted_sum_moves_it_by_more_than_the_clip_norm_but_never_more_than_c_plus_r():
    """The key holder rounds the decrypted sum to its output step. The other sites' sum lies just below a
    rounding midpoint; a site's update of norm C pushes every value just across: each released value moves by
    0.8 step more than the update, the released sum by 1.006·C. C + r covers it."""
    dimension = 1024
    config = run_config("he")
    client = privacy_settings(config, SITES, update_dimension=dimension).client
    step = config.secure_aggregation.he.output_step
    assert client.rounding_per_value == (1 + 2**-6) * step  # two roundings and the site's CKKS error
    per_value = (math.floor(CLIP / math.sqrt(dimension) / step) + 0.2) * step  # 0.2 step past a multiple
    update = np.full(dimension, per_value)
    assert np.linalg.norm(update) <= CLIP
    others = [np.full(dimension, 37.4 * step), np.zeros(dimension), np.zeros(dimension)]  # 0.1 step below ½
    difference = released_difference("he", update, others)
    norm = float(np.linalg.norm(difference))
    assert norm > CLIP * 1.005
    assert norm <= CLIP + client.rounding_l2


@pytest.mark.parametrize("protocol, adaptive", [("masked", False), ("masked", True), ("he", False)])
def test_the_rounding_term_is_that_of_the_grid_the_runs_protocol_really_uses(tmp_path, foundation, protocol,
                                                                              adaptive):
    """The run's protocol is built from its plan (build_protocol narrows the masked grid to C under central
    noise with a fixed clip norm); the privacy settings must describe that grid, not the configured one."""
    config = small_config(tmp_path, federation={"rounds": 1, "aggregation": "uniform"},
                          secure_aggregation={"protocol": protocol},
                          privacy={"client": {"placement": "central", "clip_norm": CLIP, "noise_multiplier": 1.0,
                                              "adaptive_clipping": adaptive}})
    plan = plan_run(config, foundation, LoraSettings.of(config.model), {"client-0": 32, "client-1": 32,
                                                                         "client-2": 32}, 10)
    options = build_protocol(plan).options
    step = options.quantizer.scale if protocol == "masked" else options.output_step
    grid = {"masked": 1.5, "he": 1 + 2**-6}[protocol] * step
    assert plan.privacy.client.rounding_per_value == pytest.approx(grid, rel=1e-12)


def test_the_server_adds_noise_of_sigma_times_c_plus_r_to_the_sum():
    """Reproducible noise: what the server adds is exactly N(0, (σ(C + r))²) drawn from the run's generator;
    a plain (exact) sum gets σC."""
    dimension = 500
    vector = np.linspace(-0.01, 0.01, dimension)
    for protocol in ("masked", "he", "plain"):
        client = privacy_settings(run_config(protocol), SITES, update_dimension=dimension).client
        assert (client.rounding_l2 > 0) == (protocol != "plain")
        applied, denominator = ServerPrivacy(client).aggregate_to_apply(vector, 4.0, np.random.default_rng(11))
        expected = np.random.default_rng(11).normal(0.0, 1.3 * (CLIP + client.rounding_l2), size=dimension)
        np.testing.assert_array_equal(applied, vector + expected)
        assert denominator == client.expected_participants


def test_adaptive_clipping_noises_the_moving_clip_norm_plus_r_and_the_count_for_its_rounded_sensitivity():
    dimension = 300
    config = run_config("masked", adaptive_clipping=True, count_noise_std=2.0)
    client = privacy_settings(config, SITES, update_dimension=dimension).client
    server = ServerPrivacy(client)
    server.adaptive.clip_norm = 0.08  # moved by earlier rounds
    step = 2 * config.secure_aggregation.masked.clip_range / (2**16 - 1)  # adaptive: the configured grid is kept
    assert client.rounding_per_value == pytest.approx(1.5 * step)
    vector = np.append(np.zeros(dimension), 0.2 * 1.5)  # three sites' indicators, scaled
    applied, _ = server.aggregate_to_apply(vector, 4.0, np.random.default_rng(5))
    draws = np.random.default_rng(5)
    noise = draws.normal(0.0, client.update_noise_multiplier * (0.08 + client.rounding_l2), size=dimension)
    np.testing.assert_array_equal(applied, noise)
    count = 1.5 + draws.normal(0.0, 2.0 * (1 + 2 * client.count_rounding))
    assert server.adaptive.history == [0.08]
    fraction = count / client.expected_participants + 0.5
    assert server.adaptive.clip_norm == pytest.approx(0.08 * math.exp(-0.2 * (fraction - 0.5)))


# ---------------------------------------------------------------- item 12: PRV calibration when chosen

def test_record_level_sigma_is_calibrated_with_prv_when_prv_is_chosen():
    """The FedDAT example (examples/feddat_masked_dp.toml): 200 records, batches of 16, 5 rounds of 20
    batches, two mechanisms per batch, target ε = 8. PRV needs about 6 % less noise than RDP, and its σ meets
    the target under dp_accounting's PLD too."""
    q, steps, target, delta = 16 / 200, 100, 8.0, 1e-5
    rdp = calibrate_noise_multiplier(target, delta, sample_rate=q, steps=steps, accountant="rdp",
                                     mechanisms_per_step=2)
    prv = calibrate_noise_multiplier(target, delta, sample_rate=q, steps=steps, accountant="prv",
                                     mechanisms_per_step=2)
    assert prv < 0.96 * rdp
    accounted = prv / math.sqrt(2)
    assert compute_epsilon([GaussianEvent(accounted, q, steps)], delta, "prv") <= target
    assert google_pld(q, accounted, steps, delta) <= target * 1.01
    assert google_rdp(q, accounted, steps, delta) > target  # RDP would have refused this σ: it is PRV's


def test_client_level_sigma_is_calibrated_with_prv_when_prv_is_chosen():
    rounds, target, delta = 4, 3.0, 1e-5
    sigmas = {}
    for accountant in ("rdp", "prv"):
        config = run_config("plain", accountant=accountant, target_epsilon=target, budget_epsilon=target)
        sigmas[accountant] = privacy_settings(config, SITES, update_dimension=10).client.noise_multiplier
    assert sigmas["prv"] < 0.97 * sigmas["rdp"]
    assert google_pld(1.0, sigmas["prv"], rounds, delta) <= target * 1.01
    assert google_rdp(1.0, sigmas["prv"], rounds, delta) > target
