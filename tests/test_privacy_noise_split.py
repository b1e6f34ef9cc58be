"""An unequal noise split between FedDAT's two DP-SGD steps (``privacy.record.client_adapter_noise_ratio``):
each step draws its own σ, and the batch is accounted as one Gaussian mechanism of (σ_s⁻² + σ_c⁻²)^-½, with
every ε recomputed by Google's dp_accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from feddat_secure.config import ConfigError, RecordPrivacyConfig, TrainingConfig, config_from_dict
from feddat_secure.privacy import combined_noise_multiplier, make_record_privacy
from feddat_secure.privacy.dp_sgd import PrivateOptimizer
from feddat_secure.training import trainers
from feddat_secure.training.local_model import LocalModel
from feddat_secure.training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, FedDATTrainer, Schedule

DELTA = 1e-5


def epsilon(accountant, event: dp_event.DpEvent) -> float:
    accountant.compose(event)
    return accountant.get_epsilon(DELTA)


@pytest.mark.parametrize("accountant", [RdpAccountant, PLDAccountant])
def test_two_gaussian_steps_on_one_sample_are_one_gaussian_of_the_combined_multiplier(accountant):
    """Independently of our formula: dp_accounting composes the two mechanisms itself."""
    sigma_s, sigma_c = 1.1, 2.7
    both = epsilon(accountant(), dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(sigma_s),
                                                           dp_event.GaussianDpEvent(sigma_c)]))
    one = epsilon(accountant(), dp_event.GaussianDpEvent(combined_noise_multiplier([sigma_s, sigma_c])))
    assert one == pytest.approx(both, rel=1e-3)
    assert combined_noise_multiplier([1.3, 1.3]) == pytest.approx(1.3 / math.sqrt(2))
    # accounting only the shared step's σ would understate ε
    assert epsilon(accountant(), dp_event.GaussianDpEvent(sigma_s)) < both


@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0])
def test_a_calibrated_split_spends_the_target_under_dp_accounting(ratio):
    config = RecordPrivacyConfig(enabled=True, target_epsilon=8.0, client_adapter_noise_ratio=ratio)
    settings = make_record_privacy(config, dataset_size=4000, batch_size=512, local_steps=10, rounds=6,
                                   steps_per_batch=2)
    sigma_s, sigma_c = settings.step_noise_multipliers
    assert sigma_c == pytest.approx(ratio * sigma_s) and sigma_s == settings.noise_multiplier
    (event,) = settings.round_events()
    combined = (sigma_s ** -2 + sigma_c ** -2) ** -0.5
    assert event.noise_multiplier == pytest.approx(combined) == settings.accounted_noise_multiplier
    spent = epsilon(RdpAccountant(), dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(512 / 4000, dp_event.GaussianDpEvent(combined)), 60))
    assert 7.8 < spent <= 8.0 * 1.01  # the two use different RDP orders
    assert settings.describe()["step_noise_multipliers"] == [sigma_s, sigma_c]


def test_each_feddat_step_draws_its_own_noise_multiplier(foundation, lora, tiny_benchmark, tiny_split, monkeypatch):
    built = []

    class Recording(PrivateOptimizer):
        def __init__(self, optimizer, **options):
            super().__init__(optimizer, **options)
            built.append(self)

    monkeypatch.setattr(trainers, "PrivateOptimizer", Recording)
    config = RecordPrivacyConfig(enabled=True, noise_multiplier=1.2, reproducible=True, client_adapter_noise_ratio=3.0)
    privacy = make_record_privacy(config, dataset_size=len(tiny_split), batch_size=8, local_steps=2, rounds=3,
                                  steps_per_batch=2)
    model = LocalModel(foundation, lora, (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT),
                       len(tiny_benchmark.answers), seed=1)
    trainer = FedDATTrainer(model, Schedule(TrainingConfig(local_steps=2, batch_size=8), rounds=3),
                            head_travels=False, privacy=privacy)
    trainer.train_round_on(tiny_split, np.random.default_rng(0), 0)
    client = {id(p) for p in model.adapters.trainable_parameters(CLIENT)}
    by_step = {"A_c" if client & {id(p) for p in private.parameters} else "A_s and head": private.noise_multiplier
               for private in built}
    assert by_step == {"A_s and head": 1.2, "A_c": pytest.approx(3.6)}
    (event,) = trainer.round_events
    assert event.noise_multiplier == pytest.approx((1.2 ** -2 + 3.6 ** -2) ** -0.5)


@pytest.mark.parametrize("raw, message", [
    ({"federation": {"algorithm": "fedavg"}, "privacy": {"record": {"enabled": True, "target_epsilon": 8.0,
                                                                     "client_adapter_noise_ratio": 2.0}}},
     "'privacy.record.client_adapter_noise_ratio' splits the noise between FedDAT's two DP-SGD steps; .*'fedavg'"),
    ({"privacy": {"record": {"client_adapter_noise_ratio": 2.0}}},
     "'privacy.record.client_adapter_noise_ratio' .* needs privacy.record.enabled"),
    ({"privacy": {"record": {"enabled": True, "target_epsilon": 8.0, "client_adapter_noise_ratio": 0.0}}},
     "'privacy.record.client_adapter_noise_ratio'"),
])
def test_a_split_where_there_is_nothing_to_split_is_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_a_single_step_algorithm_refuses_a_split_in_the_settings_too():
    config = RecordPrivacyConfig(enabled=True, target_epsilon=8.0, client_adapter_noise_ratio=2.0)
    with pytest.raises(ValueError, match="needs a second DP-SGD step per batch"):
        make_record_privacy(config, dataset_size=100, batch_size=10, local_steps=2, rounds=2, steps_per_batch=1)
