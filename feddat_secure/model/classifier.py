"""Answer classification on top of the (adapter-wrapped) ViLT backbone.

The head is a plain module outside PEFT on purpose: two active adapters that both declare
``modules_to_save`` fail in PEFT, and FedDAT runs two adapters at once in its teacher.
"""

from __future__ import annotations

import torch
from torch import nn


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
