"""What a benchmark's data looks like to the model: per-site counts that loading alone would hide.

Data can load without an error and still train badly without a word: a question longer than the
model's text length loses its end, a word outside the tokenizer's vocabulary is read as ``[UNK]``, a
row repeated within a split weighs twice, and an (image, question) in both train and test inflates
the test accuracy. :func:`data_report` counts each per site and words a warning for each that passes
its threshold; the runner prints the warnings and records the report in the run's metadata.

Examples are compared as the model sees them: the image's pixels after loading (conversion and
resizing) and the question after normalisation.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .vqa import Benchmark, ClientData, VQAExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TRUNCATED_WARN_SHARE = 0.05  # warn when more than this share of a site's questions is cut
UNKNOWN_WARN_SHARE = 0.05  # warn when more than this share of a site's question tokens is [UNK]
SHOWN = 3  # how many unknown words, or rows, a warning names


@dataclass(frozen=True)
class TextCoverage:
    """How much of one site's questions (train and test) the model can read."""

    site: str
    questions: int
    truncated: int  # questions longer than the model's text length: their end is cut off
    tokens: int  # question tokens, the model's special tokens ([CLS], [SEP]) not counted
    unknown_tokens: int  # tokens the tokenizer reads as its unknown token ([UNK])
    unknown_words: tuple[str, ...] = ()  # the words behind them, most frequent first (at most 10)

    @property
    def truncated_share(self) -> float:
        return self.truncated / self.questions if self.questions else 0.0

    @property
    def unknown_share(self) -> float:
        return self.unknown_tokens / self.tokens if self.tokens else 0.0


def text_coverage(site: str, questions: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                  max_text_length: int) -> TextCoverage:
    """Count the ``questions`` that ``tokenizer`` would cut at ``max_text_length`` tokens (special tokens
    included, as the model's input is built) and the tokens it cannot read."""
    if not questions:  # the tokenizer refuses an empty batch
        return TextCoverage(site=site, questions=0, truncated=0, tokens=0, unknown_tokens=0)
    encoded = tokenizer(list(questions), add_special_tokens=False, truncation=False, verbose=False,
                        return_offsets_mapping=True)
    room = max_text_length - tokenizer.num_special_tokens_to_add(pair=False)
    unknown: Counter[str] = Counter()
    for question, ids, offsets in zip(questions, encoded["input_ids"], encoded["offset_mapping"]):
        unknown.update(question[start:end] for token, (start, end) in zip(ids, offsets)
                       if token == tokenizer.unk_token_id)
    return TextCoverage(
        site=site,
        questions=len(questions),
        truncated=sum(len(ids) > room for ids in encoded["input_ids"]),
        tokens=sum(len(ids) for ids in encoded["input_ids"]),
        unknown_tokens=sum(unknown.values()),
        unknown_words=tuple(word for word, _ in unknown.most_common(10)),
    )


@dataclass(frozen=True)
class SiteDataReport:
    """One site's data as the model will see it, and the warnings it deserves."""

    site: str
    train_examples: int
    test_examples: int
    text: TextCoverage
    repeated_train: int  # train examples equal to an earlier train example (image, question and answer)
    repeated_test: int  # likewise within test
    conflicting_answers: int  # examples whose (image, question) came earlier in their split with another answer
    train_test_overlap: int  # test examples whose (image, question) is also in train
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataReport:
    """Every site's :class:`SiteDataReport`, and all warnings (the benchmark's, then each site's)."""

    benchmark: str
    sites: tuple[SiteDataReport, ...]
    warnings: tuple[str, ...]

    def to_dict(self) -> dict:
        """JSON-ready, for the run's metadata."""
        return asdict(self)


Key = tuple[bytes, str]  # (digest of the image's pixels, question): the input the model sees


def _keys(examples: Sequence[VQAExample]) -> list[Key]:
    return [(hashlib.sha256(str(e.image.shape).encode() + e.image.tobytes()).digest(), e.question) for e in examples]


