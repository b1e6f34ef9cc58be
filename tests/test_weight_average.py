"""The EMA of a site's own weights (training.ema_decay): what it averages, where it is used, what it never touches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import small_config

from feddat_secure.config import ConfigError, TrainingConfig, config_from_dict
from feddat_secure.training.local_model import LocalModel
from feddat_secure.training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, FedDATTrainer, Schedule
from feddat_secure.training.weight_average import WeightAverage

NAMES, TRAINABLE = (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT)


def test_the_average_follows_the_warmed_up_ema_recurrence():
    parameter = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([parameter], decay=0.9)
    expected = np.zeros(3)
    for t, value in enumerate([1.0, 2.0, -1.0, 4.0, 0.5] * 4, start=1):
        with torch.no_grad():
            parameter.fill_(value)
        average.update()
        decay = min(0.9, (1 + t) / (10 + t))  # TensorFlow's num_updates warm-up
        expected = decay * expected + (1 - decay) * value
        np.testing.assert_allclose(average.averages[0].numpy(), expected, rtol=1e-6)


def test_swapping_in_the_average_is_undone_even_when_the_block_fails():
    parameter = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    average = WeightAverage([parameter], decay=0.5)
    with torch.no_grad():
        parameter.add_(10.0)
    average.update()
    with pytest.raises(RuntimeError, match="inside"), average.swapped_in():
        assert not torch.equal(parameter.detach(), torch.tensor([11.0, 12.0]))
        raise RuntimeError("inside")
    assert torch.equal(parameter.detach(), torch.tensor([11.0, 12.0]))


def test_a_decay_outside_0_to_1_and_saved_averages_of_other_shapes_are_refused():
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        WeightAverage([parameter], decay=1.0)
    average = WeightAverage([parameter], decay=0.9)
    with pytest.raises(ValueError, match="do not match"):
        average.load_state_dict({"updates": 3, "averages": [np.zeros((2, 3), np.float32)]})
    assert average.updates == 0


@pytest.fixture
def trainer_with(foundation, lora, tiny_benchmark):
    def make(ema_decay: float, head_travels: bool = False) -> FedDATTrainer:
        model = LocalModel(foundation, lora, NAMES, TRAINABLE, len(tiny_benchmark.answers), seed=1)
        training = TrainingConfig(local_steps=3, batch_size=8, learning_rate=0.05, ema_decay=ema_decay)
        return FedDATTrainer(model, Schedule(training, 2), head_travels=head_travels)
    return make


def client_and_head(trainer: FedDATTrainer) -> dict[str, np.ndarray]:
    return {**trainer.model.adapters.get_state(CLIENT), **trainer.model.head_state()}


def test_feddat_evaluates_the_average_of_its_client_adapter_and_local_head_and_keeps_training_the_last_weights(
        trainer_with, tiny_split):
    trainer = trainer_with(0.5)
    trainer.train_round(tiny_split.sample_batches(8, 3, np.random.default_rng(0)), 0)
    last = client_and_head(trainer)
    shared = trainer.shared_state()
    with trainer.averaged():
        averaged = client_and_head(trainer)
        np.testing.assert_equal(trainer.shared_state(), shared)  # what travels is never averaged
    assert all(not np.allclose(averaged[key], last[key]) for key in last if "lora_B" in key or "head" in key)
    np.testing.assert_equal(client_and_head(trainer), last)  # training goes on from the last weights
    seen = {}
    original = trainer.model.accuracy

    def accuracy(split, weights, size):
        seen.update(client_and_head(trainer))
        return original(split, weights, size)
    trainer.model.accuracy = accuracy
    trainer.evaluate(tiny_split)
    np.testing.assert_equal(seen, averaged)


def test_without_an_ema_evaluation_uses_the_last_weights(trainer_with, tiny_split):
    trainer = trainer_with(0.0)
    trainer.train_round(tiny_split.sample_batches(8, 3, np.random.default_rng(0)), 0)
    assert trainer.average is None
    with trainer.averaged():
        np.testing.assert_equal(client_and_head(trainer), client_and_head(trainer))


def test_a_travelling_head_is_not_averaged(trainer_with):
    trainer = trainer_with(0.5, head_travels=True)
    heads = {id(p) for p in trainer.model.head_parameters()}
    assert not heads & {id(p) for p in trainer.average.parameters}


def test_the_average_survives_a_checkpoint_and_a_mismatched_one_is_refused(trainer_with, tiny_split):
    trainer = trainer_with(0.5)
    trainer.train_round(tiny_split.sample_batches(8, 3, np.random.default_rng(0)), 0)
    saved = trainer.state_dict()
    resumed = trainer_with(0.5)
    resumed.load_state_dict(saved)
    assert resumed.average.updates == 3
    with resumed.averaged(), trainer.averaged():
        np.testing.assert_equal(client_and_head(resumed), client_and_head(trainer))
    other = trainer_with(0.0)
    before = client_and_head(other)
    with pytest.raises(ValueError, match="ema_decay"):
        other.load_state_dict(saved)
    np.testing.assert_equal(client_and_head(other), before)  # refused before anything was applied


def test_ema_decay_is_feddats_and_in_range():
    with pytest.raises(ConfigError, match="ema_decay"):
        config_from_dict({"federation": {"algorithm": "fedavg"}, "training": {"ema_decay": 0.9}})
    with pytest.raises(ConfigError, match="ema_decay"):
        config_from_dict({"training": {"ema_decay": 1.0}})
    assert config_from_dict({"training": {"ema_decay": 0.9}}).training.ema_decay == 0.9


@pytest.mark.slow
def test_a_private_run_saves_the_averaged_model_it_evaluated(tmp_path, foundation):
    import feddat_secure
    from feddat_secure import Predictor
    from feddat_secure.data import build_benchmark

    config = small_config(tmp_path, federation={"rounds": 2, "algorithm": "feddat"}, model={"head": "local"},
                          training={"local_steps": 4, "batch_size": 8, "learning_rate": 0.05, "ema_decay": 0.8},
                          data={"test_per_client": 48},
                          privacy={"record": {"enabled": True, "noise_multiplier": 0.5, "reproducible": True}})
    result = feddat_secure.run(config, progress=False)
    benchmark = build_benchmark(config.data.benchmark, path=config.data.path, num_clients=config.data.num_clients,
                                train_per_client=config.data.train_per_client,
                                test_per_client=config.data.test_per_client, image_size=foundation.image_size,
                                seed=config.seed)
    for client in benchmark.clients:
        predictor = Predictor.from_run(result.run_dir, site=client.client_id)
        answers = predictor.predict([ex.image for ex in client.test], [ex.question for ex in client.test])
        accuracy = sum(a == ex.answer for a, ex in zip(answers, client.test)) / len(client.test)
        # under record-level DP the site keeps its metrics to itself, in its own folder
        lines = (result.run_dir / "parties" / client.client_id / "metrics.jsonl").read_text().splitlines()
        assert accuracy == json.loads(lines[-1])["accuracy"]["dat"]
