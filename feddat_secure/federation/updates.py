"""Adapter updates as flat vectors, the form secure aggregation and client-level DP work on.

A site sends the change of its travelling state over the round (its update), not the state
itself: the server adds the weighted mean update to the global state. For a weighted mean
this is the same result as averaging states, and it is what clipping (client-level DP) and
the protocols' fixed value range (masked quantization) need: updates are small and centred.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..model.adapters import AdapterState, check_state_matches


@dataclass(frozen=True)
class StateLayout:
    """Where each tensor of a state sits in the flat vector (sorted key order)."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> StateLayout:
        keys = tuple(sorted(state))
        return cls(keys, tuple(tuple(np.shape(state[k])) for k in keys))

    @property
    def size(self) -> int:
        return int(sum(np.prod(shape, dtype=np.int64) for shape in self.shapes))

    @cached_property
    def _reference(self) -> dict[str, np.ndarray]:
        """Zero-cost arrays of the layout's shapes, for check_state_matches."""
        return {k: np.broadcast_to(np.float32(0), s) for k, s in zip(self.keys, self.shapes)}

    def flatten(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        check_state_matches(state, self._reference, what="state to flatten")
        return np.concatenate([np.asarray(state[k], dtype=np.float64).ravel() for k in self.keys])

    def unflatten(self, vector: np.ndarray) -> AdapterState:
        if vector.shape != (self.size,):
            raise ValueError(f"vector of shape {vector.shape} does not fit a state of {self.size} values")
        state, start = {}, 0
        for key, shape in zip(self.keys, self.shapes):
            count = int(np.prod(shape, dtype=np.int64))
            state[key] = vector[start:start + count].reshape(shape).astype(np.float32)
            start += count
        return state


def update_vector(layout: StateLayout, trained: Mapping[str, np.ndarray],
                  received: Mapping[str, np.ndarray]) -> np.ndarray:
    """trained − received, flattened in float64 (the difference of two float32 states is exact)."""
    return layout.flatten(trained) - layout.flatten(received)


def apply_mean_update(layout: StateLayout, state: Mapping[str, np.ndarray], summed: np.ndarray,
                      total_weight: float) -> AdapterState:
    """state + summed / total_weight, the weighted FedAvg step on the global state."""
    if total_weight <= 0:
        raise ValueError("the aggregate carries no weight; nothing to apply")
    return layout.unflatten(layout.flatten(state) + summed / total_weight)
