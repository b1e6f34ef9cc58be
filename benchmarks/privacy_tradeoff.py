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

The default grid is the schedule on which DP learns (results_privacy_levers.md): ``function-grounded``, 4,000
records per site, 10 steps a round of batch 512, AdamW at 0.01 with DP and 0.003 without (the DP rate collapses a
run without per-record clipping). The earlier five-family table ran ``--benchmark function --train-per-client 1000
--steps 20 --batch-size 16 --learning-rate 0.003 --no-dp-learning-rate 0.003``.

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
                   accountant: str = "rdp", client_adapter_noise_ratio: float = 1.0):
    """DP-SGD settings for a target ε (σ calibrated under ``accountant``, as the runner does); ∞: no DP; 0: the
    DP-SGD path with σ = 0 (clipping only, no privacy)."""
    if math.isinf(target_epsilon):
        return None
    config = RecordPrivacyConfig(enabled=True, target_epsilon=target_epsilon or 8.0, max_grad_norm=CLIP,
                                 delta=DELTA, reproducible=True,  # seeded noise: reproducible numbers, no privacy claim
                                 accountant=accountant, client_adapter_noise_ratio=client_adapter_noise_ratio)
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
        "training": {"local_steps": args.steps, "batch_size": args.batch_size,
                     "learning_rate": args.no_dp_learning_rate if math.isinf(epsilon) else args.learning_rate},
        "model": {"head": "local"},
    }
    if args.ema_decay:  # the site evaluates the EMA of its own weights (0, the default, stays out of the cell's key)
        config["training"]["ema_decay"] = args.ema_decay
    if not math.isinf(epsilon):  # seeded noise: reproducible numbers, no privacy claim (a benchmark, not a release)
        config["privacy"] = {"record": {"enabled": True, "target_epsilon": epsilon, "max_grad_norm": CLIP,
                                        "delta": DELTA, "reproducible": True}}
        if args.accountant != "rdp":  # σ calibrated under this accountant (the default stays out of the cell's key)
            config["privacy"]["record"]["accountant"] = args.accountant
        if args.client_adapter_noise_ratio != 1.0:  # FedDAT's A_c step noised at this multiple of A_s's
            config["privacy"]["record"]["client_adapter_noise_ratio"] = args.client_adapter_noise_ratio
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
    """The accuracy table from the cached cells. Each (method, ε) is the mean over the seeds it has (its count shown
    where it has fewer than the grid), so a grid run in pieces reports what it has; what DP keeps of the gain over
    question-only is paired by seed with the same method's run without DP."""
    found = {(m, e, s): accuracy_cell(cache, m, e, s, args, train=False)[0]
             for m in args.methods for e in args.epsilons for s in args.seeds}
    have = {(m, e): [s for s in args.seeds if found[m, e, s] is not None] for m in args.methods for e in args.epsilons}
    seeds = [s for s in args.seeds if any(found[m, e, s] is not None for m in args.methods for e in args.epsilons)]
    rates = (f"AdamW at {args.learning_rate:g} with DP and {args.no_dp_learning_rate:g} without"
             if args.no_dp_learning_rate != args.learning_rate else f"AdamW at {args.learning_rate:g}")
    lines = ["## Accuracy against ε (record-level DP)", "",
             f"Setup: {args.clients} sites of the {args.benchmark} benchmark, {args.train_per_client} train / "
             f"{args.test_per_client} test examples each, every site in every one of {args.rounds} rounds, "
             f"{args.steps} local steps per round of expected batch {args.batch_size} (Poisson sampling, q = "
             f"{args.batch_size / args.train_per_client:g}), {rates}, LoRA rank 8, local "
             f"answer heads, FedAvg of what travels weighted by example counts. DP-SGD clips each record's gradient "
             f"to {CLIP:g} (per optimizer) and the runner calibrates σ per site so that {args.rounds} rounds end at "
             f"the target ε (RDP, δ = {DELTA:g}); FedDAT's two DP-SGD steps per batch are accounted as one Gaussian "
             "mechanism of σ/√2. Each cell is a `feddat-secure run` (`benchmarks/cells.py`). Seeds: "
             f"{', '.join(map(str, args.seeds))} ({len(args.seeds)}); an entry over fewer shows their number in "
             "brackets.", "",
             "Accuracy (%) on each site's test split after the last round, mean over sites, then over seeds ± the "
             "half-width of a 95 % t-interval; below it, the share of predictions on each site's most frequent "
             "predicted answer (mean over sites and seeds), and the gain over question-only with DP of the gain "
             "without it, in points, with the share kept: (DP − question-only) / (no DP − question-only), means over "
             "the seeds both runs have, given only where the gain without DP is clearly above 0 (its 95 % interval "
             "excludes 0; over one seed, above 5 points). The issue's goal at ε = 8: ≥ 50 % kept with ≤ 50 % on the "
             "top answer.", "",
             "| method | " + " | ".join(column(e) for e in args.epsilons) + " |", "|---|" + "---|" * len(args.epsilons)]
    if not seeds:
        return lines + ["", "No cell has run yet (the `accuracy` command runs them).", ""]
    references = {s: baseline_cell(cache, run_config("fedavg", math.inf, s, args)) for s in seeds}
    for (method, epsilon, seed), cell in found.items():
        if cell is not None and cell["data_digest"] != references[seed]["data_digest"]:
            raise SystemExit(f"{method}/ε {epsilon:g}/seed {seed}: trained on data {cell['data_digest'][:12]}, "
                             f"the references are of {references[seed]['data_digest'][:12]}")
    floor = {s: np.mean(site_scores(references[s], "question_only")) for s in seeds}

    def count(some: list[int]) -> str:
        return "" if len(some) == len(args.seeds) else f" ({len(some)})"

    for method in args.methods:
        mode = "dat" if method == "feddat" else "shared"
        accuracy = {key: [np.mean(site_scores(found[(*key, s)], mode)) for s in have[key]] for key in have
                    if key[0] == method}
        lines.append(f"| {METHODS[method]} | " + " | ".join(
            percent(*interval(accuracy[method, e])) + count(have[method, e]) if have[method, e] else "not run"
            for e in args.epsilons) + " |")
        top = {e: [np.mean(site_scores(found[method, e, s], "top_answer_share", "predictions"))
                   for s in have[method, e]] for e in args.epsilons}
        lines.append("| top answer | " + " | ".join(f"{100 * np.mean(top[e]):.0f} %" if top[e] else ""
                                                     for e in args.epsilons) + " |")
        kept = []
        for epsilon in args.epsilons:
            paired = [s for s in have[method, epsilon] if s in have.get((method, math.inf), ())]
            gain, open_gain = ([np.mean(site_scores(found[method, e, s], mode)) - floor[s] for s in paired]
                               for e in (epsilon, math.inf))
            if not paired or math.isinf(epsilon):
                kept.append("")
                continue
            mean, half = interval(open_gain)
            share = (f": {100 * np.mean(gain) / mean:.0f} %" if len(paired) > 1 and mean - half > 0 or
                     len(paired) == 1 and mean > 0.05 else "")  # a share of no gain is no measure
            kept.append(f"{100 * np.mean(gain):+.1f} of {100 * mean:+.1f}{share}{count(paired)}")
        lines.append("| gain kept | " + " | ".join(kept) + " |")
    majority = percent(*interval([np.mean(site_scores(references[s], "majority")) for s in seeds]))
    question = percent(*interval(list(floor.values())))
    spent = [ledger["epsilon"] for c in found.values() if c and c["epsilon"] for ledger in c["epsilon"]
             if ledger["level"] == "record" and ledger["accountant"] == "rdp"
             and c["config"]["privacy"]["record"].get("target_epsilon")
             and ledger["epsilon"] > c["config"]["privacy"]["record"]["target_epsilon"] + 1e-9]
    lines += ["", f"References on the same data, without training (seeds {', '.join(map(str, seeds))}): majority "
              f"answer {majority}, question-only (no image) {question} (`feddat_secure/data/baselines.py`).", "",
              "ε spent (every site's RDP ledger, from each run's privacy report) "
              + ("stayed within its target in every run." if not spent else
                 f"EXCEEDED its target in {len(spent)} ledgers."),
              "", provenance([cell for cell in found.values() if cell is not None])]
    missing = [f"{m} at {column(e)} (seeds {', '.join(str(s) for s in args.seeds if s not in have[m, e])})"
               for m in args.methods for e in args.epsilons if len(have[m, e]) < len(args.seeds)]
    if missing:
        lines += ["", "Not yet run (the `accuracy` command runs what is missing): " + "; ".join(missing) + "."]
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


