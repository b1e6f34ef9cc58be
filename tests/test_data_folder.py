"""Specification of the folder loader for users' own federated VQA data."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feddat_secure.data.folder import load_folder_benchmark
from feddat_secure.data.vqa import DataError

RED, BLUE = (200, 30, 30), (30, 30, 200)


def png(path: Path, color=RED, size=(10, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def row(image="images/red.png", question="What colour is it?", answer="red", split="train") -> dict:
    return {"image": image, "question": question, "answer": answer, "split": split}


def write_jsonl(client: Path, rows: list, *, raw_lines: tuple[str, ...] = ()) -> Path:
    client.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path = client / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_csv(client: Path, rows: list[dict], header=("image", "question", "answer", "split")) -> Path:
    client.mkdir(parents=True, exist_ok=True)
    path = client / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in rows:
            writer.writerow([r[c] for c in header] if isinstance(r, dict) else r)
    return path


def two_split_rows(**overrides) -> list[dict]:
    return [row(**overrides), row(split="test", image="images/blue.png", answer="blue")]


def make_client(root: Path, name: str, rows=None, fmt="jsonl") -> Path:
    client = root / name
    png(client / "images" / "red.png", RED)
    png(client / "images" / "blue.png", BLUE)
    rows = two_split_rows() if rows is None else rows
    return (write_jsonl if fmt == "jsonl" else write_csv)(client, rows)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A benchmark folder with answers.txt and no clients yet."""
    folder = tmp_path / "hospitals"
    folder.mkdir()
    (folder / "answers.txt").write_text("red\n\nblue\ngreen\n", encoding="utf-8")
    return folder


@pytest.fixture
def valid(root: Path) -> Path:
    make_client(root, "site_b", fmt="csv", rows=[
        row(question="  Is   it RED ?  ", answer="red"),
        row(image="images/blue.png", question="what colour, exactly ?", answer="blue"),
        row(split="test", question="is it red ?", answer="red"),
    ])
    make_client(root, "site_a", rows=[
        row(),
        row(split="test", image="images/blue.png", answer="blue"),
        row(split="test", image="images/blue.png", question="is it green ?", answer="green"),
    ])
    return root


def test_a_valid_folder_loads_clients_in_sorted_order_with_their_splits(valid):
    bench = load_folder_benchmark(valid, image_size=16)
    assert bench.name == "folder:hospitals"
    assert [c.client_id for c in bench.clients] == ["site_a", "site_b"]
    site_a, site_b = bench.clients
    assert (len(site_a.train), len(site_a.test)) == (1, 2)
    assert (len(site_b.train), len(site_b.test)) == (2, 1)
    assert [ex.answer for ex in site_a.test] == ["blue", "green"]


def test_the_answer_vocabulary_is_answers_txt_in_file_order(valid):
    bench = load_folder_benchmark(valid, image_size=16)
    assert bench.answers == ("red", "blue", "green")
    assert bench.clients[0].answers == ("red", "blue", "green")
    assert bench.clients[1].answers == ("red", "blue")  # a client's own label space


def test_questions_are_lowercased_with_whitespace_collapsed(valid):
    site_b = load_folder_benchmark(valid, image_size=16).clients[1]
    assert [ex.question for ex in site_b.train] == ["is it red ?", "what colour, exactly ?"]
    assert load_folder_benchmark(valid, image_size=16).clients[0].train[0].question == "what colour is it?"


@pytest.mark.parametrize("image_size", [8, 24])
def test_images_are_rgb_uint8_resized_to_a_square(valid, image_size):
    bench = load_folder_benchmark(valid, image_size=image_size)
    for client in bench.clients:
        for ex in client.train + client.test:
            assert ex.image.shape == (image_size, image_size, 3)
            assert ex.image.dtype == np.uint8
    red, blue = bench.clients[0].train[0].image, bench.clients[0].test[0].image
    assert tuple(red[0, 0]) == RED and tuple(blue[3, 5]) == BLUE


def test_greyscale_and_palette_images_are_converted_to_rgb(root):
    client = root / "site"
    client.mkdir()
    Image.new("L", (5, 5), 77).save(client / "grey.png")
    Image.new("P", (5, 5), 0).save(client / "palette.png")
    write_jsonl(client, [row(image="grey.png"), row(image="palette.png", split="test")])
    bench = load_folder_benchmark(root, image_size=4)
    assert tuple(bench.clients[0].train[0].image[0, 0]) == (77, 77, 77)
    assert bench.clients[0].test[0].image.shape == (4, 4, 3)