def _repeats(examples: Sequence[VQAExample], keys: list[Key]) -> tuple[list[VQAExample], list[VQAExample]]:
    """The examples that repeat an earlier one exactly, and those that repeat its (image, question) with
    another answer."""
    first_answer: dict[Key, str] = {}
    repeated, conflicting = [], []
    for example, key in zip(examples, keys):
        if key not in first_answer:
            first_answer[key] = example.answer
        elif first_answer[key] == example.answer:
            repeated.append(example)
        else:
            conflicting.append(example)
    return repeated, conflicting


def _rows(examples: Sequence[VQAExample]) -> str:
    """Where the first few examples came from, when their loader recorded it."""
    sources = [e.source for e in examples if e.source]
    if not sources:
        return ""
    more = ", ..." if len(sources) > SHOWN else ""
    return f" ({', '.join(sources[:SHOWN])}{more})"


def site_report(client: ClientData, tokenizer: PreTrainedTokenizerBase, max_text_length: int) -> SiteDataReport:
    """One site's report. It needs only the site's own data and the model's tokenizer, so a site can
    compute it where its data lives."""
    site = client.client_id
    text = text_coverage(site, [e.question for e in client.train + client.test], tokenizer, max_text_length)
    train_keys, test_keys = _keys(client.train), _keys(client.test)
    repeated_train, conflicting_train = _repeats(client.train, train_keys)
    repeated_test, conflicting_test = _repeats(client.test, test_keys)
    in_train = set(train_keys)
    overlap = [e for e, key in zip(client.test, test_keys) if key in in_train]
    warnings = []
    if text.truncated_share > TRUNCATED_WARN_SHARE:
        warnings.append(f"{site}: {text.truncated} of {text.questions} questions ({text.truncated_share:.1%}) are "
                        f"longer than the model's text length ({max_text_length} tokens) and lose their end")
    if text.unknown_share > UNKNOWN_WARN_SHARE:
        words = ", ".join(map(repr, text.unknown_words[:SHOWN]))
        warnings.append(f"{site}: {text.unknown_tokens} of {text.tokens} question tokens ({text.unknown_share:.1%}) "
                        f"are unknown to the model's tokenizer and read as [UNK] (most frequent: {words}); "
                        "see docs/data.md")
    for split, repeated in (("train", repeated_train), ("test", repeated_test)):
        if repeated:
            warnings.append(f"{site}: {len(repeated)} repeated {split} example(s), the same image, question and "
                            f"answer as an earlier one{_rows(repeated)}")
    conflicting = conflicting_train + conflicting_test
    if conflicting:
        warnings.append(f"{site}: {len(conflicting)} example(s) asking an earlier example's question of the same "
                        f"image with another answer{_rows(conflicting)}")
    if overlap:
        warnings.append(f"{site}: {len(overlap)} test example(s) asking a train example's question of the same "
                        f"image, which inflates test accuracy{_rows(overlap)}")
    return SiteDataReport(site=site, train_examples=len(client.train), test_examples=len(client.test), text=text,
                          repeated_train=len(repeated_train), repeated_test=len(repeated_test),
                          conflicting_answers=len(conflicting), train_test_overlap=len(overlap),
                          warnings=tuple(warnings))


def data_report(benchmark: Benchmark, tokenizer: PreTrainedTokenizerBase, max_text_length: int) -> DataReport:
    """Every site's report against the model's ``tokenizer`` and ``max_text_length``
    (``Foundation.tokenizer`` and ``Foundation.max_text_length``)."""
    sites = tuple(site_report(client, tokenizer, max_text_length) for client in benchmark.clients)
    skipped = tuple(f"folder {name!r} holds a manifest but is not a site (folders starting with '.' or '_' are "
                    "skipped)" for name in benchmark.skipped_sites)
    return DataReport(benchmark.name, sites, skipped + tuple(w for site in sites for w in site.warnings))
