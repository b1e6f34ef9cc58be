"""Record-level DP: accuracy against ε, FedDAT against FedAvg-adapter, and the cost of DP-SGD.

Two measurements, written to docs/results_privacy.md (raw numbers to a JSON file beside it):

``cost``
    ms per local step of each trainer without DP and with DP-SGD (Opacus per-sample gradients,
    per-sample clipping, noise; Poisson batches of the same expected size), in the same process,
    interleaved round by round so that load on the machine hits both alike.
``accuracy``
    a small federation per (method, ε, seed): every site trains on the function benchmark,
    the shared adapters are averaged (FedAvg, weighted by example counts, like the runner), and
    each site's test accuracy after the last round is reported (FedDAT: its Dual-Adapter
    Teacher). σ is calibrated per site so that a site taking part in every round ends at the
    target ε (RDP, δ = 1e-5). The loop drives the trainers directly with the runner's data,
    seeds and model construction (the runner's DP integration was not available when this was
    written); ε = ∞ is the non-private trainer.

    python benchmarks/privacy_tradeoff.py cost
    python benchmarks/privacy_tradeoff.py accuracy
    python benchmarks/privacy_tradeoff.py accuracy --epsilons 0 --append   # σ = 0: clipping alone
    python benchmarks/privacy_tradeoff.py all --quick      # smoke run of the script itself
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from feddat_secure.config import RecordPrivacyConfig, TrainingConfig
from feddat_secure.data import build_benchmark
from feddat_secure.data.batching import encode_split
from feddat_secure.federation.algorithms import dp_steps_per_batch
from feddat_secure.model.adapters import LoraSettings
from feddat_secure.model.backbone import load_foundation
from feddat_secure.privacy import compute_epsilon, make_record_privacy
from feddat_secure.training.local_model import LocalModel
from feddat_secure.training.trainers import CLIENT, FROZEN_GLOBAL, SHARED, AdapterTrainer, FedDATTrainer, Schedule

METHODS = {"feddat": "FedDAT (DAT)", "fedavg": "FedAvg-adapter"}
LORA = LoraSettings(rank=8, alpha=16.0)  # the config defaults
DELTA = 1e-5
CLIP = 1.0


def make_trainer(method: str, foundation, num_answers: int, training: TrainingConfig, rounds: int, seed: int,
                 privacy=None):
    if method == "feddat":
        model = LocalModel(foundation, LORA, (SHARED, FROZEN_GLOBAL, CLIENT), (SHARED, CLIENT), num_answers, seed)
        return FedDATTrainer(model, Schedule(training, rounds), head_travels=False, privacy=privacy)
    model = LocalModel(foundation, LORA, (SHARED,), (SHARED,), num_answers, seed)
    return AdapterTrainer(model, Schedule(training, rounds), head_travels=False, privacy=privacy)


def encoded_sites(foundation, clients: int, train: int, test: int, seed: int):
    benchmark = build_benchmark("function", path="", num_clients=clients, train_per_client=train,
                                test_per_client=test, image_size=foundation.image_size, seed=seed)
    sites = []
    for client in benchmark.clients:  # local heads answer over the site's own answer set, as in the runner
        index = {answer: i for i, answer in enumerate(client.answers)}
        sites.append(tuple(encode_split(split, foundation.tokenizer, index, foundation.max_text_length,
                                        foundation.image_size) for split in (client.train, client.test))
                     + (len(client.answers),))
    return sites


def record_privacy(target_epsilon: float, dataset_size: int, training: TrainingConfig, rounds: int, method: str):
    """DP-SGD settings for a target ε; ∞: no DP; 0: the DP-SGD path with σ = 0 (clipping only, no privacy)."""
    if math.isinf(target_epsilon):
        return None
    config = RecordPrivacyConfig(enabled=True, target_epsilon=target_epsilon or 8.0, max_grad_norm=CLIP,
                                 delta=DELTA, reproducible=True)  # seeded noise: reproducible numbers, no privacy claim
    settings = make_record_privacy(config, dataset_size=dataset_size, batch_size=training.batch_size,
                                   local_steps=training.local_steps, rounds=rounds,
                                   steps_per_batch=dp_steps_per_batch(method))
    return settings if target_epsilon else dataclasses.replace(settings, noise_multiplier=0.0)


# ---------------------------------------------------------------- cost of a local step

def measure_cost(foundation, repeats: int, steps: int, quick: bool) -> dict:
    training = TrainingConfig(local_steps=steps, batch_size=16, learning_rate=3e-3)
    train, _, answers = encoded_sites(foundation, 1, 40 if quick else 200, 10, seed=0)[0]
    results = {}
    for method in METHODS:
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

def federation(method: str, foundation, sites, training: TrainingConfig, rounds: int, seed: int,
               target_epsilon: float) -> dict:
    torch.manual_seed(seed)
    initial = LocalModel(foundation, LORA, (SHARED,), (SHARED,), 2, seed=seed)  # the runner's initial global A_s
    global_state = initial.adapters.get_state(SHARED)
    del initial
    trainers, rngs, privacies = [], [], []
    for index, (train, _, answers) in enumerate(sites):
        privacy = record_privacy(target_epsilon, len(train), training, rounds, method)
        privacies.append(privacy)
        trainers.append(make_trainer(method, foundation, answers, training, rounds, seed * 1000 + index + 1, privacy))
        rngs.append(np.random.default_rng(seed * 1000 + index))
    events = [[] for _ in sites]
    for round_index in range(rounds):
        states, weights = [], []
        for index, trainer in enumerate(trainers):
            trainer.load_global(global_state)
            trainer.train_round_on(sites[index][0], rngs[index], round_index)
            events[index] += trainer.round_events
            states.append(trainer.shared_state())
            weights.append(len(sites[index][0]))
        global_state = {key: sum(w * s[key] for w, s in zip(weights, states)) / sum(weights) for key in states[0]}
    accuracies = []
    for index, trainer in enumerate(trainers):
        trainer.load_global(global_state)
        accuracies.append(trainer.evaluate(sites[index][1])["dat" if method == "feddat" else "shared"])
    spent = [compute_epsilon(e, DELTA, "rdp") for e in events] if events[0] else [math.inf if rounds else 0.0]
    return {"accuracy": float(np.mean(accuracies)), "epsilon_spent": max(spent),
            "noise_multiplier": [p.noise_multiplier if p else 0.0 for p in privacies]}


def measure_untrained(foundation, seeds, clients: int, quick: bool) -> dict:
    """The same sites' accuracy before any training (the initial global adapter, untrained heads)."""
    training = TrainingConfig(local_steps=1, batch_size=16, learning_rate=3e-3)
    scores = {method: [] for method in METHODS}
    for seed in seeds:
        sites = encoded_sites(foundation, clients, 40 if quick else 200, 20 if quick else 100, seed)
        for method in METHODS:
            scores[method].append(federation(method, foundation, sites, training, 0, seed, math.inf)["accuracy"])
    print(f"before training: {scores}", flush=True)
    return scores


