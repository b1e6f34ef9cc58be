"""The masked protocol's options, validated once, and what follows from them."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from .graph import GraphParameters, resolve_parameters
from .quantize import Quantizer, check_no_overflow, largest_safe_weight

MAX_MODULUS_BITS = 62  # sums are decoded in int64


def _option(default: Any, **metadata: Any) -> Any:
    """A dataclass field with the metadata the run configuration validates a ``[secure_aggregation.masked]``
    key by (``choices``, or ``minimum`` and ``strict``); ``runtime=True`` marks what the runner supplies."""
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class MaskedOptions:
    """The masked protocol's options, validated once: by ``make_protocol`` and by the run configuration, which
    reads its ``[secure_aggregation.masked]`` table from this class (the ``runtime`` fields excepted).

    ``min_clients`` (default 3) is enforced by every client twice (issue 10 item 2: a server that shows a
    victim a 2-client round with one colluder reads the victim's input off the sum): on the cohort the
    server announces (at ``commit``) and on the survivor set it signs before any share is revealed (at
    ``consistency_check``), so a released sum always counts at least ``min_clients`` inputs, however the
    server reports dropouts. With c colluding sites the victim's input is therefore only ever released inside
    a sum with at least min_clients − 1 − c other honest inputs; 3 is the least that keeps one other honest
    input in the sum against one colluder. Raise it with the collusion you assume.
    """

    clip_range: float = _option(0.25, minimum=0, strict=True)  # r: each input value is clipped to [-r, r]
    quantization_bits: int = _option(16, minimum=1, strict=False)  # the grid 0..2^bits - 1 over [-r, r]
    # masked sums live modulo 2^m; words are the smallest uint holding m bits
    modulus_bits: int = _option(32, minimum=8, strict=False)
    neighbours: int = _option(0, minimum=0, strict=False)  # k; 0: Bell et al.'s default for the round's client count
    threshold: int = _option(0, minimum=0, strict=False)  # t (t-of-k Shamir); 0: the default
    # "sparse" (SecAgg+, random Harary graph) or "complete" (classic SecAgg)
    graph: str = _option("sparse", choices=("sparse", "complete"))
    # largest client weight; 0: the largest that cannot overflow for the round's n (the runner knows the data sizes)
    max_weight: int = _option(0, runtime=True)
    noise_bound: int = _option(0, runtime=True)  # B: largest |noise| a client may add before masking (distributed DP)
    adversarial_rate: float = _option(0.05, runtime=True)  # assumed corrupt fraction, for the default k and t
    dropout_rate: float = _option(0.1, runtime=True)  # assumed dropout fraction, for the default k and t
    seed: int | None = _option(0, runtime=True)  # stochastic rounding only (never the ring); None: from the OS
    # the fewest clients a round this client joins may list (client-enforced; see the class docstring)
    min_clients: int = _option(3, minimum=2, strict=False)

    def __post_init__(self):
        def integer(name: str, low: int, high: int | None = None) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                span = f">= {low}" if high is None else f"in {low}..{high}"
                raise ConfigurationError(f"masked option {name} must be an integer {span}, not {value!r}", name)

        if isinstance(self.clip_range, bool) or not isinstance(self.clip_range, int | float) \
                or not math.isfinite(self.clip_range) or self.clip_range <= 0:
            raise ConfigurationError(f"masked option clip_range must be a positive number, not {self.clip_range!r}",
                                     "clip_range")
        integer("modulus_bits", 8, MAX_MODULUS_BITS)
        integer("quantization_bits", 1, self.modulus_bits - 1)
        for name in ("neighbours", "threshold", "max_weight", "noise_bound"):
            integer(name, 0)
        integer("min_clients", 2)
        if self.graph not in ("sparse", "complete"):
            raise ConfigurationError(f"masked option graph must be 'sparse' or 'complete', not {self.graph!r}",
                                     "graph")
        for name in ("adversarial_rate", "dropout_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ConfigurationError(f"masked option {name} must be in [0, 1), not {value!r}", name)
        if self.adversarial_rate + 2 * self.dropout_rate > 0.9:
            raise ConfigurationError("adversarial_rate + 2 × dropout_rate must be at most 0.9 (Bell et al.)",
                                     "dropout_rate")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigurationError(f"seed must be an integer or None, not {self.seed!r}", "seed")

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(float(self.clip_range), self.quantization_bits)

    @property
    def word_dtype(self) -> np.dtype:
        """The smallest unsigned integer type holding m bits: what a masked vector is sent in."""
        for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
            if np.dtype(dtype).itemsize * 8 >= self.modulus_bits:
                return np.dtype(dtype)
        raise AssertionError("modulus_bits is capped at 62")

    @property
    def word_mask(self) -> int:
        return (1 << self.modulus_bits) - 1

    def graph_parameters(self, num_clients: int) -> GraphParameters:
        return resolve_parameters(num_clients, self.graph, self.neighbours, self.threshold, self.adversarial_rate,
                                  self.dropout_rate)

    def weight_bound(self, num_clients: int) -> int:
        """The largest weight accepted in a round of ``num_clients``; refuses overflowing settings."""
        bound = self.max_weight or largest_safe_weight(num_clients, self.quantization_bits, self.modulus_bits,
                                                       self.noise_bound)
        check_no_overflow(num_clients, bound, self.quantization_bits, self.modulus_bits, self.noise_bound)
        return bound

    def round_terms(self, num_clients: int, vector_length: int) -> dict[str, object]:
        """What the server announces and every client must agree with, for a round of this size; refuses a
        round smaller than ``min_clients``."""
        if num_clients < self.min_clients:
            raise ConfigurationError(f"a masked round needs at least min_clients = {self.min_clients} clients, "
                                     f"not {num_clients}", "min_clients")
        parameters = self.graph_parameters(num_clients)
        return {"clip_range": float(self.clip_range), "quantization_bits": self.quantization_bits,
                "modulus_bits": self.modulus_bits, "max_weight": self.weight_bound(num_clients),
                "noise_bound": self.noise_bound, "neighbours": parameters.neighbours,
                "threshold": parameters.threshold, "vector_length": vector_length}

    def rng(self, *context: int | str) -> np.random.Generator:
        """A reproducible generator for (seed, context...); fresh OS entropy when seed is None."""
        if self.seed is None:
            return np.random.default_rng()
        words = [self.seed & 0xFFFFFFFFFFFFFFFF]
        for item in context:
            if isinstance(item, str):
                item = int.from_bytes(hashlib.sha256(item.encode()).digest()[:8], "little")
            words.append(item)
        return np.random.default_rng(words)
