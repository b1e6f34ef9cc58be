"""Specification of the handwritten-digits VQA benchmark (scikit-learn's load_digits, offline)."""

from __future__ import annotations

import re
from itertools import combinations

import numpy as np
import pytest

from feddat_secure.data.digits import (
    FAMILIES,
    FAMILY_ANSWERS,
    WORDS,
    ask,
    cell_size,
    digit_pool,
    digits_benchmark,
    render_digit,
    render_scene,
    scene_from_labels,
)
from feddat_secure.data.vqa import Benchmark

QUESTION = re.compile(r"^[a-z0-9]+( [a-z0-9]+)* \?$")


def build(name: str = "digits", **overrides) -> Benchmark:
    args = {"num_clients": 5, "train_per_client": 12, "test_per_client": 6, "image_size": 32, "seed": 0}
    args.update(overrides)
    return digits_benchmark(name, **args)


@pytest.fixture(scope="module")
def skew() -> Benchmark:
    return build("digits-skew", num_clients=4, train_per_client=150, test_per_client=30)


def cell_lookup(image_size: int) -> dict[bytes, tuple[str, int]]:
    """Rendered cell bytes -> (pool split, label), for every digit in both pools."""
    size = cell_size(image_size)
    table = {}
    for split in ("train", "test"):
        pool = digit_pool(split)
        for image, label in zip(pool.images, pool.labels):
            table[render_digit(image, size).tobytes()] = (split, int(label))
    return table


def decode(image: np.ndarray, table: dict[bytes, tuple[str, int]]) -> list[tuple[str, int]]:
    """The (split, label) of each occupied cell, by exact lookup of its pixels."""
    size = cell_size(image.shape[0])
    found = []
    for row in range(2):
        for col in range(2):
            crop = image[row * size:(row + 1) * size, col * size:(col + 1) * size, 0]
            if crop.any():
                found.append(table[np.ascontiguousarray(crop).tobytes()])
    return found


def test_same_seed_gives_byte_identical_benchmarks():
    for name in ("digits", "digits-skew"):
        assert build(name, seed=3).digest() == build(name, seed=3).digest()


def test_different_seed_gives_different_images():
    first, second = build(seed=0), build(seed=1)
    assert first.digest() != second.digest()
    assert not np.array_equal(first.clients[0].train[0].image, second.clients[0].train[0].image)


def test_adding_a_client_does_not_change_the_others():
    assert build(num_clients=2).clients[1].train[0].image.tobytes() == \
        build(num_clients=3).clients[1].train[0].image.tobytes()


@pytest.mark.parametrize("image_size", [32, 48])
def test_images_are_rgb_uint8_of_the_requested_size_and_grey(image_size):
    bench = build("digits-skew", image_size=image_size, num_clients=2)
    for client in bench.clients:
        for ex in client.train + client.test:
            assert ex.image.shape == (image_size, image_size, 3)
            assert ex.image.dtype == np.uint8
            assert np.array_equal(ex.image[..., 0], ex.image[..., 1])
            assert np.array_equal(ex.image[..., 0], ex.image[..., 2])


def test_client_ids_and_counts():
    bench = build(num_clients=3, train_per_client=7, test_per_client=4)
    assert [c.client_id for c in bench.clients] == ["client0", "client1", "client2"]
    assert all(len(c.train) == 7 and len(c.test) == 4 for c in bench.clients)


def test_unknown_name_is_rejected_with_the_known_names():
    with pytest.raises(ValueError, match="digits, digits-skew"):
        build("mnist")


def test_too_small_images_are_rejected():
    with pytest.raises(ValueError, match="at least 16"):
        build(image_size=8)


def test_questions_are_lowercase_single_spaced_and_use_only_words():
    bench = build("digits-skew", train_per_client=60)
    vocabulary = set(WORDS)
    for client in bench.clients:
        for ex in client.train + client.test:
            assert QUESTION.match(ex.question), ex.question
            assert set(ex.question.split()) <= vocabulary, ex.question


def test_words_are_sorted_unique_and_cover_every_template():
    assert WORDS == sorted(set(WORDS))
    scene = scene_from_labels([3, 5, 7], cells=[0, 1, 2])
    rng = np.random.default_rng(0)
    used = {word for family in FAMILIES for _ in range(40) for word in ask(family, scene, rng)[0].split()}
    assert used <= set(WORDS)
    assert set(WORDS) - set("0123456789") <= used  # no word is listed that no template uses
    assert set("0123456789") <= set(WORDS)  # "is there a 7 ?" may name any digit


def test_sum_largest_and_count_are_computed_from_the_digit_labels():
    rng = np.random.default_rng(0)
    for labels in ([9], [0], [2, 7], [1, 1, 4], [9, 9, 9, 9], [0, 3, 8, 5]):
        scene = scene_from_labels(labels, cells=list(range(len(labels)))[::-1])
        assert ask("sum", scene, rng) == ("what is the sum of the digits ?", str(sum(labels)))
        assert ask("largest", scene, rng) == ("what is the largest digit ?", str(max(labels)))
        assert ask("count", scene, rng) == ("how many digits are there ?", str(len(labels)))


def test_contains_answers_match_the_labels_and_are_balanced():
    scene = scene_from_labels([2, 7, 4])
    rng = np.random.default_rng(0)
    answers = []
    for _ in range(400):
        question, answer = ask("contains", scene, rng)
        digit = int(re.fullmatch(r"is there a (\d) \?", question).group(1))
        assert answer == ("yes" if digit in (2, 7, 4) else "no")
        answers.append(answer)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6


