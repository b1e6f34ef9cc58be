"""The reference scores every accuracy table carries: majority answer and question-only (no image)."""

import numpy as np
import pytest

from feddat_secure.data.baselines import QuestionOnlyPredictor, accuracy, most_frequent, site_baselines
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


def test_question_only_answers_by_exact_wording_and_falls_back_to_the_training_majority():
    predict = QuestionOnlyPredictor(examples(("is there a red circle ?", "yes"), ("is there a red circle ?", "yes"),
                                             ("is there a red circle ?", "no"), ("how many objects are there ?", "2"),
                                             ("is there a blue cross ?", "no"), ("is there a blue cross ?", "no")))
    assert predict("is there a red circle ?") == "yes"
    assert predict("how many objects are there ?") == "2"
    assert predict("is there a green square ?") == "no"  # unseen wording: "no" is the majority (3 of 6)


def test_site_scores_are_counted_on_the_test_split_and_the_pooled_predictor_learns_from_every_site():
    site_a = ClientData("a", train=examples(("q1 ?", "yes"), ("q1 ?", "yes"), ("q2 ?", "no")),
                        test=examples(("q1 ?", "yes"), ("q2 ?", "no"), ("q3 ?", "no"), ("q3 ?", "yes")))
    site_b = ClientData("b", train=examples(("q3 ?", "no"), ("q3 ?", "no"), ("q2 ?", "no")),
                        test=examples(("q3 ?", "no")))
    scores = site_baselines(Benchmark("toy", [site_a, site_b], ("no", "yes")))
    assert scores["a"].majority_answer == "yes" and scores["a"].majority == 2 / 4
    assert scores["a"].question_only == 3 / 4  # q1 yes ✓, q2 no ✓, q3 unseen → "yes": 1 of 2
    assert scores["a"].question_only_pooled == 3 / 4  # pooled: q3 → "no": 1 of 2, q1 ✓, q2 ✓
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
