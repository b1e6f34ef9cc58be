"""A VQA benchmark on real images: scikit-learn's bundled handwritten digits, offline.

Each image is a 2x2 grid of cells holding 1 to 4 handwritten digits (grey on black),
and every question is answered from the digit labels, so answers are exact. Two
federated splits exist:

- ``digits``: function heterogeneity, client ``i`` asks only question family ``i mod 5``;
- ``digits-skew``: all families, but each client's digit classes follow its own
  Dirichlet(0.5) label distribution, the usual label-skew setting of FL papers.

Train and test scenes draw from disjoint pools of sklearn images (first 80% / last 20%),
so a test image never reuses a handwritten digit seen in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from .vqa import Benchmark, ClientData, VQAExample

GRID = 2  # cells per side; cell k sits at row k // GRID, column k % GRID
MAX_DIGITS = GRID * GRID
TRAIN_FRACTION = 0.8
MIN_IMAGE_SIZE = 2 * 8  # every cell keeps at least the digit's native 8x8 resolution
SKEW_ALPHA = 0.5
SPLITS = ("train", "test")
BENCHMARKS = ("digits", "digits-skew")

FAMILIES = ("largest", "contains", "sum", "count", "position")
DIGITS = tuple(str(d) for d in range(10))
YES_NO = ("yes", "no")
FAMILY_ANSWERS: dict[str, tuple[str, ...]] = {
    "largest": DIGITS,
    "contains": YES_NO,
    "sum": tuple(str(s) for s in range(9 * MAX_DIGITS + 1)),
    "count": tuple(str(n) for n in range(1, MAX_DIGITS + 1)),
    "position": DIGITS,
}
_ROWS = ("top", "bottom")
_COLS = ("left", "right")

QA = tuple[str, str]


def answer_sort_key(answer: str) -> tuple[int, int, str]:
    """Numbers in numeric order first, then words, so "10" does not sort before "2"."""
    return (0, int(answer), "") if answer.isdigit() else (1, 0, answer)


def _sorted_answers(families: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({a for f in families for a in FAMILY_ANSWERS[f]}, key=answer_sort_key))


@dataclass(frozen=True)
class DigitPool:
    """One split's handwritten digits: 8x8 uint8 images (0..255), labels, sklearn indices."""

    split: str
    images: np.ndarray  # uint8, shape (N, 8, 8)
    labels: np.ndarray  # int, shape (N,)
    source_indices: np.ndarray  # position of each image in sklearn's load_digits()

    def indices_of(self, label: int) -> np.ndarray:
        return np.flatnonzero(self.labels == label)


@cache
def digit_pool(split: str) -> DigitPool:
    """The train or test pool; cached because load_digits parses a CSV on every call."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    bunch = load_digits()
    # sklearn values are integers 0..16; scale to the full uint8 range once, exactly.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    cut = int(len(images) * TRAIN_FRACTION)
    part = slice(0, cut) if split == "train" else slice(cut, len(images))
    source = np.arange(len(images))[part]
    pool = DigitPool(split, images[part].copy(), bunch.target[part].astype(np.int64), source)
    for array in (pool.images, pool.labels, pool.source_indices):
        array.flags.writeable = False  # shared by every caller through the cache
    return pool


@dataclass(frozen=True)
class DigitScene:
    """Which pool digits sit in which cells; questions are answered from this, not pixels."""

    split: str
    labels: tuple[int, ...]
    cells: tuple[int, ...]  # distinct, in 0..MAX_DIGITS-1
    pool_indices: tuple[int, ...]  # into digit_pool(split)

    def label_at(self, cell: int) -> int | None:
        return self.labels[self.cells.index(cell)] if cell in self.cells else None


def scene_from_labels(labels: Sequence[int], cells: Sequence[int] | None = None, *,
                      split: str = "train") -> DigitScene:
    """A scene with the first pool image of each given label, for tests and examples."""
    if not 1 <= len(labels) <= MAX_DIGITS:
        raise ValueError(f"a scene holds 1 to {MAX_DIGITS} digits, got {len(labels)}")
    cells = tuple(range(len(labels))) if cells is None else tuple(int(c) for c in cells)
    if len(cells) != len(labels) or len(set(cells)) != len(cells) or not set(cells) <= set(range(MAX_DIGITS)):
        raise ValueError(f"cells must be {len(labels)} distinct values in 0..{MAX_DIGITS - 1}, got {cells}")
    pool = digit_pool(split)
    picks = []
    for label in labels:
        candidates = pool.indices_of(int(label))
        if not len(candidates):
            raise ValueError(f"no digit {label!r} in the {split} pool")
        picks.append(int(candidates[0]))
    return DigitScene(split, tuple(int(x) for x in labels), cells, tuple(picks))


def sample_scene(pool: DigitPool, label_probs: np.ndarray, rng: np.random.Generator) -> DigitScene:
    """1 to 4 digits in distinct cells; each label drawn from ``label_probs``, then an image of it."""
    count = int(rng.integers(1, MAX_DIGITS + 1))
    cells = rng.permutation(MAX_DIGITS)[:count]
    labels = rng.choice(10, size=count, p=label_probs)
    picks = [int(rng.choice(pool.indices_of(int(label)))) for label in labels]
    return DigitScene(pool.split, tuple(int(x) for x in labels), tuple(int(c) for c in cells), tuple(picks))


def cell_size(image_size: int) -> int:
    return image_size // GRID


def render_digit(digit: np.ndarray, size: int) -> np.ndarray:
    """One 8x8 digit upscaled (bilinear) to size x size, uint8 grey."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(digit)).resize((size, size), Image.Resampling.BILINEAR))


