"""Config validation: every mistake is one line naming the key, found when the config loads (or, for what only
the model or the data can tell, before a run creates anything)."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest

from feddat_secure.cli import main, unused_run_name
from feddat_secure.config import (
    MAX_CLIENTS,
    MAX_GENERATED_EXAMPLES,
    ClientPrivacyConfig,
    ConfigError,
    RecordPrivacyConfig,
    RunConfig,
    check_against_data,
    check_against_model,
    config_from_dict,
    load_config,
    to_dict,
    to_toml,
)

ROOT = Path(__file__).parent.parent
CENTRAL = {"federation": {"aggregation": "uniform"}, "privacy": {"client": {"placement": "central"}}}


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
    ({"training": {"learning_rate": "fast"}}, "'training.learning_rate' must be a number"),
    ({"federation": {"rounds": 0}}, r"'federation.rounds' must be an integer in 1\.\.10000, got 0"),
    ({"federation": {"algorithm": "fedsgd"}}, "'federation.algorithm' must be one of"),
    ({"data": {"num_clients": 3}, "federation": {"clients_per_round": 4}},
     "'federation.clients_per_round' is 4, more than the 3 clients"),
    ({"data": {"benchmark": "folder"}}, "'data.path' must name the data folder"),
    ({"data": {"path": "/data"}}, "'data.path' is only used by the 'folder' benchmark"),
    ({"model": {"target_modules": []}}, "'model.target_modules' must be a non-empty list"),
    ({"model": "embedded"}, "model: expected a table"),
])
def test_invalid_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


@pytest.mark.parametrize("raw, message", [
    ({"training": {"learning_rate": math.nan}}, r"'training.learning_rate' must be a finite number, got nan"),
    ({"training": {"temperature": math.nan}}, r"'training.temperature' must be a finite number, got nan"),
    ({"training": {"task_weight": math.inf}}, r"'training.task_weight' must be a finite number, got inf"),
    ({"model": {"lora_alpha": -math.inf}}, r"'model.lora_alpha' must be a finite number"),
    ({"privacy": {"record": {"target_epsilon": math.nan}}}, r"'privacy.record.target_epsilon' must be a finite"),
    ({"secure_aggregation": {"masked": {"clip_range": math.inf}}}, "'secure_aggregation.masked.clip_range' must be a"),
    ({"model": {"lora_dropout": 1.5}}, r"'model.lora_dropout' must be in \[0, 1\), got 1.5"),
    ({"model": {"lora_dropout": 1.0}}, r"'model.lora_dropout' must be in \[0, 1\)"),
    ({"privacy": {"record": {"delta": 1.0}}}, r"'privacy.record.delta' must be in \(0, 1\), got 1.0"),
    ({"privacy": {"client": {"delta": 1.0}}}, r"'privacy.client.delta' must be in \(0, 1\)"),
    ({"privacy": {"record": {"delta": 0}}}, r"'privacy.record.delta' must be in \(0, 1\), got 0.0"),
    ({"privacy": {"client": {"target_quantile": 1.0}}}, r"'privacy.client.target_quantile' must be in \(0, 1\)"),
    ({"training": {"temperature": 0}}, r"'training.temperature' must be in \[0.01, 100\]"),
    ({"training": {"learning_rate": 0}}, r"'training.learning_rate' must be in \(0, 1\]"),
    ({"training": {"weight_decay": -0.1}}, r"'training.weight_decay' must be >= 0"),
    ({"privacy": {"client": {"clip_norm": 0}}}, r"'privacy.client.clip_norm' must be > 0"),
])
def test_every_number_is_finite_and_in_its_range(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_an_integer_too_large_for_a_float_is_no_finite_number():
    with pytest.raises(ConfigError, match="'training.learning_rate' must be a finite number, got inf"):
        config_from_dict({"training": {"learning_rate": 10**400}})


def test_a_long_value_is_quoted_short_so_the_error_stays_one_readable_line():
    with pytest.raises(ConfigError, match=r"got 1000000000.*\.\.\. \(401 characters\)$") as refused:
        config_from_dict({"seed": 10**400})
    assert len(str(refused.value)) < 160


@pytest.mark.parametrize("seed", [-1, 2**32, 2**63 - 1])
def test_a_seed_outside_what_numpy_and_torch_accept_is_refused(seed):
    with pytest.raises(ConfigError, match=rf"'seed' must be an integer in 0\.\.4294967295, got {seed}"):
        config_from_dict({"seed": seed})


def test_the_largest_seed_is_accepted():
    assert config_from_dict({"seed": 2**32 - 1}).seed == 2**32 - 1


@pytest.mark.parametrize("raw, message", [
    ({"data": {"num_clients": 1_000_000}}, r"'data.num_clients' must be an integer in 1\.\.1000"),
    ({"training": {"batch_size": 1_000_000_000}}, r"'training.batch_size' must be an integer in 1\.\.4096"),
    ({"training": {"batch_size": 1e9}}, "'training.batch_size' must be an integer, got 1000000000.0"),
    ({"training": {"local_steps": 10**6}}, r"'training.local_steps' must be an integer in 1\.\.10000"),
    ({"federation": {"rounds": 10**6}}, r"'federation.rounds' must be an integer in 1\.\.10000"),
    ({"model": {"lora_rank": 100_000}}, r"'model.lora_rank' must be an integer in 1\.\.1024"),
    ({"data": {"num_clients": 1000, "train_per_client": 200}},
     "ask for 300,000 generated examples; at most 200,000"),
])
def test_resource_sized_values_have_documented_upper_bounds(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_the_bounds_themselves_are_accepted():
    per_client = MAX_GENERATED_EXAMPLES // MAX_CLIENTS
    config = config_from_dict({"data": {"num_clients": MAX_CLIENTS, "train_per_client": per_client - 1,
                                        "test_per_client": 1}})
    assert config.data.num_clients == MAX_CLIENTS


@pytest.mark.parametrize("name, message", [
    ("a\u0000b", "must not contain control characters"),
    ("a\nb", "must not contain control characters"),
    ("tab\there", "must not contain control characters"),
    ("   ", "must not be empty or only spaces"),
    ("", "must not be empty or only spaces"),
    (" run", "must not begin or end with spaces"),
    ("a\\b", "must be a plain folder name"),
    ("../escape", "must be a plain folder name"),
    ("a/b", "must be a plain folder name"),
    (".hidden", "must not begin with '.'"),
    ("..", "must not begin with '.'"),
    ("é" * 128, "must be at most 255 bytes"),
])
def test_the_run_name_is_one_plain_visible_folder_name(name, message):
    with pytest.raises(ConfigError, match=f"key 'name' {message}"):
        config_from_dict({"name": name})


@pytest.mark.parametrize("key, table", [("output_dir", None), ("path", "model"), ("keys", "secure_aggregation")])
def test_no_string_may_hold_control_characters(key, table):
    raw = {key: "runs\u0000x"} if table is None else {table: {key: "runs\u0000x"}}
    with pytest.raises(ConfigError, match="must not contain control characters"):
        config_from_dict(raw)


@pytest.mark.parametrize("modules, message", [
    (["query", "query"], "names a module twice"),
    (["query key"], "'query key' is no module name"),
    ([".dense"], "'.dense' is no module name"),
    (["out\nput"], "must not contain control characters"),
])
def test_target_modules_are_module_names(modules, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": {"target_modules": modules}})


@pytest.mark.parametrize("raw, message", [
    ({"training": {"learning_rate": 0.5, "weight_decay": 2.0}}, "'training.weight_decay' is 2: with learning_rate"),
    ({"training": {"task_weight": 0}}, "'training.task_weight' must be > 0 with FedDAT"),
    ({"privacy": {"record": {"enabled": True, "noise_multiplier": 0}}},
     "'privacy.record.noise_multiplier' must be > 0 when this level of DP is on"),
    ({**CENTRAL, "privacy": {"client": {"placement": "central", "noise_multiplier": 0}}},
     "'privacy.client.noise_multiplier' must be > 0"),
    ({"federation": {"algorithm": "local", "aggregation": "uniform"},
      "privacy": {"client": {"placement": "central"}}}, "'local' training sends no updates"),
    ({**CENTRAL, "privacy": {"client": {"placement": "distributed"}}, "secure_aggregation": {"protocol": "he"}},
     "distributed noise is added inside the masked protocol"),
    ({**CENTRAL, "privacy": {"client": {"placement": "distributed", "accountant": "prv"}}},
     "'privacy.client.accountant' must be 'rdp' with the distributed placement"),
    ({**CENTRAL, "data": {"num_clients": 3}, "privacy": {"client": {"placement": "distributed",
                                                                    "tolerated_dropouts": 3}}},
     "'privacy.client.tolerated_dropouts' is 3: at least one of the 3 participants"),
    ({**CENTRAL, "federation": {"aggregation": "uniform", "clients_per_round": 2},
      "privacy": {"client": {"placement": "distributed", "tolerated_dropouts": 2}}},
     "'privacy.client.tolerated_dropouts' is 2: at least one of the 2 participants"),
    ({**CENTRAL, "privacy": {"client": {"placement": "local", "adaptive_clipping": True}}},
     "'privacy.client.adaptive_clipping' needs placement 'central'"),
    ({**CENTRAL, "privacy": {"client": {"placement": "central", "adaptive_clipping": True, "count_noise_std": 0.5}}},
     "'privacy.client.count_noise_std' is 0.5: adaptive clipping needs more than half the noise multiplier 1"),
    ({**CENTRAL, "privacy": {"client": {"placement": "central", "adaptive_clipping": True}},
      "secure_aggregation": {"masked": {"clip_range": 0.15}}},
     "'secure_aggregation.masked.clip_range' is 0.15: adaptive clipping needs at least 0.2"),
])
def test_rules_joining_keys_are_checked_when_the_config_loads(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_adaptive_clipping_fits_any_clip_range_when_nothing_is_masked():
    raw = {**CENTRAL, "privacy": {"client": {"placement": "central", "adaptive_clipping": True}},
           "secure_aggregation": {"protocol": "he", "masked": {"clip_range": 0.15}}}
    assert config_from_dict(raw).privacy.client.adaptive_clipping


# ---------------------------------------------------------------- budgets

@pytest.mark.parametrize("level", ["record", "client"])
def test_a_missing_budget_means_no_budget_and_an_explicit_zero_is_refused(level):
    assert math.isinf(getattr(RunConfig().privacy, level).budget_epsilon)
    with pytest.raises(ConfigError, match=f"'privacy.{level}.budget_epsilon' must be > 0 .*\"unbounded\" for no"):
        config_from_dict({"privacy": {level: {"budget_epsilon": 0}}})


@pytest.mark.parametrize("written", ["unbounded", math.inf])
def test_no_budget_is_written_unbounded(written):
    config = config_from_dict({"privacy": {"record": {"budget_epsilon": written}}})
    assert math.isinf(config.privacy.record.budget_epsilon)
    assert to_dict(config)["privacy"]["record"]["budget_epsilon"] == "unbounded"
    assert 'budget_epsilon = "unbounded"' in to_toml(config)


@pytest.mark.parametrize("written", ["none", -math.inf, -1.0])
def test_a_budget_is_a_positive_number_or_unbounded(written):
    with pytest.raises(ConfigError, match="'privacy.client.budget_epsilon' must be"):
        config_from_dict({"privacy": {"client": {"budget_epsilon": written}}})


@pytest.mark.parametrize("level, extra", [("record", {"enabled": True}), ("client", {"placement": "central"})])
def test_a_budget_below_the_target_epsilon_is_refused(level, extra):
    raw = {**CENTRAL, "privacy": {level: {**extra, "target_epsilon": 8.0, "budget_epsilon": 4.0}}}
    with pytest.raises(ConfigError, match=f"'privacy.{level}.budget_epsilon' is 4, smaller than "
                                          f"'privacy.{level}.target_epsilon' 8"):
        config_from_dict(raw)
    raw["privacy"][level]["budget_epsilon"] = 8.0
    assert getattr(config_from_dict(raw).privacy, level).budget_epsilon == 8.0


def test_an_unbounded_budget_reaches_the_ledgers_as_no_budget():
    from feddat_secure.privacy.client_level import make_client_privacy
    from feddat_secure.privacy.record import make_record_privacy

    record = make_record_privacy(RecordPrivacyConfig(enabled=True), dataset_size=100, batch_size=10,
                                 local_steps=2, rounds=2, steps_per_batch=1)
    client = make_client_privacy(ClientPrivacyConfig(placement="central"), num_clients=4, clients_per_round=4,
                                 rounds=2, dimension=10)
    assert record.new_accountant("a").budget_epsilon == 0 and client.new_accountant().budget_epsilon == 0
    assert record.new_accountant("a").would_exceed(record.round_events() * 1000, 0) is None


def test_the_privacy_code_refuses_impossible_arguments_with_value_errors_not_config_errors():
    from feddat_secure.privacy.client_level import make_client_privacy, update_noise_multiplier
    from feddat_secure.privacy.record import make_record_privacy

    for refusal in (lambda: update_noise_multiplier(1.0, 0.4),
                    lambda: make_client_privacy(ClientPrivacyConfig(placement="local", adaptive_clipping=True),
                                                num_clients=4, clients_per_round=4, rounds=2, dimension=10),
                    lambda: make_record_privacy(RecordPrivacyConfig(enabled=True, noise_multiplier=0.0),
                                                dataset_size=10, batch_size=2, local_steps=1, rounds=1,
                                                steps_per_batch=1)):
        with pytest.raises(ValueError) as refused:
            refusal()
        assert not isinstance(refused.value, ConfigError)


# ---------------------------------------------------------------- what only the model or the data tells

VILT_MODULES = {"embeddings.patch_embeddings.projection": False, "encoder.layer.0.attention": False,
                **{f"encoder.layer.0.attention.attention.{name}": True for name in ("query", "key", "value")},
                **{f"encoder.layer.0.{name}.dense": True for name in ("attention.output", "intermediate", "output")}}


@pytest.mark.parametrize("modules, message", [
    (["bogus"], "'bogus' names no module of the model \\(its linear projections end in dense, key, query, value\\)"),
    (["attention"], "'attention' matches 'encoder.layer.0.attention', which is not a linear projection"),
    (["projection"], "'projection' matches 'embeddings.patch_embeddings.projection', which is not a linear"),
])
def test_target_modules_must_name_linear_projections_of_the_model(modules, message):
    config = config_from_dict({"model": {"target_modules": modules}})
    with pytest.raises(ConfigError, match=f"key 'model.target_modules': {message}"):
        check_against_model(config, VILT_MODULES, hidden_size=128)


def test_target_modules_match_as_peft_matches_them_full_name_or_dotted_suffix():
    for modules in (["query", "output.dense"], ["encoder.layer.0.output.dense"], ["dense"]):
        check_against_model(config_from_dict({"model": {"target_modules": modules}}), VILT_MODULES, 128)
    with pytest.raises(ConfigError, match="'put.dense' names no module"):
        check_against_model(config_from_dict({"model": {"target_modules": ["put.dense"]}}), VILT_MODULES, 128)


def test_the_lora_rank_is_at_most_the_hidden_size():
    check_against_model(config_from_dict({"model": {"lora_rank": 128}}), VILT_MODULES, hidden_size=128)
    with pytest.raises(ConfigError, match="'model.lora_rank' is 129, more than the model's hidden size 128"):
        check_against_model(config_from_dict({"model": {"lora_rank": 129}}), VILT_MODULES, hidden_size=128)


def test_a_batch_larger_than_a_sites_data_is_refused_naming_the_site():
    config = config_from_dict({"training": {"batch_size": 16}})
    check_against_data(config, {"a": 16, "b": 40})
    with pytest.raises(ConfigError, match="'training.batch_size' is 16, more than the 15 training examples of site "
                                          "'b'"):
        check_against_data(config, {"a": 40, "b": 15})


def test_the_centralized_reference_batches_from_the_pooled_data():
    config = config_from_dict({"federation": {"algorithm": "centralized"}, "training": {"batch_size": 16}})
    check_against_data(config, {"a": 10, "b": 10})
    with pytest.raises(ConfigError, match="more than the 15 pooled training examples"):
        check_against_data(config, {"a": 10, "b": 5})


def test_a_data_folders_site_count_is_checked_against_the_round_size_and_the_dropouts():
    folder = {"benchmark": "folder", "path": "/data"}
    per_round = config_from_dict({"data": folder, "federation": {"clients_per_round": 4}})
    with pytest.raises(ConfigError, match="'federation.clients_per_round' is 4, more than the 3 sites"):
        check_against_data(per_round, {"a": 20, "b": 20, "c": 20})
    dropouts = config_from_dict({**CENTRAL, "data": folder,
                                 "privacy": {"client": {"placement": "distributed", "tolerated_dropouts": 3}}})
    with pytest.raises(ConfigError, match="'privacy.client.tolerated_dropouts' is 3: at least one of the 3"):
        check_against_data(dropouts, {"a": 20, "b": 20, "c": 20})
    with pytest.raises(ConfigError, match=f"the data folder holds {MAX_CLIENTS + 1} sites; at most {MAX_CLIENTS}"):
        check_against_data(config_from_dict({"data": folder}), {f"s{i}": 20 for i in range(MAX_CLIENTS + 1)})


def test_a_target_epsilon_no_noise_multiplier_reaches_is_refused_naming_the_key():
    record = config_from_dict({"privacy": {"record": {"enabled": True, "target_epsilon": 0.001}}})
    with pytest.raises(ConfigError, match="'privacy.record.target_epsilon' \\(0.001\\) cannot be met at site 'a'"):
        check_against_data(record, {"a": 40})
    client = config_from_dict({**CENTRAL, "privacy": {"client": {"placement": "local", "target_epsilon": 0.001}}})
    with pytest.raises(ConfigError, match="'privacy.client.target_epsilon' \\(0.001\\) cannot be met"):
        check_against_data(client, {"a": 40, "b": 40})


def test_an_explicit_count_noise_is_checked_against_the_calibrated_noise_multiplier():
    raw = {**CENTRAL, "federation": {"aggregation": "uniform", "rounds": 2},
           "privacy": {"client": {"placement": "central", "target_epsilon": 1.0, "adaptive_clipping": True,
                                  "count_noise_std": 0.5}}}
    config = config_from_dict(raw)  # the noise multiplier is not known before calibration
    with pytest.raises(ConfigError, match="'privacy.client.count_noise_std' is 0.5: adaptive clipping needs more "
                                          "than half the noise multiplier"):
        check_against_data(config, {"a": 40, "b": 40, "c": 40})
    raw["privacy"]["client"]["count_noise_std"] = 50.0
    check_against_data(config_from_dict(raw), {"a": 40, "b": 40, "c": 40})


# ---------------------------------------------------------------- reading, writing, the command line

def test_integers_are_accepted_where_numbers_are_expected():
    assert config_from_dict({"training": {"learning_rate": 1}}).training.learning_rate == 1.0


def test_resolved_toml_reads_back_to_the_same_config(tmp_path):
    config = config_from_dict({"name": "x", "model": {"head": "shared"}, "federation": {"fedprox_mu": 0.1},
                               "privacy": {"client": {"budget_epsilon": 3.0}}})
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


@pytest.mark.parametrize("content, message", [("rounds = [", "not valid TOML"), (None, "does not exist"),
                                              (b"name = '\xff'", "is not UTF-8 text"), ("folder", "cannot read")])
def test_cli_reports_unreadable_config_files(tmp_path, capsys, content, message):
    path = tmp_path / "c.toml"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_an_output_dir_given_on_the_command_line_is_validated_like_the_configs(tmp_path, capsys):
    path = tmp_path / "ok.toml"
    path.write_text("name = 'x'\n")
    assert main(["run", str(path), "--output-dir", "runs\nelsewhere"]) == 2
    assert "key 'output_dir' must not contain control characters" in capsys.readouterr().err


def test_a_second_demo_gets_a_fresh_run_folder_instead_of_replacing_the_first(tmp_path):
    assert unused_run_name(tmp_path, "demo") == "demo"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo-2").mkdir()
    assert unused_run_name(tmp_path, "demo") == "demo-3"


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.toml")), ids=lambda path: path.name)
def test_every_example_config_is_valid(example):
    load_config(example)


def test_the_documented_defaults_are_the_defaults():
    block = re.search(r"```toml\n(.*?)```", (ROOT / "docs" / "configuration.md").read_text(), re.S).group(1)
    assert config_from_dict(tomllib.loads(block)) == RunConfig()
