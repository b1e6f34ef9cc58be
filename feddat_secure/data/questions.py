"""Templated question families over a scene, each with a fixed answer set.

The five families are the "functions" of the function-heterogeneity benchmark; every
template only uses words in :data:`WORDS`, so the locally built tokenizer covers them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .scenes import COLORS, GRID, SHAPES, SIZES, SceneObject

FAMILIES = ("attribute", "counting", "existence", "spatial", "logical")
YES_NO = ("yes", "no")
COUNTS = tuple(str(i) for i in range(GRID * GRID + 1))
FAMILY_ANSWERS: dict[str, tuple[str, ...]] = {
    "attribute": tuple(COLORS) + SHAPES + SIZES,
    "counting": COUNTS,
    "existence": YES_NO,
    "spatial": YES_NO,
    "logical": YES_NO,
}

QA = tuple[str, str]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def attribute(objects: list[SceneObject], rng: np.random.Generator, colors, shapes) -> QA:
    obj = objects[int(rng.integers(len(objects)))]
    same_shape = sum(o.shape == obj.shape for o in objects)
    same_color = sum(o.color == obj.color for o in objects)
    choice = int(rng.integers(3))
    if choice == 0 and same_shape == 1:
        return f"what color is the {obj.shape} ?", obj.color
    if choice <= 1 and same_color == 1:
        return f"what shape is the {obj.color} object ?", obj.shape
    return f"what size is the {obj.color} {obj.shape} ?", obj.size


def counting(objects: list[SceneObject], rng: np.random.Generator, colors, shapes) -> QA:
    choice = int(rng.integers(3))
    if choice == 0:
        return "how many objects are there ?", str(len(objects))
    if choice == 1:
        color = colors[int(rng.integers(len(colors)))]
        return f"how many {color} objects are there ?", str(sum(o.color == color for o in objects))
    shape = shapes[int(rng.integers(len(shapes)))]
    return f"how many {shape} objects are there ?", str(sum(o.shape == shape for o in objects))


def _random_name(objects, rng, colors, shapes, present: bool) -> str:
    if present:
        return objects[int(rng.integers(len(objects)))].name
    names = {o.name for o in objects}
    absent = [f"{c} {s}" for c in colors for s in shapes if f"{c} {s}" not in names]
    return absent[int(rng.integers(len(absent)))]


def existence(objects: list[SceneObject], rng: np.random.Generator, colors, shapes) -> QA:
    present = bool(rng.integers(2))
    return f"is there a {_random_name(objects, rng, colors, shapes, present)} ?", _yes(present)


def spatial(objects: list[SceneObject], rng: np.random.Generator, colors, shapes) -> QA:
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    if not pairs:  # a single object: ask about its position instead
        obj = objects[0]
        side = "left" if rng.integers(2) else "right"
        truth = obj.col == 0 if side == "left" else obj.col == GRID - 1
        return f"is the {obj.name} on the {side} ?", _yes(truth)
    a, b = pairs[int(rng.integers(len(pairs)))]
    relation = ("left of", "right of", "above", "below")[int(rng.integers(4))]
    truth = {
        "left of": a.col < b.col,
        "right of": a.col > b.col,
        "above": a.row < b.row,
        "below": a.row > b.row,
    }[relation]
    return f"is the {a.name} {relation} the {b.name} ?", _yes(truth)


def logical(objects: list[SceneObject], rng: np.random.Generator, colors, shapes) -> QA:
    first_present, second_present = bool(rng.integers(2)), bool(rng.integers(2))
    first = _random_name(objects, rng, colors, shapes, first_present)
    second = _random_name(objects, rng, colors, shapes, second_present)
    if rng.integers(2):
        return f"is there a {first} and a {second} ?", _yes(first_present and second_present)
    return f"is there a {first} or a {second} ?", _yes(first_present or second_present)


GENERATORS: dict[str, Callable[..., QA]] = {
    "attribute": attribute,
    "counting": counting,
    "existence": existence,
    "spatial": spatial,
    "logical": logical,
}

WORDS = sorted(
    set(
        "what color shape size is the object how many objects are there a and or on of "
        "left right above below ?".split()
    )
    | set(COLORS)
    | set(SHAPES)
    | set(SIZES)
    | set(YES_NO)
    | set(COUNTS)
)
