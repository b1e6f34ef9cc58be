"""Answer classification on top of the (adapter-wrapped) ViLT backbone.

The head is a plain module outside PEFT on purpose: two active adapters that both declare
``modules_to_save`` fail in PEFT, and FedDAT runs two adapters at once in its teacher.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from torch import nn

HEAD_PREFIX = "head."  # the head's keys in a travelling state and in head.safetensors
HEAD_FILE = "head.safetensors"
ANSWERS_FILE = "answers.json"
HEAD_CONFIG_FILE = "head.json"


class AnswerHead(nn.Module):
    """ViLT's VQA head: hidden -> 2*hidden -> LayerNorm -> GELU -> answers."""

    def __init__(self, hidden_size: int, num_answers: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.LayerNorm(2 * hidden_size),
            nn.GELU(),
            nn.Linear(2 * hidden_size, num_answers),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled)


class VQAClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: AnswerHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor) -> torch.Tensor:
        outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        return self.head(outputs.pooler_output)


def save_head(head: Mapping[str, np.ndarray], answers: Sequence[str], folder: Path) -> None:
    """Write an answer head: ``head.safetensors`` (the :class:`~feddat_secure.model.classifier.AnswerHead`'s
    state under ``head.``-prefixed keys), ``answers.json`` (the answer behind each output, in order) and
    ``head.json``, which describes both for a reader without feddat-secure (docs/api.md)."""
    arrays = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in head.items()}
    last = arrays[f"{HEAD_PREFIX}layers.3.weight"]
    if last.shape[0] != len(answers):
        raise ValueError(f"the head has {last.shape[0]} outputs for {len(answers)} answers")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(folder / HEAD_FILE))
    (folder / ANSWERS_FILE).write_text(json.dumps(list(answers), indent=1) + "\n")
    config = {
        "input": "pooler_output of ViltModel (with the adapters active)",
        "architecture": ["Linear(hidden, 2*hidden)", "LayerNorm(2*hidden)", "GELU", "Linear(2*hidden, answers)"],
        "hidden_size": int(last.shape[1] // 2),
        "num_answers": len(answers),
        "answers": list(answers),
        "layers": {key: list(value.shape) for key, value in sorted(arrays.items())},
        "weights_file": HEAD_FILE,
    }
    (folder / HEAD_CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
