"""FedDAT against the adapter baselines and the data's own reference scores; writes docs/results.md.

Every run goes through ``feddat_secure.federation.runner.run``, the code behind ``feddat-secure run``. Every
method of a table gets the same data, rounds, batch size and learning rate; ``fedavg-3x`` is FedAvg given three
times the local steps (a FedDAT step costs ≈ 3 FedAvg steps, measured below), so FedDAT is also compared at equal
compute. Next to the methods stand two scores read off the data without training
(``feddat_secure.data.baselines``): always the site's majority answer, and the question-only (no-image) lookup.

Each (benchmark, method, seed, setting) result is cached as one JSON file in ``--cache`` (committed under
``benchmarks/results/compare_methods``), so the grid runs in resumable pieces: a rerun only trains what is
missing, and ``--report-only`` rebuilds the tables from the cache without training.

Reported per benchmark (seeds are paired: one seed is one dataset, shared by every method):
- the mean over sites of each site's test accuracy after the last round, mean over seeds with a 95 % t-interval;
- the worst site's accuracy, mean over seeds;
- paired differences (FedDAT − other) over seeds with a 95 % t-interval.

The default grid is the four benchmarks on which centralized training clears question-only by at least 15 points
(``function-grounded``, ``domain-grounded``, ``task-grounded``, ``easy-vqa``; 7 methods, 5 seeds): one table with
every method at 0.001, and one with each method at its own rate of {0.001, 0.003}, chosen on a validation split.
The five-family benchmarks of docs/results_five_family.md ran ``--benchmarks function domain --learning-rates 0.003
--select-learning-rate`` (no selection).

    python benchmarks/compare_methods.py                    # the default grid (resumes from the cache)
    python benchmarks/compare_methods.py --quick            # a smoke run of the script (a temporary cache)
    python benchmarks/compare_methods.py --report-only      # tables from the cache alone
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cells import (
    BENCHMARK_VARIANTS,
    REVISION,
    baseline_cell,
    data_config,
    interval,
    percent,
    provenance,
    run_cell,
    site_scores,
    write_json,
)

from feddat_secure.config import config_from_dict
from feddat_secure.data.batching import encode_split
from feddat_secure.data.synthetic import synthetic_benchmark
from feddat_secure.model.adapters import LoraSettings
from feddat_secure.model.backbone import load_foundation
from feddat_secure.training.local_model import LocalModel
from feddat_secure.training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, AdapterTrainer, FedDATTrainer, Schedule

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "results" / "compare_methods"
COMPUTE_MATCH = 3  # fedavg-3x: local steps × this (a FedDAT step costs ≈ 2.9 FedAvg steps, measured below)
# rows that run another method with one change: (the algorithm, its training keys); fedavg-3x also multiplies the
# local steps by COMPUTE_MATCH. The FedDAT ablations (docs/configuration.md): without distillation; A_c trained
# in round 1 only (as the official code's); the head also stepped on the DAT's loss (modelled on its one optimizer).
VARIANTS = {"fedavg-3x": ("fedavg", {}), "feddat-no-distill": ("feddat", {"distill_weight": 0.0}),
            "feddat-ac-round1": ("feddat", {"client_adapter_rounds": 1}),
            "feddat-head-dat": ("feddat", {"head_in_dat_loss": True})}
METHODS = ("feddat", "fedavg", "fedavg-3x", "fedprox", "ffa-lora", "fedsa-lora", "local", "centralized",
           "feddat-no-distill", "feddat-ac-round1", "feddat-head-dat")
LABELS = {"feddat": "FedDAT (DAT)", "fedavg": "FedAvg-adapter",
          "fedavg-3x": f"FedAvg-adapter, {COMPUTE_MATCH}× local steps",
          "feddat-no-distill": "FedDAT without distillation (distill_weight 0)",
          "feddat-ac-round1": "FedDAT, A_c trained in round 1 only",
          "feddat-head-dat": "FedDAT, head also stepped on the DAT loss",
          "fedprox": "FedProx (μ = 0.01)", "ffa-lora": "FFA-LoRA (A frozen, B aggregated)",
          "fedsa-lora": "FedSA-LoRA (A aggregated, B kept)", "local": "local-only",
          "centralized": "centralized (pooled data)"}
BASELINES = {"question_only": "question-only (no image), site's own data",
             "question_only_pooled": "question-only (no image), every site's data",
             "majority": "majority answer"}
FEDDAT_MODES = {"shared": "A_s (global) alone", "client": "A_c alone"}


@dataclass(frozen=True)
class Setting:
    """What a table's runs share. One setting and one seed fix the data; every method trains on it."""

    rounds: int = 6
    local_steps: int = 20
    batch_size: int = 16
    learning_rate: float = 3e-3
    train_per_client: int = 1000
    test_per_client: int = 500
    num_clients: int = 5
    foundation: str = "embedded"  # model.path: an embedded foundation's name or a checkpoint folder


