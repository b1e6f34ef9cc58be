"""Loading the ViLT backbone and its tokenizer from a local folder, never from a hub."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, ViltConfig, ViltModel
from transformers.utils import logging as transformers_logging

EMBEDDED_FOUNDATION = Path(__file__).resolve().parent.parent / "assets" / "foundation"


class ModelLoadError(ValueError):
    """The model folder is missing, incomplete or not a ViLT checkpoint."""


@dataclass
class Foundation:
    """A backbone with the tokenizer and image geometry it was trained with."""

    model: ViltModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    digest: str

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def max_text_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def resolve_model_path(path: str | Path | None) -> Path:
    if path in (None, "", "embedded"):
        return EMBEDDED_FOUNDATION
    return Path(path).expanduser().resolve()


def folder_digest(path: Path) -> str:
    """SHA-256 over the names and bytes of every file in a checkpoint folder."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(file.relative_to(path).as_posix().encode() + b"\x00")
        with open(file, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_foundation(path: str | Path | None = None, *, random_init: bool = False, seed: int = 0) -> Foundation:
    """Load ``ViltModel`` and tokenizer from a local folder (``random_init`` keeps only its config)."""
    folder = resolve_model_path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model path {str(folder)!r} is not a local folder (feddat-secure never downloads)")
    for required in ("config.json", "tokenizer_config.json"):
        if not (folder / required).is_file():
            raise ModelLoadError(f"model folder {str(folder)!r} has no {required}")
    transformers_logging.disable_progress_bar()  # a per-file bar for a local load is noise
    try:
        config = ViltConfig.from_pretrained(folder, local_files_only=True)
        if random_init:
            torch.manual_seed(seed)
            model = ViltModel(config)
        else:
            model = ViltModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load a ViLT checkpoint from {str(folder)!r}: {error}") from error
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return Foundation(model=model, tokenizer=tokenizer, path=folder, digest=folder_digest(folder))
