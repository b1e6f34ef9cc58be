"""Whole runs: 2 clients, 2 rounds, through the same code path as ``feddat-secure run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import small_config
from peft import PeftModel
from safetensors.numpy import load_file

from feddat_secure.config import ConfigError
from feddat_secure.federation.runner import run
from feddat_secure.model.backbone import load_foundation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def feddat_run(tmp_path_factory):
    config = small_config(tmp_path_factory.mktemp("feddat"), model={"head": "local"})
    return config, run(config, progress=False, echo=lambda _: None)


def test_feddat_run_writes_every_output(feddat_run):
    _, result = feddat_run
    folder = result.run_dir
    for name in ("config.toml", "metrics.jsonl", "manifest.json", "global_adapter/adapter_model.safetensors",
                 "global_adapter/adapter_config.json", "roster.json",
                 "parties/client0/client_adapter/adapter_model.safetensors",
                 "parties/client1/shared_adapter/adapter_config.json", "parties/client0/head.safetensors",
                 "parties/client0/answers.json", "parties/client0/head.json", "provenance.json",
                 "parties/server/server.audit.jsonl", "parties/server/global_state.safetensors"):
        assert (folder / name).is_file(), name
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert set(records[-1]["clients"]["client0"]) == {"dat", "shared", "client"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"base_model", "data", "config", "files"} <= set(manifest)
    assert "global_adapter/adapter_model.safetensors" in manifest["files"]
    assert "parties/client0/client_adapter/adapter_model.safetensors" in manifest["files"]


def test_local_heads_answer_over_their_own_sites_answer_set(feddat_run):
    _, result = feddat_run
    answers = json.loads((result.run_dir / "parties/client2/answers.json").read_text())
    assert answers == ["no", "yes"]  # client2 asks existence questions only
    head = load_file(str(result.run_dir / "parties/client2/head.safetensors"))
    assert head["head.layers.3.weight"].shape[0] == 2


def test_global_adapter_loads_with_plain_peft_and_matches_the_saved_weights(feddat_run):
    _, result = feddat_run
    base = load_foundation().model
    model = PeftModel.from_pretrained(base, str(result.run_dir / "global_adapter"))
    saved = load_file(str(result.run_dir / "global_adapter" / "adapter_model.safetensors"))
    loaded = {n.replace(".default", ""): p.detach().numpy() for n, p in model.named_parameters() if "lora_" in n}
    assert set(loaded) == set(saved)
    for name, value in saved.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert any(np.abs(v).sum() > 0 for n, v in saved.items() if "lora_B" in n)
    foundation = load_foundation()
    inputs = foundation.tokenizer(["is there a red circle ?"], return_tensors="pt")
    pixels = torch.zeros(1, 3, foundation.image_size, foundation.image_size)
    with torch.no_grad():
        adapted = model(**inputs, pixel_values=pixels).pooler_output
        plain = foundation.model(**inputs, pixel_values=pixels).pooler_output
    assert not torch.allclose(adapted, plain)


def test_an_existing_run_folder_is_never_overwritten_silently(feddat_run):
    config, result = feddat_run
    before = (result.run_dir / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        run(config, progress=False, echo=lambda _: None)
    assert (result.run_dir / "manifest.json").read_bytes() == before


# Sampling two of three sites per round is below the masked protocol's secure minimum of three (with two sites
# each learns the other's update from the sum); these tests are about the runner, so they lower it.
TWO_SITE_ROUNDS = {"masked": {"min_clients": 2}}


@pytest.mark.parametrize("algorithm, head", [("fedavg", "shared"), ("fedprox", "local"), ("local", "local"),
                                             ("centralized", "shared")])
def test_every_baseline_runs_in_the_same_runner(tmp_path, algorithm, head):
    config = small_config(tmp_path, federation={"algorithm": algorithm, "clients_per_round": 2},
                          model={"head": head}, secure_aggregation=TWO_SITE_ROUNDS)
    result = run(config, progress=False, echo=lambda _: None)
    assert set(result.final_mean) == {"shared"}
    assert all(0.0 <= v <= 1.0 for v in result.final_mean.values())
    if algorithm == "local":
        assert not (result.run_dir / "global_adapter").exists()
        # control messages and tree heads (since wire v3 each header carries its payload's 64-hex digest), no
        # adapter: one would be 57,344 values × 4 bytes = 229,376 bytes
        assert result.history[-1]["bytes_to_server_total"] < 20_000
    else:
        assert (result.run_dir / "global_adapter" / "adapter_model.safetensors").is_file()


def test_partial_participation_is_seeded(tmp_path):
    config = small_config(tmp_path, federation={"clients_per_round": 2, "rounds": 2, "algorithm": "fedavg"},
                          secure_aggregation=TWO_SITE_ROUNDS)
    first = run(config, progress=False, echo=lambda _: None)
    again = run(config, progress=False, echo=lambda _: None, overwrite=True)
    assert [r["participants"] for r in first.history] == [r["participants"] for r in again.history]
    assert all(len(r["participants"]) == 2 for r in first.history)
    assert len({tuple(r["participants"]) for r in first.history}) == 2  # a different sample each round
    np.testing.assert_allclose([r["mean"]["shared"] for r in first.history],
                               [r["mean"]["shared"] for r in again.history])


def test_cli_run_finishes_and_prints_the_per_round_table(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f"""name = "cli"
output_dir = "{tmp_path / 'runs'}"
[data]
num_clients = 3
train_per_client = 24
test_per_client = 8
[federation]
rounds = 2
[training]
local_steps = 2
batch_size = 8
""")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "feddat_secure.cli", "run", str(config), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "round   2" in output and "mean" in output and "dat" in output