def run_config(benchmark: str, method: str, seed: int, setting: Setting, output_dir: str,
               validation_fraction: float = 0.0) -> dict:
    """The run configuration of one cell, as ``feddat-secure run`` would read it from a TOML file; with
    ``validation_fraction``, scored on that held-out part of each site's training data instead of its test split."""
    steps = setting.local_steps * (COMPUTE_MATCH if method == "fedavg-3x" else 1)
    algorithm, changes = VARIANTS.get(method, (method, {}))
    config = {
        "seed": seed, "output_dir": output_dir,
        "data": data_config(benchmark, num_clients=setting.num_clients, train_per_client=setting.train_per_client,
                            test_per_client=setting.test_per_client),
        "federation": {"rounds": setting.rounds, "fedprox_mu": 0.01,
                       "algorithm": algorithm},
        "training": {"local_steps": steps, "batch_size": setting.batch_size,
                     "learning_rate": setting.learning_rate, **changes},
        "model": {"head": "local", **({"path": setting.foundation} if setting.foundation != "embedded" else {})},
    }
    if validation_fraction:
        config["data"]["validation_fraction"] = validation_fraction
    return config


def grid_cell(cache: Path, benchmark: str, method: str, seed: int, setting: Setting, *, train: bool,
              validation_fraction: float = 0.0) -> tuple[dict | None, bool]:
    """One cell of the grid (``cells.run_cell``): cached, or trained now when ``train`` is set."""
    label = (f"{benchmark}-{method}-lr{setting.learning_rate:g}-s{seed}"
             + ("-validation" if validation_fraction else "")
             + ("" if setting.foundation == "embedded" else f"-{Path(setting.foundation).name}"))
    return run_cell(cache, label, run_config(benchmark, method, seed, setting, "", validation_fraction), train=train)


def choose_rates(cache: Path, benchmarks: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
                 base: Setting, candidates: Sequence[float], fraction: float, *, train: bool
                 ) -> dict[tuple[str, str], tuple[float | None, dict[float, float]]]:
    """Per (benchmark, method): the candidate learning rate whose runs score best on the held-out validation part
    of the training data (site mean, mean over ``seeds``; a tie goes to the smaller rate), with every candidate's
    score; (None, scores) while some validation cell is missing. The test split is never looked at."""
    chosen = {}
    for benchmark in benchmarks:
        for method in methods:
            scores = {}
            for rate in candidates:
                setting = dataclasses.replace(base, learning_rate=rate)
                cells = [grid_cell(cache, benchmark, method, seed, setting, train=train,
                                   validation_fraction=fraction)[0] for seed in seeds]
                if all(cell is not None for cell in cells):
                    scores[rate] = float(np.mean([np.mean(site_scores(cell, deployed_mode(method))) for cell in cells]))
            best = max(sorted(scores), key=lambda rate: scores[rate]) if len(scores) == len(candidates) else None
            chosen[benchmark, method] = best, scores
    return chosen


def deployed_mode(method: str) -> str:
    """The model each method deploys: FedDAT's Dual-Adapter Teacher, else the one adapter."""
    return "dat" if VARIANTS.get(method, (method,))[0] == "feddat" else "shared"


