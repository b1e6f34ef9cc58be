"""A site's model: its own copy of the frozen backbone, named LoRA adapters and an answer head."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..data.batching import EncodedSplit
from ..model.adapters import AdapterSet, AdapterState, LoraSettings, check_state_matches
from ..model.backbone import Foundation
from ..model.classifier import HEAD_PREFIX, AnswerHead, VQAClassifier


class LocalModel:
    def __init__(self, foundation: Foundation, lora: LoraSettings, adapters: Sequence[str],
                 trainable: Sequence[str], num_answers: int, seed: int, frozen: Sequence[str] = ()) -> None:
        torch.manual_seed(seed)  # seeds the LoRA A matrices and the head
        self.adapters = AdapterSet(copy.deepcopy(foundation.model), lora, adapters, trainable, frozen)
        self.head = AnswerHead(foundation.hidden_size, num_answers)
        self.classifier = VQAClassifier(self.adapters.peft_model, self.head)

    def logits(self, batch: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
        self.adapters.activate(weights)
        return self.classifier(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])

    @torch.no_grad()
    def accuracy(self, split: EncodedSplit, weights: Mapping[str, float], batch_size: int) -> float:
        was_training = self.classifier.training
        self.classifier.eval()
        correct = 0
        for batch in split.sequential_batches(batch_size):
            correct += int((self.logits(batch, weights).argmax(-1) == batch["labels"]).sum())
        self.classifier.train(was_training)
        return correct / len(split)

    def head_state(self) -> AdapterState:
        return {HEAD_PREFIX + k: v.detach().cpu().numpy().copy() for k, v in self.head.state_dict().items()}

    def set_head_state(self, state: Mapping[str, np.ndarray]) -> None:
        check_state_matches(state, self.head_state(), what="answer head")
        self.head.load_state_dict({k[len(HEAD_PREFIX):]: torch.from_numpy(np.array(v, dtype=np.float32))
                                   for k, v in state.items()})

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.head.parameters())


def split_head(state: Mapping[str, np.ndarray]) -> tuple[AdapterState, AdapterState]:
    """Separate a travelling state into (adapter part, head part)."""
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    adapter = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    return adapter, head