def measure_accuracy(foundation, epsilons, seeds, clients: int, rounds: int, steps: int, quick: bool) -> dict:
    training = TrainingConfig(local_steps=steps, batch_size=16, learning_rate=3e-3)
    runs = []
    for seed in seeds:
        sites = encoded_sites(foundation, clients, 40 if quick else 200, 20 if quick else 100, seed)
        for method in METHODS:
            for epsilon in epsilons:
                start = time.perf_counter()
                outcome = federation(method, foundation, sites, training, rounds, seed, epsilon)
                outcome.update(method=method, target_epsilon=epsilon, seed=seed,
                               seconds=round(time.perf_counter() - start, 1))
                runs.append(outcome)
                print(f"seed {seed} {method:7} ε={epsilon:>4}: accuracy {outcome['accuracy']:.3f}, spent "
                      f"{outcome['epsilon_spent']:.2f}, σ {np.mean(outcome['noise_multiplier']):.2f} "
                      f"({outcome['seconds']:.0f}s)", flush=True)
    return {"clients": clients, "train_per_client": 40 if quick else 200, "test_per_client": 20 if quick else 100,
            "rounds": rounds, "local_steps": steps, "batch_size": training.batch_size,
            "learning_rate": training.learning_rate, "clip": CLIP, "delta": DELTA, "runs": runs}


# ---------------------------------------------------------------- the report

def trainable_values(foundation) -> dict[str, int]:
    """Values each private optimizer noises per step: A_s with a head (FedAvg's, FedDAT's first), A_c."""
    trainer = make_trainer("feddat", foundation, 4, TrainingConfig(), 1, seed=0)
    return {"shared_and_head": sum(p.numel() for p in trainer._shared_parameters()),
            "client": sum(p.numel() for p in trainer._client_parameters())}


