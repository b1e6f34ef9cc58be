"""easy-VQA (Zhou 2020), a third-party VQA dataset, split across sites by question type; offline.

The dataset ships inside the MIT-licensed ``easy-vqa`` wheel (https://github.com/vzhou842/easy-VQA): 4,000
training and 1,000 test images (64×64 PNG, one circle, rectangle or triangle in one of 8 colours on a plain
background) and 38,575 / 9,673 template questions about them, with 13 answers. Train and test images are
disjoint. Its questions are of three types, read off the answer: which shape ("what is the blue shape?"), which
colour ("what color is the shape?") and yes/no ("is there a red shape in the image?", "does the image not contain
a circle?").

The federated split is function heterogeneity, as the ``function`` and ``digits`` benchmarks: site ``i`` asks
only :data:`QUESTION_TYPES` ``[i mod 3]`` and answers over that type's own answers. The sites that ask one type
get disjoint, seeded draws of that type's questions (no question is held by two sites); :class:`DataError` when
the dataset has too few questions of a type for the sizes asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

from .images import load_image
from .vqa import Benchmark, ClientData, DataError, VQAExample

NAME = "easy-vqa"
SPLITS = ("train", "test")
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
YES_NO = ("no", "yes")
TYPE_ANSWERS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "yes/no": YES_NO}
QUESTION_TYPES = tuple(TYPE_ANSWERS)
# every word of the dataset's questions (the tokenizer splits "?" off); a foundation that should read easy-VQA's
# questions needs them in its vocabulary
WORDS: list[str] = sorted({"?", "a", "color", "contain", "does", "image", "in", "is", "no", "not", "of", "present",
                           "shape", "the", "there", "what", *SHAPES, *COLORS})


def question_type(answer: str) -> str:
    """``shape``, ``color`` or ``yes/no``: the type of a question with this answer (DataError for another)."""
    for kind, answers in TYPE_ANSWERS.items():
        if answer in answers:
            return kind
    raise DataError(f"easy-vqa: answer {answer!r} is none of the dataset's 13 answers")


def _package():
    """The installed ``easy_vqa`` module (DataError naming the package if the install lacks it)."""
    try:
        import easy_vqa
    except ImportError as error:  # a dependency of the package: only a broken install lacks it
        raise DataError("the easy-vqa benchmark needs the 'easy-vqa' package (pip install easy-vqa)") from error
    return easy_vqa


@cache
def _pools(split: str) -> dict[str, tuple[tuple[str, str, int], ...]]:
    """(question, answer, image id) of one split by question type, each in the dataset's order; read once."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    package = _package()
    texts, answers, image_ids = package.get_train_questions() if split == "train" else package.get_test_questions()
    pools: dict[str, list[tuple[str, str, int]]] = {kind: [] for kind in QUESTION_TYPES}
    for question in zip(texts, answers, (int(i) for i in image_ids), strict=True):
        pools[question_type(question[1])].append(question)
    return {kind: tuple(questions) for kind, questions in pools.items()}


@cache
def _image_paths(split: str) -> dict[int, str]:
    package = _package()
    return dict(package.get_train_image_paths() if split == "train" else package.get_test_image_paths())


@cache
def _image(split: str, image_id: int, image_size: int) -> np.ndarray:
    """One image as RGB uint8 (image_size, image_size, 3), shared read-only by every example that asks about it."""
    path = _image_paths(split).get(image_id)
    if path is None:
        raise DataError(f"easy-vqa {split}: a question refers to image {image_id}, which the package lacks")
    image = load_image(path, image_size)
    image.flags.writeable = False
    return image


def pool_of_type(split: str, kind: str) -> list[tuple[str, str, int]]:
    """The split's questions of one type, in the dataset's order."""
    if kind not in TYPE_ANSWERS:
        raise ValueError(f"unknown question type {kind!r}; known: {', '.join(QUESTION_TYPES)}")
    return list(_pools(split)[kind])


def _deal(split: str, kind: str, sites: Sequence[int], per_site: int, seed: int) -> dict[int, list[tuple]]:
    """Disjoint seeded draws of ``per_site`` questions of type ``kind`` for each of ``sites``."""
    pool = pool_of_type(split, kind)
    needed = per_site * len(sites)
    if needed > len(pool):
        raise DataError(f"easy-vqa: {len(sites)} site(s) ask {kind} questions and need {per_site} {split} examples "
                        f"each ({needed}), but the dataset has {len(pool)}; use fewer sites or examples per site")
    order = np.random.default_rng([seed, SPLITS.index(split), QUESTION_TYPES.index(kind)]).permutation(len(pool))
    return {site: [pool[int(k)] for k in order[rank * per_site:(rank + 1) * per_site]]
            for rank, site in enumerate(sites)}


def easy_vqa_benchmark(*, num_clients: int, train_per_client: int, test_per_client: int, image_size: int,
                       seed: int) -> Benchmark:
    """The easy-VQA benchmark: ``num_clients`` sites, site ``i`` asking question type ``i mod 3``; images resized
    (bilinear) to ``image_size``. The same seed gives the same examples; DataError when a type's questions do not
    suffice for its sites."""
    if num_clients < 1 or train_per_client < 1 or test_per_client < 1:
        raise ValueError("easy-vqa needs at least one site and one train and test example per site")
    kinds = [QUESTION_TYPES[index % len(QUESTION_TYPES)] for index in range(num_clients)]
    drawn: dict[str, dict[int, list[tuple]]] = {split: {} for split in SPLITS}
    for kind in dict.fromkeys(kinds):
        sites = [index for index, k in enumerate(kinds) if k == kind]
        for split, per_site in (("train", train_per_client), ("test", test_per_client)):
            drawn[split].update(_deal(split, kind, sites, per_site, seed))
    clients = []
    for index, kind in enumerate(kinds):
        splits = [[VQAExample(image=_image(split, image_id, image_size), question=text, answer=answer,
                              source=f"easy-vqa {split} image {image_id}")
                   for text, answer, image_id in drawn[split][index]] for split in SPLITS]
        clients.append(ClientData(f"client{index}", *splits, answers=TYPE_ANSWERS[kind]))
    return Benchmark(NAME, clients, tuple(sorted(a for answers in TYPE_ANSWERS.values() for a in answers)))
