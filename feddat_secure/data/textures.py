"""Natural-texture backgrounds from scikit-image's bundled images (offline: they ship inside its wheel).

The ``texture`` benchmark (``synthetic.py``) draws its scenes on these: a background the embedded foundation never
saw in pretraining (it was pretrained on solid backgrounds under the five ``scenes.DOMAINS``), so each site's
domain shift is out of distribution for the backbone. Each example gets its own crop of its site's image.
"""

from __future__ import annotations

import functools

import numpy as np
import skimage.data
from PIL import Image

# skimage.data's bundled images used as site domains: three grey natural textures, a colour photograph and a colour
# microscopy slide (immunohistochemistry)
TEXTURES = ("brick", "grass", "gravel", "coffee", "immunohistochemistry")
CROP_FRACTION = 0.25  # a crop's side, as a fraction of the image's shorter side, before it is resized


@functools.cache
def texture_image(name: str) -> np.ndarray:
    """The bundled image ``name`` as uint8 RGB (H, W, 3); ValueError for a name not in ``TEXTURES``."""
    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; known: {', '.join(TEXTURES)}")
    pixels = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    pixels.setflags(write=False)
    return pixels


def texture_crop(name: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of texture ``name``, resized to (image_size, image_size, 3) uint8."""
    pixels = texture_image(name)
    side = int(min(pixels.shape[:2]) * CROP_FRACTION)
    top = int(rng.integers(pixels.shape[0] - side + 1))
    left = int(rng.integers(pixels.shape[1] - side + 1))
    crop = Image.fromarray(pixels[top:top + side, left:left + side])
    return np.asarray(crop.resize((image_size, image_size), Image.Resampling.BILINEAR), dtype=np.uint8).copy()


def on_texture(scene: np.ndarray, background: tuple[int, int, int], texture: np.ndarray) -> np.ndarray:
    """``scene`` (rendered on the solid ``background``) with every background pixel replaced by ``texture``'s.
    Shapes are drawn without anti-aliasing in colours other than the background, so the mask is exact."""
    objects = np.any(scene != np.asarray(background, dtype=np.uint8), axis=2, keepdims=True)
    return np.where(objects, scene, texture)
