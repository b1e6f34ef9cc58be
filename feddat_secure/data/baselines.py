"""Reference scores a VQA model must beat before its accuracy means anything: read off the data, no training.

- **majority answer**: always answer the site's most frequent training answer;
- **question-only** (no image): answer from the question's words alone, with lookup tables fitted on the
  training data. Two lookups are fitted: by the question's *template* (every word that is also one of the
  benchmark's answers, a colour or a shape, replaced by one placeholder), and by its *exact wording*, backing off
  to the template for a wording never seen. Which of the two a site uses is chosen on a held-out fifth of its
  training data, then refitted on all of it; an unseen template gets the majority answer. A model that does not
  clear this has learnt the answer prior, not to look (Goyal et al., "Making the V in VQA Matter", CVPR 2017, make
  the same point for VQA v1's language priors). It is a strong reference, not a bound: a trained text-only model
  can do better.

Both are fitted on a train split and scored on a test split; ``pooled`` variants fit on every site's training
data, which is what a federation could learn without images. Ties between equally frequent answers go to the
answer that sorts first, so every score is deterministic.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from .vqa import Benchmark, DataError, VQAExample

PLACEHOLDER = "<answer>"
HELD_OUT = 5  # every 5th training example chooses between the two lookups


@dataclass(frozen=True)
class BaselineScores:
    """One site's reference accuracies on its test split (fractions in [0, 1])."""

    majority: float  # the site's most frequent training answer, always
    question_only: float  # from the question's words, fitted on the site's own training data
    question_only_pooled: float  # the same, fitted on every site's training data
    majority_answer: str  # the site's most frequent training answer


def most_frequent(answers: Iterable[str]) -> str:
    """The most frequent answer; ties go to the one that sorts first. DataError for no answers."""
    counts = Counter(answers)
    if not counts:
        raise DataError("no answers to take the most frequent of")
    return min(counts, key=lambda answer: (-counts[answer], answer))


def template(question: str, answer_words: Collection[str]) -> str:
    """``question`` with every word that is an answer (a colour, a shape, a count...) replaced by one placeholder."""
    return " ".join(PLACEHOLDER if word in answer_words else word for word in question.split())


def _table(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    by_key: dict[str, list[str]] = defaultdict(list)
    for key, answer in pairs:
        by_key[key].append(answer)
    return {key: most_frequent(answers) for key, answers in by_key.items()}


def _lookups(train: Sequence[VQAExample], answer_words: Collection[str]) -> dict[str, Callable[[str], str]]:
    """The two candidate predictors fitted on ``train``: by template, and by exact wording then template."""
    fallback = most_frequent(example.answer for example in train)
    by_template = _table((template(e.question, answer_words), e.answer) for e in train)
    by_question = _table((e.question, e.answer) for e in train)

    def from_template(question: str) -> str:
        return by_template.get(template(question, answer_words), fallback)

    def from_wording(question: str) -> str:
        return by_question.get(question) or from_template(question)

    return {"template": from_template, "wording": from_wording}


class QuestionOnlyPredictor:
    """Answers a question from its words alone (the module's docstring says how); ``choice`` is the lookup the
    held-out training data chose ("template" or "wording")."""

    def __init__(self, train: Sequence[VQAExample], answer_words: Collection[str]):
        if not train:
            raise DataError("cannot fit a question-only predictor on no training examples")
        kept = [e for index, e in enumerate(train) if index % HELD_OUT]
        held = [e for index, e in enumerate(train) if not index % HELD_OUT]
        if kept and held:
            candidates = _lookups(kept, answer_words)
            scores = {name: accuracy(predict, held) for name, predict in candidates.items()}
            self.choice = max(sorted(scores), key=lambda name: scores[name])  # a tie: "template", the simpler
        else:
            self.choice = "wording"
        self._predict = _lookups(train, answer_words)[self.choice]

    def __call__(self, question: str) -> str:
        return self._predict(question)


def accuracy(predict: Callable[[str], str], test: Sequence[VQAExample]) -> float:
    """Fraction of ``test`` whose answer ``predict(question)`` gets right. DataError for an empty split."""
    if not test:
        raise DataError("cannot score an empty test split")
    return sum(predict(example.question) == example.answer for example in test) / len(test)


def site_baselines(benchmark: Benchmark) -> dict[str, BaselineScores]:
    """Every site's reference scores, keyed by site id."""
    answer_words = {word for answer in benchmark.answers for word in answer.split()}
    pooled = QuestionOnlyPredictor([example for client in benchmark.clients for example in client.train],
                                   answer_words)
    scores = {}
    for client in benchmark.clients:
        majority = most_frequent(example.answer for example in client.train)
        own = QuestionOnlyPredictor(client.train, answer_words)
        scores[client.client_id] = BaselineScores(
            majority=accuracy(lambda _question, answer=majority: answer, client.test),
            question_only=accuracy(own, client.test), question_only_pooled=accuracy(pooled, client.test),
            majority_answer=majority)
    return scores
