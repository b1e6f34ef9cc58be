"""Cached benchmark cells: one run of ``feddat_secure.federation.runner.run`` (the code behind
``feddat-secure run``) per configuration, kept as one JSON file, so that a grid runs in resumable pieces.

A cell's file is named by a readable label and a digest of its whole configuration and of the foundation checkpoint
it names (its files' SHA-256): any change to either is a new cell, and an unchanged one is never trained twice (a
re-pretrained foundation under the same name must not reuse the old one's cells). A cell records what it ran (the
configuration, the foundation's digest, the revision of the code, the digest of the data), each site's last-round
accuracy, the share of each site's test predictions on its most frequent answer (predicted from the saved model,
whose accuracy is checked against the run's own) and, under differential privacy, the ε every site's ledger spent.

Used by ``compare_methods.py`` and ``privacy_tradeoff.py``; not a library module (benchmarks are scripts).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from feddat_secure.config import config_from_dict
from feddat_secure.data import FAMILIES, GROUNDED_FAMILIES, build_benchmark
from feddat_secure.data.baselines import site_baselines
from feddat_secure.federation.runner import run
from feddat_secure.model.backbone import folder_digest, load_foundation, resolve_model_path
from feddat_secure.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent
BASELINES_VERSION = "v2"  # v2: question-only backs off from the exact wording to the template (docs/data.md)


# benchmarks of the data layer with one change: (the benchmark, its question families). "-grounded" keeps the
# families the image answers (existence, attribute, counting): where centralized training clears question-only.
BENCHMARK_VARIANTS = {f"{name}-grounded": (name, GROUNDED_FAMILIES)
                      for name in ("function", "domain", "scene", "task", "texture")}


def data_config(benchmark: str, **sizes) -> dict:
    """The ``[data]`` table of a run of ``benchmark`` (a data-layer benchmark or one of ``BENCHMARK_VARIANTS``)."""
    name, families = BENCHMARK_VARIANTS.get(benchmark, (benchmark, None))
    return {"benchmark": name, **sizes, **({"question_families": list(families)} if families else {})}


def git_revision() -> str:
    """The checkout's commit, with "+dirty" when tracked files differ from it (a cell's code must be findable)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


REVISION = git_revision()  # read once: the code this process imported, even if the checkout changes while it runs


