"""Answering questions about images with a finished run's model, exactly as a site (or the global model) does.

A :class:`Predictor` is built from a run folder alone (:meth:`Predictor.from_run`); which model it rebuilds
follows from the run's own ``config.toml``, and every part comes from the files the run saved:

======================  =========================================  =============================  ===============
what                    adapters (LoRA scaling)                    answer head                    run's metric
======================  =========================================  =============================  ===============
FedDAT, a site          ``client_adapter`` ½ + ``shared_adapter``  the site's, or the global one  ``dat``
                        ½: the Dual-Adapter Teacher (the site's    when heads are shared
                        copy of the last global adapter it
                        received is the frozen half)
other methods, a site   the site's ``shared_adapter`` (the last    the site's, or the global one  ``shared``
                        global adapter it received; ``local``:     when heads are shared
                        its own; ``fedsa-lora``: the global A
                        matrices with the site's own B)
``site=None``           ``global_adapter`` (not ``fedsa-lora``)    the global one (needed)        ``shared``
======================  =========================================  =============================  ===============

Inputs are prepared as training prepared them: images (arrays, PIL images or files) are converted by
:mod:`feddat_secure.data.images` and stretched to the model's square size with the same filter, questions
are normalised as the ``folder`` benchmark normalises them and tokenized as ``data.batching.encode_split``
does. The base model is the one the adapters name (``base_model_name_or_path``, see
:func:`feddat_secure.model.adapters.portable_base_model`) and must be the one the run's ``manifest.json``
pins. docs/api.md describes the saved result's layout, including the head's (:func:`save_head`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.numpy import load_file

from .config import RunConfig, load_config
from .data.batching import images_to_pixels
from .data.folder import normalise_question
from .data.images import load_image, to_rgb
from .data.vqa import DataError
from .errors import FeddatError
from .federation.algorithms import get_algorithm
from .federation.party_folder import PARTIES_DIR
from .model.adapters import AdapterState, AdapterStateError, LoraSettings
from .model.backbone import Foundation, folder_digest, load_foundation
from .model.classifier import ANSWERS_FILE, HEAD_FILE, save_head  # noqa: F401  (save_head: public here too)
from .training.adapter_names import CLIENT, FROZEN_GLOBAL, SHARED
from .training.local_model import LocalModel
from .training.trainers import DUAL_ADAPTER_TEACHER, SHARED_ONLY

GLOBAL_ADAPTER_DIR = "global_adapter"

ImageInput = np.ndarray | Image.Image | str | os.PathLike


class ResultError(FeddatError):
    """A run's saved result cannot be used: no such run or site, a run that did not finish, a missing file, or a
    base model other than the one the run trained on."""


class Predictor:
    """One inference mode of a finished run: adapters with their scalings, an answer head and its answers.

    Prediction draws nothing from the caller's torch random generator (ViLT visits image patches in a random
    order; the order changes nothing but rounding, and the predictor uses a fixed one), and repeated calls
    give identical probabilities.
    """

    def __init__(self, foundation: Foundation, lora: LoraSettings, adapters: Mapping[str, AdapterState],
                 weights: Mapping[str, float], head: AdapterState, answers: Sequence[str], *, batch_size: int,
                 metric: str, site: str | None) -> None:
        with torch.random.fork_rng(devices=[]):  # LocalModel seeds torch's generator to initialise what we replace
            self._model = LocalModel(foundation, lora, tuple(adapters), (), len(answers), seed=0)
        for name, state in adapters.items():
            self._model.adapters.set_state(name, state)
        self._model.set_head_state(head)
        self._model.classifier.eval()
        self._weights = dict(weights)
        self._tokenizer = foundation.tokenizer
        self.image_size = foundation.image_size
        self.max_text_length = foundation.max_text_length
        self.batch_size = batch_size
        self.answers: tuple[str, ...] = tuple(answers)  # the columns of predict_proba
        self.metric = metric  # the accuracy in metrics.jsonl this mode reproduces for its site ("dat", "shared")
        self.site = site

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, site: str | None = None) -> Predictor:
        """The model ``site`` evaluates with at the end of the run in ``run_dir`` (see the module's table), or the
        global model when ``site`` is None, which needs a global head (``model.head = "shared"``, or a
        centralized run)."""
        run = Path(run_dir)
        if not (run / "config.toml").is_file():
            raise ResultError(f"{str(run)!r} is not a run folder (it has no config.toml)")
        if not (run / "manifest.json").is_file():
            raise ResultError(f"run {str(run)!r} did not finish (it has no manifest.json): resume it or run it again")
        config = load_config(run / "config.toml")
        adapter_dirs, weights, head_dir, metric = _inference_mode(run, config, site)
        adapters = {name: _read_safetensors(folder / "adapter_model.safetensors")
                    for name, folder in adapter_dirs.items()}
        foundation = _base_model(run, config, next(iter(adapter_dirs.values())))
        answers = _read_answers(head_dir / ANSWERS_FILE)
        head = _read_safetensors(head_dir / HEAD_FILE)
        lora = LoraSettings.of(config.model)
        try:
            return cls(foundation, lora, adapters, weights, head, answers,
                       batch_size=config.training.eval_batch_size, metric=metric, site=site)
        except AdapterStateError as error:
            raise ResultError(f"run {str(run)!r}: the saved model does not fit its configuration: {error}") from None

    # ------------------------------------------------------------------------------------------ inference

    def predict(self, images: Sequence[ImageInput], questions: Sequence[str]) -> list[str]:
        """The answer to each question about the image at the same position."""
        logits = self._logits(images, questions)
        return [self.answers[i] for i in logits.argmax(-1).tolist()]

    def predict_proba(self, images: Sequence[ImageInput], questions: Sequence[str]) -> np.ndarray:
        """(N, len(answers)) probabilities, one row per question, columns in the order of :attr:`answers`."""
        return torch.softmax(self._logits(images, questions), dim=-1).numpy()

    def encode(self, images: Sequence[ImageInput], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors the model reads: ``pixel_values`` (N, 3, S, S), ``input_ids`` and ``attention_mask``
        (N, max text length), made exactly as training made them."""
        if isinstance(questions, str):
            raise TypeError("questions must be a sequence of strings, one per image, not one string")
        images, questions = list(images), list(questions)
        if not all(isinstance(q, str) for q in questions):
            raise TypeError("questions must be strings")
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions: give one question per image")
        if not questions:
            empty = torch.zeros(0, self.max_text_length, dtype=torch.long)
            return {"pixel_values": torch.zeros(0, 3, self.image_size, self.image_size), "input_ids": empty,
                    "attention_mask": empty.clone()}
        text = self._tokenizer([normalise_question(q) for q in questions], padding="max_length", truncation=True,
                               max_length=self.max_text_length, return_tensors="pt")
        pixels = images_to_pixels([_image_array(image, i, self.image_size) for i, image in enumerate(images)])
        return {"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}

    @torch.no_grad()
    def _logits(self, images: Sequence[ImageInput], questions: Sequence[str]) -> torch.Tensor:
        inputs = self.encode(images, questions)
        size = len(inputs["input_ids"])
        if size == 0:
            return torch.zeros(0, len(self.answers))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torch.cat([self._model.logits({k: v[start:start + self.batch_size] for k, v in inputs.items()},
                                                 self._weights)
                              for start in range(0, size, self.batch_size)])


# ----------------------------------------------------------------------------------------- the saved result


def run_sites(run_dir: str | os.PathLike) -> tuple[str, ...]:
    """The sites of a run that saved their model (each has ``parties/<site>/shared_adapter/``)."""
    parties = Path(run_dir) / PARTIES_DIR
    if not parties.is_dir():
        return ()
    return tuple(sorted(p.name for p in parties.iterdir() if (p / f"{SHARED}_adapter").is_dir()))


def _inference_mode(run: Path, config: RunConfig, site: str | None) -> tuple[dict[str, Path], dict[str, float],
                                                                             Path, str]:
    """(adapter name → saved folder, the adapters' scalings, the head's folder, the metric it reproduces)."""
    name = config.federation.algorithm
    centralized = name == "centralized"
    algorithm = None if centralized else get_algorithm(name)
    # A centralized run's one model always has its head; a federation's travels when heads are shared.
    head_is_global = centralized or (config.model.head == "shared" and algorithm.sends_updates)
    global_dir = run / GLOBAL_ADAPTER_DIR
    sites = run_sites(run)
    if site is None:
        if not centralized and not algorithm.global_model_whole:
            raise ResultError(f"run {str(run)!r} has no global model ({name}: each site keeps its own LoRA B "
                              f"matrices); choose one of its sites: {', '.join(sites) or 'none'}")
        if not head_is_global:
            raise ResultError(f"run {str(run)!r} has no global model with a head ({name}, model.head = "
                              f"{config.model.head!r}: each site keeps its own); choose one of its sites: "
                              f"{', '.join(sites) or 'none'}")
        return {SHARED: global_dir}, dict(SHARED_ONLY), global_dir, "shared"
    if site not in sites:
        hint = "; a centralized run has one global model: use site=None" if centralized else ""
        raise ResultError(f"run {str(run)!r} has no site {site!r} (its sites: {', '.join(sites) or 'none'}){hint}")
    site_dir = run / PARTIES_DIR / site
    head_dir = global_dir if head_is_global else site_dir
    if CLIENT in algorithm.kept:  # a client adapter is kept for the Dual-Adapter Teacher: FedDAT's site inference
        return ({CLIENT: site_dir / f"{CLIENT}_adapter", FROZEN_GLOBAL: site_dir / f"{SHARED}_adapter"},
                dict(DUAL_ADAPTER_TEACHER), head_dir, "dat")
    return {SHARED: site_dir / f"{SHARED}_adapter"}, dict(SHARED_ONLY), head_dir, "shared"


def _base_model(run: Path, config: RunConfig, adapter_dir: Path) -> Foundation:
    """The base model the adapter in ``adapter_dir`` names, checked against the SHA-256 the run's manifest pins
    (a random-init run's base is rebuilt from the run's seed, as the run built it)."""
    adapter_config = adapter_dir / "adapter_config.json"
    try:
        named = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    except FileNotFoundError:
        raise ResultError(f"{str(adapter_config)!r} is missing: the run's result is incomplete") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ResultError(f"{str(adapter_config)!r} is not a readable adapter configuration ({error})") from None
    base = (adapter_dir / named).resolve()  # a relative name is relative to the adapter folder
    if not base.is_dir():
        raise ResultError(f"the base model {str(base)!r} named by {str(adapter_config)!r} is not a folder (moved "
                          "or deleted?)")
    if folder_digest(base) != _pinned_base_model(run):
        raise ResultError(f"the base model {str(base)!r} is not the one run {str(run)!r} trained on (its SHA-256 "
                          "differs from the one in manifest.json)")
    with torch.random.fork_rng(devices=[]):  # a random-init base is rebuilt by seeding torch's generator
        return load_foundation(base, random_init=config.model.random_init, seed=config.seed)


def _pinned_base_model(run: Path) -> str:
    """The base model's SHA-256 that the run's manifest records."""
    path = run / "manifest.json"
    try:
        digest = json.loads(path.read_text())["base_model"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ResultError(f"{str(path)!r} records no base model digest ({type(error).__name__}: {error})") from None
    return str(digest)


def _read_safetensors(path: Path) -> AdapterState:
    if not path.is_file():
        raise ResultError(f"{str(path)!r} is missing: the run's result is incomplete")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise ResultError(f"{str(path)!r} is not a readable safetensors file ({error})") from None


def _read_answers(path: Path) -> list[str]:
    if not path.is_file():
        raise ResultError(f"{str(path)!r} is missing: the run's result is incomplete")
    try:
        answers = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ResultError(f"{str(path)!r} is not readable JSON ({error})") from None
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ResultError(f"{str(path)!r} is not a list of answers")
    return answers


def _image_array(image: ImageInput, index: int, size: int) -> np.ndarray:
    """One image as the model's (size, size, 3) uint8 RGB array, as :func:`~feddat_secure.data.images.load_image`
    makes it from a file: upright (EXIF), converted by :func:`~feddat_secure.data.images.to_rgb` (16-bit scaled,
    transparency onto white), stretched to a square with the bilinear filter."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        try:
            return load_image(path, size)
        except OSError as error:  # missing, unreadable, or not an image PIL can decode
            raise DataError(f"image {index} ({str(path)!r}): cannot read it ({error.strerror or error})") from None
    if isinstance(image, np.ndarray):
        try:
            image = Image.fromarray(image)
        except (TypeError, ValueError):
            raise DataError(f"image {index}: an array of dtype {image.dtype} and shape {image.shape} is not an image; "
                            "give (H, W, 3) uint8 RGB, (H, W, 4) RGBA, or (H, W) 8- or 16-bit greyscale") from None
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {index}: expected a numpy array, a PIL image or a file path, got "
                        f"{type(image).__name__}")
    rgb = to_rgb(ImageOps.exif_transpose(image), f"image {index}")
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8).copy()