def time_local_steps(steps: int, foundation_path: str) -> tuple[float, float]:
    """Seconds per local step of FedDAT and FedAvg on identical batches, same process, on ``foundation_path``."""
    foundation = load_foundation(foundation_path)
    bench = synthetic_benchmark("function", num_clients=1, train_per_client=256, test_per_client=1,
                                image_size=foundation.image_size, seed=0)
    split = encode_split(bench.clients[0].train, foundation.tokenizer, bench.answer_index,
                         foundation.max_text_length, foundation.image_size)
    lora = LoraSettings()
    schedule = Schedule(config_from_dict({}).training, rounds=1)
    answers = len(bench.answers)
    feddat = FedDATTrainer(LocalModel(foundation, lora, (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT),
                                      answers, 0), schedule, head_travels=False)
    fedavg = AdapterTrainer(LocalModel(foundation, lora, (SHARED,), (SHARED,), answers, 0), schedule,
                            head_travels=False)
    timings = {}
    for name, trainer in (("fedavg", fedavg), ("feddat", feddat), ("fedavg2", fedavg), ("feddat2", feddat)):
        batches = list(split.sample_batches(16, steps, np.random.default_rng(0)))
        start = time.perf_counter()
        trainer.train_round(batches, 0)
        timings[name] = (time.perf_counter() - start) / steps
    # Each trainer ran twice (warm-up effects cancel); keep the faster of its two runs.
    return min(timings["feddat"], timings["feddat2"]), min(timings["fedavg"], timings["fedavg2"])


