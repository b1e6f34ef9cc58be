"""Shared fixtures: the embedded foundation (loaded once) and small benchmarks."""

from __future__ import annotations

import pytest

from feddat_secure.config import RunConfig, config_from_dict
from feddat_secure.data.batching import encode_split
from feddat_secure.data.synthetic import synthetic_benchmark
from feddat_secure.model.adapters import LoraSettings
from feddat_secure.model.backbone import Foundation, load_foundation


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
