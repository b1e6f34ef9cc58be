"""Client-level DP: clipping bound, noise scales, distributed Skellam shares, adaptive clipping,
and each party's own ledgers (budget stop, resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from feddat_secure.config import ConfigError, config_from_dict
from feddat_secure.privacy import GaussianEvent, compute_epsilon
from feddat_secure.privacy.client_level import (
    SKELLAM_RDP_ORDERS,
    AdaptiveClipping,
    central_noise,
    clip_update,
    conditional_rounding_bound,
    distributed_noise_share,
    epsilon_for_surviving_shares,
    local_noise,
    poisson_participants,
    quantized_sensitivity,
    skellam_gaussian_equivalent,
    update_noise_multiplier,
)
from feddat_secure.privacy.run_privacy import ServerPrivacy, SitePrivacy, privacy_settings

SITES = {"site-0": 40, "site-1": 30, "site-2": 20}


def run_config(**privacy):
    return config_from_dict({"federation": {"rounds": 8, "aggregation": "uniform"}, "data": {"num_clients": 3},
                             "training": {"local_steps": 5, "batch_size": 8},
                             "secure_aggregation": {"protocol": privacy.pop("protocol", "plain")},
                             "privacy": privacy})


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e6, 1e6)), st.floats(1e-4, 1e3))
def test_no_clipped_update_leaves_with_a_norm_above_the_bound(vector, bound):
    clipped, norm = clip_update(vector, bound)
    assert np.linalg.norm(clipped) <= bound
    assert norm == pytest.approx(np.linalg.norm(vector))
    if norm <= bound:
        np.testing.assert_array_equal(clipped, vector)
    else:  # scaled, not reshaped
        np.testing.assert_allclose(clipped * norm, vector * np.linalg.norm(clipped), rtol=1e-9, atol=1e-9)


def test_clipping_refuses_non_finite_updates():
    with pytest.raises(ValueError, match="finite"):
        clip_update(np.array([1.0, np.nan]), 1.0)


@pytest.mark.parametrize("noise", [central_noise, local_noise])
def test_gaussian_noise_has_the_configured_standard_deviation(noise):
    n = 200_000
    sample = noise(n, clip_norm=0.1, noise_multiplier=1.7, rng=np.random.default_rng(0))
    std = 0.17
    assert abs(sample.std() / std - 1) < 3.3 / math.sqrt(2 * n)  # 99.9% interval of a sample std
    assert abs(sample.mean()) < 3.3 * std / math.sqrt(n)


def test_distributed_noise_shares_sum_to_the_target_variance():
    """s sites' Skellam shares add up to integer noise whose variance is (σ·Δ2)², Δ2 the quantized
    sensitivity: the same noise multiplier as central noise, in grid steps."""
    dimension, sigma, clip, step, sites = 50_000, 1.1, 0.1, 2 * 0.25 / (2**16 - 1), 5
    l2, _ = quantized_sensitivity(clip, step, dimension)
    assert l2 == pytest.approx(conditional_rounding_bound(clip, step, dimension) + math.sqrt(dimension) / 2)
    rng = np.random.default_rng(1)
    shares = [distributed_noise_share(dimension, noise_multiplier=sigma, clip_norm=clip, quantization_step=step,
                                      planned_shares=sites, rng=rng) for _ in range(sites)]
    assert all(s.dtype == np.int64 for s in shares)
    total = np.sum(shares, axis=0)
    target = (sigma * l2) ** 2
    assert abs(total.var() / target - 1) < 4.0 * math.sqrt(2 / dimension)
    assert abs(shares[0].var() / (target / sites) - 1) < 4.0 * math.sqrt(2 / dimension)


def test_fewer_surviving_shares_mean_less_noise_and_more_epsilon():
    arguments = dict(noise_multiplier=1.0, clip_norm=0.1, quantization_step=1e-5, dimension=1000, planned_shares=4)
    full = epsilon_for_surviving_shares(surviving_shares=4, **arguments)
    fewer = epsilon_for_surviving_shares(surviving_shares=3, **arguments)
    assert full.sample_rate == 1.0 and full.steps == 1
    assert fewer.noise_multiplier == pytest.approx(full.noise_multiplier * math.sqrt(3 / 4), rel=1e-4)
    assert compute_epsilon([fewer] * 10, 1e-5, rdp_orders=SKELLAM_RDP_ORDERS) > \
        compute_epsilon([full] * 10, 1e-5, rdp_orders=SKELLAM_RDP_ORDERS)
    with pytest.raises(ValueError):
        epsilon_for_surviving_shares(surviving_shares=0, **arguments)


@pytest.mark.parametrize("variance, l2", [(1e8, 1e4), (400.0, 10.0), (30.0, 3.0)])
def test_the_gaussian_equivalent_dominates_the_skellam_rdp_bound_at_every_integer_order(variance, l2):
    l1 = 5 * l2
    s = skellam_gaussian_equivalent(variance, l2, l1)
    assert s <= math.sqrt(variance) / l2  # never more noise than is there
    for alpha in SKELLAM_RDP_ORDERS:  # Agarwal et al. 2021, Thm 3.5
        skellam = alpha * l2**2 / (2 * variance) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2),
                                                       3 * l1 / (2 * variance))
        assert alpha / (2 * s**2) >= skellam * (1 - 1e-12)
    if variance == 1e8:  # fine grids: Skellam is as good as the Gaussian
        assert s == pytest.approx(math.sqrt(variance) / l2, rel=1e-6)


def test_adaptive_clipping_spends_one_gaussian_and_moves_the_clip_norm_towards_the_quantile():
    z_update = update_noise_multiplier(1.0, 2.0)
    assert z_update**-2 + (2 * 2.0) ** -2 == pytest.approx(1.0)  # (update, count) = one Gaussian of multiplier 1
    with pytest.raises(ValueError, match="count noise"):  # the configuration is refused when it loads
        update_noise_multiplier(1.0, 0.4)
    clipping = AdaptiveClipping(clip_norm=1.0, target_quantile=0.5, learning_rate=0.2, count_noise_std=0.0,
                                expected_participants=10)
    all_clipped = sum(AdaptiveClipping.indicator(5.0, clipping.clip_norm) for _ in range(10))
    assert clipping.server_update(all_clipped, np.random.default_rng(0)) > 1.0  # norms above C: C grows
    none_clipped = sum(AdaptiveClipping.indicator(0.1, clipping.clip_norm) for _ in range(10))
    before = clipping.clip_norm
    assert clipping.server_update(none_clipped, np.random.default_rng(0)) < before
    restored = AdaptiveClipping(1.0, 0.5, 0.2, 0.0, 10)
    restored.load_state_dict(json.loads(json.dumps(clipping.state_dict())))
    assert restored.clip_norm == clipping.clip_norm


def test_poisson_participation():
    ids = [f"site-{i}" for i in range(1000)]
    chosen = poisson_participants(ids, 0.3, np.random.default_rng(0))
    assert len(chosen) == pytest.approx(300, abs=50)
    assert poisson_participants(ids, 1.0, np.random.default_rng(0)) == ids


def site_privacy(settings, cid: str) -> SitePrivacy:
    return SitePrivacy(cid, settings.record.get(cid), settings.client)


def test_client_level_target_epsilon_is_met_for_every_placement():
    for placement, protocol in (("central", "plain"), ("local", "plain"), ("distributed", "masked")):
        config = run_config(client={"placement": placement, "target_epsilon": 4.0, "clip_norm": 0.1},
                            protocol=protocol)
        settings = privacy_settings(config, SITES, update_dimension=2000)
        server = ServerPrivacy(settings.client)
        sites = [site_privacy(settings, cid) for cid in SITES]
        if placement == "local":  # each site's own noise: each site holds its client-level ledger
            assert server.accountants == [] and all(site.client_accountant is not None for site in sites)
            accountant = sites[0].client_accountant
        elif placement == "distributed":  # the federation's sum, protected against the server: both hold one
            assert all(site.client_accountant is not None for site in sites) and len(server.accountants) == 1
            accountant = sites[0].client_accountant
        else:  # the federation's noise: the server holds the one client-level ledger
            assert all(site.client_accountant is None for site in sites)
            (accountant,) = server.accountants
        for round_index in range(8):
            accountant.spend(accountant.planned_events(round_index), round_index)
        assert 3.8 < accountant.epsilon() <= 4.0, placement


@pytest.mark.parametrize("privacy, key", [
    ({"client": {"placement": "distributed"}}, "masked"),
    ({"client": {"placement": "distributed", "accountant": "prv"}, "protocol": "masked"}, "rdp"),
    ({"client": {"placement": "local", "adaptive_clipping": True}}, "adaptive_clipping"),
    ({"record": {"enabled": True, "noise_multiplier": 0.0}}, "noise_multiplier"),
    ({"client": {"placement": "central", "adaptive_clipping": True, "noise_multiplier": 1.0,
                 "count_noise_std": 0.4}}, "count_noise_std"),
])
def test_client_level_configuration_errors_name_the_key(privacy, key):
    with pytest.raises(ConfigError, match=key):
        privacy_settings(run_config(**privacy), SITES, update_dimension=10)


def test_each_party_stops_before_a_round_that_would_exceed_its_budget_and_resume_does_not_double_count():
    config = run_config(record={"enabled": True, "noise_multiplier": 3.0, "budget_epsilon": 4.0},
                        client={"placement": "central", "noise_multiplier": 2.0, "budget_epsilon": 50.0})
    settings = privacy_settings(config, SITES, update_dimension=100)
    sites = {cid: site_privacy(settings, cid) for cid in SITES}
    server = ServerPrivacy(settings.client)
    assert all(site.record_accountant is not None and site.client_accountant is None for site in sites.values())
    assert [a.level for a in server.accountants] == ["client"]  # the server holds no site's record ledger
    spent = 0
    while server.refusal(spent) is None and not any(site.refusal(spent) for site in sites.values()):
        for cid, site in sites.items():
            site.charge_training(settings.record[cid].round_events(), spent)
        server.charge(spent)
        spent += 1
    assert 0 < spent < 8
    refusals = {cid: site.refusal(spent) for cid, site in sites.items()}
    # the smallest site has the largest q, hence the largest ε: it stops first; the largest site could go on
    assert refusals["site-2"] is not None and "over the budget" in refusals["site-2"]
    assert refusals["site-0"] is None
    assert server.refusal(spent) is None  # the client-level budget is far from spent
    for party in [*sites.values(), server]:
        assert all(a.epsilon() <= a.budget_epsilon for a in party.accountants)

    for cid, site in sites.items():
        resumed = site_privacy(settings, cid)
        resumed.load_state_dict(json.loads(json.dumps(site.state_dict())))
        assert [a.epsilon() for a in resumed.accountants] == [a.epsilon() for a in site.accountants]
        assert resumed.refusal(spent) == refusals[cid]  # a resumed site does not forget what it spent
        with pytest.raises(ValueError, match="comes before"):
            resumed.charge_training(settings.record[cid].round_events(), spent - 2)
    resumed_server = ServerPrivacy(settings.client)
    resumed_server.load_state_dict(json.loads(json.dumps(server.state_dict())))
    assert resumed_server.accountant.epsilon() == server.accountant.epsilon()
    with pytest.raises(ValueError, match="comes before"):
        resumed_server.charge(spent - 2)
    with pytest.raises(ValueError, match="do not match"):  # one party's checkpoint does not restore another's
        site_privacy(settings, "site-0").load_state_dict(json.loads(json.dumps(sites["site-1"].state_dict())))


def test_distributed_rounds_are_charged_the_planned_noise_shares():
    """Honest sites refuse to unmask a sum with fewer than the planned shares, so the server charges the planned
    event, before the round (write-ahead), whatever dropouts it later claims."""
    config = run_config(client={"placement": "distributed", "noise_multiplier": 1.0, "tolerated_dropouts": 1},
                        protocol="masked")
    settings = privacy_settings(config, SITES, update_dimension=1000)
    client = settings.client
    assert client.planned_shares(3) == 2
    l2, _ = quantized_sensitivity(0.1, client.quantization_step, 1000)
    assert client.noise_bound(3) == math.ceil(12 * l2 / math.sqrt(2))  # 12 standard deviations of a share
    assert np.abs(client.noise_share(3, np.random.default_rng(0))).max() < client.noise_bound(3)
    server = ServerPrivacy(client)
    assert server.train_terms(3) == {"clip_norm": client.clip_norm, "noise_shares": 3}  # sent to the sites
    server.charge(0)
    server.charge(1)
    (ledger,) = server.accountants
    assert [events for _, events in ledger.rounds] == [tuple(client.round_events(3))] * 2
    assert client.round_events(3)[0].noise_multiplier == pytest.approx(1.0, rel=1e-3)  # the target noise
    assert ledger.applicable_accountants == ("rdp",)


def test_a_prv_ledger_far_out_of_range_falls_back_to_rdp_without_exhausting_memory():
    events = [GaussianEvent(0.05, 0.05, 300)]
    from feddat_secure.privacy import AccountingError, PrivacyAccountant

    with pytest.raises(AccountingError, match="range"):
        compute_epsilon(events, 1e-5, "prv")
    ledger = PrivacyAccountant(level="record", client="x", accountant="prv", delta=1e-5, budget_epsilon=1.0,
                               per_round=events)
    assert ledger.would_exceed(events, 0) is not None