def test_examples_sharing_an_image_get_equal_but_separate_arrays(root):
    make_client(root, "site", rows=[row(), row(question="is it red ?"), row(split="test")])
    train = load_folder_benchmark(root, image_size=8).clients[0].train
    assert np.array_equal(train[0].image, train[1].image)
    assert not np.shares_memory(train[0].image, train[1].image)


def test_jsonl_and_csv_manifests_give_the_same_data(tmp_path):
    digests = []
    for fmt in ("jsonl", "csv"):
        folder = tmp_path / fmt / "same"
        folder.mkdir(parents=True)
        (folder / "answers.txt").write_text("red\nblue\n")
        make_client(folder, "site", fmt=fmt)
        digests.append(load_folder_benchmark(folder, image_size=8).digest())
    assert digests[0] == digests[1]


def test_blank_lines_in_manifests_are_ignored(root):
    make_client(root, "site", rows=two_split_rows())
    manifest = root / "site" / "manifest.jsonl"
    manifest.write_text("\n" + manifest.read_text() + "\n\n")
    assert len(load_folder_benchmark(root, image_size=8).clients[0].train) == 1


def test_csv_with_byte_order_mark_and_quoted_commas_loads(root):
    manifest = make_client(root, "site", fmt="csv", rows=[row(question="red, or blue ?"), row(split="test")])
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())
    assert load_folder_benchmark(root, image_size=8).clients[0].train[0].question == "red, or blue ?"


def test_hidden_folders_are_not_clients(valid):
    (valid / ".cache").mkdir()
    assert [c.client_id for c in load_folder_benchmark(valid, image_size=8).clients] == ["site_a", "site_b"]


def test_root_given_as_string_works(valid):
    assert load_folder_benchmark(str(valid), image_size=8).name == "folder:hospitals"


# --- errors: each names the file, the line and the problem -------------------------------------


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match="nowhere: benchmark folder not found"):
        load_folder_benchmark(tmp_path / "nowhere", image_size=8)


def test_missing_answers_txt_is_an_error(root):
    (root / "answers.txt").unlink()
    make_client(root, "site")
    with pytest.raises(DataError, match="answers.txt not found"):
        load_folder_benchmark(root, image_size=8)


def test_empty_answers_txt_is_an_error(root):
    (root / "answers.txt").write_text("\n  \n")
    make_client(root, "site")
    with pytest.raises(DataError, match="answers.txt: answers.txt is empty"):
        load_folder_benchmark(root, image_size=8)


def test_duplicate_answers_are_an_error_naming_both_lines(root):
    (root / "answers.txt").write_text("red\nblue\n red \n")
    make_client(root, "site")
    with pytest.raises(DataError, match=r"answers.txt line 3: duplicate answer 'red' \(already on line 1\)"):
        load_folder_benchmark(root, image_size=8)


def test_a_root_without_client_folders_is_an_error(root):
    (root / "notes.txt").write_text("not a client")
    with pytest.raises(DataError, match="no client folders"):
        load_folder_benchmark(root, image_size=8)


def test_a_client_folder_without_manifest_is_an_error(valid):
    (valid / "site_c").mkdir()
    with pytest.raises(DataError, match="site_c: client folder has no manifest.jsonl or manifest.csv"):
        load_folder_benchmark(valid, image_size=8)


def test_a_client_folder_with_both_manifests_is_an_error(valid):
    write_csv(valid / "site_a", two_split_rows())
    with pytest.raises(DataError, match="site_a: client folder has both manifest.jsonl and manifest.csv"):
        load_folder_benchmark(valid, image_size=8)


def test_malformed_json_line_is_an_error_with_its_line_number(root):
    write_jsonl(root / "site", two_split_rows(), raw_lines=('{"image": "images/red.png",',))
    png(root / "site" / "images" / "red.png")
    png(root / "site" / "images" / "blue.png")
    with pytest.raises(DataError, match=r"manifest.jsonl line 3: malformed JSON"):
        load_folder_benchmark(root, image_size=8)


