"""Named PEFT LoRA adapters on one backbone, with explicit activation, scaling and freezing.

PEFT's ``set_adapter`` has two side effects this module does not want to inherit:
it marks every active adapter trainable (which would train the frozen global copy in
FedDAT's teacher) and marks every inactive one frozen (how the official FedDAT code lost
the client adapter's ``requires_grad`` after the first round). :meth:`AdapterSet.activate`
therefore re-applies the trainability fixed at construction after every switch, down to single LoRA
matrices (FFA-LoRA's frozen A of a trained adapter).
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.numpy import save_file

from ..training.adapter_names import LORA_MATRICES, is_matrix
from .backbone import EMBEDDED_FOUNDATIONS, folder_digest, save_processor
from .lora_targets import DEFAULT_TARGET_MODULES

AdapterState = dict[str, np.ndarray]
BASE_MODEL_DIR = "base_model"  # the copy of an embedded foundation beside saved adapters (portable_base_model)
_EMBEDDED_FOLDERS = frozenset(folder.resolve() for folder in EMBEDDED_FOUNDATIONS.values())

# peft 0.21 calls a transformers helper that transformers 5 has renamed; harmless, and not ours.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


class AdapterStateError(ValueError):
    """An adapter state does not fit the adapter it should be loaded into."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=DEFAULT_TARGET_MODULES)

    @classmethod
    def of(cls, model) -> LoraSettings:
        """The settings of a run configuration's ``[model]`` table (``RunConfig.model``)."""
        return cls(model.lora_rank, model.lora_alpha, model.lora_dropout, model.target_modules)

    def to_peft(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )


