"""A party's round checkpoints: safetensors files, each written atomically.

A checkpoint holds a nested structure of plain values (JSON) and arrays (numpy or torch),
stored as tensors plus a JSON skeleton in the file's metadata. Safetensors rather than a
pickle: opening a checkpoint from a run folder must never run code. The file is written
beside the old one and moved over it with ``os.replace``, so a crash leaves either the
previous round's checkpoint or this one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import FeddatError

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "feddat-secure-checkpoint/1"


class CheckpointError(FeddatError, ValueError):
    """A checkpoint is missing, unreadable or does not belong to this run."""


def save_checkpoint(path: Path, tree: Any) -> Path:
    """Write ``tree`` (nested dicts/lists of plain values, numpy arrays and torch tensors) to ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(tree, tensors, "")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    save_file(tensors, str(temporary), metadata={"format": FORMAT, "skeleton": json.dumps(skeleton)})
    with open(temporary, "rb") as stream:
        os.fsync(stream.fileno())
    os.replace(temporary, path)
    return path


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 (hex) of a checkpoint file's bytes: what a resumed party's ``run_resumed`` audit entry names."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def load_checkpoint(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint {str(path)!r}: the party has not finished that round")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{str(path)!r} is not a {FORMAT} checkpoint")
        return _join(json.loads(metadata["skeleton"]), tensors)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {error}") from None


def _split(node: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[path] = node.detach().cpu().contiguous().clone()
        return {"__torch__": path}
    if isinstance(node, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(node).copy())
        return {"__numpy__": path}
    if isinstance(node, dict):
        if not all(isinstance(k, (str, int)) for k in node):
            raise TypeError(f"checkpoint keys must be strings or integers at {path!r}")
        return {"__dict__": [[k, _split(v, tensors, f"{path}/{k}")] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        return {"__list__": [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(node)]}
    if node is None or isinstance(node, (bool, int, float, str)):
        return {"__value__": node}
    raise TypeError(f"cannot checkpoint a {type(node).__name__} at {path!r}")


def _join(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, value), = node.items()
    if kind == "__torch__":
        return tensors[value]
    if kind == "__numpy__":
        return tensors[value].numpy()
    if kind == "__dict__":
        return {k: _join(v, tensors) for k, v in value}
    if kind == "__list__":
        return [_join(v, tensors) for v in value]
    return value