def report(cache: Path, benchmarks: Sequence[str], methods: Sequence[str], seeds: Sequence[int], base: Setting,
           settings: Sequence[Setting], step_times: tuple[float, float] | None, command: str,
           selection: tuple[dict, Sequence[float], float, Sequence[int]] | None = None,
           against: str | None = None) -> str:
    """docs/results.md from the cache: one table per fixed learning rate of ``settings`` (sizes and schedule of
    ``base``), and with ``selection`` (the chosen rates, the candidates, the validation fraction, the selection
    seeds) one with each method at its chosen rate; with ``against`` (another foundation), each fixed-rate row minus
    the same configuration on that foundation. Each table reports the seeds every one of its rows has; the
    missing cells are listed."""
    lines = [
        "# Results: FedDAT, the adapter baselines and the data's reference scores",
        "",
        "Measured by `benchmarks/compare_methods.py` on "
        + ("the embedded foundation" if base.foundation == "embedded" else f"the foundation `{base.foundation}`")
        + f" (CPU: "
        f"{platform.processor() or platform.machine()}; the cells' revisions and torch threads are listed at the "
        "end of the tables); every number "
        "below is read from the cached cells in `benchmarks/results/compare_methods/` (each holds its full "
        "configuration and the revision it ran on). Reproduce, or resume, with:",
        "", "```", command, "```", "",
        f"Setup: {base.num_clients} sites, {base.train_per_client} train / {base.test_per_client} test examples each, "
        f"{base.rounds} rounds of {base.local_steps} local steps (batch {base.batch_size}; `fedavg-3x`: "
        f"{COMPUTE_MATCH * base.local_steps}), AdamW at a constant learning rate (one for every method of a table, or "
        "each method's own chosen on a validation split), LoRA "
        "rank 8 on attention and feed-forward projections, local answer heads over each site's own answers, every "
        "site every round, aggregation weighted by example counts. Centralized trains one adapter and one head on "
        "the pooled data for as many steps as the whole federation. FedDAT is scored with its Dual-Adapter Teacher "
        "(A_c + global adapter). A seed fixes the data (every method of a seed sees the same examples), so "
        "differences are paired by seed; each table says which seeds every one of its rows has.",
        "",
        "Accuracy (%) on each site's test split after the last round: **site mean** is the mean over sites (then "
        "over seeds, ± the half-width of a 95 % t-interval over seeds), **worst site** the lowest site's accuracy "
        "(mean over seeds), **top answer** the share of a site's test predictions that are its most frequent "
        "predicted answer (mean over sites and seeds; predicted by `Predictor.from_run` from the saved model, whose "
        "accuracy is checked against the run's own). The reference rows need no training: *question-only* "
        "answers from the question's words alone, by a lookup of its template or exact wording fitted on the "
        "training data (a strong reference for what ignoring the image gets, not a bound; docs/data.md), "
        "*majority* always gives the site's most frequent training answer (`feddat_secure/data/baselines.py`).",
    ]
    missing, unreproduced, reported = [], [], []
    tables = [(f"Learning rate {setting.learning_rate:g}", lambda _b, _m, fixed=setting: fixed) for setting in settings]
    if selection is not None:
        chosen, candidates, fraction, selection_seeds = selection
        lines += ["", "## Learning rates chosen on a validation split", "",
                  f"Each method's rate is the candidate ({', '.join(f'{r:g}' for r in candidates)}) whose runs score "
                  f"best, site mean over seeds {', '.join(map(str, selection_seeds))}, on the last "
                  f"{100 * fraction:g} % of each site's training examples held out of training "
                  "(`data.validation_fraction`); the test split plays no part in the choice.", "",
                  "| method | " + " | ".join(benchmarks) + " |", "|---|" + "---|" * len(benchmarks)]
        for method in methods:
            lines.append(f"| {LABELS[method]} | " + " | ".join(
                ("not yet chosen" if chosen[b, method][0] is None else f"**{chosen[b, method][0]:g}**") + " ("
                + ", ".join(f"{r:g}: {100 * v:.1f}" for r, v in sorted(chosen[b, method][1].items())) + ")"
                for b in benchmarks) + " |")
        tables.append(("Each method at its chosen learning rate",
                       lambda b, m: None if chosen[b, m][0] is None else
                       dataclasses.replace(base, learning_rate=chosen[b, m][0])))
    for title, setting_of in tables:
        lines += ["", f"## {title}", ""]
        header = "| method | " + " | ".join(f"{b}: site mean | worst site | top answer" for b in benchmarks) + " |"
        lines += [header, "|---|" + "---|---|---|" * len(benchmarks)]
        per_seed: dict[tuple[str, str], list[float]] = {}
        used_seeds: dict[str, list[int]] = {}
        for benchmark in benchmarks:
            found = {method: {seed: None if setting_of(benchmark, method) is None else
                              grid_cell(cache, benchmark, method, seed, setting_of(benchmark, method), train=False)[0]
                              for seed in seeds} for method in methods}
            missing += [f"{benchmark}/{method}/{title.lower()}/seed {seed}"
                        for method in methods for seed, one in found[method].items() if one is None]
            ran = [method for method in methods if any(one is not None for one in found[method].values())]
            # every row of a benchmark over the same seeds, so that differences are paired
            used = [seed for seed in seeds if all(found[method][seed] is not None for method in ran)]
            used_seeds[benchmark] = used
            baselines = {seed: baseline_cell(cache, run_config(benchmark, "fedavg", seed, base, ""))
                         for seed in used}
            for name in BASELINES:
                per_seed[benchmark, name] = [float(np.mean(site_scores(baselines[seed], name))) for seed in used]
                per_seed[benchmark, name + "/worst"] = [float(np.min(site_scores(baselines[seed], name)))
                                                        for seed in used]
            for method in ran if used else ():
                cells = [found[method][seed] for seed in used]
                reported += cells
                for one, seed in zip(cells, used):
                    if one["data_digest"] != baselines[seed]["data_digest"]:
                        raise SystemExit(f"{benchmark}/{method}/seed {seed}: trained on data "
                                         f"{one['data_digest'][:12]}, the baselines are of "
                                         f"{baselines[seed]['data_digest'][:12]}")
                mode = deployed_mode(method)
                per_seed[benchmark, method] = [float(np.mean(site_scores(one, mode))) for one in cells]
                per_seed[benchmark, method + "/worst"] = [float(np.min(site_scores(one, mode))) for one in cells]
                per_seed[benchmark, method + "/top"] = [
                    float(np.mean(site_scores(one, "top_answer_share", "predictions"))) for one in cells]
                for one in cells:  # the saved model must be the evaluated one
                    for site, predicted in one["predictions"].items():
                        if abs(predicted["accuracy"] - one["sites"][site][mode]) > 1e-9:
                            unreproduced.append(f"{benchmark}/{method}/seed {one['config']['seed']}/{site}: "
                                                f"{predicted['accuracy']:.3f} vs {one['sites'][site][mode]:.3f}")
                if method == "feddat":
                    for extra in FEDDAT_MODES:
                        per_seed[benchmark, extra] = [float(np.mean(site_scores(one, extra))) for one in cells]
        lines[-2:-2] = ["Seeds used: " + "; ".join(f"{b}: {', '.join(map(str, used_seeds[b])) or 'none'} "
                                                   f"({len(used_seeds[b])})" for b in benchmarks) + ".", ""]
        rows = [(method, LABELS[method]) for method in methods] + list(BASELINES.items())
        for key, label in rows:
            cells = []
            for benchmark in benchmarks:
                if (benchmark, key) in per_seed:
                    top = per_seed.get((benchmark, key + "/top"), [1.0] if key == "majority" else [])
                    cells += [percent(*interval(per_seed[benchmark, key])),
                              f"{100 * np.mean(per_seed[benchmark, key + '/worst']):.1f}",
                              f"{100 * np.mean(top):.1f}" if top else "—"]
                else:
                    cells += ["not run", "", ""]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if "feddat" in methods:
            lines += ["", "FedDAT's other inference modes (same runs, site mean; every site has as many test examples, "
                      "so the global adapter's site mean, each site reading it with its own head, is its accuracy on "
                      "the union of the sites' test sets):", "",
                      "| mode | " + " | ".join(benchmarks) + " |", "|---|" + "---|" * len(benchmarks)]
            for extra, label in FEDDAT_MODES.items():
                lines.append(f"| {label} | " + " | ".join(
                    percent(*interval(per_seed[b, extra])) if (b, extra) in per_seed else "not run"
                    for b in benchmarks) + " |")
            others = [m for m in methods if m != "feddat"] + list(BASELINES)
            lines += ["", "Paired differences, FedDAT minus each other row (percentage points, site mean; mean over "
                      "seeds ± 95 % t-interval; an interval that includes 0 is no evidence either way):", "",
                      "| FedDAT − | " + " | ".join(benchmarks) + " |", "|---|" + "---|" * len(benchmarks)]
            for other in others:
                cells = []
                for benchmark in benchmarks:
                    if (benchmark, "feddat") in per_seed and (benchmark, other) in per_seed:
                        differences = np.subtract(per_seed[benchmark, "feddat"], per_seed[benchmark, other])
                        mean, half = interval(differences)
                        cells.append(f"{100 * mean:+.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}"))
                    else:
                        cells.append("not run")
                lines.append(f"| {LABELS.get(other) or BASELINES[other]} | " + " | ".join(cells) + " |")
        if "centralized" in methods:
            lines += ["", "Centralized minus question-only (site's own data), the room a benchmark leaves to learn "
                      "from images (the issue's bar: ≥ 15 points):", ""]
            for benchmark in benchmarks:
                if (benchmark, "centralized") in per_seed:
                    mean, half = interval(np.subtract(per_seed[benchmark, "centralized"],
                                                      per_seed[benchmark, "question_only"]))
                    lines.append(f"- {benchmark}: {100 * mean:+.1f}" + ("" if math.isnan(half) else
                                                                         f" ± {100 * half:.1f}") + " points")
    if against is not None:
        lines += foundation_differences(cache, benchmarks, methods, seeds, base, settings, against)
    if reported:
        lines += ["", provenance(reported)]
    if step_times is not None:
        feddat_step, fedavg_step = step_times
        lines += ["", "## Cost of a local step", "",
                  f"FedDAT: {1000 * feddat_step:.1f} ms per local step; FedAvg-adapter: {1000 * fedavg_step:.1f} ms; "
                  f"ratio **{feddat_step / fedavg_step:.2f}x** (batch 16, same batches, same process). FedDAT does "
                  "one teacher forward pass and two forward/backward passes per batch, FedAvg one."]
    if unreproduced:
        lines += ["", "## Saved models that do not reproduce their run's accuracy", "",
                  "Predicting with `Predictor.from_run` gave another accuracy than the run's last evaluation: "
                  + "; ".join(unreproduced) + "."]
    if missing:
        lines += ["", "## Not yet run", "", "Cells missing from the cache (rerun the command to fill them in): "
                  + ", ".join(missing) + "."]
    lines += ["", "## Differential privacy", "",
              "Accuracy against ε with record-level DP and the cost of DP-SGD per local step: "
              "[results_privacy.md](results_privacy.md) (`benchmarks/privacy_tradeoff.py`).", ""]
    return "\n".join(lines)


