"""An exponential moving average (EMA) of a site's own parameters, evaluated and kept in their place.

Under DP-SGD every step adds fresh Gaussian noise to the parameters; averaging the iterates cancels much of it at no
privacy cost, since the average is computed from DP outputs only (post-processing). De et al., "Unlocking
High-Accuracy Differentially Private Image Classification through Scale" (2022), §3.3, found it among the levers that
matter most. The update is PyTorch's (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`) with the warm-up of
TensorFlow's ``ExponentialMovingAverage(num_updates=t)``: at step t the decay is min(decay, (1 + t) / (10 + t)), so
that the first steps are not pulled towards the initial values.

Only parameters that never leave the site are averaged (FedDAT's client adapter A_c, a local answer head): what
travels is replaced by the global state every round, so its average would mix two models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class WeightAverage:
    """EMA of ``parameters`` (tensors of any shapes, updated in place by an optimizer).

    ``decay`` in [0, 1): 0 keeps the last iterate (the average is then the parameters themselves).
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"an EMA decay must be in [0, 1), got {decay!r}")
        self.parameters = list(parameters)
        self.decay = decay
        self.averages = [p.detach().clone() for p in self.parameters]
        self.updates = 0

    def update(self) -> None:
        """Fold the current parameters into the average (after an optimizer step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        get_ema_multi_avg_fn(decay)(self.averages, [p.detach() for p in self.parameters], None)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the parameters hold their averages; afterwards their own values again."""
        own = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for p, average in zip(self.parameters, self.averages):
                p.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.parameters, own):
                    p.copy_(value)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "averages": [a.cpu().numpy().copy() for a in self.averages]}

    def load_state_dict(self, state: dict) -> None:
        averages = state["averages"]
        shapes = [tuple(np.shape(a)) for a in averages]
        expected = [tuple(p.shape) for p in self.parameters]
        if shapes != expected:
            raise ValueError(f"saved weight averages of shapes {shapes} do not match the parameters' {expected}")
        self.averages = [torch.from_numpy(np.array(a, dtype=np.float32)) for a in averages]
        self.updates = int(state["updates"])
