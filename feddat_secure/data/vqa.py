"""Data types shared by every benchmark: one VQA example, one client's splits, a benchmark.

Images are kept as ``uint8`` arrays (H, W, 3) so that generators, loaders and digests
do not depend on torch; conversion to tensors happens in :mod:`feddat_secure.data.batching`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..errors import FeddatError


class DataError(FeddatError, ValueError):
    """Raised for data that cannot be used: missing images, unknown answers, empty splits."""


@dataclass(frozen=True)
class VQAExample:
    image: np.ndarray  # uint8, shape (H, W, 3)
    question: str
    answer: str
    # Where the example came from ("manifest.jsonl line 7" for a folder), so that a data report can
    # point at the rows it warns about; not part of the example's identity or of the data digest.
    source: str = field(default="", compare=False)


@dataclass
class ClientData:
    """One site's local data. ``answers`` is the site's own answer set (its label space)."""

    client_id: str
    train: list[VQAExample]
    test: list[VQAExample]
    answers: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.train:
            raise DataError(f"client {self.client_id!r}: the train split is empty")
        if not self.test:
            raise DataError(f"client {self.client_id!r}: the test split is empty")
        if not self.answers:
            seen = {ex.answer for ex in self.train} | {ex.answer for ex in self.test}
            self.answers = tuple(sorted(seen))


@dataclass
class Benchmark:
    """A federated benchmark: clients with their splits, and the global answer vocabulary."""

    name: str
    clients: list[ClientData]
    answers: tuple[str, ...]
    # Folders of a data root that hold a manifest but are not sites by their name (they start with '.'
    # or '_'): skipping them is how a site is left out on purpose, and the data report says so.
    skipped_sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.clients:
            raise DataError(f"benchmark {self.name!r} has no clients")
        ids = [c.client_id for c in self.clients]
        if len(set(ids)) != len(ids):
            raise DataError(f"benchmark {self.name!r} has duplicate client ids: {ids}")
        known = set(self.answers)
        for client in self.clients:
            for split, examples in (("train", client.train), ("test", client.test)):
                for ex in examples:
                    if ex.answer not in known:
                        raise DataError(
                            f"client {client.client_id!r} {split}: answer {ex.answer!r} "
                            "is not in the answer vocabulary"
                        )

    @property
    def answer_index(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(self.answers)}

    def digest(self) -> str:
        """SHA-256 over every example in order, so a run's manifest pins the exact data."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        for answer in self.answers:
            h.update(b"\x00a" + answer.encode())
        for client in self.clients:
            h.update(b"\x00c" + client.client_id.encode())
            for split in (client.train, client.test):
                h.update(b"\x00s")
                for ex in split:
                    h.update(np.ascontiguousarray(ex.image).tobytes())
                    h.update(str(ex.image.shape).encode())
                    h.update(b"\x00q" + ex.question.encode() + b"\x00r" + ex.answer.encode())
        return h.hexdigest()


def hold_out_validation(benchmark: Benchmark, fraction: float) -> Benchmark:
    """The benchmark with each site's test split replaced by the last ``fraction`` of its training examples
    (at least one), which leave its training split: scores for choosing hyperparameters that never see a test
    example. ``fraction`` in (0, 1); DataError when a site would keep no training example."""
    if not 0 < fraction < 1:
        raise DataError(f"a validation fraction must be in (0, 1), not {fraction!r}")
    clients = []
    for client in benchmark.clients:
        held = max(1, round(fraction * len(client.train)))
        if held >= len(client.train):
            raise DataError(f"client {client.client_id!r}: holding out {fraction:g} of its {len(client.train)} "
                            "training examples for validation leaves none to train on")
        clients.append(ClientData(client.client_id, client.train[:-held], client.train[-held:], client.answers))
    return Benchmark(benchmark.name, clients, benchmark.answers, benchmark.skipped_sites)