def reading(results: dict) -> list[str]:
    accuracy, untrained = results["accuracy"], results.get("untrained")
    sizes = accuracy.get("trainable_values")
    if not untrained or not sizes:
        return []

    def mean(method: str, epsilon: float) -> float:
        return 100 * np.mean([r["accuracy"] for r in accuracy["runs"]
                              if r["method"] == method and r["target_epsilon"] == epsilon])

    finite = sorted(e for e in {r["target_epsilon"] for r in accuracy["runs"]} if e and not math.isinf(e))
    if not finite:
        return []
    best = finite[-1]
    sigma = np.mean([np.mean(r["noise_multiplier"]) for r in accuracy["runs"]
                     if r["method"] == "fedavg" and r["target_epsilon"] == best])
    noise = sigma * accuracy["clip"] / accuracy["batch_size"] * math.sqrt(sizes["shared_and_head"])
    kept = {m: (mean(m, best) - 100 * np.mean(untrained[m])) / (mean(m, math.inf) - 100 * np.mean(untrained[m]))
            for m in METHODS}
    steps = accuracy["rounds"] * accuracy["local_steps"]
    return ["", "Reading: per-record clipping alone costs nothing (the σ = 0 column matches or beats training "
            "without DP); the noise is what costs. At ε = "
            f"{best:g} FedDAT keeps {100 * kept['feddat']:.0f} % and FedAvg {100 * kept['fedavg']:.0f} % of what "
            "training without DP gains over the untrained models, and smaller ε change little more. The optimizers "
            f"noise {sizes['shared_and_head']:,} values (A_s with the head; A_c: {sizes['client']:,}) with expected "
            f"batches of {accuracy['batch_size']}: at ε = {best:g} the noise FedAvg adds to a step's mean gradient "
            f"has norm σC√d/B ≈ {noise:.0f}, against at most C = {accuracy['clip']:g} for the clipped gradient "
            f"itself, and {steps} steps per site do not average it out. FedDAT needs √2 times FedAvg's noise per "
            "step for the same ε (two DP-SGD steps per batch); at this noise level both end at the same accuracy. "
            "The hyperparameters are those of the non-private benchmark, not tuned for DP: larger expected batches, "
            "fewer noised values (a lower LoRA rank, a head not trained from scratch) and more records per site are "
            "the usual levers; they were not measured here."]


def column(epsilon: float) -> str:
    if epsilon == 0:
        return "σ = 0 (clipping only, no privacy)"
    return "ε = ∞ (no DP)" if math.isinf(epsilon) else f"ε = {epsilon:g}"


