"""The reference scores every accuracy table carries: majority answer and question-only (no image)."""

import numpy as np
import pytest

from feddat_secure.data.baselines import QuestionOnlyPredictor, accuracy, most_frequent, site_baselines, template
from feddat_secure.data.synthetic import synthetic_benchmark
from feddat_secure.data.vqa import Benchmark, ClientData, DataError, VQAExample

IMAGE = np.zeros((4, 4, 3), np.uint8)


def examples(*pairs):
    return [VQAExample(IMAGE, question, answer) for question, answer in pairs]


def test_the_most_frequent_answer_wins_and_a_tie_goes_to_the_answer_that_sorts_first():
    assert most_frequent(["no", "yes", "yes"]) == "yes"
    assert most_frequent(["yes", "no"]) == "no"
    with pytest.raises(DataError):
        most_frequent([])


def test_a_template_replaces_every_answer_word_by_one_placeholder():
    words = {"red", "blue", "circle", "cross", "2"}
    assert template("is the red circle left of the blue cross ?", words) == \
        "is the <answer> <answer> left of the <answer> <answer> ?"


def test_wordings_that_repeat_are_answered_by_their_own_majority_and_unseen_ones_by_their_template():
    # "red circle" is mostly yes, "blue cross" mostly no: only the exact wording tells them apart
    train = examples(*[("is there a red circle ?", "yes")] * 9 + [("is there a red circle ?", "no")] * 1
                     + [("is there a blue cross ?", "no")] * 12 + [("how many objects are there ?", "2")] * 3)
    predict = QuestionOnlyPredictor(train, {"red", "blue", "circle", "cross", "green", "square", "yes", "no", "2"})
    assert predict.choice == "wording"
    assert predict("is there a red circle ?") == "yes" and predict("is there a blue cross ?") == "no"
    assert predict("is there a green square ?") == "no"  # unseen: its template's majority (13 of 22 "no")
    assert predict("what is this ?") == "no"  # unseen template: the training majority


def test_when_wordings_never_repeat_the_template_lookup_is_chosen():
    colours = ["red", "blue", "green", "white", "cyan", "yellow", "magenta", "black", "grey", "pink"]
    train = examples(*[(f"is there a {c} {s} and a {s} ?", "no") for c in colours for s in ("circle", "cross")]
                     + [(f"is there a {c} {s} or a {s} ?", "yes") for c in colours for s in ("circle", "cross")])
    predict = QuestionOnlyPredictor(train, set(colours) | {"circle", "cross", "square"})
    assert predict.choice == "template"
    assert predict("is there a red square or a square ?") == "yes"
    assert predict("is there a red square and a square ?") == "no"


def test_site_scores_are_counted_on_the_test_split():
    site_a = ClientData("a", train=examples(("q1 ?", "yes"), ("q1 ?", "yes"), ("q2 ?", "no")),
                        test=examples(("q1 ?", "yes"), ("q2 ?", "no"), ("q3 ?", "no"), ("q3 ?", "yes")))
    site_b = ClientData("b", train=examples(("q3 ?", "no"), ("q3 ?", "no"), ("q2 ?", "no")),
                        test=examples(("q3 ?", "no")))
    scores = site_baselines(Benchmark("toy", [site_a, site_b], ("no", "yes")))
    assert scores["a"].majority_answer == "yes" and scores["a"].majority == 2 / 4
    assert scores["b"].majority == scores["b"].question_only == 1.0


def test_an_empty_test_split_is_refused_rather_than_scored():
    with pytest.raises(DataError):
        accuracy(lambda question: "yes", [])


def test_question_only_beats_the_majority_answer_on_templated_questions_and_ignores_the_images():
    benchmark = synthetic_benchmark("function", num_clients=5, train_per_client=300, test_per_client=150,
                                    image_size=16, seed=0)
    scores = site_baselines(benchmark)
    assert np.mean([s.question_only for s in scores.values()]) > np.mean([s.majority for s in scores.values()])
    blank = Benchmark(benchmark.name, [ClientData(c.client_id, [VQAExample(IMAGE, e.question, e.answer)
                                                                for e in c.train],
                                                  [VQAExample(IMAGE, e.question, e.answer) for e in c.test], c.answers)
                                       for c in benchmark.clients], benchmark.answers)
    assert site_baselines(blank) == scores
