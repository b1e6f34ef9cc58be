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
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .vqa import Benchmark, ClientData, DataError, VQAExample

ANSWERS_FILE = "answers.txt"
MANIFESTS = ("manifest.jsonl", "manifest.csv")
COLUMNS = ("image", "question", "answer", "split")
SPLITS = ("train", "test")
MAX_CLIENT_ID = 64  # the message format's limit on party ids
_SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a site id is a file name in keys/ and audit/
RESERVED_IDS = ("server", "keyholder")

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


def read_answers(path: Path) -> tuple[str, ...]:
    """The answer vocabulary, in file order (the order fixes the classifier's output indices)."""
    if not path.is_file():
        raise DataError(f"{path}: {ANSWERS_FILE} not found (it lists the answer vocabulary, one per line)")
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(_lines(path), start=1):
        answer = line.strip()
        if not answer:
            continue
        if answer in first_line:
            raise DataError(
                f"{path} line {lineno}: duplicate answer {answer!r} (already on line {first_line[answer]})"
            )
        first_line[answer] = lineno
    if not first_line:
        raise DataError(f"{path}: {ANSWERS_FILE} is empty (it must list at least one answer)")
    return tuple(first_line)


def _check_columns(path: Path, lineno: int, names: list[str], what: str) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    missing = [c for c in COLUMNS if c not in names]
    unknown = sorted(set(names) - set(COLUMNS))
    problems = []
    if missing:
        problems.append(f"missing {what}(s) {', '.join(map(repr, missing))}")
    if unknown:
        problems.append(f"unknown {what}(s) {', '.join(map(repr, unknown))}")
    if duplicates:
        problems.append(f"duplicate {what}(s) {', '.join(map(repr, duplicates))}")
    if problems:
        expected = ", ".join(COLUMNS)
        raise DataError(f"{path} line {lineno}: {'; '.join(problems)} (expected exactly: {expected})")


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
        _check_columns(path, lineno, list(record), "key")
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
    header = [name.strip() for name in header]
    _check_columns(path, reader.line_num, header, "column")
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
    """Lowercase with single spaces, matching how the built-in benchmarks phrase questions."""
    return " ".join(question.lower().split())


def load_image(path: Path, image_size: int) -> np.ndarray:
    """RGB uint8 (image_size, image_size, 3); raises OSError-family errors for unreadable files."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


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
    return path


class _ImageCache:
    """Decodes each file once per client: VQA data often asks several questions per image."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.arrays: dict[Path, np.ndarray] = {}

    def get(self, path: Path, manifest: Path, lineno: int, name: str) -> np.ndarray:
        if path not in self.arrays:
            try:
                self.arrays[path] = load_image(path, self.image_size)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataError(f"{manifest} line {lineno}: cannot read image {name!r}: {exc}") from None
        return self.arrays[path].copy()  # a private array per example, as the generators give


def _find_manifest(client_dir: Path) -> Path:
    present = [client_dir / name for name in MANIFESTS if (client_dir / name).is_file()]
    if not present:
        raise DataError(f"{client_dir}: client folder has no {' or '.join(MANIFESTS)}")
    if len(present) > 1:
        raise DataError(f"{client_dir}: client folder has both {' and '.join(MANIFESTS)}; keep only one")
    return present[0]


def load_client(client_dir: Path, answers: tuple[str, ...], answers_path: Path, image_size: int) -> ClientData:
    manifest = _find_manifest(client_dir)
    rows = _jsonl_rows(manifest) if manifest.suffix == ".jsonl" else _csv_rows(manifest)
    known = set(answers)
    cache = _ImageCache(image_size)
    splits: dict[str, list[VQAExample]] = {split: [] for split in SPLITS}
    for lineno, row in rows:
        split = row["split"].strip()
        if split not in SPLITS:
            raise DataError(f"{manifest} line {lineno}: split must be 'train' or 'test', got {row['split']!r}")
        question = normalise_question(row["question"])
        if not question:
            raise DataError(f"{manifest} line {lineno}: empty question")
        answer = row["answer"].strip()
        if not answer:
            raise DataError(f"{manifest} line {lineno}: empty answer")
        if answer not in known:
            raise DataError(f"{manifest} line {lineno}: answer {answer!r} is not listed in {answers_path}")
        path = _resolve_image(manifest, lineno, client_dir, row["image"])
        image = cache.get(path, manifest, lineno, row["image"])
        splits[split].append(VQAExample(image=image, question=question, answer=answer))
    for split in SPLITS:
        if not splits[split]:
            raise DataError(f"{manifest}: no {split!r} examples (every client needs both a train and a test split)")
    seen = {ex.answer for examples in splits.values() for ex in examples}
    # The client's own label space, in the vocabulary's order.
    local = tuple(a for a in answers if a in seen)
    return ClientData(client_dir.name, splits["train"], splits["test"], local)


def load_folder_benchmark(root: str | Path, *, image_size: int) -> Benchmark:
    """Every client folder under ``root`` (sorted by name; hidden folders are skipped)."""
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: benchmark folder not found")
    answers_path = root / ANSWERS_FILE
    answers = read_answers(answers_path)
    client_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not client_dirs:
        raise DataError(f"{root}: no client folders (expected one sub-folder per client, each with a manifest)")
    for client_dir in client_dirs:
        if len(client_dir.name) > MAX_CLIENT_ID:
            raise DataError(f"{client_dir}: client folder name is longer than {MAX_CLIENT_ID} characters "
                            "(it becomes the site id in every message)")
        if not _SITE_ID.fullmatch(client_dir.name) or client_dir.name in RESERVED_IDS:
            raise DataError(f"{client_dir}: client folder name must be a site id (letters, digits, '.', '_', '-', "
                            f"starting with a letter or digit) other than {' or '.join(RESERVED_IDS)}")
    clients = [load_client(d, answers, answers_path, image_size) for d in client_dirs]
    return Benchmark(f"folder:{root.resolve().name}", clients, answers)
