"""Seeded rendering of synthetic scenes: coloured shapes on a 2x2 grid, plus image domains.

Every function takes a ``numpy.random.Generator`` so the same seed gives byte-identical
images on every machine (PIL rasterisation and numpy arithmetic are deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 215),
    "white": (240, 240, 240),
}
# Colours and a shape the benchmarks never draw, for foundation pretraining only (``pretraining.FOUNDATIONS``): the
# ones easy-VQA's images use beyond the above, in CSS's values (easy-VQA names its colours by CSS name)
EXTRA_COLORS = {"black": (0, 0, 0), "brown": (165, 42, 42), "gray": (128, 128, 128), "teal": (0, 128, 128)}
EXTRA_SHAPES = ("rectangle",)
PALETTE = {**COLORS, **EXTRA_COLORS}
SIZES = ("small", "large")
DOMAINS = ("clean", "noisy", "low_contrast", "inverted", "blurred")
GRID = 2  # cells per side; positions are (row, col) on this grid


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class SceneStyle:
    """What a site's scenes look like: object vocabulary, layout and background."""

    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    min_objects: int = 1
    max_objects: int = 4
    background: tuple[int, int, int] = (0, 0, 0)
    jitter: float = 0.15  # fraction of a cell the object centre may move


def sample_objects(rng: np.random.Generator, style: SceneStyle) -> list[SceneObject]:
    """Objects in distinct cells with distinct (colour, shape), so every reference is unique."""
    count = int(rng.integers(style.min_objects, style.max_objects + 1))
    cells = rng.permutation(GRID * GRID)[:count]
    pairs = [(c, s) for c in style.colors for s in style.shapes]
    chosen = rng.permutation(len(pairs))[:count]
    return [
        SceneObject(
            shape=pairs[p][1],
            color=pairs[p][0],
            size=SIZES[int(rng.integers(len(SIZES)))],
            row=int(cell) // GRID,
            col=int(cell) % GRID,
        )
        for cell, p in zip(cells, chosen)
    ]


def render(
    objects: list[SceneObject], rng: np.random.Generator, style: SceneStyle, image_size: int
) -> np.ndarray:
    image = Image.new("RGB", (image_size, image_size), style.background)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in objects:
        jx, jy = rng.uniform(-style.jitter, style.jitter, size=2) * cell
        cx = (obj.col + 0.5) * cell + jx
        cy = (obj.row + 0.5) * cell + jy
        r = cell * (0.42 if obj.size == "large" else 0.24)
        _draw_shape(draw, obj.shape, cx, cy, r, PALETTE[obj.color])
    return np.asarray(image, dtype=np.uint8).copy()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "rectangle":  # wider than tall, so that it is not a square
        draw.rectangle((cx - r, cy - 0.55 * r, cx + r, cy + 0.55 * r), fill=fill)
    elif shape == "cross":
        w = r / 2.5
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def apply_domain(image: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Shift the image distribution the way a different camera or scanner would."""
    if domain == "clean":
        return image
    pixels = image.astype(np.float32)
    if domain == "noisy":
        pixels = pixels + rng.normal(0.0, 40.0, size=pixels.shape)
    elif domain == "low_contrast":
        pixels = 96.0 + 0.3 * pixels
    elif domain == "inverted":
        pixels = 255.0 - pixels
    elif domain == "blurred":
        blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=1.5))
        pixels = np.asarray(blurred, dtype=np.float32)
    else:
        raise ValueError(f"unknown image domain {domain!r}; known: {', '.join(DOMAINS)}")
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
