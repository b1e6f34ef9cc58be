"""Record-level DP-SGD: Opacus per-sample gradients, per-sample clipping, Gaussian noise.

Opacus's hooks (:class:`opacus.grad_sample.GradSampleHooks`) compute the per-sample
gradient of every trainable parameter of the classifier during ``backward``. Clipping and
noise are done here rather than by Opacus's ``DPOptimizer`` because FedDAT runs two
private optimizers on two losses of the same batch, and because a Poisson batch may be
empty (then no backward runs and the step releases noise only, as DP-SGD requires):

    g = (Σ_i g_i · min(1, C / ‖g_i‖) + N(0, σ²C²·I)) / (q·N)

with ‖g_i‖ the norm of sample i's gradient over all parameters of that optimizer, C the
clipping norm, σ the noise multiplier and q·N the expected batch size (Opacus's estimator).

Guards against the known failure modes of Opacus with PEFT and ViLT:

- every trainable parameter must belong to exactly one private optimizer, so nothing that
  sees data is trained without DP (:func:`attach_per_sample_gradients`);
- ViLT's embeddings must stay frozen: Opacus returns a per-sample gradient of the wrong
  shape for ViLT's position embeddings without raising, so a trainable parameter under an
  ``embeddings`` module is refused;
- a non-empty batch whose backward left a trainable parameter without a per-sample gradient
  of the batch's size is an error, never a silent zero (the PEFT + Opacus corruption reports
  were of updates that went missing or were mis-shaped without an error).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from opacus.grad_sample import GradSampleHooks
from torch import nn

HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"

SUPPORTED_MODULES = (nn.Linear, nn.LayerNorm)  # what LoRA adapters and the answer head are made of


class PrivacyError(RuntimeError):
    """DP-SGD cannot be applied as configured, or a per-sample gradient is missing or malformed."""


def attach_per_sample_gradients(module: nn.Module, groups: Sequence[Sequence[nn.Parameter]]) -> GradSampleHooks:
    """Attach Opacus's per-sample gradient hooks after checking that DP-SGD covers the model.

    ``groups`` are the parameter lists of the private optimizers; together they must hold
    every trainable parameter of ``module`` exactly once.
    """
    trainable = {id(p): name for name, p in module.named_parameters() if p.requires_grad}
    embedded = sorted(name for name in trainable.values() if ".embeddings." in f".{name}")
    if embedded:
        raise PrivacyError(f"record-level DP keeps ViLT's embeddings frozen (Opacus computes a wrongly shaped "
                           f"per-sample gradient for its position embeddings), but these are trainable: "
                           f"{embedded[:3]}; remove embedding modules from model.target_modules")
    covered: dict[int, int] = {}
    for group in groups:
        for p in group:
            covered[id(p)] = covered.get(id(p), 0) + 1
    unprotected = sorted(name for pid, name in trainable.items() if pid not in covered)
    if unprotected:
        raise PrivacyError(f"trainable parameters outside every private optimizer would see data without DP: "
                           f"{unprotected[:3]}")
    twice = [pid for pid, count in covered.items() if count > 1]
    foreign = [pid for pid in covered if pid not in trainable]
    if twice or foreign:
        raise PrivacyError("each private optimizer must own distinct trainable parameters of the model")
    for name, sub in module.named_modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)) and not isinstance(sub, SUPPORTED_MODULES):
            raise PrivacyError(f"module {name!r} ({type(sub).__name__}) holds trainable parameters but is not one "
                               f"of the layer types whose per-sample gradients are checked here")
    return GradSampleHooks(module, batch_first=True, loss_reduction="mean", strict=True)


@contextlib.contextmanager
def expected_hook_warnings() -> Iterator[None]:
    """Opacus's full backward hooks fire on the first LoRA layer, whose input (the frozen
    backbone's activations) needs no gradient; PyTorch warns about that on every backward,
    and it is expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=HOOK_WARNING)
        yield


class PrivateOptimizer:
    """One optimizer made private: its step uses the clipped, noised mean of per-sample gradients."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, generator: torch.Generator) -> None:
        if max_grad_norm <= 0 or expected_batch_size <= 0 or noise_multiplier < 0:
            raise ValueError("DP-SGD needs max_grad_norm > 0, expected_batch_size > 0 and noise_multiplier >= 0")
        self.optimizer = optimizer
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.generator = generator

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the sum of clipped per-sample gradients."""
        return self.noise_multiplier * self.max_grad_norm

    def step(self, batch_size: int, *, add_gradients: Mapping[nn.Parameter, torch.Tensor] | None = None) -> None:
        """Privatize the gradients of a batch of ``batch_size`` records (0: noise only) and step.

        ``add_gradients`` are data-independent terms (FedProx's proximal pull) added after
        the noise: they depend only on parameters that are themselves DP outputs.
        """
        self.privatize(batch_size)
        for parameter, gradient in (add_gradients or {}).items():
            parameter.grad.add_(gradient)
        self.optimizer.step()
        self.clear()

    def privatize(self, batch_size: int) -> None:
        """Replace each parameter's ``.grad`` by (Σ clipped per-sample gradients + noise) / (q·N)."""
        samples = [self._per_sample(p, batch_size) for p in self.parameters]
        if batch_size:
            norms = torch.stack([g.reshape(batch_size, -1).norm(dim=1) for g in samples]).norm(dim=0)
            factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, g in zip(self.parameters, samples):
            summed = torch.einsum("i,i...->...", factors, g) if batch_size else torch.zeros_like(p)
            noise = torch.normal(0.0, self.noise_std, size=p.shape, generator=self.generator) if self.noise_std \
                else torch.zeros_like(p)
            p.grad = (summed + noise) / self.expected_batch_size

    def clear(self) -> None:
        for p in self.parameters:
            p.grad_sample = None
            p.grad = None

    def _per_sample(self, p: nn.Parameter, batch_size: int) -> torch.Tensor | None:
        sample = getattr(p, "grad_sample", None)
        if batch_size == 0:
            if sample is not None:
                raise PrivacyError("a per-sample gradient is left over from an earlier backward pass")
            return None
        if sample is None:
            raise PrivacyError(f"a parameter of shape {tuple(p.shape)} has no per-sample gradient after a batch of "
                               f"{batch_size}: its update would silently go missing")
        if isinstance(sample, list) or sample.shape != (batch_size, *p.shape):
            shape = [tuple(s.shape) for s in sample] if isinstance(sample, list) else tuple(sample.shape)
            raise PrivacyError(f"per-sample gradient of shape {shape} for a parameter of shape {tuple(p.shape)} "
                               f"and a batch of {batch_size}")
        return sample
