"""Shared fixtures: the embedded foundation (loaded once), small benchmarks, and a small simulated federation."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from feddat_secure.config import RunConfig, config_from_dict
from feddat_secure.data import build_benchmark
from feddat_secure.data.batching import encode_split
from feddat_secure.data.scenes import SceneObject
from feddat_secure.data.synthetic import synthetic_benchmark
from feddat_secure.model.adapters import LoraSettings
from feddat_secure.model.backbone import Foundation, load_foundation
from feddat_secure.pretraining import PretrainSettings, caption_pair, scene_background
from protocols import enrol_parties
from protocols.identity import ROSTER_FILE

if TYPE_CHECKING:
    from feddat_secure.federation.simulation import Federation


def _env_folder(env_var: str, folder: Path) -> Iterator[Path]:
    """``folder`` as ``$env_var`` while the fixture lives (processes the tests spawn inherit it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(env_var, str(folder))
        yield folder


def _ledger_dir(folder: Path) -> Iterator[Path]:
    yield from _env_folder("FEDDAT_SECURE_LEDGER_DIR", folder)


def _receipt_dir(folder: Path) -> Iterator[Path]:
    yield from _env_folder("FEDDAT_SECURE_RECEIPT_DIR", folder)


@pytest.fixture(scope="session", autouse=True)
def session_ledger_dir(tmp_path_factory) -> Iterator[Path]:
    """No test writes a dataset privacy ledger under ~: session-scoped fixtures get a folder of their own..."""
    yield from _ledger_dir(tmp_path_factory.mktemp("ledgers-session"))


@pytest.fixture(scope="module", autouse=True)
def module_ledger_dir(tmp_path_factory) -> Iterator[Path]:
    """... each module's (module-scoped fixtures that run DP federations) one, ..."""
    yield from _ledger_dir(tmp_path_factory.mktemp("ledgers-module"))


@pytest.fixture(autouse=True)
def ledger_dir(tmp_path_factory) -> Iterator[Path]:
    """... and each test one (processes it spawns inherit it): runs on the same data never share a budget
    across tests."""
    yield from _ledger_dir(tmp_path_factory.mktemp("ledgers"))


@pytest.fixture(scope="session", autouse=True)
def session_receipt_dir(tmp_path_factory) -> Iterator[Path]:
    """No run writes its audit receipt under ~ either (docs/audit.md "The audit receipt"): a folder per session,
    per module and per test, like the ledgers'."""
    yield from _receipt_dir(tmp_path_factory.mktemp("receipts-session"))


@pytest.fixture(scope="module", autouse=True)
def module_receipt_dir(tmp_path_factory) -> Iterator[Path]:
    yield from _receipt_dir(tmp_path_factory.mktemp("receipts-module"))


@pytest.fixture(autouse=True)
def receipt_dir(tmp_path_factory) -> Iterator[Path]:
    yield from _receipt_dir(tmp_path_factory.mktemp("receipts"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh folder with a short path (0700): a Unix socket's path holds at most ~100 characters."""
    folder = Path(tempfile.mkdtemp(prefix="fd-", dir="/tmp"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def foundation() -> Foundation:
    return load_foundation()


@pytest.fixture(scope="session")
def lora() -> LoraSettings:
    return LoraSettings(rank=4, alpha=8.0)


@pytest.fixture(scope="session")
def tiny_benchmark(foundation):
    return synthetic_benchmark("function", num_clients=2, train_per_client=32, test_per_client=16,
                               image_size=foundation.image_size, seed=0)


@pytest.fixture(scope="session")
def tiny_split(foundation, tiny_benchmark):
    client = tiny_benchmark.clients[0]
    return encode_split(client.train, foundation.tokenizer, tiny_benchmark.answer_index,
                        foundation.max_text_length, foundation.image_size)


def small_config(tmp_path, **sections) -> RunConfig:
    """A 3-client, 2-round run that finishes in seconds; ``sections`` override tables."""
    raw = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "data": {"num_clients": 3, "train_per_client": 32, "test_per_client": 16},
        "federation": {"rounds": 2},
        "training": {"local_steps": 3, "batch_size": 8},
    }
    for table, values in sections.items():
        raw.setdefault(table, {}).update(values)
    return config_from_dict(raw)


def simulated_federation(config: RunConfig, foundation: Foundation) -> Federation:
    """Every party of ``config``'s run as ``feddat-secure run`` builds them: each enrolled with its own key in
    ``runs/<name>/parties/<party>/`` (with a copy of the roster it pins), built from that folder, wired in
    memory, and the run's session opened; no round has run yet. Tests drive the parties from here."""
    # imported here, so that a broken federation package fails only the tests that use it
    from feddat_secure.federation.parties import plan_run
    from feddat_secure.federation.party_folder import PARTIES_DIR
    from feddat_secure.federation.simulation import simulate_federation

    benchmark = build_benchmark(config.data.benchmark, path=config.data.path, num_clients=config.data.num_clients,
                                train_per_client=config.data.train_per_client,
                                test_per_client=config.data.test_per_client, image_size=foundation.image_size,
                                seed=config.seed)
    answers = {client.client_id: client.answers if config.model.head == "local" else benchmark.answers
               for client in benchmark.clients}
    splits = {}
    for client in benchmark.clients:
        index = {answer: i for i, answer in enumerate(answers[client.client_id])}
        splits[client.client_id] = tuple(encode_split(split, foundation.tokenizer, index, foundation.max_text_length,
                                                      foundation.image_size) for split in (client.train, client.test))
    lora = LoraSettings(config.model.lora_rank, config.model.lora_alpha, config.model.lora_dropout,
                        config.model.target_modules)
    plan = plan_run(config, foundation, lora, {cid: len(train) for cid, (train, _) in splits.items()},
                    len(benchmark.answers))
    run_dir = Path(config.output_dir) / config.name
    parties = run_dir / PARTIES_DIR
    enrol_parties(parties, plan.parties())
    for party, _ in plan.parties():
        shutil.copyfile(parties / ROSTER_FILE, parties / party / ROSTER_FILE)
    return simulate_federation(plan, run_dir, foundation, lora, splits, answers, resume=False)


def recipe_draws_digest(recipe: PretrainSettings, draws: int = 50) -> str:
    """SHA-256 over ``draws`` pretraining draws (image, caption, label, cells) of ``recipe`` from ``default_rng(0)``:
    pins what a committed checkpoint was pretrained on."""
    rng, digest = np.random.default_rng(0), hashlib.sha256()
    for _ in range(draws):
        image, text, matches, cells = caption_pair(rng, recipe.style, 32, recipe.background_textures,
                                                   recipe.background_weights)
        digest.update(image.tobytes() + text.encode() + bytes([matches]) + cells.tobytes())
    return digest.hexdigest()


def background_kinds(textures: tuple[str, ...], draws: int, seed: int, weights=(1.0, 1.0, 1.0)) -> Counter:
    """How often ``scene_background`` (behind one red circle) drew black, a solid colour or a photograph."""
    rng, kinds = np.random.default_rng(seed), Counter()
    objects = [SceneObject("circle", "red", "large", 0, 0)]
    for _ in range(draws):
        colours = np.unique(scene_background(objects, rng, textures, 32, weights).reshape(-1, 3), axis=0)
        kinds["photograph" if len(colours) > 1 else "black" if not colours.any() else "colour"] += 1
    return kinds
