"""The embedded foundation checkpoint: local, offline, reproducible by the committed script."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from feddat_secure.data.digits import digits_benchmark
from feddat_secure.model.backbone import EMBEDDED_FOUNDATION, ModelLoadError, folder_digest, load_foundation
from feddat_secure.pretraining import PretrainSettings, pretrain


def test_embedded_foundation_is_a_small_pretrained_vilt(foundation):
    assert foundation.path == EMBEDDED_FOUNDATION
    assert (EMBEDDED_FOUNDATION / "model.safetensors").stat().st_size < 8 * 2**20
    assert foundation.model.config.model_type == "vilt"
    assert all(not p.requires_grad for p in foundation.model.parameters())
    random = load_foundation(random_init=True, seed=0).model
    trained, fresh = foundation.model.state_dict(), random.state_dict()
    assert not torch.equal(trained["encoder.layer.0.attention.attention.query.weight"],
                           fresh["encoder.layer.0.attention.attention.query.weight"])


def test_missing_or_incomplete_model_folders_are_named_in_the_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a local folder"):
        load_foundation(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no tokenizer_config.json"):
        load_foundation(tmp_path)


def test_digits_questions_are_covered_by_the_tokenizer(foundation):
    bench = digits_benchmark("digits", num_clients=5, train_per_client=20, test_per_client=5, image_size=32, seed=0)
    ids = foundation.tokenizer([e.question for c in bench.clients for e in c.train])["input_ids"]
    assert all(foundation.tokenizer.unk_token_id not in row for row in ids)


def test_pretraining_script_writes_a_loadable_checkpoint_deterministically(tmp_path):
    settings = dataclasses.replace(PretrainSettings(), steps=2, batch_size=4)
    pretrain(tmp_path / "a", settings, log=lambda _: None)
    pretrain(tmp_path / "b", settings, log=lambda _: None)
    assert folder_digest(tmp_path / "a") == folder_digest(tmp_path / "b")
    assert load_foundation(tmp_path / "a").image_size == settings.image_size
