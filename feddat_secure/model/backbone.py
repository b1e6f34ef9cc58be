"""Loading the ViLT backbone and its tokenizer from a local folder, never from a hub.

Every load names a resolved local folder and passes ``local_files_only=True``, so nothing is downloaded
whatever the caller's environment says (the package sets no ``HF_*_OFFLINE`` variable of its own).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase, ViltConfig, ViltModel
from transformers.utils import logging as transformers_logging

from ..data.batching import IMAGE_MEAN, IMAGE_STD
from ..errors import FeddatError

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_FOUNDATION = _ASSETS / "foundation"
# the checkpoints that ship in the package, by the name ``model.path`` gives them; each is reproduced by
# ``feddat-secure pretrain-foundation --foundation NAME`` (recipes in ``feddat_secure.pretraining.FOUNDATIONS``)
EMBEDDED_FOUNDATIONS = {"embedded": EMBEDDED_FOUNDATION, "embedded-v2": _ASSETS / "foundation-v2",
                        "embedded-v3": _ASSETS / "foundation-v3",
                        "embedded-v4": _ASSETS / "foundation-v4"}
PROCESSOR_CONFIG_FILE = "preprocessor_config.json"


class ModelLoadError(FeddatError, ValueError):
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

    def lora_adaptable(self) -> dict[str, bool]:
        """Every module name of the backbone, and whether LoRA can adapt it (a linear projection): what a
        configuration's ``model.target_modules`` is checked against before a run starts."""
        return {name: isinstance(module, torch.nn.Linear) for name, module in self.model.named_modules() if name}


def resolve_model_path(path: str | Path | None) -> Path:
    """The folder of ``path``: an embedded foundation's by its name (``EMBEDDED_FOUNDATIONS``; none or "" is
    ``embedded``), else the local folder it names."""
    if path in (None, ""):
        return EMBEDDED_FOUNDATION
    if isinstance(path, str) and path in EMBEDDED_FOUNDATIONS:
        return EMBEDDED_FOUNDATIONS[path]
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


def processor_config(config: ViltConfig) -> dict[str, Any]:
    """The ``ViltImageProcessor`` settings under which ``transformers.ViltProcessor`` turns an image into the
    pixels training read: :func:`feddat_secure.data.images.load_image` resizes to the model's square image size
    with PIL's bilinear filter, and :func:`feddat_secure.data.batching.images_to_pixels` scales to [0, 1] and
    normalises with mean and std 0.5.

    ViLT's processor keeps an image's aspect ratio (shortest edge to the image size) where feddat-secure
    stretches it to a square, so the two agree exactly on square images; ``do_pad`` gives a batch of any sizes
    a pixel mask, all ones for square images, as training's implicit one."""
    return {
        "processor_class": "ViltProcessor",
        "image_processor_type": "ViltImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": int(config.image_size)},
        "size_divisor": int(config.patch_size),
        "resample": int(Image.Resampling.BILINEAR),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [IMAGE_MEAN] * 3,
        "image_std": [IMAGE_STD] * 3,
        "do_pad": True,
    }


def save_processor(model_folder: Path, folder: Path) -> None:
    """Write the processor of the checkpoint in ``model_folder`` into ``folder``: ``preprocessor_config.json``
    (:func:`processor_config`) and the tokenizer with ``model_max_length`` set to the model's text length, so
    that ``ViltProcessor.from_pretrained(folder)`` prepares inputs as training did, without feddat-secure
    (called with ``padding="max_length", truncation=True``, as training tokenizes)."""
    config = ViltConfig.from_pretrained(model_folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_folder, local_files_only=True)
    tokenizer.model_max_length = int(config.max_position_embeddings)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    (folder / PROCESSOR_CONFIG_FILE).write_text(json.dumps(processor_config(config), indent=2) + "\n")