def test_a_json_line_that_is_not_an_object_is_an_error(root):
    write_jsonl(root / "site", [], raw_lines=('["images/red.png", "q", "red", "train"]',))
    with pytest.raises(DataError, match="manifest.jsonl line 1: expected a JSON object, got list"):
        load_folder_benchmark(root, image_size=8)


def test_missing_json_key_is_an_error(root):
    rows = two_split_rows()
    del rows[1]["split"]
    make_client(root, "site", rows=rows)
    with pytest.raises(DataError, match="manifest.jsonl line 2: missing key\\(s\\) 'split'"):
        load_folder_benchmark(root, image_size=8)


def test_unknown_json_key_is_an_error(root):
    rows = two_split_rows()
    rows[0]["label"] = "red"
    make_client(root, "site", rows=rows)
    with pytest.raises(DataError, match="manifest.jsonl line 1: unknown key\\(s\\) 'label'"):
        load_folder_benchmark(root, image_size=8)


def test_non_string_json_value_is_an_error(root):
    make_client(root, "site", rows=[row(answer=3), row(split="test")])
    with pytest.raises(DataError, match="manifest.jsonl line 1: key 'answer' must be a string, got int"):
        load_folder_benchmark(root, image_size=8)


def test_missing_csv_column_is_an_error(root):
    write_csv(root / "site", [["images/red.png", "q ?", "red"]], header=("image", "question", "answer"))
    with pytest.raises(DataError, match="manifest.csv line 1: missing column\\(s\\) 'split'"):
        load_folder_benchmark(root, image_size=8)


def test_unknown_csv_column_is_an_error(root):
    header = ("image", "question", "answer", "split", "notes")
    write_csv(root / "site", [["images/red.png", "q ?", "red", "train", "x"]], header=header)
    with pytest.raises(DataError, match="manifest.csv line 1: unknown column\\(s\\) 'notes'"):
        load_folder_benchmark(root, image_size=8)


def test_csv_row_with_an_extra_field_is_an_error(root):
    make_client(root, "site", fmt="csv", rows=[row(), ["images/blue.png", "q ?", "blue", "test", "extra"]])
    with pytest.raises(DataError, match="manifest.csv line 3: expected 4 fields .*got 5"):
        load_folder_benchmark(root, image_size=8)


def test_empty_csv_manifest_is_an_error(root):
    (root / "site").mkdir()
    (root / "site" / "manifest.csv").write_text("")
    with pytest.raises(DataError, match="manifest.csv: empty file"):
        load_folder_benchmark(root, image_size=8)


def test_split_other_than_train_or_test_is_an_error(root):
    make_client(root, "site", rows=[row(), row(split="val")])
    with pytest.raises(DataError, match="manifest.jsonl line 2: split must be 'train' or 'test', got 'val'"):
        load_folder_benchmark(root, image_size=8)


def test_missing_image_file_is_an_error_naming_it(root):
    make_client(root, "site", fmt="csv", rows=[row(), row(split="test", image="images/gone.png")])
    with pytest.raises(DataError, match="manifest.csv line 3: image file 'images/gone.png' not found"):
        load_folder_benchmark(root, image_size=8)


def test_unreadable_image_is_an_error_naming_it(root):
    make_client(root, "site", rows=[row(), row(split="test", image="images/broken.png")])
    (root / "site" / "images" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="manifest.jsonl line 2: cannot read image 'images/broken.png'"):
        load_folder_benchmark(root, image_size=8)


@pytest.mark.parametrize("image", ["../../outside/red.png", "/etc/passwd"])
def test_image_paths_must_stay_inside_the_client_folder(root, image):
    png(root.parent / "outside" / "red.png")
    make_client(root, "site", rows=[row(), row(split="test", image=image)])
    with pytest.raises(DataError, match="line 2: image path .* must be relative to the client folder"):
        load_folder_benchmark(root, image_size=8)


def test_answer_not_in_answers_txt_is_an_error_naming_it_and_the_line(root):
    make_client(root, "site", rows=[row(), row(split="test", answer="purple")])
    with pytest.raises(DataError, match=r"manifest.jsonl line 2: answer 'purple' is not listed in .*answers.txt"):
        load_folder_benchmark(root, image_size=8)


