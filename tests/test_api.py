"""The Python API: a configuration from a file or a dict, a run, and a finished run's result used for inference,
from feddat-secure (``Predictor``) and from the Hugging Face libraries alone (PEFT, ``ViltProcessor``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import small_config
from PIL import Image
from safetensors.numpy import load_file

import feddat_secure
from feddat_secure import ConfigError, FeddatError, Predictor, ResultError
from feddat_secure.data import DataError, build_benchmark
from feddat_secure.data.batching import encode_split
from feddat_secure.predictor import save_head
from feddat_secure.training.local_model import LocalModel

pytestmark = pytest.mark.slow


def finished_run(tmp_path_factory, algorithm: str, head: str):
    config = small_config(tmp_path_factory.mktemp(algorithm), federation={"rounds": 1, "algorithm": algorithm},
                          model={"head": head})
    return config, feddat_secure.run(config, progress=False)


@pytest.fixture(scope="module")
def feddat_run(tmp_path_factory):
    """FedDAT with each site's own head (the paper's setting)."""
    return finished_run(tmp_path_factory, "feddat", "local")


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory):
    """FedAvg with a shared head: a global model that answers for every site."""
    return finished_run(tmp_path_factory, "fedavg", "shared")


def site_test_examples(config, foundation):
    """Each site's test examples, regenerated from the run's configuration as the run generated them."""
    benchmark = build_benchmark(config.data.benchmark, path=config.data.path, num_clients=config.data.num_clients,
                                train_per_client=config.data.train_per_client,
                                test_per_client=config.data.test_per_client, image_size=foundation.image_size,
                                seed=config.seed)
    return {client.client_id: client.test for client in benchmark.clients}


def accuracy(predictor: Predictor, examples) -> float:
    answers = predictor.predict([ex.image for ex in examples], [ex.question for ex in examples])
    return sum(answer == ex.answer for answer, ex in zip(answers, examples)) / len(examples)


def reported(result, site: str, metric: str) -> float:
    return result.history[-1]["clients"][site][metric]


# ------------------------------------------------------------------------------------- the Predictor


def test_a_feddat_site_predicts_with_its_dual_adapter_teacher_and_its_own_head(feddat_run, foundation):
    config, result = feddat_run
    for site, examples in site_test_examples(config, foundation).items():
        predictor = Predictor.from_run(result.run_dir, site=site)
        assert predictor.metric == "dat"
        assert predictor.answers == tuple(json.loads((result.run_dir / "parties" / site / "answers.json").read_text()))
        assert accuracy(predictor, examples) == reported(result, site, "dat")


def test_the_teachers_frozen_half_is_the_global_adapter_the_site_last_received(feddat_run):
    _, result = feddat_run
    global_adapter = load_file(str(result.run_dir / "global_adapter" / "adapter_model.safetensors"))
    for site in ("client0", "client1", "client2"):
        kept = load_file(str(result.run_dir / "parties" / site / "shared_adapter" / "adapter_model.safetensors"))
        assert kept.keys() == global_adapter.keys()
        assert all(np.array_equal(kept[key], global_adapter[key]) for key in kept)


def test_the_global_model_and_each_fedavg_site_reproduce_the_accuracy_the_run_reported(fedavg_run, foundation):
    config, result = fedavg_run
    global_model = Predictor.from_run(result.run_dir)
    assert global_model.site is None and global_model.metric == "shared"
    for site, examples in site_test_examples(config, foundation).items():
        assert accuracy(global_model, examples) == reported(result, site, "shared")
        assert accuracy(Predictor.from_run(result.run_dir, site=site), examples) == reported(result, site, "shared")


@pytest.mark.parametrize("algorithm, head", [("local", "local"), ("centralized", "shared")])
def test_a_quiet_run_prints_nothing_and_its_result_predicts_as_it_evaluated(tmp_path, capfd, caplog, foundation,
                                                                            algorithm, head):
    caplog.set_level(logging.INFO, logger="feddat_secure")
    config = small_config(tmp_path, federation={"rounds": 1, "algorithm": algorithm}, model={"head": head})
    result = feddat_secure.run(config, progress=False)
    assert capfd.readouterr() == ("", "")
    assert any(record.getMessage().startswith("round   1") for record in caplog.records)
    for site, examples in site_test_examples(config, foundation).items():
        predictor = Predictor.from_run(result.run_dir, site=None if algorithm == "centralized" else site)
        assert accuracy(predictor, examples) == reported(result, site, "shared")


def test_probabilities_rank_the_answers_and_prediction_leaves_the_callers_random_generator_alone(feddat_run,
                                                                                                   foundation):
    config, result = feddat_run
    examples = site_test_examples(config, foundation)["client1"]
    predictor = Predictor.from_run(result.run_dir, site="client1")
    images, questions = [ex.image for ex in examples], [ex.question for ex in examples]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    probabilities = predictor.predict_proba(images, questions)
    assert torch.equal(torch.get_rng_state(), state)
    assert probabilities.shape == (len(examples), len(predictor.answers))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert [predictor.answers[i] for i in probabilities.argmax(axis=1)] == predictor.predict(images, questions)
    assert np.array_equal(predictor.predict_proba(images, questions), probabilities)
    assert predictor.predict([], []) == [] and predictor.predict_proba([], []).shape == (0, len(predictor.answers))


def test_images_as_arrays_pil_images_or_files_are_read_exactly_as_training_read_them(feddat_run, foundation,
                                                                                    tmp_path):
    config, result = feddat_run
    examples = site_test_examples(config, foundation)["client0"][:6]
    predictor = Predictor.from_run(result.run_dir, site="client0")
    files = []
    for i, ex in enumerate(examples):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(ex.image).save(files[-1])
    questions = [ex.question for ex in examples]
    trained = encode_split(examples, foundation.tokenizer, {a: 0 for a in {ex.answer for ex in examples}},
                           foundation.max_text_length, foundation.image_size)
    for images in ([ex.image for ex in examples], [Image.fromarray(ex.image) for ex in examples], files,
                   [str(f) for f in files]):
        encoded = predictor.encode(images, questions)
        assert torch.equal(encoded["pixel_values"], trained.pixel_values)
        assert torch.equal(encoded["input_ids"], trained.input_ids)
        assert torch.equal(encoded["attention_mask"], trained.attention_mask)
    shouted = predictor.encode([examples[0].image], ["  " + questions[0].upper().replace(" ", "   ") + " "])
    assert torch.equal(shouted["input_ids"][0], trained.input_ids[0])  # normalised as the folder loader does


def test_a_larger_or_transparent_image_is_converted_as_a_data_folder_image_is(feddat_run, tmp_path):
    _, result = feddat_run
    predictor = Predictor.from_run(result.run_dir, site="client0")
    rgba = np.zeros((64, 48, 4), dtype=np.uint8)
    rgba[:32, :, :] = (200, 10, 10, 255)  # opaque red on top, transparent below
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    from_file = predictor.encode([tmp_path / "rgba.png"], ["is there a red circle ?"])["pixel_values"]
    from_array = predictor.encode([rgba], ["is there a red circle ?"])["pixel_values"]
    assert torch.equal(from_file, from_array)
    assert from_array.shape == (1, 3, predictor.image_size, predictor.image_size)
    assert torch.all(from_array[0, :, -1, :] == 1.0)  # the transparent half shows the white background


# ------------------------------------------------------------------- the saved result, without feddat-secure


def test_a_moved_run_folder_still_loads_with_peft_and_with_the_predictor(feddat_run, foundation, tmp_path):
    from peft import PeftModel
    from transformers import ViltModel

    config, result = feddat_run
    moved = tmp_path / "elsewhere" / "my-run"
    shutil.copytree(result.run_dir, moved)
    hidden = result.run_dir.with_name("hidden-while-moved")
    result.run_dir.rename(hidden)  # nothing may still point into the original folder
    try:
        for adapter in (moved / "global_adapter", moved / "parties" / "client2" / "client_adapter"):
            named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
            assert not os.path.isabs(named)
            base = ViltModel.from_pretrained(adapter / named, local_files_only=True)
            model = PeftModel.from_pretrained(base, adapter)
            saved = load_file(str(adapter / "adapter_model.safetensors"))
            loaded = {n.replace(".default", ""): p.detach().numpy() for n, p in model.named_parameters()
                      if "lora_" in n}
            assert loaded.keys() == saved.keys()
            assert all(np.array_equal(loaded[key], saved[key]) for key in saved)
        examples = site_test_examples(config, foundation)["client2"]
        assert accuracy(Predictor.from_run(moved, site="client2"), examples) == reported(result, "client2", "dat")
    finally:
        hidden.rename(result.run_dir)


def peft_alone(adapters: dict[str, object], head_folder, scale: float):
    """A run's model rebuilt from its saved folders with transformers and PEFT alone, as docs/api.md shows:
    the adapters active together, each LoRA scaling multiplied by ``scale``, and the head of ``head_folder``
    built from its documented layout. Returns (the processor, a function from inputs to probabilities)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import ViltModel, ViltProcessor

    (first, folder), *others = adapters.items()
    named = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(ViltModel.from_pretrained(folder / named), folder, adapter_name=first)
    for name, other in others:
        model.load_adapter(other, adapter_name=name)
    model.base_model.set_adapter(list(adapters))
    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name in adapters:
                layer.scaling[name] *= scale
    saved = load_file(str(head_folder / "head.safetensors"))
    weights = {key.removeprefix("head."): torch.from_numpy(value) for key, value in saved.items()}
    hidden, answers = weights["layers.0.weight"].shape[1], weights["layers.3.weight"].shape[0]
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 2 * hidden), torch.nn.LayerNorm(2 * hidden), torch.nn.GELU(),
                               torch.nn.Linear(2 * hidden, answers))
    head.load_state_dict({k.removeprefix("layers."): v for k, v in weights.items()})
    model.eval()

    @torch.no_grad()
    def probabilities(inputs):
        pooled = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"]).pooler_output
        return torch.softmax(head(pooled), dim=-1).numpy()

    return ViltProcessor.from_pretrained(folder), probabilities


