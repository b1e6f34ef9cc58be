"""Specification of the data report: what loading accepts but the model would silently lose or double-count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from feddat_secure.data import build_benchmark
from feddat_secure.data.folder import load_folder_benchmark
from feddat_secure.data.report import data_report, text_coverage
from feddat_secure.data.vqa import Benchmark, ClientData, VQAExample
from feddat_secure.model.tokenizer import build_word_tokenizer

WORDS = "is it red blue ?".split()
MAX_LENGTH = 8  # [CLS] + 6 tokens + [SEP]


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS, max_length=MAX_LENGTH)


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, dtype=np.uint8)


def example(question="is it red ?", answer="red", pixels=0, source="") -> VQAExample:
    return VQAExample(image=image(pixels), question=question, answer=answer, source=source)


def benchmark(train: list[VQAExample], test: list[VQAExample] | None = None, **extra) -> Benchmark:
    test = [example(pixels=255)] if test is None else test
    return Benchmark("spec", [ClientData("site", train, test)], ("red", "blue"), **extra)


def distinct(count: int, question="is it red ?") -> list[VQAExample]:
    return [example(question=question, pixels=i) for i in range(count)]


# --- what the model can read ---------------------------------------------------------------------------


def test_text_coverage_counts_questions_cut_at_the_text_length_and_unknown_tokens(tokenizer):
    questions = ["is it red ?",                     # 4 tokens: fits
                 "is it red or blue ?",             # 'or' unknown; 6 tokens: exactly fills the 8 with [CLS], [SEP]
                 "is it red , blue or green ?"]     # ',', 'or', 'green' unknown; 8 tokens: cut
    coverage = text_coverage("site", questions, tokenizer, MAX_LENGTH)
    assert (coverage.questions, coverage.truncated) == (3, 1)
    assert (coverage.tokens, coverage.unknown_tokens) == (18, 4)
    assert coverage.unknown_words == ("or", ",", "green")
    assert coverage.truncated_share == pytest.approx(1 / 3)
    assert coverage.unknown_share == pytest.approx(4 / 18)


def test_text_coverage_of_no_questions_is_empty(tokenizer):
    coverage = text_coverage("site", [], tokenizer, MAX_LENGTH)
    assert (coverage.questions, coverage.tokens, coverage.truncated_share, coverage.unknown_share) == (0, 0, 0, 0)


def test_with_a_wordpiece_tokenizer_like_vilts_a_word_split_into_known_pieces_is_not_unknown():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "it", "a", "les", "##ion", "?"]
    core = Tokenizer(models.WordPiece({word: i for i, word in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]")
    coverage = text_coverage("site", ["is it a lesion ?", "is it a tumour ?"], wordpiece, 7)
    assert (coverage.tokens, coverage.unknown_tokens, coverage.unknown_words) == (11, 1, ("tumour",))
    assert coverage.truncated == 1  # 'les ##ion' makes the first question 6 tokens, 1 more than 7 - [CLS], [SEP]


def test_the_report_covers_both_splits_of_a_site(tokenizer):
    report = data_report(benchmark(distinct(3), [example(question="is it green ?", pixels=255)]), tokenizer,
                         MAX_LENGTH)
    (site,) = report.sites
    assert (site.train_examples, site.test_examples, site.text.questions) == (3, 1, 4)
    assert site.text.unknown_words == ("green",)


def test_no_warning_at_five_percent_truncated_and_a_warning_above(tokenizer):
    long = "is it red or blue or red ?"
    at = data_report(benchmark(distinct(18) + [example(question=long, pixels=99)]), tokenizer, MAX_LENGTH)
    assert at.sites[0].text.truncated == 1 and at.warnings == ()  # 1 of 20 questions (with the test one) is 5 %
    above = data_report(benchmark(distinct(17) + [example(question=long, pixels=i) for i in (98, 99)]), tokenizer,
                        MAX_LENGTH)
    assert above.warnings == ("site: 2 of 20 questions (10.0%) are longer than the model's text length "
                              "(8 tokens) and lose their end",)


def test_no_warning_at_five_percent_unknown_tokens_and_a_warning_above(tokenizer):
    # 5 questions of 4 tokens = 20 tokens; one unknown word is 5 %
    at = data_report(benchmark(distinct(3) + [example(question="is it pink ?", pixels=9)]), tokenizer, MAX_LENGTH)
    assert at.sites[0].text.unknown_tokens == 1 and at.warnings == ()
    above = data_report(benchmark(distinct(3) + [example(question="is it pink ?", pixels=9)],
                                  [example(question="is it teal ?", pixels=255)]), tokenizer, MAX_LENGTH)
    assert above.warnings == ("site: 2 of 20 question tokens (10.0%) are unknown to the model's tokenizer and read "
                              "as [UNK] (most frequent: 'pink', 'teal'); see docs/data.md",)


def test_the_embedded_model_reads_the_built_in_benchmarks_without_a_warning(foundation):
    for name in ("function", "domain", "scene", "digits"):
        bench = build_benchmark(name, path="", num_clients=5, train_per_client=40, test_per_client=10,
                                image_size=foundation.image_size, seed=0)
        report = data_report(bench, foundation.tokenizer, foundation.max_text_length)
        assert report.warnings == (), name
        assert all(site.text.unknown_tokens == 0 and site.text.truncated == 0 for site in report.sites)


def test_the_embedded_model_reports_words_outside_its_vocabulary(foundation):
    coverage = text_coverage("site", ["what colour is the lesion on the left ?"], foundation.tokenizer,
                             foundation.max_text_length)
    assert coverage.unknown_words == ("colour", "lesion")  # it knows 'color', not 'colour'
    assert (coverage.tokens, coverage.unknown_tokens, coverage.truncated) == (9, 2, 0)


# --- repeated examples ------------------------------------------------------------------------------------


def test_an_exact_repeat_within_a_split_is_counted_and_warned_about_with_its_rows(tokenizer):
    train = [example(source="manifest.jsonl line 1"), example(pixels=7, source="manifest.jsonl line 2"),
             example(source="manifest.jsonl line 3")]
    test = [example(pixels=255, source="manifest.jsonl line 4"), example(pixels=255, source="manifest.jsonl line 5")]
    site = data_report(benchmark(train, test), tokenizer, MAX_LENGTH).sites[0]
    assert (site.repeated_train, site.repeated_test, site.conflicting_answers) == (1, 1, 0)
    assert site.warnings == ("site: 1 repeated train example(s), the same image, question and answer as an earlier "
                             "one (manifest.jsonl line 3)",
                             "site: 1 repeated test example(s), the same image, question and answer as an earlier "
                             "one (manifest.jsonl line 5)")


def test_the_same_question_of_the_same_image_with_another_answer_is_a_conflict_not_a_repeat(tokenizer):
    site = data_report(benchmark([example(), example(answer="blue")]), tokenizer, MAX_LENGTH).sites[0]
    assert (site.repeated_train, site.conflicting_answers) == (0, 1)
    assert site.warnings == ("site: 1 example(s) asking an earlier example's question of the same image with "
                             "another answer",)


def test_another_question_or_another_image_is_not_a_repeat(tokenizer):
    train = [example(), example(question="is it blue ?", answer="blue"), example(pixels=1)]
    site = data_report(benchmark(train), tokenizer, MAX_LENGTH).sites[0]
    assert (site.repeated_train, site.conflicting_answers, site.train_test_overlap, site.warnings) == (0, 0, 0, ())


def test_a_test_example_asking_a_train_question_of_the_same_image_is_counted_whatever_its_answer(tokenizer):
    train = [example(), example(pixels=3)]
    test = [example(answer="blue", source="manifest.csv line 9"), example(pixels=3, source="manifest.csv line 10"),
            example(pixels=255)]
    site = data_report(benchmark(train, test), tokenizer, MAX_LENGTH).sites[0]
    assert site.train_test_overlap == 2
    assert site.warnings == ("site: 2 test example(s) asking a train example's question of the same image, which "
                             "inflates test accuracy (manifest.csv line 9, manifest.csv line 10)",)


def test_a_warning_names_at_most_three_rows(tokenizer):
    train = [example(source=f"manifest.jsonl line {i}") for i in range(1, 6)]
    (warning,) = data_report(benchmark(train), tokenizer, MAX_LENGTH).warnings
    assert warning.endswith("(manifest.jsonl line 2, manifest.jsonl line 3, manifest.jsonl line 4, ...)")


def test_images_are_compared_by_their_pixels_so_a_copied_file_is_a_repeat(tmp_path, tokenizer):
    root = tmp_path / "data"
    site = root / "site"
    site.mkdir(parents=True)
    (root / "answers.txt").write_text("red\nblue\n")
    for name, colour in (("a.png", (200, 0, 0)), ("copy_of_a.png", (200, 0, 0)), ("b.png", (0, 0, 200))):
        Image.new("RGB", (4, 4), colour).save(site / name)
    rows = [("a.png", "Is it red?", "red", "train"), ("copy_of_a.png", "is  it RED?", "red", "train"),
            ("b.png", "is it red?", "blue", "test")]
    (site / "manifest.jsonl").write_text("\n".join(
        json.dumps(dict(zip(("image", "question", "answer", "split"), r))) for r in rows))
    report = data_report(load_folder_benchmark(root, image_size=4), tokenizer, MAX_LENGTH)
    assert report.sites[0].repeated_train == 1
    assert "(manifest.jsonl line 2)" in report.warnings[0]


# --- the report as a whole --------------------------------------------------------------------------------


def test_a_skipped_folder_holding_a_manifest_is_warned_about_first(tokenizer):
    report = data_report(benchmark(distinct(2) + [example()], skipped_sites=("_site_b",)), tokenizer, MAX_LENGTH)
    assert report.warnings[0] == ("folder '_site_b' holds a manifest but is not a site (folders starting with '.' "
                                  "or '_' are skipped)")
    assert report.warnings[1].startswith("site: 1 repeated train example(s)")


def test_the_report_is_json_ready_for_the_runs_metadata(tokenizer):
    report = data_report(benchmark(distinct(2) + [example()]), tokenizer, MAX_LENGTH)
    recorded = json.loads(json.dumps(report.to_dict()))
    assert recorded["benchmark"] == "spec"
    (site,) = recorded["sites"]
    assert site["repeated_train"] == 1 and site["text"]["questions"] == 4 and site["text"]["site"] == "site"
    assert recorded["warnings"] == list(report.warnings)


def test_one_site_per_client_in_benchmark_order(tokenizer):
    clients = [ClientData(name, distinct(2), [example(pixels=255)]) for name in ("b", "a")]
    report = data_report(Benchmark("spec", clients, ("red",)), tokenizer, MAX_LENGTH)
    assert [site.site for site in report.sites] == ["b", "a"]


def test_docs_list_exactly_the_words_the_embedded_model_reads(foundation):
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    listed = text.split("built-in benchmarks:\n\n```\n", 1)[1].split("```", 1)[0].split()
    special = set(foundation.tokenizer.all_special_tokens)
    assert sorted(listed) == sorted(set(foundation.tokenizer.get_vocab()) - special)
    assert (len(listed), len(foundation.tokenizer.get_vocab()), foundation.max_text_length) == (55, 60, 20)
