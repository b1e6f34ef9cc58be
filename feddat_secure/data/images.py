"""Decoding an image file into the RGB ``uint8`` array the model reads, without silently losing content.

PIL's own ``convert("RGB")`` is wrong for two common kinds of file: 16-bit greyscale (mode ``I;16``,
typical of medical exports) is clipped to 0..255, so nearly every pixel becomes white, and a
transparent pixel keeps whatever colour is stored under it, usually black. Here every mode PIL
decodes is either converted correctly or refused with a :class:`DataError` naming the file and mode:

- 8-bit colour and greyscale modes (``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``,
  ``LAB``, ``HSV``) convert as PIL converts them;
- integer greyscale (``I;16`` and its byte orders, ``I``) is 16-bit: 0..65535 maps linearly onto
  0..255, and ``I`` values outside 0..65535 are refused;
- float greyscale (``F``) must hold finite values in [0, 1], which map linearly onto 0..255;
- transparency (an alpha channel, or a transparent colour or palette entry) is composited onto
  :data:`BACKGROUND`, white, as viewers conventionally show it;
- the EXIF orientation tag is applied, so the array is upright as viewers show the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .vqa import DataError

BACKGROUND = (255, 255, 255)  # what shows through transparent pixels
COLOUR_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
ALPHA_MODES = frozenset({"LA", "PA", "RGBA", "RGBa"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
SIXTEEN_BIT_MAX = 65535
SUPPORTED_MODES = COLOUR_MODES | ALPHA_MODES | SIXTEEN_BIT_MODES | {"F"}


def _greyscale_to_8bit(image: Image.Image, name: str) -> Image.Image:
    """A 16-bit or float greyscale image as 8-bit ``L`` (``LA`` when a grey level is marked transparent)."""
    values = np.asarray(image)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        if not np.isfinite(values).all() or low < 0 or high > 1:
            raise DataError(f"{name}: image mode 'F' (32-bit float) must hold finite values in [0, 1], found "
                            f"{low:g} to {high:g}; save it as 8-bit or 16-bit integers")
        scaled = values * 255.0
    else:
        if low < 0 or high > SIXTEEN_BIT_MAX:
            raise DataError(f"{name}: image mode {image.mode!r} is read as 16-bit greyscale (0..{SIXTEEN_BIT_MAX}), "
                            f"found {low:g} to {high:g}; save it as 8-bit or 16-bit")
        scaled = values / (SIXTEEN_BIT_MAX / 255)  # 257: an 8-bit value widened to 16 bits comes back exactly
    grey = np.rint(scaled).astype(np.uint8)
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):  # a PNG tRNS grey level, in the image's own 16-bit units
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1))
    return Image.fromarray(grey)


def to_rgb(image: Image.Image, name: str) -> Image.Image:
    """``image`` as 8-bit RGB with transparency composited onto :data:`BACKGROUND`.

    ``name`` (the file) is only for the :class:`DataError` raised for a mode that cannot be
    converted without losing content."""
    if image.mode not in SUPPORTED_MODES:
        raise DataError(f"{name}: image mode {image.mode!r} is not supported; save it as RGB, RGBA, "
                        "greyscale (8- or 16-bit) or palette")
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        image = _greyscale_to_8bit(image, name)
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path, image_size: int) -> np.ndarray:
    """RGB ``uint8`` (image_size, image_size, 3), upright and stretched to a square.

    Raises :class:`DataError` for a mode it cannot convert, and OSError-family errors for files PIL
    cannot decode. Only the first frame of a multi-frame file (animated GIF, multi-page TIFF) is read."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
    rgb = to_rgb(upright, str(path))
    resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()