def markdown(results: dict, command: str) -> str:
    lines = ["# Results: differential privacy", "",
             f"Measured by `benchmarks/privacy_tradeoff.py` on the embedded foundation (CPU: {platform.machine()}, "
             f"{torch.get_num_threads()} torch thread, shared machine). Reproduce with:", "", "```", command, "```", ""]
    accuracy = results.get("accuracy")
    if accuracy:
        eps_values = sorted({r["target_epsilon"] for r in accuracy["runs"]}, key=lambda e: (e == 0, math.isinf(e), e))
        seeds = sorted({r["seed"] for r in accuracy["runs"]})
        lines += [
            "## Accuracy against ε (record-level DP, function benchmark)", "",
            f"Setup: {accuracy['clients']} sites of the function benchmark, {accuracy['train_per_client']} train / "
            f"{accuracy['test_per_client']} test examples each, every site in every one of {accuracy['rounds']} "
            f"rounds, {accuracy['local_steps']} local steps per round of expected batch {accuracy['batch_size']} "
            f"(Poisson sampling, q = {accuracy['batch_size'] / accuracy['train_per_client']:g}), AdamW at "
            f"{accuracy['learning_rate']:g}, LoRA rank 8, local answer heads, FedAvg of the shared adapters "
            f"weighted by example counts. DP-SGD clips each record's gradient to {accuracy['clip']:g} (per "
            f"optimizer) and calibrates σ per site so that {accuracy['rounds']} rounds end at the target ε "
            f"(Opacus RDP, δ = {accuracy['delta']:g}); FedDAT's two DP-SGD steps per batch are accounted as one "
            f"Gaussian mechanism of σ/√2, so FedDAT needs √2 times the noise per step of FedAvg for the same ε. "
            f"ε = ∞ is training without DP. Seeds: {', '.join(map(str, seeds))}. Driven by the script's own "
            "federation loop over the trainers (same data, model construction, seeds and aggregation as the runner).",
            "",
            "Accuracy (%) on each site's test split after the last round, mean over sites; mean ± std over seeds "
            "(in brackets: the per-step noise multiplier σ, mean over sites and seeds).", "",
            "| method | " + " | ".join(column(e) for e in eps_values) + " |",
            "|---|" + "---|" * len(eps_values)]
        for method, label in METHODS.items():
            cells = []
            for epsilon in eps_values:
                runs = [r for r in accuracy["runs"] if r["method"] == method and r["target_epsilon"] == epsilon]
                values = [100 * r["accuracy"] for r in runs]
                sigma = np.mean([np.mean(r["noise_multiplier"]) for r in runs])
                spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
                cells.append(f"{np.mean(values):.1f}{spread}" + ("" if math.isinf(epsilon) or not epsilon
                                                                 else f" (σ {sigma:.2f})"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        untrained = results.get("untrained")
        if untrained:
            lines += ["", "Before any training the same sites score "
                      + " and ".join(f"{100 * np.mean(v):.1f} ({METHODS[m]})" for m, v in untrained.items())
                      + " (initial global adapter, untrained local heads)."]
        lines += reading(results)
        seconds = sum(r["seconds"] for r in accuracy["runs"])
        within = all(r["epsilon_spent"] <= r["target_epsilon"] + 1e-9 for r in accuracy["runs"] if r["target_epsilon"])
        lines += ["", "ε actually spent (largest site, recomputed from each run's events with the RDP accountant) "
                      + ("stayed within its target in every run. " if within else "EXCEEDED its target in some run. ")
                      + f"The {len(accuracy['runs'])} runs took {seconds / 60:.1f} minutes in total.", ""]
    cost = results.get("cost")
    if cost:
        lines += ["## Cost of DP-SGD per local step", "",
                  f"Median ms per local step over {cost['rounds_timed']} rounds of {cost['steps_per_round']} steps "
                  f"(after one warm-up round), batch {cost['batch_size']} without DP, Poisson batches of expected "
                  f"size {cost['batch_size']} with DP (a site of {cost['dataset_size']} records), same process, "
                  "rounds of the two trainers interleaved.", "",
                  "| method | non-private | DP-SGD | ratio |", "|---|---|---|---|"]
        for method, label in METHODS.items():
            row = cost["per_method"][method]
            lines.append(f"| {label} | {row['non-private']:.1f} ms | {row['DP-SGD']:.1f} ms | "
                         f"**{row['ratio']:.2f}x** |")
        lines += ["", "DP-SGD adds Opacus's per-sample gradients (activations kept in forward hooks, one "
                      "outer product per LoRA and head layer per record in backward), the per-record norms and "
                      "clipping, and one Gaussian draw per trainable value per step. FedDAT also computes the head's "
                      "per-sample gradients in its DAT pass, where they are discarded.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["cost", "accuracy", "untrained", "all", "report"],
                        help="what to measure; report: only rewrite the Markdown from the saved JSON")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the script")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per trainer (cost)")
    parser.add_argument("--output", default="docs/results_privacy.md")
    parser.add_argument("--append", action="store_true", help="add these accuracy runs to the saved ones")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    foundation = load_foundation()
    raw_path = Path(args.output).with_suffix(".json")
    results = json.loads(raw_path.read_text()) if raw_path.is_file() and not args.quick else {}
    if args.what in ("cost", "all"):
        results["cost"] = measure_cost(foundation, 1 if args.quick else args.repeats, 2 if args.quick else args.steps,
                                       args.quick)
    if args.what in ("accuracy", "all"):
        measured = measure_accuracy(foundation, args.epsilons, args.seeds[:1] if args.quick else args.seeds,
                                    args.clients, 2 if args.quick else args.rounds, 2 if args.quick else args.steps,
                                    args.quick)
        if args.append and "accuracy" in results:
            measured["runs"] = results["accuracy"]["runs"] + measured["runs"]
        results["accuracy"] = measured
    if "accuracy" in results and "trainable_values" not in results["accuracy"]:
        results["accuracy"]["trainable_values"] = trainable_values(foundation)
    if args.what in ("untrained", "all"):
        results["untrained"] = measure_untrained(foundation, args.seeds[:1] if args.quick else args.seeds,
                                                 args.clients, args.quick)
    if args.quick:
        print(markdown(results, "python benchmarks/privacy_tradeoff.py all --quick"))
        return 0
    raw_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    command = "OMP_NUM_THREADS=1 python benchmarks/privacy_tradeoff.py cost\n" \
              "OMP_NUM_THREADS=1 python benchmarks/privacy_tradeoff.py accuracy\n" \
              "OMP_NUM_THREADS=1 python benchmarks/privacy_tradeoff.py accuracy --epsilons 0 --append\n" \
              "OMP_NUM_THREADS=1 python benchmarks/privacy_tradeoff.py untrained"
    Path(args.output).write_text(markdown(results, command))
    print(f"wrote {args.output} and {raw_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