def write_json(path: Path, value: dict) -> None:
    """Whole or not at all: a run killed mid-write leaves no half file for the next resume to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path)


def interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (nan with one value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def percent(mean: float, half: float) -> str:
    return f"{100 * mean:.1f}" if math.isnan(half) else f"{100 * mean:.1f} ± {100 * half:.1f}"


def data_of(config: dict):
    """The examples of a run configuration, built by the runner's own ``build_benchmark`` (a validation split
    included): what the run trained and was scored on."""
    data = config["data"]
    return build_benchmark(data["benchmark"], path=data.get("path", ""), num_clients=data["num_clients"],
                           train_per_client=data["train_per_client"], test_per_client=data["test_per_client"],
                           image_size=load_foundation(model_path(config)).image_size, seed=config["seed"],
                           validation_fraction=data.get("validation_fraction", 0.0),
                           question_families=tuple(data.get("question_families", FAMILIES)))


def baseline_cell(cache: Path, config: dict) -> dict:
    """The reference scores of a configuration's data (``feddat_secure.data.baselines``); cached too (7,500
    images take seconds to generate)."""
    data = config["data"]
    name = (f"{data['benchmark']}-n{data['num_clients']}-{data['train_per_client']}-{data['test_per_client']}"
            f"-s{config['seed']}"
            + (f"-val{data['validation_fraction']:g}" if data.get("validation_fraction") else "")
            + (f"-{'+'.join(data['question_families'])}" if data.get("question_families") else "")
            + f"-baselines-{BASELINES_VERSION}.json")
    path = cache / name
    if path.exists():
        return json.loads(path.read_text())
    benchmark = data_of(config)
    cell = {"benchmark": data["benchmark"], "seed": config["seed"], "data_digest": benchmark.digest(),
            "sites": {site: asdict(scores) for site, scores in site_baselines(benchmark).items()}}
    write_json(path, cell)
    return cell


def model_path(config: dict) -> str:
    """The foundation a run configuration names (``model.path``; the ``embedded`` one by default)."""
    return config.get("model", {}).get("path", "embedded")


@functools.cache
def foundation_digest(path: str) -> str:
    """SHA-256 of the files of the foundation ``path`` names (``backbone.folder_digest``), read once a process;
    SystemExit when it names no folder (a mistyped name would otherwise key every cell by the digest of nothing)."""
    folder = resolve_model_path(path)
    if not folder.is_dir():
        raise SystemExit(f"foundation {path!r}: {str(folder)!r} is not a folder (an embedded foundation's name, "
                         "or a checkpoint folder)")
    return folder_digest(folder)


def cell_path(cache: Path, label: str, config: dict) -> Path:
    """Where a configuration's cell lives: ``<label>-<first 12 hex of a SHA-256>.json``, over the configuration and
    the digest of the foundation it names."""
    keyed = {"config": config, "foundation": foundation_digest(model_path(config))}
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]
    return cache / f"{label}-{digest}.json"


def prediction_shares(run_dir: Path, centralized: bool, data) -> dict[str, dict[str, float]]:
    """Per site, from the run's saved model (``Predictor.from_run``, what a user deploys): the share of test
    predictions on the site's most frequent predicted answer (a model that collapsed to the answer prior gives
    one answer nearly always) and the accuracy those predictions score (it must equal the run's own last-round
    accuracy: the saved model is the evaluated one)."""
    shares = {}
    for client in data.clients:
        predictor = Predictor.from_run(run_dir, site=None if centralized else client.client_id)
        answers = predictor.predict([e.image for e in client.test], [e.question for e in client.test])
        shares[client.client_id] = {
            "top_answer_share": max(Counter(answers).values()) / len(answers),
            "accuracy": sum(a == e.answer for a, e in zip(answers, client.test)) / len(answers)}
    return shares


def spent_epsilon(run_dir: Path) -> list[dict] | None:
    """Every DP ledger's ε after the run (from the run's privacy report): None without DP."""
    report = run_dir / "privacy_report.json"
    if not report.exists():
        return None
    ledgers = json.loads(report.read_text())["ledgers"]
    return [{key: ledger[key] for key in ("client", "level", "accountant", "epsilon", "delta")} for ledger in ledgers]


def run_cell(cache: Path, label: str, config: dict, *, train: bool) -> tuple[dict | None, bool]:
    """The cell of ``config`` (a run configuration as a TOML file would give it, with ``output_dir`` ""),
    training it first when it is missing and ``train`` is set; None when missing and not trained. Also returns
    whether it was trained now. A DP run's dataset ledgers go to the run's temporary folder: a benchmark must
    not charge the budget of a dataset's real ledger."""
    path = cell_path(cache, label, config)
    if path.exists():
        return json.loads(path.read_text()), False
    if not train:
        return None, False
    with tempfile.TemporaryDirectory() as folder:
        raw = {**config, "output_dir": folder, "name": "cell",  # the run's receipt stays with it, not in the home
               "audit": {**config.get("audit", {}), "receipt_dir": str(Path(folder) / "receipts")}}
        if "privacy" in raw:
            raw["privacy"] = {**raw["privacy"], "dataset_ledger_dir": str(Path(folder) / "ledgers")}
        start = time.perf_counter()
        result = run(config_from_dict(raw), progress=False, echo=lambda _: None)
        seconds = time.perf_counter() - start
        data_digest = json.loads((result.run_dir / "manifest.json").read_text())["data"]["sha256"]
        centralized = config["federation"]["algorithm"] == "centralized"
        predictions = prediction_shares(result.run_dir, centralized, data_of(config))
        epsilon = spent_epsilon(result.run_dir)
    final = result.history[-1]
    sites = final["clients"]
    if any(scores is None for scores in sites.values()):  # DP: the sites kept their metrics (a simulation's
        sites = next(kept["clients"] for kept in result.site_history if kept["round"] == final["round"])  # operator)
    cell = {"label": label, "config": config, "foundation": foundation_digest(model_path(config)),
            "revision": REVISION, "torch_threads": torch.get_num_threads(),
            "seconds": round(seconds, 1),
            "data_digest": data_digest, "sites": sites, "predictions": predictions, "epsilon": epsilon,
            "rounds_run": len(result.history), "stopped": result.stopped}
    write_json(path, cell)
    return cell, True


def provenance(cells: Sequence[dict]) -> str:
    """What a table's cells ran on, for its caption: the code revisions and torch thread counts, with how many
    cells each, and the cells that stopped before their last round (a privacy budget), which a reader must know."""
    revisions = Counter(cell.get("revision", "unknown") for cell in cells)
    threads = Counter(str(cell.get("torch_threads", "not recorded")) for cell in cells)
    stopped = [cell["label"] for cell in cells if cell.get("stopped")]
    text = (f"Cells ran at revision {', '.join(f'{r} ({n})' for r, n in sorted(revisions.items()))}; torch threads "
            f"{', '.join(f'{t} ({n})' for t, n in sorted(threads.items()))}.")
    if any(revision.endswith("+dirty") for revision in revisions):
        text += " A revision marked +dirty ran with uncommitted changes."
    return text + (f" Stopped before their last round: {', '.join(stopped)}." if stopped else "")


def site_scores(cell: dict, key: str, field: str = "sites") -> list[float]:
    """Per-site values of a cell, in site order: an inference mode's accuracy or a baseline (``field`` "sites"),
    or a prediction statistic (``field`` "predictions")."""
    return [float(scores[key]) for _, scores in sorted(cell[field].items())]
