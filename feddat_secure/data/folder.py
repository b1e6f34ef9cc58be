"""Load a user's own federated VQA data from a folder.

Layout::

    root/
      answers.txt          one answer per line: the answer vocabulary (blank lines ignored)
      site_a/              one sub-folder per client; the folder name is the client id
        manifest.jsonl     {"image": ..., "question": ..., "answer": ..., "split": ...} per line
        images/...         image paths in the manifest are relative to the client folder
      site_b/
        manifest.csv       or a CSV with the header row: image,question,answer,split

Every problem raises :class:`DataError` naming the file, the line and what is wrong, because
these folders are written by hand and a silent skip would quietly change an experiment.

Names and labels follow one rule: column names, JSON keys, split names and answers are compared
ignoring case (after trimming and collapsing whitespace; answers take their spelling from
``answers.txt``), questions are lower-cased, and image paths are file paths (case as the file
system has it). Folders of the root whose names start with ``.`` or ``_`` are not sites; every
other folder is one, and its name must be a site id. Every file read must really lie inside its
folder: a symlink that leads out of the site's folder (or, for a site folder, out of the root) is
refused.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .images import load_image
from .vqa import Benchmark, ClientData, DataError, VQAExample

ANSWERS_FILE = "answers.txt"
MANIFESTS = ("manifest.jsonl", "manifest.csv")
COLUMNS = ("image", "question", "answer", "split")
SPLITS = ("train", "test")
MAX_CLIENT_ID = 64  # the message format's limit on party ids
_SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a site id names its party folder and files
RESERVED_IDS = ("server", "keyholder")  # in any case: site ids may not differ from another party's only by case
NOT_SITES = (".", "_")  # root folders starting with these are skipped: hidden, __pycache__, _archive

Row = tuple[int, dict[str, str]]  # (line number, field values)


def _read_text(path: Path) -> str:
    # utf-8-sig: spreadsheet programs often save CSV files with a byte-order mark.
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _lines(path: Path) -> list[str]:
    # Split on "\n" only: str.splitlines also breaks on U+2028 etc., which JSON strings may hold.
    return [line.rstrip("\r") for line in _read_text(path).split("\n")]


def _fold(text: str) -> str:
    """The form in which names and labels are compared: NFC, whitespace trimmed and collapsed, case folded."""
    return unicodedata.normalize("NFC", " ".join(text.split())).casefold()


def read_answers(path: Path) -> tuple[str, ...]:
    """The answer vocabulary, in file order (the order fixes the classifier's output indices).

    Answers are compared ignoring case, so two lines that differ only by case (or spacing) are the
    same answer listed twice; the spelling written here is the one every site's labels take."""
    if not path.is_file():
        raise DataError(f"{path}: {ANSWERS_FILE} not found (it lists the answer vocabulary, one per line)")
    first: dict[str, tuple[int, str]] = {}  # folded answer -> (line, spelling)
    for lineno, line in enumerate(_lines(path), start=1):
        answer = unicodedata.normalize("NFC", " ".join(line.split()))
        if not answer:
            continue
        if _fold(answer) in first:
            earlier, spelling = first[_fold(answer)]
            same = "" if spelling == answer else f" as {spelling!r}; answers are compared ignoring case"
            raise DataError(f"{path} line {lineno}: duplicate answer {answer!r} (already on line {earlier}{same})")
        first[_fold(answer)] = (lineno, answer)
    if not first:
        raise DataError(f"{path}: {ANSWERS_FILE} is empty (it must list at least one answer)")
    return tuple(spelling for _, spelling in first.values())


def _columns(path: Path, lineno: int, names: list[str], what: str) -> list[str]:
    """``names`` as the canonical column names (compared ignoring case), or a DataError listing every problem."""
    folded = [_fold(n) for n in names]
    duplicates = sorted({n for n, f in zip(names, folded) if folded.count(f) > 1})
    missing = [c for c in COLUMNS if c not in folded]
    unknown = sorted({n for n, f in zip(names, folded) if f not in COLUMNS})
    problems = []
    if missing:
        problems.append(f"missing {what}(s) {', '.join(map(repr, missing))}")
    if unknown:
        problems.append(f"unknown {what}(s) {', '.join(map(repr, unknown))}")
    if duplicates:
        problems.append(f"duplicate {what}(s) {', '.join(map(repr, duplicates))}")
    if problems:
        expected = ", ".join(COLUMNS)
        raise DataError(f"{path} line {lineno}: {'; '.join(problems)} (expected exactly: {expected}, in any case)")
    return folded


def _jsonl_rows(path: Path) -> Iterator[Row]:
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
        record = dict(zip(_columns(path, lineno, list(record), "key"), record.values()))
        for key in COLUMNS:
            if not isinstance(record[key], str):
                raise DataError(
                    f"{path} line {lineno}: key {key!r} must be a string, got {type(record[key]).__name__}"
                )
        yield lineno, record


def _csv_rows(path: Path) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header row: {','.join(COLUMNS)})") from None
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
    header = _columns(path, reader.line_num, header, "column")
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV ({exc})") from None
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise DataError(
                f"{path} line {reader.line_num}: expected {len(header)} fields "
                f"({','.join(header)}), got {len(values)}"
            )
        yield reader.line_num, dict(zip(header, values))