def test_the_dual_adapter_teacher_rebuilt_with_peft_alone_gives_the_predictors_probabilities(feddat_run, foundation):
    config, result = feddat_run
    site = result.run_dir / "parties" / "client1"
    processor, probabilities = peft_alone({"client": site / "client_adapter", "global": site / "shared_adapter"},
                                          site, scale=0.5)
    examples = site_test_examples(config, foundation)["client1"]
    images, questions = [ex.image for ex in examples], [ex.question for ex in examples]
    inputs = processor(images=images, text=questions, padding="max_length", truncation=True, return_tensors="pt")
    expected = Predictor.from_run(result.run_dir, site="client1").predict_proba(images, questions)
    np.testing.assert_allclose(probabilities(inputs), expected, rtol=1e-5, atol=1e-6)


def test_the_global_model_rebuilt_with_peft_alone_gives_the_predictors_probabilities(fedavg_run, foundation):
    config, result = fedavg_run
    folder = result.run_dir / "global_adapter"
    processor, probabilities = peft_alone({"global": folder}, folder, scale=1.0)
    examples = site_test_examples(config, foundation)["client2"]
    images, questions = [ex.image for ex in examples], [ex.question for ex in examples]
    inputs = processor(images=images, text=questions, padding="max_length", truncation=True, return_tensors="pt")
    expected = Predictor.from_run(result.run_dir).predict_proba(images, questions)
    np.testing.assert_allclose(probabilities(inputs), expected, rtol=1e-5, atol=1e-6)


