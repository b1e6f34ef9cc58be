"""Record-level DP: accuracy against ε (with the data's reference scores), and the cost of DP-SGD per step.

Two measurements, written to docs/results_privacy.md:

``accuracy``
    one cell per (method, ε, seed): a federation run by ``feddat_secure.federation.runner.run`` (the code behind
    ``feddat-secure run``) with record-level DP at a target ε (σ calibrated by the runner so that a site taking
    part in every round ends at ε; δ = 1e-5), cached as one JSON file in ``--cache`` (committed under
    ``benchmarks/results/privacy_tradeoff``) so that the grid runs in resumable pieces (``cells.py``). ε = ∞ is
    the same run without DP. Next to each accuracy stand
    the majority answer and question-only (no image) scores of the same data, and the share of predictions on
    each site's most frequent answer (a model that collapsed to the answer prior gives one answer nearly always).
``cost``
    ms per local step of each trainer without DP and with DP-SGD (Opacus per-sample gradients, per-sample
    clipping, noise; Poisson batches of the same expected size), in the same process, interleaved round by round
    so that load on the machine hits both alike (raw numbers in docs/results_privacy.json).

    python benchmarks/privacy_tradeoff.py accuracy            # the grid (resumes from the cache)
    python benchmarks/privacy_tradeoff.py cost
    python benchmarks/privacy_tradeoff.py report              # the Markdown from the cache and the JSON alone
    python benchmarks/privacy_tradeoff.py all --quick         # smoke run of the script itself
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from cells import BENCHMARK_VARIANTS, baseline_cell, data_config, interval, percent, provenance, run_cell, site_scores

from feddat_secure.config import RecordPrivacyConfig, TrainingConfig
from feddat_secure.data import build_benchmark
from feddat_secure.data.batching import encode_split
from feddat_secure.federation.algorithms import dp_steps_per_batch
from feddat_secure.model.adapters import LoraSettings
from feddat_secure.model.backbone import load_foundation
from feddat_secure.privacy import make_record_privacy
from feddat_secure.training.local_model import LocalModel
from feddat_secure.training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, AdapterTrainer, FedDATTrainer, Schedule

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "results" / "privacy_tradeoff"
METHODS = {"feddat": "FedDAT (DAT)", "fedavg": "FedAvg-adapter", "ffa-lora": "FFA-LoRA (A frozen, B aggregated)"}
LORA = LoraSettings(rank=8, alpha=16.0)  # the config defaults
DELTA = 1e-5
CLIP = 1.0


COST_METHODS = ("feddat", "fedavg")  # the two trainers whose step cost is timed


def make_trainer(method: str, foundation, num_answers: int, training: TrainingConfig, rounds: int, seed: int,
                 privacy=None):
    """A site's trainer for the cost measurement: FedDAT's, or one adapter trained with cross-entropy."""
    if method == "feddat":
        model = LocalModel(foundation, LORA, (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT), num_answers, seed)
        return FedDATTrainer(model, Schedule(training, rounds), head_travels=False, privacy=privacy)
    model = LocalModel(foundation, LORA, (SHARED,), (SHARED,), num_answers, seed)
    return AdapterTrainer(model, Schedule(training, rounds), head_travels=False, privacy=privacy)


def encoded_sites(foundation, clients: int, train: int, test: int, seed: int):
    """The function benchmark's sites as model tensors, labels over each site's own answers (as the runner)."""
    benchmark = build_benchmark("function", path="", num_clients=clients, train_per_client=train,
                                test_per_client=test, image_size=foundation.image_size, seed=seed)
    sites = []
    for client in benchmark.clients:  # local heads answer over the site's own answer set, as in the runner
        index = {answer: i for i, answer in enumerate(client.answers)}
        sites.append(tuple(encode_split(split, foundation.tokenizer, index, foundation.max_text_length,
                                        foundation.image_size) for split in (client.train, client.test))
                     + (len(client.answers),))
    return sites


def record_privacy(target_epsilon: float, dataset_size: int, training: TrainingConfig, rounds: int, method: str,
                   accountant: str = "rdp"):
    """DP-SGD settings for a target ε (σ calibrated under ``accountant``, as the runner does); ∞: no DP; 0: the
    DP-SGD path with σ = 0 (clipping only, no privacy)."""
    if math.isinf(target_epsilon):
        return None
    config = RecordPrivacyConfig(enabled=True, target_epsilon=target_epsilon or 8.0, max_grad_norm=CLIP,
                                 delta=DELTA, reproducible=True,  # seeded noise: reproducible numbers, no privacy claim
                                 accountant=accountant)
    settings = make_record_privacy(config, dataset_size=dataset_size, batch_size=training.batch_size,
                                   local_steps=training.local_steps, rounds=rounds,
                                   steps_per_batch=dp_steps_per_batch(method))
    return settings if target_epsilon else dataclasses.replace(settings, noise_multiplier=0.0)


# ---------------------------------------------------------------- cost of a local step

def measure_cost(foundation, repeats: int, steps: int, quick: bool) -> dict:
    training = TrainingConfig(local_steps=steps, batch_size=16, learning_rate=3e-3)
    train, _, answers = encoded_sites(foundation, 1, 40 if quick else 200, 10, seed=0)[0]
    results = {}
    for method in COST_METHODS:
        privacy = record_privacy(3.0, len(train), training, 6, method)
        trainers = {"non-private": make_trainer(method, foundation, answers, training, 6, seed=1),
                    "DP-SGD": make_trainer(method, foundation, answers, training, 6, seed=1, privacy=privacy)}
        times = {name: [] for name in trainers}
        rng = np.random.default_rng(0)
        for round_index in range(repeats + 1):
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_round_on(train, rng, round_index % 6)
                if round_index:  # the first round warms up
                    times[name].append((time.perf_counter() - start) / steps * 1000)
        results[method] = {name: statistics.median(values) for name, values in times.items()}
        results[method]["ratio"] = results[method]["DP-SGD"] / results[method]["non-private"]
        print(f"{method}: {results[method]}", flush=True)
    return {"batch_size": training.batch_size, "steps_per_round": steps, "rounds_timed": repeats,
            "dataset_size": len(train), "per_method": results}


# ---------------------------------------------------------------- accuracy against ε

def run_config(method: str, epsilon: float, seed: int, args: argparse.Namespace) -> dict:
    """One cell's run configuration, as ``feddat-secure run`` would read it from a TOML file."""
    config = {
        "seed": seed, "output_dir": "",
        "data": data_config(args.benchmark, num_clients=args.clients, train_per_client=args.train_per_client,
                            test_per_client=args.test_per_client),
        "federation": {"rounds": args.rounds, "algorithm": method},
        "training": {"local_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate},
        "model": {"head": "local"},
    }
    if args.ema_decay:  # the site evaluates the EMA of its own weights (0, the default, stays out of the cell's key)
        config["training"]["ema_decay"] = args.ema_decay
    if not math.isinf(epsilon):  # seeded noise: reproducible numbers, no privacy claim (a benchmark, not a release)
        config["privacy"] = {"record": {"enabled": True, "target_epsilon": epsilon, "max_grad_norm": CLIP,
                                        "delta": DELTA, "reproducible": True}}
        if args.accountant != "rdp":  # σ calibrated under this accountant (the default stays out of the cell's key)
            config["privacy"]["record"]["accountant"] = args.accountant
    return config


def accuracy_cell(cache: Path, method: str, epsilon: float, seed: int, args: argparse.Namespace, *, train: bool
                  ) -> tuple[dict | None, bool]:
    label = f"{args.benchmark}-{method}-eps{epsilon:g}-s{seed}"
    return run_cell(cache, label, run_config(method, epsilon, seed, args), train=train)


def measure_accuracy(cache: Path, args: argparse.Namespace) -> None:
    for seed in args.seeds:  # seed-major: a grid stopped early has the same seeds for every row
        baseline_cell(cache, run_config("fedavg", math.inf, seed, args))
        for method in args.methods:
            for epsilon in args.epsilons:
                cell, trained = accuracy_cell(cache, method, epsilon, seed, args, train=True)
                mode = "dat" if method == "feddat" else "shared"
                spent = max((ledger["epsilon"] for ledger in cell["epsilon"] or () if ledger["level"] == "record"),
                            default=0.0)
                print(f"seed {seed} {method:9} ε={epsilon:>4g}: accuracy {np.mean(site_scores(cell, mode)):.3f}, "
                      f"top answer {np.mean(site_scores(cell, 'top_answer_share', 'predictions')):.2f}, "
                      f"spent ε {spent:.2f} ({cell['seconds']:.0f} s{'' if trained else ', cached'})", flush=True)


def column(epsilon: float) -> str:
    return "ε = ∞ (no DP)" if math.isinf(epsilon) else f"ε = {epsilon:g}"


def accuracy_section(cache: Path, args: argparse.Namespace) -> list[str]:
    """The accuracy table from the cached cells (rows over the seeds every cell of the table has)."""
    found = {(m, e, s): accuracy_cell(cache, m, e, s, args, train=False)[0]
             for m in args.methods for e in args.epsilons for s in args.seeds}
    seeds = [s for s in args.seeds if all(found[m, e, s] is not None for m in args.methods for e in args.epsilons)]
    missing = [f"{m}/ε {e:g}/seed {s}" for (m, e, s), cell in found.items() if cell is None]
    lines = ["## Accuracy against ε (record-level DP)", "",
             f"Setup: {args.clients} sites of the {args.benchmark} benchmark, {args.train_per_client} train / "
             f"{args.test_per_client} test examples each, every site in every one of {args.rounds} rounds, "
             f"{args.steps} local steps per round of expected batch {args.batch_size} (Poisson sampling, q = "
             f"{args.batch_size / args.train_per_client:g}), AdamW at {args.learning_rate:g}, LoRA rank 8, local "
             f"answer heads, FedAvg of what travels weighted by example counts. DP-SGD clips each record's gradient "
             f"to {CLIP:g} (per optimizer) and the runner calibrates σ per site so that {args.rounds} rounds end at "
             f"the target ε (RDP, δ = {DELTA:g}); FedDAT's two DP-SGD steps per batch are accounted as one Gaussian "
             "mechanism of σ/√2. Each cell is a `feddat-secure run` (`benchmarks/cells.py`). Seeds: "
             f"{', '.join(map(str, seeds)) or 'none yet'} ({len(seeds)}).", "",
             "Accuracy (%) on each site's test split after the last round, mean over sites, then over seeds ± the "
             "half-width of a 95 % t-interval; below it, the share of predictions on each site's most frequent "
             "predicted answer (mean over sites and seeds).", "",
             "| method | " + " | ".join(column(e) for e in args.epsilons) + " |", "|---|" + "---|" * len(args.epsilons)]
    if seeds:
        for method in args.methods:
            mode = "dat" if method == "feddat" else "shared"
            cells = [[found[method, e, s] for s in seeds] for e in args.epsilons]
            lines.append(f"| {METHODS[method]} | " + " | ".join(
                percent(*interval([np.mean(site_scores(c, mode)) for c in column_cells])) for column_cells in cells)
                + " |")
            lines.append("| top answer | " + " | ".join(
                f"{100 * np.mean([np.mean(site_scores(c, 'top_answer_share', 'predictions')) for c in cc]):.0f} %"
                for cc in cells) + " |")
        references = [baseline_cell(cache, run_config("fedavg", math.inf, s, args)) for s in seeds]
        for (method, epsilon, seed), cell in found.items():
            reference = references[seeds.index(seed)] if seed in seeds else None
            if cell is not None and reference is not None and cell["data_digest"] != reference["data_digest"]:
                raise SystemExit(f"{method}/ε {epsilon:g}/seed {seed}: trained on data {cell['data_digest'][:12]}, "
                                 f"the references are of {reference['data_digest'][:12]}")
        majority = percent(*interval([np.mean(site_scores(r, "majority")) for r in references]))
        question = percent(*interval([np.mean(site_scores(r, "question_only")) for r in references]))
        spent = [ledger["epsilon"] for c in found.values() if c and c["epsilon"] for ledger in c["epsilon"]
                 if ledger["level"] == "record" and ledger["accountant"] == "rdp"
                 and c["config"]["privacy"]["record"].get("target_epsilon")
                 and ledger["epsilon"] > c["config"]["privacy"]["record"]["target_epsilon"] + 1e-9]
        lines += ["", f"References on the same data, without training: majority answer {majority}, question-only "
                  f"(no image) {question} (`feddat_secure/data/baselines.py`).", ""]
        finite = [e for e in args.epsilons if not math.isinf(e)]
        if finite and math.inf in args.epsilons:  # the measure: how much of the gain over no image is kept
            floor = [np.mean(site_scores(r, "question_only")) for r in references]
            gains = []
            for method in args.methods:
                mode = "dat" if method == "feddat" else "shared"
                private, open_ = ([np.mean(site_scores(found[method, e, s], mode)) for s in seeds]
                                  for e in (max(finite), math.inf))
                gains.append(f"{METHODS[method]} {100 * np.mean(np.subtract(open_, floor)):+.1f} without DP, "
                             f"{100 * np.mean(np.subtract(private, floor)):+.1f} at ε = {max(finite):g}")
            lines += ["Gain over question-only, in points (paired by seed, mean over seeds): " + "; ".join(gains)
                      + ". The share of it that DP keeps means something only where the gain without DP is clearly "
                      "above 0.", ""]
        lines += [
                  "ε spent (every site's RDP ledger, from each run's privacy report) "
                  + ("stayed within its target in every run." if not spent else
                     f"EXCEEDED its target in {len(spent)} ledgers."),
                  "", provenance([cell for cell in found.values() if cell is not None])]
    if missing:
        lines += ["", "Not yet run (rerun the command to fill them in): " + ", ".join(missing) + "."]
    return lines + [""]


def cost_section(cost: dict) -> list[str]:
    lines = ["## Cost of DP-SGD per local step", "",
             f"Median ms per local step over {cost['rounds_timed']} rounds of {cost['steps_per_round']} steps "
             f"(after one warm-up round), batch {cost['batch_size']} without DP, Poisson batches of expected "
             f"size {cost['batch_size']} with DP (a site of {cost['dataset_size']} records), same process, "
             "rounds of the two trainers interleaved, one torch thread (`OMP_NUM_THREADS=1 python "
             "benchmarks/privacy_tradeoff.py cost`; the numbers are its last run's, kept in results_privacy.json).", "",
             "| method | non-private | DP-SGD | ratio |", "|---|---|---|---|"]
    for method, row in cost["per_method"].items():
        lines.append(f"| {METHODS.get(method, method)} | {row['non-private']:.1f} ms | {row['DP-SGD']:.1f} ms | "
                     f"**{row['ratio']:.2f}x** |")
    return lines + ["", "DP-SGD adds Opacus's per-sample gradients (activations kept in forward hooks, one "
                    "outer product per LoRA and head layer per record in backward), the per-record norms and "
                    "clipping, and one Gaussian draw per trainable value per step. FedDAT also computes the head's "
                    "per-sample gradients in its DAT pass, where they are discarded.", ""]


def markdown(cache: Path, cost: dict | None, args: argparse.Namespace, command: str) -> str:
    lines = ["# Results: differential privacy", "",
             f"Measured by `benchmarks/privacy_tradeoff.py` on the embedded foundation (CPU: {platform.machine()}). "
             "Reproduce, or resume, with:", "", "```", command, "```", "",
             "What each lever (data per site, batch size, learning rate, the PRV accountant, FFA-LoRA, an EMA of the "
             "weights) buys FedDAT at ε = 8 on a benchmark where the image holds the answer, and the share of the "
             "non-private gain it keeps there: [results_privacy_levers.md](results_privacy_levers.md) "
             "(`benchmarks/privacy_levers.py`).", ""]
    lines += accuracy_section(cache, args)
    if cost:
        lines += cost_section(cost)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cost", "accuracy", "all", "report"],
                        help="what to measure; report: only rewrite the Markdown from the cache and the JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a temporary cache: a smoke run")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--benchmark", default="function",
                        help="function, domain, scene, or one of " + ", ".join(BENCHMARK_VARIANTS))
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--train-per-client", type=int, default=1000)
    parser.add_argument("--test-per-client", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--accountant", choices=["rdp", "prv"], default="rdp",
                        help="the accountant that calibrates σ to the target ε (prv: tighter, so less noise)")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="FedDAT: evaluate the EMA of each site's own weights with this decay (0: the last ones)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per trainer (cost)")
    parser.add_argument("--cache", default=str(CACHE), help="folder of cached cells (one JSON file each)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results_privacy.md"))
    args = parser.parse_args(argv)
    if any(not epsilon > 0 for epsilon in args.epsilons):
        parser.error("every --epsilons value must be > 0 (inf: without DP); the runner refuses DP with σ = 0")
    if args.quick:
        args.seeds, args.clients, args.train_per_client, args.test_per_client = args.seeds[:1], 3, 40, 20
        args.rounds, args.steps, args.batch_size = 2, 2, 8
    raw_path = Path(args.output).with_suffix(".json")
    saved = json.loads(raw_path.read_text()) if raw_path.is_file() and not args.quick else {}
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) if args.quick else Path(args.cache)
        if args.what in ("accuracy", "all"):
            measure_accuracy(cache, args)
        if args.what in ("cost", "all"):
            torch.set_num_threads(1)
            saved["cost"] = measure_cost(load_foundation(), 1 if args.quick else args.repeats,
                                         2 if args.quick else args.steps, args.quick)
        command = "python " + " ".join(["benchmarks/privacy_tradeoff.py", *(sys.argv[1:] if argv is None else argv)])
        text = markdown(cache, saved.get("cost"), args, command)
    if args.quick:
        print(text)
        return 0
    if "cost" in saved:
        raw_path.write_text(json.dumps({"cost": saved["cost"]}, indent=1) + "\n")
    Path(args.output).write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
