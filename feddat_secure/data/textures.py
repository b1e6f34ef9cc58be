"""Natural-texture backgrounds from scikit-image's bundled images (offline: they ship inside its wheel).

The ``texture`` benchmark (``synthetic.py``) draws its scenes on :data:`TEXTURES`: backgrounds no embedded foundation
saw in pretraining, so each site's domain shift is out of distribution for the backbone (``embedded`` was pretrained
on solid black backgrounds; ``embedded-v2`` also on :data:`PRETRAINING_TEXTURES`, a disjoint set of bundled images,
so it has learnt to find shapes on a textured background without having seen the benchmark's). Each example gets
its own crop of its image.
"""

from __future__ import annotations

import functools

import numpy as np
import skimage.data
from PIL import Image

# skimage.data's bundled images used as site domains: three grey natural textures, a colour photograph and a colour
# microscopy slide (immunohistochemistry)
TEXTURES = ("brick", "grass", "gravel", "coffee", "immunohistochemistry")
# eight other bundled images (photographs and a microscopy slide), for foundation pretraining only (``chelsea`` is
# ``cat``'s same image)
PRETRAINING_TEXTURES = ("astronaut", "camera", "chelsea", "coins", "hubble_deep_field", "moon", "retina", "rocket")
assert not set(TEXTURES) & set(PRETRAINING_TEXTURES), "the texture benchmark's images must stay unseen in pretraining"
CROP_FRACTION = 0.25  # a crop's side, as a fraction of the image's shorter side, before it is resized


@functools.cache
def texture_image(name: str) -> np.ndarray:
    """The bundled image ``name`` as uint8 RGB (H, W, 3); ValueError for a name in neither :data:`TEXTURES` nor
    :data:`PRETRAINING_TEXTURES`."""
    if name not in TEXTURES + PRETRAINING_TEXTURES:
        raise ValueError(f"unknown texture {name!r}; known: {', '.join(TEXTURES + PRETRAINING_TEXTURES)}")
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