def render_scene(scene: DigitScene, image_size: int) -> np.ndarray:
    """RGB uint8 (image_size, image_size, 3); each digit fills its cell, the rest is black.

    When image_size is odd the last row/column stays black, so every cell has the same size.
    """
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} (8 pixels per cell), got {image_size}")
    pool = digit_pool(scene.split)
    size = cell_size(image_size)
    grey = np.zeros((image_size, image_size), dtype=np.uint8)
    for cell, index in zip(scene.cells, scene.pool_indices):
        row, col = divmod(cell, GRID)
        grey[row * size:(row + 1) * size, col * size:(col + 1) * size] = render_digit(pool.images[index], size)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def largest(scene: DigitScene, rng: np.random.Generator) -> QA:
    return "what is the largest digit ?", str(max(scene.labels))


def contains(scene: DigitScene, rng: np.random.Generator) -> QA:
    """Asks about a present digit half the time; at most 4 of 10 are present, so "no" is always possible."""
    present = bool(rng.integers(2))
    pool = sorted(set(scene.labels)) if present else sorted(set(range(10)) - set(scene.labels))
    digit = pool[int(rng.integers(len(pool)))]
    return f"is there a {digit} ?", _yes(present)


def digit_sum(scene: DigitScene, rng: np.random.Generator) -> QA:
    return "what is the sum of the digits ?", str(sum(scene.labels))


def count(scene: DigitScene, rng: np.random.Generator) -> QA:
    return "how many digits are there ?", str(len(scene.labels))


def position(scene: DigitScene, rng: np.random.Generator) -> QA:
    """Names an occupied cell, so the answer is unique.

    "on the left/right" is used only when that column holds exactly one digit.
    """
    cell = scene.cells[int(rng.integers(len(scene.cells)))]
    row, col = divmod(cell, GRID)
    answer = str(scene.label_at(cell))
    alone_in_column = sum(c % GRID == col for c in scene.cells) == 1
    if alone_in_column and rng.integers(2):
        return f"what is the digit on the {_COLS[col]} ?", answer
    return f"what is the {_ROWS[row]} {_COLS[col]} digit ?", answer


GENERATORS: dict[str, Callable[[DigitScene, np.random.Generator], QA]] = {
    "largest": largest,
    "contains": contains,
    "sum": digit_sum,
    "count": count,
    "position": position,
}


def ask(family: str, scene: DigitScene, rng: np.random.Generator) -> QA:
    """One (question, answer) of the given family about ``scene``."""
    if family not in GENERATORS:
        raise ValueError(f"unknown question family {family!r}; known: {', '.join(FAMILIES)}")
    return GENERATORS[family](scene, rng)


_TEMPLATE_WORDS = (
    "what", "is", "the", "largest", "digit", "?", "there", "a", "sum", "of", "digits",
    "how", "many", "are", "on", *_ROWS, *_COLS,
)
WORDS: list[str] = sorted(set(_TEMPLATE_WORDS) | set(DIGITS))


def generate_examples(pool: DigitPool, families: Sequence[str], label_probs: np.ndarray, count: int,
                      image_size: int, rng: np.random.Generator) -> list[VQAExample]:
    examples = []
    for _ in range(count):
        scene = sample_scene(pool, label_probs, rng)
        family = families[int(rng.integers(len(families)))]
        question, answer = ask(family, scene, rng)
        examples.append(VQAExample(image=render_scene(scene, image_size), question=question, answer=answer))
    return examples


UNIFORM = np.full(10, 0.1)


def client_setup(name: str, index: int, rng: np.random.Generator) -> tuple[tuple[str, ...], np.ndarray]:
    """A client's question families and digit-class distribution (same for its train and test)."""
    if name == "digits":
        return (FAMILIES[index % len(FAMILIES)],), UNIFORM
    return FAMILIES, rng.dirichlet(np.full(10, SKEW_ALPHA))


def digits_benchmark(
    name: str, *, num_clients: int, train_per_client: int, test_per_client: int, image_size: int, seed: int
) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown digits benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} (8 pixels per cell), got {image_size}")
    train_pool, test_pool = digit_pool("train"), digit_pool("test")
    clients = []
    for index in range(num_clients):
        # One independent stream per client, so adding a client never changes the others.
        rng = np.random.default_rng([seed, index])
        families, probs = client_setup(name, index, rng)
        train = generate_examples(train_pool, families, probs, train_per_client, image_size, rng)
        test = generate_examples(test_pool, families, probs, test_per_client, image_size, rng)
        clients.append(ClientData(f"client{index}", train, test, _sorted_answers(families)))
    return Benchmark(name, clients, _sorted_answers(FAMILIES))
