"""Turning examples into tensors once per client, and drawing seeded mini-batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .vqa import VQAExample

IMAGE_MEAN = 0.5  # ViLT's image processor normalises with mean 0.5 and std 0.5
IMAGE_STD = 0.5


def images_to_pixels(images: Sequence[np.ndarray]) -> torch.Tensor:
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (stacked / 255.0 - IMAGE_MEAN) / IMAGE_STD


@dataclass
class EncodedSplit:
    """A split as model-ready tensors: pixels (N,3,H,W), token ids and mask (N,L), labels (N,)."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.pixel_values[index],
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
        }

    def sample_batches(self, batch_size: int, count: int, rng: np.random.Generator) -> Iterator[dict]:
        """``count`` mini-batches drawn by reshuffling epochs, so every example is used evenly."""
        order: list[int] = []
        for _ in range(count):
            if len(order) < batch_size:
                order.extend(rng.permutation(len(self)).tolist())
            chosen, order = order[:batch_size], order[batch_size:]
            yield self.batch(torch.tensor(chosen))

    def poisson_batches(self, sample_rate: float, count: int, rng: np.random.Generator) -> Iterator[dict]:
        """``count`` mini-batches in which every example takes part independently with probability
        ``sample_rate``: the sampling DP-SGD's accounting assumes (Opacus's ``DPDataLoader``).
        Batch sizes vary, and a batch may be empty."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate must lie in (0, 1], got {sample_rate}")
        for _ in range(count):
            chosen = np.flatnonzero(rng.random(len(self)) < sample_rate)
            yield self.batch(torch.from_numpy(chosen))

    def sequential_batches(self, batch_size: int) -> Iterator[dict]:
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size))

    @staticmethod
    def concatenate(splits: Sequence[EncodedSplit]) -> EncodedSplit:
        return EncodedSplit(*(torch.cat([getattr(s, f) for s in splits]) for f in
                              ("pixel_values", "input_ids", "attention_mask", "labels")))


def encode_split(examples: Sequence[VQAExample], tokenizer, answer_index: dict[str, int],
                 max_length: int, image_size: int) -> EncodedSplit:
    for ex in examples:
        if ex.image.shape != (image_size, image_size, 3):
            raise ValueError(f"image of shape {ex.image.shape} does not match the model's "
                             f"{image_size}x{image_size} RGB input")
    text = tokenizer([ex.question for ex in examples], padding="max_length", truncation=True,
                     max_length=max_length, return_tensors="pt")
    labels = torch.tensor([answer_index[ex.answer] for ex in examples], dtype=torch.long)
    return EncodedSplit(images_to_pixels([ex.image for ex in examples]), text["input_ids"],
                        text["attention_mask"], labels)