def argument_parser() -> argparse.ArgumentParser:
    """The script's options; their defaults are the grid of docs/results_privacy.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cost", "accuracy", "all", "report"],
                        help="what to measure; report: only rewrite the Markdown from the cache and the JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a temporary cache: a smoke run")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, math.inf])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--benchmark", default="function-grounded",
                        help="function, domain, scene, or one of " + ", ".join(BENCHMARK_VARIANTS))
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--train-per-client", type=int, default=4000)
    parser.add_argument("--test-per-client", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--learning-rate", type=float, default=1e-2, help="AdamW's rate of the runs with DP")
    parser.add_argument("--no-dp-learning-rate", type=float, default=3e-3,
                        help="the rate of the runs without DP (ε = ∞): the DP rate, which per-record clipping makes "
                        "usable, collapses a run without clipping (results_privacy_levers.md)")
    parser.add_argument("--accountant", choices=["rdp", "prv"], default="rdp",
                        help="the accountant that calibrates σ to the target ε (prv: tighter, so less noise)")
    parser.add_argument("--client-adapter-noise-ratio", type=float, default=1.0,
                        help="FedDAT: σ of A_c's DP-SGD step over σ of A_s's, both calibrated together to the ε")
    parser.add_argument("--ema-decay", type=float, default=0.0,
                        help="FedDAT: evaluate the EMA of each site's own weights with this decay (0: the last ones)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per trainer (cost)")
    parser.add_argument("--cache", default=str(CACHE), help="folder of cached cells (one JSON file each)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results_privacy.md"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser()
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
        given = ["accuracy" if a == "report" else a for a in (sys.argv[1:] if argv is None else argv)]  # fills it
        command = "python " + " ".join(["benchmarks/privacy_tradeoff.py", *given])
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