def test_empty_answer_is_an_error(root):
    make_client(root, "site", rows=[row(answer="  "), row(split="test")])
    with pytest.raises(DataError, match="manifest.jsonl line 1: empty answer"):
        load_folder_benchmark(root, image_size=8)


def test_empty_question_is_an_error(root):
    make_client(root, "site", fmt="csv", rows=[row(), row(split="test", question=" \t ")])
    with pytest.raises(DataError, match="manifest.csv line 3: empty question"):
        load_folder_benchmark(root, image_size=8)


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_client_with_an_empty_split_is_an_error(root, split):
    make_client(root, "site", rows=[row(split="test" if split == "train" else "train")])
    with pytest.raises(DataError, match=re.escape(f"manifest.jsonl: no '{split}' examples")):
        load_folder_benchmark(root, image_size=8)


def test_a_client_folder_name_too_long_for_a_site_id_is_an_error(root):
    make_client(root, "s" * 65, rows=[row(), row(split="test")])
    with pytest.raises(DataError, match="longer than 64 characters"):
        load_folder_benchmark(root, image_size=8)


# --- symlinks: every file read really lies inside its folder -------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder next to the data root holding an image and a complete site."""
    folder = tmp_path / "outside"
    png(folder / "red.png")
    make_client(folder, "site_c")
    return folder


def test_an_image_symlinked_from_outside_the_site_folder_is_refused(root, outside):
    make_client(root, "site", rows=[row(), row(split="test", image="images/linked.png")])
    (root / "site" / "images" / "linked.png").symlink_to(outside / "red.png")
    with pytest.raises(DataError, match=r"manifest.jsonl line 2: image 'images/linked.png' resolves to "
                                        r".*outside.red\.png, outside the client folder .*site \(a symlink"):
        load_folder_benchmark(root, image_size=8)


def test_an_image_under_a_symlinked_sub_folder_leading_outside_is_refused(root, outside):
    make_client(root, "site", rows=[row(), row(split="test", image="scans/red.png")])
    (root / "site" / "scans").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match=r"line 2: image 'scans/red.png' resolves to .*, outside the client folder"):
        load_folder_benchmark(root, image_size=8)


def test_a_client_folder_symlinked_from_outside_the_data_folder_is_refused(valid, outside):
    (valid / "site_c").symlink_to(outside / "site_c", target_is_directory=True)
    with pytest.raises(DataError, match=r"site_c: client folder resolves to .*outside.site_c, outside the data "
                                        r"folder .*hospitals"):
        load_folder_benchmark(valid, image_size=8)


def test_a_manifest_symlinked_from_outside_is_refused(root, outside):
    make_client(root, "site")
    (root / "site" / "manifest.jsonl").unlink()
    (root / "site" / "manifest.jsonl").symlink_to(outside / "site_c" / "manifest.jsonl")
    with pytest.raises(DataError, match=r"manifest.jsonl: manifest resolves to .*, outside the client folder"):
        load_folder_benchmark(root, image_size=8)


def test_an_answers_file_symlinked_from_outside_is_refused(root, tmp_path):
    (tmp_path / "vocabulary.txt").write_text("red\nblue\n")
    (root / "answers.txt").unlink()
    (root / "answers.txt").symlink_to(tmp_path / "vocabulary.txt")
    make_client(root, "site")
    with pytest.raises(DataError, match=r"answers.txt: answers.txt resolves to .*vocabulary.txt, outside the data"):
        load_folder_benchmark(root, image_size=8)


def test_symlinks_that_stay_inside_their_folder_are_followed(root):
    make_client(root, "_store/site_b")  # '_store' is not a site; site_b is reached through a symlink to it
    (root / "site_b").symlink_to(root / "_store" / "site_b", target_is_directory=True)
    make_client(root, "site_a", rows=[row(image="images/alias.png"), row(split="test")])
    (root / "site_a" / "images" / "alias.png").symlink_to(root / "site_a" / "images" / "red.png")
    bench = load_folder_benchmark(root, image_size=8)
    assert [c.client_id for c in bench.clients] == ["site_a", "site_b"]
    assert tuple(bench.clients[0].train[0].image[0, 0]) == RED


