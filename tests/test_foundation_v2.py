"""The second embedded foundation, ``embedded-v2``: its recipe keeps the texture benchmark's images unseen, draws
easy-VQA's colours and shape, and leaves the first foundation's recipe untouched."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import background_kinds, recipe_draws_digest, small_config

from feddat_secure.cli import build_parser
from feddat_secure.config import config_from_dict
from feddat_secure.data.easy_vqa import WORDS as EASY_VQA_WORDS
from feddat_secure.data.scenes import PALETTE, SceneObject
from feddat_secure.data.textures import PRETRAINING_TEXTURES, TEXTURES
from feddat_secure.federation.runner import run
from feddat_secure.model.adapters import portable_base_model
from feddat_secure.model.backbone import (
    EMBEDDED_FOUNDATION,
    EMBEDDED_FOUNDATIONS,
    folder_digest,
    load_foundation,
    resolve_model_path,
)
from feddat_secure.predictor import Predictor
from feddat_secure.pretraining import FOUNDATIONS, caption_pair, pretrain, scene_background, vocabulary


@pytest.fixture(scope="module")
def v2():
    return load_foundation("embedded-v2")


def test_every_embedded_foundation_has_its_recipe_and_its_committed_checkpoint():
    assert set(FOUNDATIONS) == set(EMBEDDED_FOUNDATIONS)
    assert resolve_model_path(None) == resolve_model_path("embedded") == EMBEDDED_FOUNDATION
    assert resolve_model_path("embedded-v2") == EMBEDDED_FOUNDATIONS["embedded-v2"] != EMBEDDED_FOUNDATION
    for name, folder in EMBEDDED_FOUNDATIONS.items():
        assert (folder / "model.safetensors").stat().st_size < 8 * 2**20, name
    assert folder_digest(EMBEDDED_FOUNDATIONS["embedded"]) != folder_digest(EMBEDDED_FOUNDATIONS["embedded-v2"])


def test_v2_has_the_first_foundations_shape_and_a_vocabulary_that_adds_easy_vqa_words(foundation, v2):
    assert v2.model.config.hidden_size == foundation.model.config.hidden_size
    assert v2.model.config.num_hidden_layers == foundation.model.config.num_hidden_layers
    assert (v2.image_size, v2.max_text_length) == (foundation.image_size, foundation.max_text_length)
    old, new = set(foundation.tokenizer.get_vocab()), set(v2.tokenizer.get_vocab())
    assert old < new and set(EASY_VQA_WORDS) <= new
    assert sorted(new - old) == sorted(set(EASY_VQA_WORDS) - old)
    assert all(not p.requires_grad for p in v2.model.parameters())


def test_a_run_on_it_pins_it_and_its_saved_site_model_loads_on_its_copy(tmp_path):
    config = small_config(tmp_path, model={"path": "embedded-v2"}, federation={"rounds": 1},
                          training={"local_steps": 1})
    result = run(config, progress=False, echo=lambda _: None)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["base_model"]["sha256"] == folder_digest(EMBEDDED_FOUNDATIONS["embedded-v2"])
    copies = sorted(result.run_dir.rglob("base_model"))
    assert copies and all(folder_digest(copy) == manifest["base_model"]["sha256"] for copy in copies)
    predictor = Predictor.from_run(result.run_dir, site="client0")  # refuses a base model of another digest
    assert len(predictor.predict([np.zeros((32, 32, 3), np.uint8)], ["is there a teal shape ?"])) == 1


def test_the_command_line_offers_every_recipe():
    pretrain = build_parser()._subparsers._group_actions[0].choices["pretrain-foundation"]
    offered = next(action for action in pretrain._actions if action.dest == "foundation").choices
    assert set(offered) == set(FOUNDATIONS)
    assert config_from_dict({"model": {"path": "embedded-v2"}}).model.path == "embedded-v2"


def test_the_texture_benchmarks_images_are_never_pretraining_backgrounds():
    assert FOUNDATIONS["embedded-v2"].background_textures == PRETRAINING_TEXTURES
    assert not set(TEXTURES) & set(PRETRAINING_TEXTURES)
    assert FOUNDATIONS["embedded"].background_textures == ()


# SHA-256 over 50 draws of ``caption_pair`` (image, caption, label, cells) from ``default_rng(0)`` with the first
# recipe, computed at 244d67b, before the second recipe existed
FIRST_RECIPE_DRAWS = "70ece33fe2720c51525dab832964327e7ae105063afc5b93edbefc3e21689609"


def test_the_first_recipe_is_unchanged_by_the_second(foundation):
    """``embedded``'s recipe still draws the scenes and captions it was pretrained on, byte for byte, and gives the
    vocabulary of its committed checkpoint (its reproduction is not moved by v2's)."""
    recipe = FOUNDATIONS["embedded"]
    assert recipe_draws_digest(recipe) == FIRST_RECIPE_DRAWS
    words = set(foundation.tokenizer.get_vocab()) - set(foundation.tokenizer.all_special_tokens)
    assert set(vocabulary(recipe)) == words
    assert "teal" not in recipe.style.colors and "rectangle" not in recipe.style.shapes
    assert {"black", "brown", "gray", "teal"} <= set(FOUNDATIONS["embedded-v2"].style.colors)
    assert "rectangle" in FOUNDATIONS["embedded-v2"].style.shapes


def test_a_solid_background_is_never_close_to_an_objects_colour():
    """A black circle must not be drawn on black: the caption would name an object the image does not show."""
    rng = np.random.default_rng(0)
    for colour in ("black", "white", "gray", "yellow"):
        objects = [SceneObject("circle", colour, "large", 0, 0)]
        for _ in range(60):
            background = scene_background(objects, rng, PRETRAINING_TEXTURES, 32)
            assert background.shape == (32, 32, 3) and background.dtype == np.uint8
            if len(np.unique(background.reshape(-1, 3), axis=0)) == 1:  # a solid colour, not a photograph's crop
                assert np.linalg.norm(background[0, 0].astype(float) - PALETTE[colour]) >= 99.5


def test_backgrounds_are_black_a_random_colour_or_a_photograph_about_a_third_of_the_time_each():
    kinds = background_kinds(PRETRAINING_TEXTURES, 600, seed=1)
    assert set(kinds) == {"black", "colour", "photograph"}
    assert all(150 <= count <= 250 for count in kinds.values()), kinds


def test_v2_scenes_show_no_undrawn_background_pixel():
    """The background is drawn in a colour no object has, then every such pixel is replaced."""
    recipe = FOUNDATIONS["embedded-v2"]
    rng = np.random.default_rng(1)
    for _ in range(40):
        image, _, _, cells = caption_pair(rng, recipe.style, 32, recipe.background_textures)
        assert image.shape == (32, 32, 3) and not np.all(image == (1, 2, 3), axis=2).any()
        assert cells.shape == (4, 3) and cells[:, 1].max() <= len(recipe.style.colors)


def test_the_v2_recipe_is_deterministic(tmp_path):
    settings = dataclasses.replace(FOUNDATIONS["embedded-v2"], steps=2, batch_size=4)
    pretrain(tmp_path / "a", settings, log=lambda _: None)
    pretrain(tmp_path / "b", settings, log=lambda _: None)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert set(EASY_VQA_WORDS) <= set(load_foundation(tmp_path / "a").tokenizer.get_vocab())


def test_an_adapter_saved_on_v2_carries_its_own_copy_of_it_as_on_the_first(tmp_path):
    """Both live inside the installed package, a path another machine does not have."""
    for name, folder in EMBEDDED_FOUNDATIONS.items():
        adapter = tmp_path / name / "shared_adapter"
        assert portable_base_model(folder, adapter) == "../base_model"
        assert folder_digest(tmp_path / name / "base_model") == folder_digest(folder)
