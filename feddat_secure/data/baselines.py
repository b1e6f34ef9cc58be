"""Reference scores a VQA model must beat before its accuracy means anything: read off the data, no training.

- **majority answer**: always answer the site's most frequent training answer;
- **question-only** (no image): answer each question with the answer its exact wording most often had in the
  training data, and the site's majority answer for a wording never seen in training. For templated questions
  this is the best any model that ignores the image can do on data drawn like the training data, so a model that
  does not clear it has learnt the answer prior, not to look (Goyal et al., "Making the V in VQA Matter",
  CVPR 2017, make the same point for VQA v1's language priors).

Both are fitted on a train split and scored on a test split; ``pooled`` variants fit on every site's training
data, which is what a federation could learn without images. Ties between equally frequent answers go to the
answer that sorts first, so every score is deterministic.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .vqa import Benchmark, DataError, VQAExample


@dataclass(frozen=True)
class BaselineScores:
    """One site's reference accuracies on its test split (fractions in [0, 1])."""

    majority: float  # the site's most frequent training answer, always
    question_only: float  # per exact question wording, fitted on the site's own training data
    question_only_pooled: float  # the same, fitted on every site's training data
    majority_answer: str  # the site's most frequent training answer


def most_frequent(answers: Iterable[str]) -> str:
    """The most frequent answer; ties go to the one that sorts first. DataError for no answers."""
    counts = Counter(answers)
    if not counts:
        raise DataError("no answers to take the most frequent of")
    return min(counts, key=lambda answer: (-counts[answer], answer))


class QuestionOnlyPredictor:
    """Answers a question from its wording alone: the most frequent training answer of that exact wording,
    else ``fallback`` (the training data's majority answer)."""

    def __init__(self, train: Sequence[VQAExample]):
        by_question: dict[str, list[str]] = defaultdict(list)
        for example in train:
            by_question[example.question].append(example.answer)
        self.fallback = most_frequent(example.answer for example in train)
        self.table = {question: most_frequent(answers) for question, answers in by_question.items()}

    def __call__(self, question: str) -> str:
        return self.table.get(question, self.fallback)


def accuracy(predict, test: Sequence[VQAExample]) -> float:
    """Fraction of ``test`` whose answer ``predict(question)`` gets right. DataError for an empty split."""
    if not test:
        raise DataError("cannot score an empty test split")
    return sum(predict(example.question) == example.answer for example in test) / len(test)


def site_baselines(benchmark: Benchmark) -> dict[str, BaselineScores]:
    """Every site's reference scores, keyed by site id."""
    pooled = QuestionOnlyPredictor([example for client in benchmark.clients for example in client.train])
    scores = {}
    for client in benchmark.clients:
        majority = most_frequent(example.answer for example in client.train)
        own = QuestionOnlyPredictor(client.train)
        majority_score = accuracy(lambda _question, answer=majority: answer, client.test)
        scores[client.client_id] = BaselineScores(
            majority=majority_score, question_only=accuracy(own, client.test),
            question_only_pooled=accuracy(pooled, client.test), majority_answer=majority)
    return scores
