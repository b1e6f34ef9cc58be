"""The names of FedDAT's adapters and of a LoRA adapter's two matrices (torch-free, so registries and
configuration can use them cheaply)."""

from __future__ import annotations

from collections.abc import Iterable

SHARED = "shared"  # A_s: trained locally, the only adapter that leaves the site
FROZEN_GLOBAL = "global_frozen"  # Â_s: the received global adapter, frozen, half of the teacher
CLIENT = "client"  # A_c: the personal adapter, trained locally, never leaves the site, kept across rounds

# A LoRA layer adds B·A·x: A (lora_A, rank × in) projects down, B (lora_B, out × rank) projects up. PEFT names
# every tensor of an adapter with one of these parts (".lora_A.weight" in a saved state, ".lora_A.<adapter>."
# in a parameter's name), so a part names the matrix whatever the layer.
LORA_A = "lora_A"
LORA_B = "lora_B"
LORA_MATRICES = (LORA_A, LORA_B)


def is_matrix(key: str, matrices: Iterable[str]) -> bool:
    """Whether the PEFT tensor or parameter name ``key`` belongs to one of ``matrices`` (``LORA_A``/``LORA_B``)."""
    return any(f".{matrix}." in key for matrix in matrices)
