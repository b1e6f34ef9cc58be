"""FedDAT's Dual-Adapter Teacher and the three adapters of a site."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer

from feddat_secure.config import TrainingConfig
from feddat_secure.training.local_model import LocalModel
from feddat_secure.training.trainers import (
    CLIENT,
    CLIENT_ONLY,
    DUAL_ADAPTER_TEACHER,
    FROZEN_GLOBAL,
    SHARED,
    FedDATTrainer,
    Schedule,
)

NAMES, TRAINABLE = (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT)


def randomized(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in state.items()}


@pytest.fixture
def site(foundation, lora, tiny_benchmark) -> LocalModel:
    model = LocalModel(foundation, lora, NAMES, TRAINABLE, len(tiny_benchmark.answers), seed=1)
    for seed, name in enumerate(NAMES):  # LoRA starts with B = 0; give every adapter an effect
        model.adapters.set_state(name, randomized(model.adapters.get_state(name), seed))
    return model


def lora_layer_delta(model: LocalModel, weights: dict[str, float], x: torch.Tensor) -> torch.Tensor:
    layer = next(m for m in model.adapters.peft_model.modules() if isinstance(m, LoraLayer))
    model.adapters.activate(weights)
    with torch.no_grad():
        return layer(x) - layer.base_layer(x)


def test_teacher_adds_half_of_client_and_half_of_frozen_global_adapter(site, foundation):
    x = torch.randn(3, 5, foundation.hidden_size)
    dat = lora_layer_delta(site, DUAL_ADAPTER_TEACHER, x)
    client = lora_layer_delta(site, {CLIENT: 1.0}, x)
    frozen = lora_layer_delta(site, {FROZEN_GLOBAL: 1.0}, x)
    assert not torch.allclose(client, frozen)
    torch.testing.assert_close(dat, 0.5 * client + 0.5 * frozen)


def test_activating_the_teacher_keeps_frozen_copy_frozen_and_client_trainable(site):
    site.adapters.activate(DUAL_ADAPTER_TEACHER)
    assert all(not p.requires_grad for p in site.adapters.parameters(FROZEN_GLOBAL))
    assert all(p.requires_grad for p in site.adapters.parameters(CLIENT))
    site.adapters.activate({SHARED: 1.0})  # PEFT would now freeze the inactive client adapter
    assert all(p.requires_grad for p in site.adapters.parameters(CLIENT))


def test_scaling_is_restored_after_the_teacher_pass(site, foundation):
    x = torch.randn(2, 4, foundation.hidden_size)
    before = lora_layer_delta(site, CLIENT_ONLY, x)
    lora_layer_delta(site, DUAL_ADAPTER_TEACHER, x)
    torch.testing.assert_close(lora_layer_delta(site, CLIENT_ONLY, x), before)


def train_rounds(site: LocalModel, split, rounds: int, **training):
    """Yield (frozen before, frozen after, client before, client after, trainer) per round."""
    trainer = FedDATTrainer(site, Schedule(TrainingConfig(local_steps=3, batch_size=8, **training), rounds),
                            head_travels=False)
    rng = np.random.default_rng(0)
    for round_index in range(rounds):
        global_state = randomized(site.adapters.get_state(SHARED), 100 + round_index)
        trainer.load_global(global_state)
        frozen, client = site.adapters.get_state(FROZEN_GLOBAL), site.adapters.get_state(CLIENT)
        trainer.train_round(split.sample_batches(8, 3, rng), round_index)
        yield global_state, frozen, site.adapters.get_state(FROZEN_GLOBAL), client, site.adapters.get_state(CLIENT)


def test_frozen_global_copy_gets_no_gradient_and_never_changes(site, tiny_split):
    for global_state, before, after, _, _ in train_rounds(site, tiny_split, rounds=2):
        for key in global_state:
            np.testing.assert_array_equal(before[key], global_state[key])
            np.testing.assert_array_equal(after[key], before[key])
    assert all(p.grad is None for p in site.adapters.parameters(FROZEN_GLOBAL))


def test_client_adapter_changes_in_every_round_including_after_the_first(site, tiny_split):
    for *_, before, after in train_rounds(site, tiny_split, rounds=3):
        changed = max(float(np.abs(after[k] - before[k]).max()) for k in before)
        assert changed > 1e-6


def test_shared_adapter_trains_and_is_reset_to_the_global_adapter_each_round(site, tiny_split):
    trainer = FedDATTrainer(site, Schedule(TrainingConfig(local_steps=2), 2), head_travels=False)
    global_state = randomized(site.adapters.get_state(SHARED), 7)
    trainer.load_global(global_state)
    trainer.train_round(tiny_split.sample_batches(8, 2, np.random.default_rng(0)), 0)
    trained = trainer.shared_state()
    assert any(not np.array_equal(trained[k], global_state[k]) for k in global_state)
    trainer.load_global(global_state)
    for key, value in trainer.shared_state().items():
        np.testing.assert_array_equal(value, global_state[key])


def head_state(site: LocalModel) -> dict[str, np.ndarray]:
    return {key: value.copy() for key, value in site.head_state().items()}


def test_the_official_codes_ablation_trains_the_client_adapter_in_the_first_rounds_only(site, tiny_split):
    changes = [max(float(np.abs(after[k] - before[k]).max()) for k in before)
               for *_, before, after in train_rounds(site, tiny_split, rounds=3, client_adapter_rounds=1)]
    assert changes[0] > 1e-6 and changes[1] == changes[2] == 0.0


def test_the_head_in_dat_loss_ablation_also_steps_the_head_with_the_dats_loss(site, tiny_split, foundation, lora,
                                                                             tiny_benchmark):
    def head_after_round(**training) -> dict[str, np.ndarray]:
        model = LocalModel(foundation, lora, NAMES, TRAINABLE, len(tiny_benchmark.answers), seed=1)
        trainer = FedDATTrainer(model, Schedule(TrainingConfig(local_steps=2, batch_size=8, **training), 1),
                                head_travels=False)
        trainer.train_round(tiny_split.sample_batches(8, 2, np.random.default_rng(0)), 0)
        return head_state(model)

    default, ablation = head_after_round(), head_after_round(head_in_dat_loss=True)
    assert any(not np.array_equal(default[key], ablation[key]) for key in default)
    torch.manual_seed(0)
    trainer = FedDATTrainer(site, Schedule(TrainingConfig(head_in_dat_loss=True), 1), head_travels=False)
    held = {id(p) for group in trainer.client_optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in site.head_parameters()} <= held


def test_feddat_ablations_are_refused_with_record_level_dp_and_for_other_algorithms():
    from feddat_secure.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match="without record-level DP"):
        config_from_dict({"training": {"client_adapter_rounds": 1},
                          "privacy": {"record": {"enabled": True, "noise_multiplier": 1.0}}})
    with pytest.raises(ConfigError, match="FedDAT ablation"):
        config_from_dict({"federation": {"algorithm": "fedavg"}, "training": {"head_in_dat_loss": True}})
    with pytest.raises(ConfigError, match="below federation.rounds"):
        config_from_dict({"federation": {"rounds": 2}, "training": {"client_adapter_rounds": 2}})
    with pytest.raises(ConfigError, match="sampled cohort"):
        config_from_dict({"federation": {"clients_per_round": 2}, "training": {"client_adapter_rounds": 1}})
    with pytest.raises(ConfigError, match="model.head = 'local'"):
        config_from_dict({"model": {"head": "shared"}, "training": {"head_in_dat_loss": True}})
    assert config_from_dict({"training": {"client_adapter_rounds": 1, "head_in_dat_loss": True}})