class AdapterSet:
    """A backbone wrapped by PEFT with several named LoRA adapters of the same shape.

    ``trainable``: the adapters training updates; ``frozen``: LoRA matrices (``"lora_A"``, ``"lora_B"``) that
    stay frozen even in those (FFA-LoRA freezes every A). ValueError for an unknown adapter or matrix.
    """

    def __init__(self, backbone: torch.nn.Module, settings: LoraSettings, names: Sequence[str],
                 trainable: Sequence[str], frozen: Sequence[str] = ()) -> None:
        if not names:
            raise ValueError("an adapter set needs at least one adapter name")
        unknown = set(trainable) - set(names)
        if unknown:
            raise ValueError(f"trainable adapters {sorted(unknown)} are not in {list(names)}")
        if not set(frozen) <= set(LORA_MATRICES):
            raise ValueError(f"frozen matrices {sorted(set(frozen) - set(LORA_MATRICES))} are not in {LORA_MATRICES}")
        self.settings = settings
        self.names = tuple(names)
        self.trainable = frozenset(trainable)
        self.frozen = tuple(frozen)
        self.peft_model = get_peft_model(backbone, settings.to_peft(), adapter_name=names[0])
        for name in names[1:]:
            self.peft_model.add_adapter(name, settings.to_peft())
        self._lora_layers = [m for m in self.peft_model.modules() if isinstance(m, LoraLayer)]
        # Looked up once: activate() runs several times per batch, and loading a state copies
        # into these same parameters, so the lists never go stale.
        named = {name: [(n, p) for n, p in self.peft_model.named_parameters() if f".{name}." in n and "lora_" in n]
                 for name in self.names}
        self._parameters = {name: [p for _, p in pairs] for name, pairs in named.items()}
        self._trainable = {name: [p for n, p in pairs if name in self.trainable and not is_matrix(n, self.frozen)]
                           for name, pairs in named.items()}
        self._base_scaling = [dict(layer.scaling) for layer in self._lora_layers]
        self.activate({names[0]: 1.0})

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        """Every LoRA parameter of adapter ``name``, trained or not."""
        self._check_name(name)
        return list(self._parameters[name])

    def trainable_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter ``name`` that training updates (what its optimizer holds): none of a frozen
        adapter, and none of a frozen matrix."""
        self._check_name(name)
        return list(self._trainable[name])

    def activate(self, weights: Mapping[str, float]) -> None:
        """Make exactly these adapters active, each scaled by its weight (outputs add up)."""
        for name in weights:
            self._check_name(name)
        self.peft_model.base_model.set_adapter(list(weights))
        for layer, base in zip(self._lora_layers, self._base_scaling):
            for name in self.names:
                layer.scaling[name] = base[name] * weights.get(name, 1.0)
        for name, parameters in self._parameters.items():
            trainable = {id(p) for p in self._trainable[name]}
            for parameter in parameters:
                parameter.requires_grad_(id(parameter) in trainable)

    def get_state(self, name: str) -> AdapterState:
        """The adapter's weights under PEFT's saved key names (no adapter name in the keys)."""
        self._check_name(name)
        state = get_peft_model_state_dict(self.peft_model, adapter_name=name)
        return {key: value.detach().cpu().numpy().copy() for key, value in state.items()}

    def set_state(self, name: str, state: Mapping[str, np.ndarray]) -> None:
        """Load weights into one adapter after checking every key and shape (all or nothing)."""
        check_state_matches(state, self.get_state(name), what=f"adapter {name!r}")
        tensors = {key: torch.from_numpy(np.array(value, dtype=np.float32)) for key, value in state.items()}
        set_peft_model_state_dict(self.peft_model, tensors, adapter_name=name)

    def copy(self, source: str, target: str) -> None:
        self.set_state(target, self.get_state(source))

    def _check_name(self, name: str) -> None:
        if name not in self.names:
            raise KeyError(f"unknown adapter {name!r}; this model has {list(self.names)}")


def check_state_matches(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], *, what: str) -> None:
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise AdapterStateError(f"{what}: missing keys {missing[:3]}, unexpected keys {extra[:3]}")
    for key, expected in reference.items():
        value = np.asarray(state[key])
        if value.shape != expected.shape:
            raise AdapterStateError(f"{what}: {key} has shape {value.shape}, expected {expected.shape}")
        if not np.all(np.isfinite(value)):
            raise AdapterStateError(f"{what}: {key} holds NaN or inf")


def save_peft_adapter(state: Mapping[str, np.ndarray], settings: LoraSettings, base_model_path: Path,
                      folder: Path) -> None:
    """Write an adapter exactly as ``PeftModel.save_pretrained`` does, from its state alone, with what the
    Hugging Face libraries need to use it without feddat-secure.

    The server never holds a model, only the aggregated state; this lets it publish the
    global adapter in the format ``peft.PeftModel.from_pretrained`` reads. The folder also holds the model's
    processor (:func:`~feddat_secure.model.backbone.save_processor`: ``ViltProcessor.from_pretrained(folder)``
    prepares inputs as training did), and ``base_model_name_or_path`` names the base model so that the folder
    still finds it after a move: see :func:`portable_base_model`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = settings.to_peft()
    config.base_model_name_or_path = portable_base_model(base_model_path, folder)
    config.save_pretrained(str(folder))
    _sort_target_modules(folder / "adapter_config.json")
    arrays = {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in state.items()}
    save_file(arrays, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    save_processor(base_model_path, folder)


def _sort_target_modules(path: Path) -> None:
    """PEFT keeps ``target_modules`` as a set, so its JSON order follows the process's string hashing: sort it,
    so the same adapter always gives the same file (and the same digest in a run's manifest)."""
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def portable_base_model(base_model_path: Path, folder: Path) -> str:
    """How the adapter saved in ``folder`` names its base model (``base_model_name_or_path``).

    An embedded foundation (``EMBEDDED_FOUNDATIONS``) lives inside the installed package, a path that means nothing
    on another machine or after an upgrade; it is small (2.3 MB), so it is copied beside the adapter, into
    ``../base_model/`` (one copy for every adapter saved in the same parent folder: the run's, and each site's
    own), and named by that path relative to the adapter folder, which survives moving the parent folder. A
    checkpoint of the user's own (``model.path``, possibly gigabytes) is not copied: it is named by its absolute
    path, which survives moving the run, and the run's ``manifest.json`` pins its SHA-256.
    """
    base = Path(base_model_path).resolve()
    if base not in _EMBEDDED_FOLDERS:
        return str(base)
    copy = folder.parent / BASE_MODEL_DIR
    if not copy.is_dir() or folder_digest(copy) != folder_digest(base):
        if copy.exists():
            shutil.rmtree(copy)
        shutil.copytree(base, copy)
    return f"../{BASE_MODEL_DIR}"
