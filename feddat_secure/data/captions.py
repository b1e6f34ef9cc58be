"""Captions of synthetic scenes, true or minimally false: the text of ViLT's image–text matching.

The foundation is pretrained on these captions (``feddat_secure.pretraining``), and the task benchmark's matching
sites finetune on them (``synthetic.py``), so both read one definition. Every word is in the foundation's
vocabulary (``CAPTION_WORDS`` with the scene words of ``scenes.py``).
"""

from __future__ import annotations

import numpy as np

from .scenes import GRID, SceneObject, SceneStyle, sample_objects

ROW_WORDS = ("top", "bottom")
COL_WORDS = ("left", "right")
CAPTION_WORDS = ["at", "and", *ROW_WORDS, *COL_WORDS]
assert GRID == 2, "captions name positions with top/bottom and left/right"


def describe(obj: SceneObject) -> str:
    """One object as a caption: "small red circle at top left"."""
    return f"{obj.size} {obj.color} {obj.shape} at {ROW_WORDS[obj.row]} {COL_WORDS[obj.col]}"


def perturb(obj: SceneObject, rng: np.random.Generator, style: SceneStyle) -> SceneObject:
    """A hard negative: the same object with exactly one attribute changed (shape, colour, size or position)."""
    field = ("shape", "color", "size", "position")[int(rng.integers(4))]
    if field == "shape":
        return SceneObject(_other(obj.shape, style.shapes, rng), obj.color, obj.size, obj.row, obj.col)
    if field == "color":
        return SceneObject(obj.shape, _other(obj.color, style.colors, rng), obj.size, obj.row, obj.col)
    if field == "size":
        return SceneObject(obj.shape, obj.color, "small" if obj.size == "large" else "large", obj.row, obj.col)
    return SceneObject(obj.shape, obj.color, obj.size, 1 - obj.row, 1 - obj.col)


def _other(value: str, choices: tuple[str, ...], rng: np.random.Generator) -> str:
    others = [c for c in choices if c != value]
    return others[int(rng.integers(len(others)))]


def caption(objects: list[SceneObject], rng: np.random.Generator, style: SceneStyle, *,
            exact: bool = False) -> tuple[str, bool]:
    """A caption of up to two of ``objects`` and whether it is true of the scene: true half of the time; otherwise
    an easy negative (the caption of another random scene) or a hard one (one attribute of one described object
    changed), equally often. A hard negative is always false (objects sit in distinct cells with distinct colour and
    shape); an easy one describes this scene by chance about once in 2,000 negatives. ``exact`` replaces such a
    negative with a hard one, so that every label is right (the benchmark's sites); without it the draws are those
    the foundation was pretrained on, where that rate is harmless noise."""
    described = [objects[i] for i in rng.permutation(len(objects))[:2]]
    true_ones = described
    matches = bool(rng.integers(2))
    if not matches and rng.integers(2):
        described = sample_objects(rng, style)[:2]
        if exact and {describe(o) for o in described} <= {describe(o) for o in objects}:
            described = list(true_ones)
            victim = int(rng.integers(len(described)))
            described[victim] = perturb(described[victim], rng, style)
    elif not matches:
        victim = int(rng.integers(len(described)))
        described[victim] = perturb(described[victim], rng, style)
    return " and ".join(describe(o) for o in described), matches
