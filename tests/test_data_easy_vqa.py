"""Specification of the easy-vqa benchmark: the third-party easy-VQA dataset (its own wheel, offline), split across
sites by question type."""

from __future__ import annotations

import json

import easy_vqa
import numpy as np
import pytest
from conftest import small_config

from feddat_secure.data import build_benchmark, data_report
from feddat_secure.data.easy_vqa import (
    QUESTION_TYPES,
    TYPE_ANSWERS,
    WORDS,
    easy_vqa_benchmark,
    pool_of_type,
    question_type,
)
from feddat_secure.data.images import load_image
from feddat_secure.data.vqa import Benchmark, DataError
from feddat_secure.federation.runner import run
from feddat_secure.model.backbone import load_foundation


def build(**overrides) -> Benchmark:
    args = {"num_clients": 5, "train_per_client": 40, "test_per_client": 20, "image_size": 32, "seed": 0}
    args.update(overrides)
    return easy_vqa_benchmark(**args)


@pytest.fixture(scope="module")
def bench() -> Benchmark:
    return build()


def key(example) -> tuple[str, str]:
    return example.source, example.question


def test_site_i_asks_question_type_i_mod_3_over_that_types_answers(bench):
    for index, client in enumerate(bench.clients):
        kind = QUESTION_TYPES[index % 3]
        assert client.answers == TYPE_ANSWERS[kind]
        assert {question_type(e.answer) for e in client.train + client.test} == {kind}
    assert bench.answers == tuple(sorted(answer for answers in TYPE_ANSWERS.values() for answer in answers))
    assert set(bench.answers) == set(easy_vqa.get_answers()) and len(bench.answers) == 13


def test_sites_that_ask_one_type_hold_disjoint_questions(bench):
    for first, second in ((0, 3), (1, 4)):
        for split in ("train", "test"):
            held = [{key(e) for e in getattr(bench.clients[site], split)} for site in (first, second)]
            assert len(held[0]) == len(getattr(bench.clients[first], split))  # no question twice at one site
            assert not held[0] & held[1]


def test_train_and_test_come_from_the_datasets_disjoint_image_sets(bench):
    for client in bench.clients:
        assert all(e.source.startswith("easy-vqa train image ") for e in client.train)
        assert all(e.source.startswith("easy-vqa test image ") for e in client.test)


def test_each_example_is_a_question_of_the_dataset_about_the_image_it_names(bench):
    questions = {split: {(text, answer, image_id) for text, answer, image_id in zip(*getter())}
                 for split, getter in (("train", easy_vqa.get_train_questions),
                                       ("test", easy_vqa.get_test_questions))}
    paths = {"train": easy_vqa.get_train_image_paths(), "test": easy_vqa.get_test_image_paths()}
    for client in bench.clients:
        for example in client.train[:5] + client.test[:5]:
            split, image_id = example.source.split()[1], int(example.source.split()[-1])
            assert (example.question, example.answer, image_id) in questions[split]
            assert example.image.dtype == np.uint8 and example.image.shape == (32, 32, 3)
            assert np.array_equal(example.image, load_image(paths[split][image_id], 32))


def test_the_same_seed_gives_the_same_data_and_another_seed_other_data(bench):
    assert build().digest() == bench.digest()
    assert build(seed=1).digest() != bench.digest()


def test_too_few_questions_of_a_type_is_refused_with_the_counts():
    shape_questions = len(pool_of_type("train", "shape"))
    with pytest.raises(DataError, match=rf"2 site\(s\) ask shape questions .* but the dataset has {shape_questions}"):
        build(num_clients=4, train_per_client=shape_questions // 2 + 1)


def test_words_are_every_word_of_the_datasets_questions():
    seen = {word for split in ("train", "test") for text, _, _ in pool_of_type(split, "shape")
            + pool_of_type(split, "color") + pool_of_type(split, "yes/no")
            for word in text.replace("?", " ? ").split()}
    assert sorted(seen) == WORDS


def test_a_federated_run_trains_on_it_and_pins_its_data(tmp_path, foundation):
    config = small_config(tmp_path, data={"benchmark": "easy-vqa"}, federation={"rounds": 1},
                          training={"local_steps": 1})
    result = run(config, progress=False, echo=lambda _: None)
    expected = build_benchmark("easy-vqa", path="", num_clients=3, train_per_client=32, test_per_client=16,
                               image_size=foundation.image_size, seed=config.seed)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["data"]["sha256"] == expected.digest()
    assert [client.answers for client in expected.clients] == [TYPE_ANSWERS[kind] for kind in QUESTION_TYPES]


def test_the_embedded_foundation_reads_some_of_its_words_as_unknown_and_the_data_report_says_so(bench, foundation):
    """The embedded foundation's vocabulary predates this dataset: its colours black, brown, gray and teal, the shape
    "rectangle" and the words of its yes/no templates reach the model as [UNK], and the data report warns."""
    vocabulary = foundation.tokenizer.get_vocab()
    missing = [word for word in WORDS if word not in vocabulary]
    assert {"black", "brown", "gray", "teal", "rectangle", "not"} <= set(missing)
    report = data_report(bench, foundation.tokenizer, foundation.max_text_length)
    assert report.warnings and all("[UNK]" in warning for warning in report.warnings)


def test_the_embedded_v2_foundation_reads_every_word_of_it_and_the_data_report_is_quiet(bench):
    v2 = load_foundation("embedded-v2")
    report = data_report(bench, v2.tokenizer, v2.max_text_length)
    assert report.warnings == ()
    assert all(site.text.unknown_tokens == 0 and site.text.truncated == 0 for site in report.sites)
