"""The question families a synthetic benchmark asks (``data.question_families``): narrowing them to the ones the
image answers is what gives a benchmark room to learn (issue 15), and it must change nothing else."""

import pytest

from feddat_secure.config import ConfigError, config_from_dict
from feddat_secure.data import FAMILIES, GROUNDED_FAMILIES, build_benchmark
from feddat_secure.data.questions import FAMILY_ANSWERS

SIZES = dict(path="", num_clients=5, train_per_client=30, test_per_client=10, image_size=16, seed=4)


def answers_of(families):
    return {answer for family in families for answer in FAMILY_ANSWERS[family]}


def test_function_sites_each_ask_one_of_the_listed_families_in_turn():
    benchmark = build_benchmark("function", **SIZES, question_families=GROUNDED_FAMILIES)
    for index, client in enumerate(benchmark.clients):
        family = GROUNDED_FAMILIES[index % len(GROUNDED_FAMILIES)]
        assert set(client.answers) == answers_of([family])
        assert {example.answer for example in client.train + client.test} <= answers_of([family])
    assert set(benchmark.answers) == answers_of(GROUNDED_FAMILIES)


@pytest.mark.parametrize("name", ["domain", "scene"])
def test_domain_and_scene_sites_ask_every_listed_family_and_no_other(name):
    benchmark = build_benchmark(name, **SIZES, question_families=("existence", "counting"))
    for client in benchmark.clients:
        assert set(client.answers) == answers_of(["existence", "counting"])
        assert {example.answer for example in client.train} <= answers_of(["existence", "counting"])


def test_all_five_families_by_default_give_the_data_every_cached_result_was_measured_on():
    """The default must not move: benchmarks/results/ caches cells by the data's digest."""
    for name in ("function", "domain", "scene"):
        assert build_benchmark(name, **SIZES).digest() == build_benchmark(name, **SIZES,
                                                                           question_families=FAMILIES).digest()
    assert build_benchmark("function", **SIZES).digest() != build_benchmark(
        "function", **SIZES, question_families=GROUNDED_FAMILIES).digest()


@pytest.mark.parametrize(("data", "message"), [
    ({"question_families": ["existence", "colour"]}, "unknown family 'colour'"),
    ({"question_families": ["counting", "counting"]}, "names a family twice"),
    ({"question_families": []}, "must be a non-empty list of strings"),
    ({"benchmark": "digits", "question_families": ["existence"]}, "applies to the synthetic benchmarks"),
])
def test_a_wrong_family_list_is_one_line_naming_the_key(data, message):
    with pytest.raises(ConfigError, match=message) as error:
        config_from_dict({"data": data})
    assert "data.question_families" in str(error.value) and "\n" not in str(error.value)


def test_the_data_layer_refuses_families_for_a_benchmark_that_has_none():
    with pytest.raises(ValueError, match="apply to the synthetic benchmarks"):
        build_benchmark("digits", **SIZES, question_families=GROUNDED_FAMILIES)