def foundation_differences(cache: Path, benchmarks: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
                           base: Setting, settings: Sequence[Setting], against: str) -> list[str]:
    """Per fixed-rate table: each method's site mean and worst site on ``base.foundation`` minus the same
    configuration's on ``against``, paired by seed (a seed fixes the data, so both trained and were scored on the
    same examples); over the seeds both foundations' cells have. Centralized minus question-only is given for both
    foundations: the room each leaves."""
    lines = ["", f"## This foundation minus `{against}`", "",
             f"The same configurations with `model.path = \"{against}\"` (their cells are in the same cache). "
             "Percentage points, mean over the seeds both have ± 95 % t-interval, (number of seeds); an interval "
             "that includes 0 is no evidence either way."]
    for setting in settings:
        other = dataclasses.replace(setting, foundation=against)
        lines += ["", f"Learning rate {setting.learning_rate:g}:", "",
                  "| method | " + " | ".join(f"{b}: site mean | worst site" for b in benchmarks) + " |",
                  "|---|" + "---|---|" * len(benchmarks)]
        room: dict[str, list[str]] = {}
        for method in methods:
            row = []
            for benchmark in benchmarks:
                pairs = [(grid_cell(cache, benchmark, method, seed, setting, train=False)[0],
                          grid_cell(cache, benchmark, method, seed, other, train=False)[0]) for seed in seeds]
                pairs = [pair for pair in pairs if None not in pair]
                if not pairs:
                    row += ["not run", ""]
                    continue
                for new, old in pairs:
                    if new["data_digest"] != old["data_digest"]:
                        raise SystemExit(f"{benchmark}/{method}/seed {new['config']['seed']}: the two foundations' "
                                         f"runs trained on different data ({new['data_digest'][:12]} and "
                                         f"{old['data_digest'][:12]})")
                mode = deployed_mode(method)
                for reduce in (np.mean, np.min):
                    mean, half = interval([reduce(site_scores(new, mode)) - reduce(site_scores(old, mode))
                                           for new, old in pairs])
                    row.append(f"{100 * mean:+.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")
                               + f" ({len(pairs)})")
                if method == "centralized":
                    baselines = [baseline_cell(cache, run_config(benchmark, "fedavg", new["config"]["seed"], base, ""))
                                 for new, _ in pairs]
                    if any(b["data_digest"] != new["data_digest"] for b, (new, _) in zip(baselines, pairs)):
                        raise SystemExit(f"{benchmark}: the baselines are of other data than the runs")
                    for name, cells in (("this foundation", [new for new, _ in pairs]),
                                        (f"`{against}`", [old for _, old in pairs])):
                        gains = [np.mean(site_scores(one, mode)) - np.mean(site_scores(baseline, "question_only"))
                                 for one, baseline in zip(cells, baselines)]
                        mean, half = interval(gains)
                        room.setdefault(benchmark, []).append(
                            f"{name} {100 * mean:+.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}"))
            lines.append(f"| {LABELS[method]} | " + " | ".join(row) + " |")
        if room:
            lines += ["", "Centralized minus question-only on each foundation (same seeds):", ""]
            lines += [f"- {benchmark}: " + "; ".join(values) + " points" for benchmark, values in room.items()]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a temporary cache: checks the script")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--train-per-client", type=int, default=1000)
    parser.add_argument("--test-per-client", type=int, default=500)
    parser.add_argument("--benchmarks", nargs="+",
                        default=["function-grounded", "domain-grounded", "task-grounded", "easy-vqa"],
                        help="function, domain, scene, task, digits, digits-skew, easy-vqa, or one of "
                        + ", ".join(BENCHMARK_VARIANTS))
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=["feddat", "fedavg", "fedavg-3x", "ffa-lora", "fedsa-lora", "local", "centralized"])
    parser.add_argument("--learning-rates", type=float, nargs="*", default=[1e-3],
                        help="one table per rate; within a table every method uses the same rate")
    parser.add_argument("--select-learning-rate", type=float, nargs="*", default=[1e-3, 3e-3], metavar="RATE",
                        help="candidates: each method's rate is chosen on a validation split, then run on every seed "
                        "(none given: no selection)")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="share of each site's training examples held out to choose rates on")
    parser.add_argument("--selection-seeds", type=int, default=2, help="the first N seeds choose the rates")
    parser.add_argument("--foundation", default="embedded",
                        help="model.path of every run: an embedded foundation's name or a checkpoint folder")
    parser.add_argument("--against-foundation", metavar="NAME",
                        help="add each fixed-rate row minus the same run on this foundation (cached cells only)")
    parser.add_argument("--cache", default=str(CACHE), help="folder of cached cells (one JSON file each)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tables from the cache")
    parser.add_argument("--skip-step-timing", action="store_true", help="leave out the cost-of-a-step measurement")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results.md"))
    args = parser.parse_args(argv)
    seeds = list(range(1 if args.quick else args.seeds))
    sizes = (40, 20, 2) if args.quick else (args.train_per_client, args.test_per_client, args.rounds)
    base = Setting(rounds=sizes[2], local_steps=2 if args.quick else 20, train_per_client=sizes[0],
                   test_per_client=sizes[1], foundation=args.foundation)
    settings = [dataclasses.replace(base, learning_rate=rate) for rate in args.learning_rates]
    train = not args.report_only

    def run_all(pairs) -> None:
        """Every (method, setting) of ``pairs`` on every seed, seed-major: a grid stopped early has the same seeds
        for every benchmark."""
        for seed in seeds:
            for benchmark in args.benchmarks:
                baseline_cell(cache, run_config(benchmark, "fedavg", seed, base, ""))
                for method, setting in pairs(benchmark):
                    found, trained = grid_cell(cache, benchmark, method, seed, setting, train=train)
                    if found is not None:
                        score = np.mean(site_scores(found, deployed_mode(method)))
                        print(f"lr {setting.learning_rate:g} {benchmark:9} {method:12} seed {seed}: {score:.3f} "
                              f"({found['seconds']:.0f} s{'' if trained else ', cached'})", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) if args.quick else Path(args.cache)
        for setting in settings:
            run_all(lambda _benchmark, fixed=setting: [(method, fixed) for method in args.methods])
        selection = None
        if args.select_learning_rate:
            selection_seeds = seeds[:args.selection_seeds]
            chosen = choose_rates(cache, args.benchmarks, args.methods, selection_seeds, base,
                                  args.select_learning_rate, args.validation_fraction, train=train)
            for (benchmark, method), (rate, scores) in chosen.items():
                print(f"{benchmark:9} {method:12} validation: " + ", ".join(f"{r:g} {v:.3f}" for r, v in
                                                                            sorted(scores.items()))
                      + f" -> {'not yet chosen' if rate is None else f'{rate:g}'}", flush=True)
            run_all(lambda benchmark: [(method, dataclasses.replace(base, learning_rate=chosen[benchmark, method][0]))
                                       for method in args.methods if chosen[benchmark, method][0] is not None])
            selection = chosen, args.select_learning_rate, args.validation_fraction, selection_seeds
        timing = cache / "step-timing.json"
        if not (args.report_only or args.skip_step_timing):
            feddat_step, fedavg_step = time_local_steps(5 if args.quick else 40, args.foundation)
            print(f"local step: feddat {feddat_step * 1000:.1f} ms, fedavg {fedavg_step * 1000:.1f} ms, "
                  f"ratio {feddat_step / fedavg_step:.2f}")
            write_json(timing, {"feddat_s": feddat_step, "fedavg_s": fedavg_step, "revision": REVISION})
        step_times = None
        if timing.exists():
            measured = json.loads(timing.read_text())
            step_times = measured["feddat_s"], measured["fedavg_s"]
        given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]  # what fills the cells
        command = "python " + " ".join(["benchmarks/compare_methods.py", *given])
        text = report(cache, args.benchmarks, args.methods, seeds, base, settings, step_times, command, selection,
                      args.against_foundation)
    if args.quick:
        print(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