def test_vilt_processor_loads_offline_from_an_adapter_folder_and_prepares_inputs_as_training(
        fedavg_run, foundation, monkeypatch):
    from transformers import AutoProcessor, ViltProcessor

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is unreachable in this test")

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    config, result = fedavg_run
    folder = result.run_dir / "global_adapter"
    processor = ViltProcessor.from_pretrained(folder)
    assert isinstance(AutoProcessor.from_pretrained(folder), ViltProcessor)
    assert attempts == []
    examples = site_test_examples(config, foundation)["client0"]
    trained = encode_split(examples, foundation.tokenizer, {a: 0 for a in {ex.answer for ex in examples}},
                           foundation.max_text_length, foundation.image_size)
    inputs = processor(images=[ex.image for ex in examples], text=[ex.question for ex in examples],
                       padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], trained.pixel_values)
    assert torch.equal(inputs["input_ids"], trained.input_ids)
    assert torch.equal(inputs["attention_mask"], trained.attention_mask)
    assert torch.all(inputs["pixel_mask"] == 1)
    larger = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # resized with training's filter
    assert torch.equal(processor(images=[larger], text=["x"], return_tensors="pt")["pixel_values"],
                       Predictor.from_run(result.run_dir).encode([larger], ["x"])["pixel_values"])


def test_a_saved_head_describes_its_layout_in_head_json(foundation, lora, tmp_path):
    model = LocalModel(foundation, lora, ("shared",), ("shared",), num_answers=3, seed=0)
    save_head(model.head_state(), ("yes", "no", "maybe"), tmp_path)
    described = json.loads((tmp_path / "head.json").read_text())
    weights = load_file(str(tmp_path / "head.safetensors"))
    assert described["answers"] == json.loads((tmp_path / "answers.json").read_text()) == ["yes", "no", "maybe"]
    assert described["hidden_size"] == foundation.hidden_size and described["num_answers"] == 3
    assert described["layers"] == {key: list(value.shape) for key, value in weights.items()}
    assert described["layers"]["head.layers.3.weight"] == [3, 2 * foundation.hidden_size]
    with pytest.raises(ValueError, match="3 outputs for 2 answers"):
        save_head(model.head_state(), ("yes", "no"), tmp_path / "wrong")


