"""`feddat-secure run BAD.toml`: every bad value is refused with one line naming the key, exit code 2, and no run
folder, whether the configuration alone shows it (at load) or only the model or the data do (before the run
creates anything), so the corrected re-run is never blocked by a half-made folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from feddat_secure.cli import main

SMALL_DATA = "[data]\nnum_clients = 2\ntrain_per_client = 20\ntest_per_client = 5\n"
UNIFORM = "[federation]\naggregation = 'uniform'\nrounds = 2\n"

REFUSED_AT_LOAD = [
    ("training.learning_rate", "[training]\nlearning_rate = nan\n"),
    ("model.lora_dropout", "[model]\nlora_dropout = 1.5\n"),
    ("seed", "seed = -1\n"),
    ("seed", "seed = 9223372036854775807\n"),
    ("privacy.record.delta", "[privacy.record]\ndelta = 1.0\n"),
    ("privacy.client.delta", "[privacy.client]\ndelta = 1.0\n"),
    ("privacy.record.target_epsilon", "[privacy.record]\ntarget_epsilon = nan\n"),
    ("model.lora_rank", "[model]\nlora_rank = 100000\n"),
    ("name", 'name = "a\\u0000b"\n'),
    ("name", 'name = "   "\n'),
    ("name", 'name = "a\\nb"\n'),
    ("name", 'name = "a\\\\b"\n'),
    ("training.temperature", "[training]\ntemperature = nan\n"),
    ("training.task_weight", "[training]\ntask_weight = inf\n"),
    ("data.num_clients", "[data]\nnum_clients = 1000000\n"),
    ("training.batch_size", "[training]\nbatch_size = 1e9\n"),
    ("privacy.record.budget_epsilon", "[privacy.record]\nbudget_epsilon = 0\n"),
    ("privacy.client.budget_epsilon",
     UNIFORM + "[privacy.client]\nplacement = 'central'\ntarget_epsilon = 8.0\nbudget_epsilon = 4.0\n"),
]

REFUSED_BEFORE_THE_RUN = [  # what only the model or the data tells
    ("model.target_modules", "[model]\ntarget_modules = ['bogus']\n"),
    ("model.target_modules", "[model]\ntarget_modules = ['attention']\n"),
    ("model.lora_rank", "[model]\nlora_rank = 200\n"),  # the embedded model's hidden size is 128
    ("training.batch_size", SMALL_DATA + "[training]\nbatch_size = 32\n"),
    ("privacy.record.target_epsilon", SMALL_DATA + "[privacy.record]\nenabled = true\ntarget_epsilon = 0.001\n"),
    ("privacy.client.target_epsilon",
     SMALL_DATA + UNIFORM + "[privacy.client]\nplacement = 'distributed'\ntarget_epsilon = 0.001\n"),
    ("privacy.client.count_noise_std", SMALL_DATA + UNIFORM + "[privacy.client]\nplacement = 'central'\n"
     "target_epsilon = 1.0\nadaptive_clipping = true\ncount_noise_std = 0.5\n"),
]


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(f"output_dir = {str(tmp_path / 'runs')!r}\n" + body)
    return path


def assert_refused_in_one_line(capsys, key: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("feddat-secure: error: ")
    assert f"'{key}'" in captured.err and "Traceback" not in captured.err


CASES = REFUSED_AT_LOAD + REFUSED_BEFORE_THE_RUN


@pytest.mark.parametrize("key, body", CASES, ids=[f"{key}:{body.splitlines()[-1]}" for key, body in CASES])
def test_a_bad_value_exits_2_with_one_line_naming_the_key_and_leaves_no_run_folder(tmp_path, capsys, key, body):
    if not body.startswith("name"):
        body = 'name = "refused"\n' + body
    assert main(["run", str(write_config(tmp_path, body)), "--quiet"]) == 2
    assert_refused_in_one_line(capsys, key)
    assert not (tmp_path / "runs").exists()


def test_the_installed_command_refuses_a_bad_value_the_same_way(tmp_path):
    command = Path(sys.executable).with_name("feddat-secure")
    done = subprocess.run([str(command), "run", str(write_config(tmp_path, "[training]\nlearning_rate = nan\n"))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "feddat-secure: error: key 'training.learning_rate' must be a finite number, got nan\n"
    assert not (tmp_path / "runs").exists()