def test_a_data_folder_reached_through_a_symlink_loads(valid, tmp_path):
    (tmp_path / "link").symlink_to(valid, target_is_directory=True)
    assert [c.client_id for c in load_folder_benchmark(tmp_path / "link", image_size=8).clients] == ["site_a",
                                                                                                     "site_b"]


def test_two_client_folders_that_are_one_folder_are_refused(valid):
    (valid / "site_c").symlink_to(valid / "site_a", target_is_directory=True)
    with pytest.raises(DataError, match=r"site_c: client folder is the same folder as .*site_a \(through a symlink\)"):
        load_folder_benchmark(valid, image_size=8)


# --- one rule for names and labels: compared ignoring case; '.' and '_' folders are not sites ---------


def test_split_names_are_compared_ignoring_case_and_surrounding_spaces(root):
    make_client(root, "site", rows=[row(split="Train"), row(split=" TEST ", image="images/blue.png")])
    site = load_folder_benchmark(root, image_size=8).clients[0]
    assert (len(site.train), len(site.test)) == (1, 1)


def test_answers_are_compared_ignoring_case_and_take_the_spelling_of_answers_txt(root):
    (root / "answers.txt").write_text("Red\nlight  blue\n")
    make_client(root, "site", rows=[row(answer=" RED "), row(split="test", image="images/blue.png",
                                                              answer="Light Blue")])
    bench = load_folder_benchmark(root, image_size=8)
    assert bench.answers == ("Red", "light blue")
    assert [ex.answer for ex in bench.clients[0].train + bench.clients[0].test] == ["Red", "light blue"]


def test_answers_that_differ_only_by_case_are_one_answer_listed_twice(root):
    (root / "answers.txt").write_text("red\nblue\nRed\n")
    make_client(root, "site")
    with pytest.raises(DataError, match=r"answers.txt line 3: duplicate answer 'Red' \(already on line 1 as 'red'; "
                                        "answers are compared ignoring case\\)"):
        load_folder_benchmark(root, image_size=8)


def test_column_names_and_json_keys_are_compared_ignoring_case(root):
    make_client(root, "site_a", fmt="csv", rows=two_split_rows())
    (root / "site_a" / "manifest.csv").write_text((root / "site_a" / "manifest.csv").read_text().replace(
        "image,question,answer,split", "Image, Question ,ANSWER,Split"))
    make_client(root, "site_b", rows=[{k.title(): v for k, v in r.items()} for r in two_split_rows()])
    site_a, site_b = load_folder_benchmark(root, image_size=8).clients
    assert [ex.answer for ex in site_a.train + site_a.test] == ["red", "blue"]
    assert [ex.answer for ex in site_b.train + site_b.test] == ["red", "blue"]


def test_two_json_keys_that_differ_only_by_case_are_a_duplicate(root):
    make_client(root, "site", rows=[{**row(), "Image": "images/blue.png"}, row(split="test")])
    with pytest.raises(DataError, match=r"line 1: duplicate key\(s\) 'Image', 'image'"):
        load_folder_benchmark(root, image_size=8)


@pytest.mark.parametrize("name", ["__pycache__", "_archive", ".ipynb_checkpoints"])
def test_folders_starting_with_a_dot_or_underscore_are_not_sites(valid, name):
    (valid / name).mkdir()
    bench = load_folder_benchmark(valid, image_size=8)
    assert [c.client_id for c in bench.clients] == ["site_a", "site_b"]
    assert bench.skipped_sites == ()


def test_a_skipped_folder_that_holds_a_manifest_is_listed_for_the_data_report(valid):
    make_client(valid, "_site_c")
    assert load_folder_benchmark(valid, image_size=8).skipped_sites == ("_site_c",)


@pytest.mark.parametrize("name", ["-site", "site a", "server", "KeyHolder"])
def test_any_other_folder_must_be_a_valid_site_id(valid, name):
    make_client(valid, name)
    with pytest.raises(DataError, match="client folder name must be a site id .* folders starting with '.' or '_' "
                                        "are skipped"):
        load_folder_benchmark(valid, image_size=8)


def test_site_folders_that_differ_only_by_case_are_refused(valid):
    make_client(valid, "Site_A")
    with pytest.raises(DataError, match="client folders 'Site_A' and 'site_a' differ only by case"):
        load_folder_benchmark(valid, image_size=8)