# ------------------------------------------------------------------------------------------------ errors


def copy_of(result, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(result.run_dir, target)
    return target


def remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("damage, site, message", [
    (lambda run: remove(run), "client0", "is not a run folder (it has no config.toml)"),
    (lambda run: remove(run / "manifest.json"), "client0", "did not finish (it has no manifest.json)"),
    (lambda run: None, "client9", "has no site 'client9' (its sites: client0, client1, client2)"),
    (lambda run: None, "server", "has no site 'server'"),
    (lambda run: None, None, "has no global model with a head (feddat, model.head = 'local'"),
    (lambda run: remove(run / "parties/client1/client_adapter"), "client1", "client_adapter/adapter_model.safetensors' "
                                                                             "is missing"),
    (lambda run: remove(run / "parties/client1/answers.json"), "client1", "answers.json' is missing"),
    (lambda run: remove(run / "parties/client1/base_model"), "client1", "base_model' named by"),
    (lambda run: (run / "parties/client1/base_model/config.json").write_text("{}"), "client1",
     "is not the one run"),
])
def test_a_result_that_cannot_be_used_is_refused_in_one_line_naming_the_problem(feddat_run, tmp_path, damage, site,
                                                                               message):
    _, result = feddat_run
    run = copy_of(result, tmp_path)
    damage(run)
    with pytest.raises(ResultError) as refused:
        Predictor.from_run(run, site=site)
    assert message in str(refused.value)
    assert isinstance(refused.value, FeddatError) and "\n" not in str(refused.value) and "--" not in str(refused.value)


def test_bad_inputs_are_refused_with_a_message_naming_the_input(feddat_run, tmp_path):
    _, result = feddat_run
    predictor = Predictor.from_run(result.run_dir, site="client0")
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(DataError, match=r"image 1 \('.*no-such\.png'\): cannot read it"):
        predictor.predict([image, tmp_path / "no-such.png"], ["a ?", "b ?"])
    with pytest.raises(DataError, match="image 0 .*not-an-image.png'\\): cannot read it"):
        predictor.predict([tmp_path / "not-an-image.png"], ["a ?"])
    with pytest.raises(DataError, match=r"image 0: an array of dtype int64 and shape \(32, 32, 3\) is not an image"):
        predictor.predict([image.astype(np.int64)], ["a ?"])
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        predictor.predict([image, image], ["a ?"])
    with pytest.raises(TypeError, match="not one string"):
        predictor.predict([image], "is there a red circle ?")
    with pytest.raises(TypeError, match="image 0: expected a numpy array, a PIL image or a file path, got int"):
        predictor.predict([3], ["a ?"])


# ---------------------------------------------------------------------------------- configuration and import


def test_a_configuration_loads_from_a_toml_file_or_from_a_dict_of_its_tables(tmp_path):
    (tmp_path / "run.toml").write_text('name = "x"\n[federation]\nalgorithm = "fedavg"\n[training]\nlocal_steps = 4\n')
    from_file = feddat_secure.load_config(tmp_path / "run.toml")
    from_dict = feddat_secure.load_config({"name": "x", "federation": {"algorithm": "fedavg"},
                                           "training": {"local_steps": 4}})
    assert from_file == from_dict == feddat_secure.load_config(str(tmp_path / "run.toml"))
    assert feddat_secure.load_config(from_dict) is from_dict
    for bad, message in [({"training": {"learning_rate": float("nan")}}, "key 'training.learning_rate'"),
                         ({"trainig": {}}, "unknown key 'trainig'"), (tmp_path / "none.toml", "does not exist"),
                         (42, "not a int")]:
        with pytest.raises(ConfigError, match=message) as refused:
            feddat_secure.load_config(bad)
        assert "\n" not in str(refused.value)


def test_the_package_exports_its_api_without_loading_a_deep_learning_library_until_used(tmp_path):
    code = """
import json, sys
import feddat_secure
config = feddat_secure.load_config({"name": "light"})
light = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
predictor = feddat_secure.Predictor
print(json.dumps({"light": light, "name": config.name, "all": sorted(feddat_secure.__all__),
                  "loaded": "torch" in sys.modules, "predictor": predictor.__module__}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["light"] == [] and result["name"] == "light"
    assert result["all"] == sorted(["ConfigError", "FeddatError", "Predictor", "ResultError", "RunConfig",
                                    "RunResult", "__version__", "load_config", "run"])
    assert result["loaded"] and result["predictor"] == "feddat_secure.predictor"
