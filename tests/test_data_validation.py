"""A validation split held out of the training data: hyperparameters are chosen without a test example."""

import json

import pytest
from conftest import small_config

from feddat_secure.config import ConfigError, config_from_dict
from feddat_secure.data import build_benchmark, hold_out_validation
from feddat_secure.data.vqa import DataError
from feddat_secure.federation.runner import run

SIZES = dict(path="", num_clients=2, train_per_client=40, test_per_client=12, image_size=16, seed=3)


def test_the_last_training_examples_are_scored_and_no_longer_trained_on_and_the_test_split_is_never_used():
    full = build_benchmark("function", **SIZES)
    held = hold_out_validation(full, 0.1)
    for before, after in zip(full.clients, held.clients):
        assert after.train == before.train[:36] and after.test == before.train[36:]
        assert not {id(example) for example in before.test} & {id(example) for example in after.train + after.test}
        assert after.answers == before.answers
    assert build_benchmark("function", **SIZES, validation_fraction=0.1).digest() == held.digest()


def test_a_fraction_that_leaves_no_training_example_is_refused_and_a_tiny_one_holds_out_one():
    two = build_benchmark("function", **{**SIZES, "train_per_client": 2})
    assert [(len(c.train), len(c.test)) for c in hold_out_validation(two, 0.01).clients] == [(1, 1), (1, 1)]
    with pytest.raises(DataError, match="leaves none to train on"):
        hold_out_validation(build_benchmark("function", **{**SIZES, "train_per_client": 1}), 0.01)
    with pytest.raises(DataError, match="in \\(0, 1\\)"):
        hold_out_validation(two, 1.0)


def test_the_configuration_takes_a_fraction_up_to_a_half():
    assert config_from_dict({"data": {"validation_fraction": 0.1}}).data.validation_fraction == 0.1
    with pytest.raises(ConfigError, match="validation_fraction"):
        config_from_dict({"data": {"validation_fraction": 0.6}})


def test_a_run_with_a_validation_fraction_trains_and_scores_on_the_held_out_split(tmp_path, foundation):
    config = small_config(tmp_path, data={"validation_fraction": 0.25}, federation={"rounds": 1},
                          training={"local_steps": 1})
    result = run(config, progress=False, echo=lambda _: None)
    expected = build_benchmark("function", path="", num_clients=3, train_per_client=32, test_per_client=16,
                               image_size=foundation.image_size, seed=config.seed, validation_fraction=0.25)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data"]["sha256"] == expected.digest()
    assert all(len(client.train) == 24 and len(client.test) == 8 for client in expected.clients)
