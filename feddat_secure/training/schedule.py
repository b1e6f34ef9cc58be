"""Learning rate as a pure function of (round, local step).

The official FedDAT code steps a stateful scheduler twice per batch for its two optimizers
but once for the baselines, so FedDAT's learning rate decays twice as fast. Here every
optimizer asks for the rate of the same (round, step) position, so all methods follow
one schedule whatever number of optimizers they run.
"""

from __future__ import annotations

SCHEDULES = ("constant", "linear")


def learning_rate(base: float, schedule: str, *, round_index: int, step: int, rounds: int,
                  steps_per_round: int) -> float:
    if schedule == "constant":
        return base
    if schedule == "linear":
        done = round_index * steps_per_round + step
        return base * max(0.0, 1.0 - done / (rounds * steps_per_round))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
