"""Specification of image decoding: every mode PIL reads is converted without losing content, or refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feddat_secure.data.folder import load_folder_benchmark
from feddat_secure.data.images import BACKGROUND, load_image, to_rgb
from feddat_secure.data.vqa import DataError

WHITE = BACKGROUND


def saved(tmp_path: Path, image: Image.Image, name: str, **options) -> Path:
    path = tmp_path / name
    image.save(path, **options)
    return path


def row_of_pixels(tmp_path: Path, mode: str, values: list, name: str, **options) -> np.ndarray:
    """A 1-pixel-high image of ``values`` in ``mode``, saved, loaded at its own width: (width, 3) RGB."""
    image = Image.new(mode, (len(values), 1))
    image.putdata(values)
    loaded = load_image(saved(tmp_path, image, name, **options), image_size=len(values))
    return loaded[0]


def sixteen_bit(values: list[int]) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=np.uint16))


# --- 16-bit and float greyscale ------------------------------------------------------------------


def test_a_16_bit_greyscale_png_uses_its_whole_range_rather_than_turning_white(tmp_path):
    path = saved(tmp_path, sixteen_bit([0, 100 * 257, 128 * 257, 65535]), "scan.png")
    assert Image.open(path).mode == "I;16"  # what PIL opens a 16-bit PNG as
    grey = load_image(path, image_size=4)[0]
    assert grey[:, 0].tolist() == [0, 100, 128, 255]
    assert (grey == grey[:, :1]).all()  # grey stays grey: R = G = B


def test_16_bit_values_round_to_the_nearest_8_bit_level(tmp_path):
    grey = load_image(saved(tmp_path, sixteen_bit([128, 129, 65535 - 129]), "scan.png"), image_size=3)[0]
    assert grey[:, 0].tolist() == [0, 1, 254]  # 128/257 ≈ 0.498, 129/257 ≈ 0.502


def test_a_12_bit_image_stored_in_16_bits_is_scaled_by_the_16_bit_range_not_stretched(tmp_path):
    """One fixed scale for every file keeps intensities comparable between images (see docs/data.md)."""
    grey = load_image(saved(tmp_path, sixteen_bit([0, 1028, 2056, 4095]), "ct.png"), image_size=4)[0]
    assert grey[:, 0].tolist() == [0, 4, 8, 16]


def test_a_32_bit_integer_image_is_read_as_16_bit(tmp_path):
    grey = row_of_pixels(tmp_path, "I", [0, 257 * 3, 65535], "scan.tif")
    assert grey[:, 0].tolist() == [0, 3, 255]


def test_a_32_bit_integer_image_outside_the_16_bit_range_is_refused_naming_file_and_mode(tmp_path):
    with pytest.raises(DataError, match=r"scan.tif: image mode 'I' is read as 16-bit .* found 0 to 70000"):
        row_of_pixels(tmp_path, "I", [0, 70000], "scan.tif")


def test_a_float_image_in_0_to_1_is_scaled_to_8_bits(tmp_path):
    grey = row_of_pixels(tmp_path, "F", [0.0, 0.5, 1.0], "map.tif")
    assert grey[:, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("values", [[0.0, 2.0], [-0.5, 1.0], [0.0, float("nan")]])
def test_a_float_image_outside_0_to_1_is_refused_naming_file_and_mode(tmp_path, values):
    with pytest.raises(DataError, match=r"map.tif: image mode 'F' \(32-bit float\) must hold finite values in \[0, 1\]"
                                        r", found "):
        row_of_pixels(tmp_path, "F", values, "map.tif")


# --- transparency is composited onto white ---------------------------------------------------------


def test_transparent_rgba_pixels_show_the_white_background_not_black(tmp_path):
    rgb = row_of_pixels(tmp_path, "RGBA", [(0, 0, 0, 0), (200, 30, 30, 255), (255, 0, 0, 128)], "icon.png")
    assert tuple(rgb[0]) == WHITE
    assert tuple(rgb[1]) == (200, 30, 30)
    alpha = 128 / 255  # half-covered red over white
    expected = np.array([255, 255 * (1 - alpha), 255 * (1 - alpha)])
    assert np.abs(rgb[2] - expected).max() <= 1


def test_transparent_greyscale_with_alpha_shows_white(tmp_path):
    rgb = row_of_pixels(tmp_path, "LA", [(0, 0), (50, 255)], "grey.png")
    assert tuple(rgb[0]) == WHITE and tuple(rgb[1]) == (50, 50, 50)


def test_a_transparent_palette_entry_shows_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 30, 30, 200])
    image.putdata([0, 1])
    rgb = load_image(saved(tmp_path, image, "chart.png", transparency=0), image_size=2)[0]
    assert tuple(rgb[0]) == WHITE and tuple(rgb[1]) == (30, 30, 200)


def test_a_transparent_grey_level_shows_white(tmp_path):
    rgb = row_of_pixels(tmp_path, "L", [5, 6], "grey.png", transparency=5)
    assert tuple(rgb[0]) == WHITE and tuple(rgb[1]) == (6, 6, 6)


def test_a_transparent_16_bit_grey_level_shows_white(tmp_path):
    path = saved(tmp_path, sixteen_bit([1000, 257 * 9]), "scan.png", transparency=1000)
    rgb = load_image(path, image_size=2)[0]
    assert tuple(rgb[0]) == WHITE and tuple(rgb[1]) == (9, 9, 9)


# --- other modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "value"), [
    ("1", 1), ("L", 255), ("RGB", (255, 0, 0)), ("CMYK", (0, 255, 255, 0)), ("YCbCr", (76, 85, 255)),
    ("LAB", (136, 208, 195)), ("HSV", (0, 255, 255)), ("RGBX", (255, 0, 0, 0)),
])
def test_8_bit_colour_modes_convert_to_the_colour_they_hold(mode, value):
    rgb = np.asarray(to_rgb(Image.new(mode, (1, 1), value), "x.png"))[0, 0]
    expected = (255, 255, 255) if mode in ("1", "L") else (255, 0, 0)
    assert np.abs(rgb.astype(int) - expected).max() <= 12  # YCbCr and LAB round through another colour space


def test_a_mode_that_cannot_be_converted_is_refused_naming_file_and_mode():
    with pytest.raises(DataError, match=r"^scan.tif: image mode 'La' is not supported; save it as RGB"):
        to_rgb(Image.new("La", (2, 2)), "scan.tif")


def test_the_exif_orientation_is_applied_so_the_image_is_upright(tmp_path):
    image = Image.new("RGB", (2, 2), (30, 30, 200))
    image.putpixel((0, 0), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down: viewers rotate it by 180°
    rgb = load_image(saved(tmp_path, image, "photo.png", exif=exif), image_size=2)
    assert tuple(rgb[1, 1]) == (200, 30, 30) and tuple(rgb[0, 0]) == (30, 30, 200)


def test_the_folder_loader_names_the_manifest_line_the_file_and_the_mode(tmp_path):
    root = tmp_path / "data"
    site = root / "site"
    site.mkdir(parents=True)
    (root / "answers.txt").write_text("red\n")
    Image.new("RGB", (4, 4), (200, 30, 30)).save(site / "red.png")
    Image.fromarray(np.array([[0.0, 3.0]], dtype=np.float32)).save(site / "map.tif")
    rows = [{"image": "red.png", "question": "q ?", "answer": "red", "split": "train"},
            {"image": "map.tif", "question": "q ?", "answer": "red", "split": "test"}]
    (site / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"manifest.jsonl line 2: .*map.tif: image mode 'F' .* found 0 to 3;"):
        load_folder_benchmark(root, image_size=4)