def test_position_questions_name_a_cell_whose_digit_is_unique():
    # cells: 0 top left, 1 top right, 2 bottom left, 3 bottom right
    scene = scene_from_labels([3, 8, 5], cells=[0, 2, 1])  # left column holds 3 and 8, right holds 5
    expected = {
        "what is the top left digit ?": "3",
        "what is the bottom left digit ?": "8",
        "what is the top right digit ?": "5",
        "what is the digit on the right ?": "5",
    }
    rng = np.random.default_rng(0)
    asked = {ask("position", scene, rng) for _ in range(200)}
    assert asked == set(expected.items())  # never "on the left": two digits are there


def test_composed_image_shows_each_digit_in_its_cell_and_leaves_empty_cells_black():
    scene = scene_from_labels([6, 1], cells=[3, 0])
    image = render_scene(scene, 32)
    pool = digit_pool("train")
    assert np.array_equal(image[16:, 16:, 0], render_digit(pool.images[scene.pool_indices[0]], 16))
    assert np.array_equal(image[:16, :16, 0], render_digit(pool.images[scene.pool_indices[1]], 16))
    assert not image[:16, 16:].any() and not image[16:, :16].any()
    assert [int(pool.labels[i]) for i in scene.pool_indices] == [6, 1]


def test_answers_agree_with_the_digits_actually_drawn_in_the_image():
    table = cell_lookup(32)
    bench = build(train_per_client=30)
    for client in bench.clients:
        for ex in client.train:
            labels = [label for _, label in decode(ex.image, table)]
            if ex.question == "what is the sum of the digits ?":
                assert ex.answer == str(sum(labels))
            elif ex.question == "what is the largest digit ?":
                assert ex.answer == str(max(labels))
            elif ex.question == "how many digits are there ?":
                assert ex.answer == str(len(labels))


def test_train_and_test_pools_are_disjoint_and_cover_all_sklearn_digits():
    train, test = digit_pool("train"), digit_pool("test")
    assert not set(train.source_indices) & set(test.source_indices)
    assert len(train.source_indices) + len(test.source_indices) == 1797
    assert not {x.tobytes() for x in train.images} & {x.tobytes() for x in test.images}
    assert set(train.labels) == set(test.labels) == set(range(10))


def test_train_images_use_only_train_digits_and_test_images_only_test_digits():
    table = cell_lookup(32)
    bench = build("digits-skew", num_clients=3)
    for client in bench.clients:
        assert {split for ex in client.train for split, _ in decode(ex.image, table)} == {"train"}
        assert {split for ex in client.test for split, _ in decode(ex.image, table)} == {"test"}


def label_histogram(examples, table) -> np.ndarray:
    counts = np.zeros(10)
    for ex in examples:
        for _, label in decode(ex.image, table):
            counts[label] += 1
    return counts / counts.sum()


def mean_pairwise_total_variation(histograms) -> float:
    return float(np.mean([0.5 * np.abs(a - b).sum() for a, b in combinations(histograms, 2)]))


def test_skew_split_gives_clients_clearly_different_digit_distributions(skew):
    table = cell_lookup(32)
    skewed = [label_histogram(c.train, table) for c in skew.clients]
    uniform = [label_histogram(c.train, table) for c in build(num_clients=4, train_per_client=150).clients]
    assert mean_pairwise_total_variation(skewed) > 0.4
    assert mean_pairwise_total_variation(uniform) < 0.15
    assert all(0.5 * np.abs(h - 0.1).sum() > 0.25 for h in skewed)  # far from 10% per class
    assert all(0.5 * np.abs(h - 0.1).sum() < 0.15 for h in uniform)


def test_skew_clients_use_the_same_digit_distribution_for_train_and_test(skew):
    table = cell_lookup(32)
    train = [label_histogram(c.train, table) for c in skew.clients]
    test = [label_histogram(c.test, table) for c in skew.clients]
    distance = np.array([[0.5 * np.abs(a - b).sum() for b in test] for a in train])
    same_client = np.diag(distance).mean()
    other_clients = distance[~np.eye(len(train), dtype=bool)].mean()
    assert same_client < 0.5 * other_clients


def test_skew_clients_ask_every_family_and_share_the_full_answer_set(skew):
    for client in skew.clients:
        questions = {ex.question for ex in client.train}
        assert "what is the sum of the digits ?" in questions
        assert "what is the largest digit ?" in questions
        assert "how many digits are there ?" in questions
        assert any(q.startswith("is there a") for q in questions)
        assert any(q.endswith("digit ?") and q != "what is the largest digit ?" for q in questions)
        assert client.answers == skew.answers


def test_family_split_gives_each_client_exactly_one_family():
    bench = build(num_clients=7)
    patterns = {
        "largest": r"what is the largest digit \?",
        "contains": r"is there a \d \?",
        "sum": r"what is the sum of the digits \?",
        "count": r"how many digits are there \?",
        "position": r"what is the ((top|bottom) (left|right) digit|digit on the (left|right)) \?",
    }
    for index, client in enumerate(bench.clients):
        family = FAMILIES[index % len(FAMILIES)]
        for ex in client.train + client.test:
            assert re.fullmatch(patterns[family], ex.question), (client.client_id, ex.question)
        assert set(client.answers) == set(FAMILY_ANSWERS[family])


def test_answer_vocabulary_is_the_numerically_sorted_union_of_all_families():
    bench = build()
    assert bench.answers == tuple(str(n) for n in range(37)) + ("no", "yes")
    assert build("digits-skew").answers == bench.answers
