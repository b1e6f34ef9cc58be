"""Config validation: every mistake is one line naming the key, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from feddat_secure.cli import main, unused_run_name
from feddat_secure.config import ConfigError, RunConfig, config_from_dict, load_config, to_toml


@pytest.mark.parametrize("raw, message", [
    ({"federation": {"rounds": 2, "round": 3}}, "unknown key 'federation.round'"),
    ({"modle": {}}, "unknown key 'modle'"),
    ({"federation": {"rounds": "5"}}, "'federation.rounds' must be an integer"),
    ({"federation": {"rounds": True}}, "'federation.rounds' must be an integer"),
    ({"secure_aggregation": {"protocol": "rot13"}}, "'secure_aggregation.protocol' must be one of plain, masked, he"),
    ({"secure_aggregation": {"he": {"coeff_mod_bit_sizes": [60, 0]}}}, "list of positive integers"),
    ({"privacy": {"client": {"placement": "central"}}}, "'federation.aggregation' must be 'uniform'"),
    ({"federation": {"algorithm": "centralized"}, "privacy": {"record": {"enabled": True}}},
     "differential privacy is for federated runs"),
    ({"privacy": {"record": {"delta": 0}}}, "'privacy.record.delta' must be > 0"),
    ({"training": {"learning_rate": "fast"}}, "'training.learning_rate' must be a number"),
    ({"federation": {"rounds": 0}}, "'federation.rounds' must be >= 1"),
    ({"training": {"temperature": 0}}, "'training.temperature' must be > 0"),
    ({"federation": {"algorithm": "fedsgd"}}, "'federation.algorithm' must be one of"),
    ({"data": {"num_clients": 3}, "federation": {"clients_per_round": 4}},
     "'federation.clients_per_round' is 4, more than the 3 clients"),
    ({"data": {"benchmark": "folder"}}, "'data.path' must name the data folder"),
    ({"model": {"target_modules": []}}, "'model.target_modules' must be a non-empty list"),
    ({"model": "embedded"}, "model: expected a table"),
    ({"name": "../escape"}, "'name' must be a plain folder name"),
])
def test_invalid_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_integers_are_accepted_where_numbers_are_expected():
    assert config_from_dict({"training": {"learning_rate": 1}}).training.learning_rate == 1.0


def test_resolved_toml_reads_back_to_the_same_config(tmp_path):
    config = config_from_dict({"name": "x", "model": {"head": "shared"}, "federation": {"fedprox_mu": 0.1}})
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config
    assert load_config(path).digest() == config.digest() != RunConfig().digest()


def test_cli_prints_one_line_and_exits_2_on_a_bad_config(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[data]\nnum_clients = 2\n[federation]\nclients_per_round = 5\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clients_per_round" in err and "Traceback" not in err


@pytest.mark.parametrize("content, message", [("rounds = [", "not valid TOML"), (None, "does not exist")])
def test_cli_reports_unreadable_config_files(tmp_path, capsys, content, message):
    path = tmp_path / "c.toml"
    if content is not None:
        path.write_text(content)
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_a_second_demo_gets_a_fresh_run_folder_instead_of_replacing_the_first(tmp_path):
    assert unused_run_name(tmp_path, "demo") == "demo"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo-2").mkdir()
    assert unused_run_name(tmp_path, "demo") == "demo-3"


@pytest.mark.parametrize("example", sorted((Path(__file__).parent.parent / "examples").glob("*.toml")),
                         ids=lambda path: path.name)
def test_every_example_config_is_valid(example):
    load_config(example)