def normalise_question(question: str) -> str:
    """Lowercase (NFC) with single spaces, matching how the built-in benchmarks phrase questions."""
    return unicodedata.normalize("NFC", " ".join(question.lower().split()))


def _escape(path: Path, folder: Path) -> Path | None:
    """Where ``path`` really is (symlinks followed) when that is outside the real ``folder``; else None."""
    real = path.resolve()
    return None if real.is_relative_to(folder.resolve()) else real


def _outside(real: Path, folder: Path, kind: str) -> str:
    return f"resolves to {real}, outside the {kind} {folder.resolve()} (a symlink may not lead out of it)"


def _resolve_image(manifest: Path, lineno: int, client_dir: Path, name: str) -> Path:
    relative = Path(name)
    if not name.strip():
        raise DataError(f"{manifest} line {lineno}: empty image path")
    if relative.is_absolute() or ".." in relative.parts:
        raise DataError(
            f"{manifest} line {lineno}: image path {name!r} must be relative to the client folder "
            "and stay inside it"
        )
    path = client_dir / relative
    if not path.is_file():
        raise DataError(f"{manifest} line {lineno}: image file {name!r} not found (looked for {path})")
    if (real := _escape(path, client_dir)) is not None:
        raise DataError(f"{manifest} line {lineno}: image {name!r} {_outside(real, client_dir, 'client folder')}")
    return path.resolve()


