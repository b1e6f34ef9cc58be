"""The package and its command line are light and leave the caller's process alone: importing feddat_secure
changes no environment variable, the commands that train nothing load no deep-learning library, and the model
loads from its local folder without the network whatever the Hugging Face offline variables say.

Each check runs in a fresh interpreter, as this one has long imported torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "transformers", "peft")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def python(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter without any Hugging Face offline variable; it prints one JSON line."""
    env = {key: value for key, value in os.environ.items() if key not in OFFLINE_VARIABLES}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_importing_the_package_changes_no_environment_variable(tmp_path):
    result = python("""
import json, os
before = dict(os.environ)
import feddat_secure, feddat_secure.cli, feddat_secure.config
after = dict(os.environ)
print(json.dumps({"added": sorted(set(after) - set(before)),
                  "changed": sorted(k for k in before if after.get(k) != before[k])}))
""", tmp_path)
    assert result == {"added": [], "changed": []}


def test_commands_that_train_nothing_load_no_deep_learning_library(tmp_path):
    result = python(f"""
import contextlib, io, json, sys
from feddat_secure.cli import main

HEAVY = {HEAVY!r}
loaded = {{}}

def command(name, argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    loaded[name] = [code, sorted(m for m in HEAVY if m in sys.modules)]

command("help", ["--help"])
command("run --help", ["run", "--help"])
command("keys create", ["keys", "create", "--party", "server", "--role", "server", "--out", "server"])
command("keys create client", ["keys", "create", "--party", "site-a", "--out", "site-a"])
command("roster build", ["roster", "build", "server/enrolment.json", "site-a/enrolment.json", "--out", "roster.json"])
command("audit verify", ["audit", "verify", "no-such-run"])
open("bad.toml", "w").write("[training]\\nlearning_rate = nan\\n")
command("run with a bad config", ["run", "bad.toml"])
print(json.dumps(loaded))
""", tmp_path)
    assert result == {"help": [0, []], "run --help": [0, []], "keys create": [0, []], "keys create client": [0, []],
                      "roster build": [0, []], "audit verify": [2, []], "run with a bad config": [2, []]}


def test_the_privacy_report_loads_no_model_library(tmp_path):
    """Its accountants come from Opacus, which imports torch; transformers and PEFT it never needs."""
    result = python(f"""
import contextlib, io, json, sys
from feddat_secure.cli import main

with contextlib.redirect_stderr(io.StringIO()):
    code = main(["privacy-report", "no-such-run"])
print(json.dumps([code, sorted(m for m in {HEAVY!r} if m in sys.modules)]))
""", tmp_path)
    assert result == [2, ["torch"]]


def test_the_model_loads_and_adapts_from_its_folder_with_the_hub_online_and_the_network_unreachable(tmp_path):
    result = python("""
import json, os, socket

attempts = []

def refuse(*args, **kwargs):
    attempts.append(repr(args)[:200])
    raise OSError("the network is unreachable in this test")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse

import copy
from pathlib import Path

from huggingface_hub import constants
from feddat_secure.model.adapters import AdapterSet, LoraSettings, save_peft_adapter
from feddat_secure.model.backbone import ModelLoadError, load_foundation

foundation = load_foundation()
tokens = foundation.tokenizer("what color is the circle ?")["input_ids"]
adapters = AdapterSet(copy.deepcopy(foundation.model), LoraSettings(rank=2), ["shared"], ["shared"])
save_peft_adapter(adapters.get_state("shared"), adapters.settings, foundation.path, Path("adapter"))
try:
    load_foundation("dandelin/vilt-b32-mlm")  # a hub id is no local folder: refused, never fetched
    hub = "loaded"
except ModelLoadError as error:
    hub = str(error)
print(json.dumps({"hub_offline": constants.HF_HUB_OFFLINE, "hub_id": hub, "attempts": attempts,
                  "unknown_tokens": tokens.count(foundation.tokenizer.unk_token_id),
                  "offline_variables": [v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
                                        if v in os.environ]}))
""", tmp_path)
    assert result["hub_offline"] is False and result["offline_variables"] == []  # nothing forced offline
    assert result["unknown_tokens"] == 0
    assert "is not a local folder (feddat-secure never downloads)" in result["hub_id"]
    assert result["attempts"] == []
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
