"""The protocol registry: one options dataclass per protocol, used by make_protocol and by the config file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pytest

from feddat_secure.config import ConfigError, RunConfig, config_from_dict, to_dict
from protocols import (
    ConfigurationError,
    make_protocol,
    options_class,
    register_protocol,
    registered_protocols,
    registry,
    simulate_round,
)
from protocols.he import HEOptions
from protocols.masked import MaskedOptions, MaskedProtocol
from protocols.plain import PlainProtocol


@dataclass(frozen=True)
class TinyOptions:
    """A new protocol's options: one key a configuration file may set, and the seed the runner supplies."""

    copies: int = field(default=1, metadata={"minimum": 1, "strict": False})
    seed: int | None = field(default=0, metadata={"runtime": True})


class TinyProtocol(PlainProtocol):
    """The plain protocol under another name, with options of its own."""

    name = "tiny"


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations made in a test stay in that test."""
    monkeypatch.setattr(registry, "_PROTOCOLS", dict(registry._PROTOCOLS))


def test_the_built_in_protocols_are_registered_with_their_options_classes():
    assert registered_protocols() == ("plain", "masked", "he")
    assert options_class("masked") is MaskedOptions and options_class("he") is HEOptions


def test_a_registered_protocol_is_available_by_name(own_registry):
    with pytest.raises(ConfigurationError, match="unknown protocol 'tiny'"):
        make_protocol("tiny")
    register_protocol("tiny", TinyOptions, TinyProtocol)
    assert registered_protocols() == ("plain", "masked", "he", "tiny")
    protocol = make_protocol("tiny", copies=3, seed=5)
    assert isinstance(protocol, TinyProtocol) and protocol.options == TinyOptions(copies=3, seed=5)
    xs = [np.arange(4.0), np.ones(4)]
    np.testing.assert_allclose(simulate_round("tiny", xs, [2.0, 1.0]), 2 * xs[0] + xs[1])


def test_a_registered_protocol_is_a_choice_of_the_config_file(own_registry):
    raw = {"secure_aggregation": {"protocol": "tiny"}}
    with pytest.raises(ConfigError, match="'secure_aggregation.protocol' must be one of plain, masked, he; got"):
        config_from_dict(raw)
    register_protocol("tiny", TinyOptions, TinyProtocol)
    config = config_from_dict(raw).secure_aggregation
    assert config.protocol == "tiny"
    assert config.protocol_options is None  # no table for it in the file format: the protocol's defaults
    assert make_protocol(config.protocol, config.protocol_options, seed=1).options == TinyOptions(seed=1)


@pytest.mark.parametrize(("name", "options_cls", "factory", "message"), [
    ("masked", TinyOptions, TinyProtocol, "already registered"),
    ("Tiny Protocol", TinyOptions, TinyProtocol, "invalid protocol name"),
    ("tiny", dict, TinyProtocol, "must be a dataclass"),
    ("tiny", dataclasses.make_dataclass("Required", ["copies"]), TinyProtocol, "copies have no default"),
    ("tiny", TinyOptions, None, "must be callable"),
])
def test_registration_refuses_what_could_not_work(own_registry, name, options_cls, factory, message):
    with pytest.raises(ConfigurationError, match=message):
        register_protocol(name, options_cls, factory)


def test_options_by_keyword_by_instance_and_both():
    masked = make_protocol("masked", clip_range=1.0, seed=3)
    assert isinstance(masked, MaskedProtocol) and (masked.options.clip_range, masked.options.seed) == (1.0, 3)
    from_config = MaskedOptions(clip_range=0.5, graph="complete")
    built = make_protocol("masked", from_config, seed=7, max_weight=10)  # the runner adds what only it knows
    assert built.options == dataclasses.replace(from_config, seed=7, max_weight=10)
    with pytest.raises(ConfigurationError, match="takes MaskedOptions options, not HEOptions"):
        make_protocol("masked", HEOptions())


def test_unknown_options_and_invalid_values_are_configuration_errors_naming_the_option():
    with pytest.raises(ConfigurationError, match="unknown option colour") as caught:
        make_protocol("masked", colour="red")
    assert caught.value.option == "colour"
    with pytest.raises(ConfigurationError, match="quantization_bits") as caught:
        make_protocol("masked", options=MaskedOptions(), quantization_bits=40)
    assert caught.value.option == "quantization_bits"


def test_the_config_tables_are_the_protocols_own_options_classes():
    config = RunConfig().secure_aggregation
    assert type(config.masked) is options_class("masked") and type(config.he) is options_class("he")
    assert config.protocol_options is config.masked  # the default protocol is masked
    assert to_dict(config)["masked"] == {"clip_range": 0.25, "quantization_bits": 16, "modulus_bits": 32,
                                         "neighbours": 0, "threshold": 0, "graph": "sparse", "min_clients": 3}
    assert to_dict(config)["he"] == {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40],
                                     "global_scale_bits": 40, "min_clients": 3, "min_fraction": 0.5,
                                     "committee_size": 3}


@pytest.mark.parametrize(("table", "key"), [("masked", "seed"), ("masked", "max_weight"), ("masked", "noise_bound"),
                                            ("masked", "dropout_rate"), ("masked", "adversarial_rate"),
                                            ("he", "seed"), ("he", "min_weight"), ("he", "max_weight"),
                                            ("he", "input_bound")])
def test_options_the_runner_supplies_are_not_configuration_keys(table, key):
    with pytest.raises(ConfigError, match=f"unknown key 'secure_aggregation.{table}.{key}'"):
        config_from_dict({"secure_aggregation": {table: {key: 1}}})


@pytest.mark.parametrize(("raw", "message"), [
    ({"masked": {"quantization_bits": 20, "modulus_bits": 16}},
     "key 'secure_aggregation.masked.quantization_bits': masked option quantization_bits must be an integer in 1..15"),
    ({"masked": {"modulus_bits": 63}}, "key 'secure_aggregation.masked.modulus_bits': .* in 8..62"),
    ({"he": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 60]}},
     "key 'secure_aggregation.he.coeff_mod_bit_sizes': .* 128-bit security"),
    ({"he": {"poly_modulus_degree": 5000}}, "key 'secure_aggregation.he.poly_modulus_degree': .* one of"),
    ({"masked": {"graph": "ring"}}, "key 'secure_aggregation.masked.graph' must be one of sparse, complete"),
])
def test_the_options_classes_own_checks_run_when_the_config_loads_and_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"secure_aggregation": raw})


def test_a_protocol_is_built_from_its_config_table_and_the_runners_values():
    config = config_from_dict({"secure_aggregation": {"masked": {"clip_range": 0.5, "graph": "complete"}}})
    protocol = make_protocol(config.secure_aggregation.protocol, config.secure_aggregation.protocol_options, seed=2,
                             max_weight=100)
    assert (protocol.options.clip_range, protocol.options.graph, protocol.options.max_weight) == (0.5, "complete", 100)