class _ImageCache:
    """Decodes each file once per client: VQA data often asks several questions per image."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.arrays: dict[Path, np.ndarray] = {}

    def get(self, path: Path, manifest: Path, lineno: int, name: str) -> np.ndarray:
        if path not in self.arrays:
            try:
                self.arrays[path] = load_image(path, self.image_size)
            except DataError as exc:  # a mode that cannot be converted; the message names the file and mode
                raise DataError(f"{manifest} line {lineno}: {exc}") from None
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"{manifest} line {lineno}: cannot read image {name!r}: {exc}") from None
        return self.arrays[path].copy()  # a private array per example, as the generators give


def _find_manifest(client_dir: Path) -> Path:
    present = [client_dir / name for name in MANIFESTS if (client_dir / name).is_file()]
    if not present:
        raise DataError(f"{client_dir}: client folder has no {' or '.join(MANIFESTS)}")
    if len(present) > 1:
        raise DataError(f"{client_dir}: client folder has both {' and '.join(MANIFESTS)}; keep only one")
    if (real := _escape(present[0], client_dir)) is not None:
        raise DataError(f"{present[0]}: manifest {_outside(real, client_dir, 'client folder')}")
    return present[0]


def load_client(client_dir: Path, answers: tuple[str, ...], answers_path: Path, image_size: int) -> ClientData:
    manifest = _find_manifest(client_dir)
    rows = _jsonl_rows(manifest) if manifest.suffix == ".jsonl" else _csv_rows(manifest)
    spelling = {_fold(answer): answer for answer in answers}
    cache = _ImageCache(image_size)
    splits: dict[str, list[VQAExample]] = {split: [] for split in SPLITS}
    for lineno, row in rows:
        split = _fold(row["split"])
        if split not in SPLITS:
            raise DataError(f"{manifest} line {lineno}: split must be 'train' or 'test', got {row['split']!r}")
        question = normalise_question(row["question"])
        if not question:
            raise DataError(f"{manifest} line {lineno}: empty question")
        if not row["answer"].strip():
            raise DataError(f"{manifest} line {lineno}: empty answer")
        answer = spelling.get(_fold(row["answer"]))
        if answer is None:
            raise DataError(f"{manifest} line {lineno}: answer {row['answer'].strip()!r} is not listed in "
                            f"{answers_path}")
        path = _resolve_image(manifest, lineno, client_dir, row["image"])
        image = cache.get(path, manifest, lineno, row["image"])
        splits[split].append(VQAExample(image=image, question=question, answer=answer,
                                        source=f"{manifest.name} line {lineno}"))
    for split in SPLITS:
        if not splits[split]:
            raise DataError(f"{manifest}: no {split!r} examples (every client needs both a train and a test split)")
    seen = {ex.answer for examples in splits.values() for ex in examples}
    # The client's own label space, in the vocabulary's order.
    local = tuple(a for a in answers if a in seen)
    return ClientData(client_dir.name, splits["train"], splits["test"], local)


def _check_site_folders(root: Path, client_dirs: list[Path]) -> None:
    """Each folder is a valid site id, really inside ``root``, and no two are one site in disguise."""
    by_fold: dict[str, Path] = {}
    by_real: dict[Path, Path] = {}
    for client_dir in client_dirs:
        name = client_dir.name
        if len(name) > MAX_CLIENT_ID:
            raise DataError(f"{client_dir}: client folder name is longer than {MAX_CLIENT_ID} characters "
                            "(it becomes the site id in every message)")
        if not _SITE_ID.fullmatch(name) or name.casefold() in RESERVED_IDS:
            raise DataError(f"{client_dir}: client folder name must be a site id (letters, digits, '.', '_', '-', "
                            f"starting with a letter or digit) other than {' or '.join(RESERVED_IDS)}; "
                            f"folders starting with {' or '.join(map(repr, NOT_SITES))} are skipped")
        if (real := _escape(client_dir, root)) is not None:
            raise DataError(f"{client_dir}: client folder {_outside(real, root, 'data folder')}")
        if name.casefold() in by_fold:
            raise DataError(f"{root}: client folders {by_fold[name.casefold()].name!r} and {name!r} differ only by "
                            "case; site ids name folders and files on every party's disk, so they must differ "
                            "by more than case")
        if client_dir.resolve() in by_real:
            raise DataError(f"{client_dir}: client folder is the same folder as {by_real[client_dir.resolve()]} "
                            "(through a symlink); a site's data would be loaded twice")
        by_fold[name.casefold()] = by_real[client_dir.resolve()] = client_dir


def load_folder_benchmark(root: str | Path, *, image_size: int) -> Benchmark:
    """Every client folder under ``root``, sorted by name; folders starting with '.' or '_' are not sites
    (those that hold a manifest anyway are listed in ``skipped_sites`` for the data report)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: benchmark folder not found")
    answers_path = root / ANSWERS_FILE
    if answers_path.is_file() and (real := _escape(answers_path, root)) is not None:
        raise DataError(f"{answers_path}: {ANSWERS_FILE} {_outside(real, root, 'data folder')}")
    answers = read_answers(answers_path)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    client_dirs = [p for p in folders if not p.name.startswith(NOT_SITES)]
    skipped = tuple(p.name for p in folders
                    if p.name.startswith(NOT_SITES) and any((p / name).is_file() for name in MANIFESTS))
    if not client_dirs:
        raise DataError(f"{root}: no client folders (expected one sub-folder per client, each with a manifest)")
    _check_site_folders(root, client_dirs)
    clients = [load_client(d, answers, answers_path, image_size) for d in client_dirs]
    return Benchmark(f"folder:{root.resolve().name}", clients, answers, skipped_sites=skipped)
