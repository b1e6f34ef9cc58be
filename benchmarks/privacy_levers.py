"""What each lever buys record-level DP FedDAT at ε = 8: one row per lever, each a cached `feddat-secure run`.

Issue 15 asks that DP FedDAT at ε = 8 keep at least half of its non-private gain over the question-only (no
image) baseline without collapsing onto one answer, and, where that cannot be reached, that each lever's effect be
shown. Each lever below changes the run of the row it builds on (``base``) in one way, in the order the issue
expects them to matter: the schedule (batch size, steps, learning rate), the accountant that calibrates σ, fewer
noised values (FFA-LoRA), more data per site. A row's cells are those of ``privacy_tradeoff.py accuracy`` with the
row's options (the same cache: a cell already run for either script is not run again), so every number here is a
`feddat-secure run` through the federation code, σ calibrated by the runner so that every site ends at the target ε.

    python benchmarks/privacy_levers.py              # runs what is missing (resumable), then writes the report
    python benchmarks/privacy_levers.py --report     # only rewrites docs/results_privacy_levers.md from the cache
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cells import baseline_cell, interval, percent, provenance, site_scores
from privacy_tradeoff import CACHE, DELTA, ROOT, accuracy_cell, record_privacy, run_config

from feddat_secure.config import TrainingConfig

BENCHMARK = "function-grounded"  # where centralized training clears question-only by +27 points (results_grounded)
EPSILON = 8.0


@dataclass(frozen=True)
class Lever:
    name: str
    options: dict = field(default_factory=dict)  # privacy_tradeoff.py arguments that differ from DEFAULTS
    method: str = "feddat"
    without_dp: bool = True  # also run the same schedule without DP (the gain the lever is measured against)


DEFAULTS = {"benchmark": BENCHMARK, "clients": 5, "train_per_client": 1000, "test_per_client": 500, "rounds": 6,
            "steps": 20, "batch_size": 16, "learning_rate": 3e-3, "accountant": "rdp", "ema_decay": 0.0,
            "client_adapter_noise_ratio": 1.0,
            "cache": str(CACHE)}
LARGE_BATCH = {"batch_size": 128, "steps": 10}
BATCH_64 = Lever("batch 64, 10 steps a round", {"batch_size": 64, "steps": 10})
MORE_DATA = Lever("batch 128, 4× the data per site (4,000)", {**LARGE_BATCH, "train_per_client": 4000})
RATE_001 = Lever("batch 128, learning rate 0.01", {**LARGE_BATCH, "learning_rate": 1e-2})
RATE_001_MORE_DATA = Lever("batch 128, learning rate 0.01, 4× the data per site",
                           {**LARGE_BATCH, "learning_rate": 1e-2, "train_per_client": 4000}, without_dp=False)
RATE_001_MORE_DATA_EMA = Lever("batch 128, learning rate 0.01, 4× the data per site, EMA of A_c and the head "
                               "(decay 0.9)", {**RATE_001_MORE_DATA.options, "ema_decay": 0.9}, without_dp=False)
BATCH_512_RATE_0003 = Lever("batch 512, 4× the data per site",
                            {"batch_size": 512, "steps": 10, "train_per_client": 4000})
BATCH_512_MORE_DATA = Lever("batch 512, learning rate 0.01, 4× the data per site",
                            {"batch_size": 512, "steps": 10, "learning_rate": 1e-2, "train_per_client": 4000})
BATCH_512_EMA = Lever("batch 512, learning rate 0.01, 4× the data per site, EMA of A_c and the head (decay 0.9)",
                      {**BATCH_512_MORE_DATA.options, "ema_decay": 0.9}, without_dp=False)
LEVERS = (
    Lever("batch 16, 20 steps a round (the schedule of results_privacy_five_family.md)"),
    BATCH_64,
    Lever("batch 128, 10 steps a round", LARGE_BATCH, without_dp=False),
    Lever("batch 128, σ calibrated with PRV", {**LARGE_BATCH, "accountant": "prv"}, without_dp=False),
    Lever("batch 128, FFA-LoRA (A frozen: half the noised values)", LARGE_BATCH, method="ffa-lora"),
    MORE_DATA,
    RATE_001,
    Lever("batch 128, learning rate 0.03", {**LARGE_BATCH, "learning_rate": 3e-2}, without_dp=False),
    RATE_001_MORE_DATA,
    RATE_001_MORE_DATA_EMA,
    BATCH_512_RATE_0003,
    BATCH_512_MORE_DATA,
    BATCH_512_EMA,
)

# the measure on several seeds, per data size: the best DP row of the table against the best schedule
# measured without DP on the same data (the non-private gain a user gives up is that of the schedule they would run
# without DP); first on the data with the most examples per site, which is where the issue sets its goal
CONFIRMED_DATA_SIZES = (4000, 1000)


def arguments(lever: Lever, seed: int) -> argparse.Namespace:
    """``privacy_tradeoff.py``'s arguments of one lever's cells: its run without DP keeps the lever's rate."""
    options = {**DEFAULTS, **lever.options, "seeds": [seed]}
    return argparse.Namespace(**options, no_dp_learning_rate=options["learning_rate"])


def sigma(lever: Lever, args: argparse.Namespace) -> str:
    """The noise multiplier the runner calibrates for this lever's run (the same function, the same inputs); both
    steps' (A_s, A_c) where they differ."""
    training = TrainingConfig(local_steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate)
    steps = record_privacy(EPSILON, args.train_per_client, training, args.rounds, lever.method, args.accountant,
                           args.client_adapter_noise_ratio).step_noise_multipliers
    return " / ".join(f"{value:.2f}" for value in dict.fromkeys(steps))


def cells_of(lever: Lever, seed: int, train: bool) -> tuple[dict | None, dict | None, dict]:
    """(the DP cell, the cell without DP or None, the data's reference cell) of one lever and seed."""
    args = arguments(lever, seed)
    private = accuracy_cell(Path(args.cache), lever.method, EPSILON, seed, args, train=train)[0]
    open_ = accuracy_cell(Path(args.cache), lever.method, math.inf, seed, args, train=train)[0] \
        if lever.without_dp else None
    return private, open_, baseline_cell(Path(args.cache), run_config("fedavg", math.inf, seed, args))


def best_levers(train_per_client: int, seeds: list[int]) -> tuple[Lever, Lever] | None:
    """The FedDAT rows of the table on this many records per site with the highest accuracy at ε = 8 and without
    DP (means over the table's ``seeds``), or None while one of their cells is missing."""
    rows = [lever for lever in LEVERS if lever.method == "feddat"
            and arguments(lever, seeds[0]).train_per_client == train_per_client]
    found = {lever.name: [cells_of(lever, seed, train=False) for seed in seeds] for lever in rows}
    if any(private is None or (lever.without_dp and open_ is None)
           for lever in rows for private, open_, _ in found[lever.name]):
        return None
    private = max(rows, key=lambda lever: np.mean([np.mean(site_scores(p, "dat")) for p, _, _ in found[lever.name]]))
    open_ = max((lever for lever in rows if lever.without_dp),
                key=lambda lever: np.mean([np.mean(site_scores(o, "dat")) for _, o, _ in found[lever.name]]))
    return private, open_


def report(seeds: list[int], command: str) -> str:
    lines = ["# Results: what each lever buys record-level DP at ε = 8", "",
             "Measured by `benchmarks/privacy_levers.py` (each cell a `feddat-secure run`, cached with those of "
             "`benchmarks/privacy_tradeoff.py`). Reproduce, or resume, with:", "", "```", command, "```", "",
             f"Setup unless a row says otherwise: {DEFAULTS['clients']} sites of the {BENCHMARK} benchmark "
             f"(docs/results_grounded.md), {DEFAULTS['train_per_client']} train / {DEFAULTS['test_per_client']} "
             f"test examples each, every site in each of {DEFAULTS['rounds']} rounds, AdamW at "
             f"{DEFAULTS['learning_rate']:g}, LoRA rank 8, local answer heads, record-level DP-SGD (per-record "
             f"clipping to 1, Poisson batches) with σ calibrated by the runner so that every site ends at ε = "
             f"{EPSILON:g}, δ = {DELTA:g} (RDP unless the row says PRV). FedDAT takes two DP-SGD steps a batch "
             "(A_s, then A_c), accounted as one Gaussian mechanism of σ/√2. Seeds: "
             f"{', '.join(map(str, seeds))} ({len(seeds)}).", "",
             "Accuracy (%) on each site's test split after the last round (FedDAT: the DAT, A_s + A_c; FFA-LoRA: "
             "the shared adapter), mean over sites, then over seeds (± the half-width of a 95 % t-interval where "
             "there are several); top answer: the share of test predictions on each site's most frequent predicted "
             "answer. Gain: over question-only on the same data, paired by seed; kept: the gain at ε = 8 over the "
             "gain without DP on the same schedule (the issue's goal: ≥ 50 %, with top answer ≤ 50 %).", "",
             "| lever | σ | ε = 8 | top answer | no DP | gain at ε = 8 | gain without DP | kept | question-only "
             "| majority |", "|---|---|---|---|---|---|---|---|---|---|"]
    used = []
    for lever in LEVERS:
        found = [cells_of(lever, seed, train=False) for seed in seeds]
        if any(private is None or (lever.without_dp and open_ is None) for private, open_, _ in found):
            lines.append(f"| {lever.name} | | not yet run | | | | | | | |")
            continue
        mode = "dat" if lever.method == "feddat" else "shared"
        private = [np.mean(site_scores(p, mode)) for p, _, _ in found]
        floor = [np.mean(site_scores(r, "question_only")) for _, _, r in found]
        majority = [np.mean(site_scores(r, "majority")) for _, _, r in found]
        top = np.mean([np.mean(site_scores(p, "top_answer_share", "predictions")) for p, _, _ in found])
        gain = np.subtract(private, floor)
        row = [lever.name,
               sigma(lever, arguments(lever, seeds[0])), percent(*interval(private)), f"{100 * top:.0f} %"]
        if lever.without_dp:
            open_ = [np.mean(site_scores(o, mode)) for _, o, _ in found]
            open_gain = np.subtract(open_, floor)
            kept = f"{100 * np.mean(gain) / np.mean(open_gain):.0f} %" if np.mean(open_gain) > 0 else "—"
            row += [percent(*interval(open_)), f"{100 * np.mean(gain):+.1f}", f"{100 * np.mean(open_gain):+.1f}",
                    kept]
        else:
            row += ["not run", f"{100 * np.mean(gain):+.1f}", "", ""]
        row += [percent(*interval(floor)), percent(*interval(majority))]
        lines.append("| " + " | ".join(row) + " |")
        used += [cell for cells in found for cell in cells[:2] if cell is not None]
    return "\n".join(lines + ["", provenance(used), ""])


def confirmation(best_private: Lever, best_open: Lever, seeds: list[int]) -> list[str]:
    """The best DP schedule against the best one without DP, seed by seed (the issue's goal, on several seeds)."""
    data = f"{arguments(best_private, 0).train_per_client:,} examples per site"
    lines = ["", f"## The best DP schedule against the best one without DP, {data}", "",
             f"FedDAT at ε = {EPSILON:g} on the row \"{best_private.name}\" against FedDAT without DP on "
             f"\"{best_open.name}\" (the table's rows on this data with the highest accuracy at ε = {EPSILON:g} and "
             "without DP, chosen by the script on the table's seeds; the non-private gain a user gives up is that of "
             "the schedule they would run without DP), paired by seed:", "",
             "| seed | ε = 8 | top answer | no DP | question-only | majority | gain at ε = 8 | gain without DP "
             "| kept |", "|---|---|---|---|---|---|---|---|---|"]
    rows, used, missing = [], [], []
    for seed in seeds:
        private, _, reference = cells_of(best_private, seed, train=False)
        open_ = accuracy_cell(Path(CACHE), "feddat", math.inf, seed, arguments(best_open, seed), train=False)[0]
        if private is None or open_ is None:
            missing.append(seed)
            continue
        rows.append((seed, np.mean(site_scores(private, "dat")),
                     np.mean(site_scores(private, "top_answer_share", "predictions")),
                     np.mean(site_scores(open_, "dat")), np.mean(site_scores(reference, "question_only")),
                     np.mean(site_scores(reference, "majority"))))
        used += [private, open_]
    for seed, private, top, open_, floor, majority in rows:
        lines.append(f"| {seed} | {100 * private:.1f} | {100 * top:.1f} % | {100 * open_:.1f} | {100 * floor:.1f} | "
                     f"{100 * majority:.1f} | {100 * (private - floor):+.1f} | {100 * (open_ - floor):+.1f} | "
                     f"{100 * (private - floor) / (open_ - floor):.0f} % |")
    if len(rows) > 1:
        gain = [private - floor for _, private, _, _, floor, _ in rows]
        open_gain = [open_ - floor for _, _, _, open_, floor, _ in rows]
        top = np.mean([r[2] for r in rows])
        lines.append(f"| mean of {len(rows)} | {percent(*interval([r[1] for r in rows]))} | {100 * top:.1f} % | "
                     f"{percent(*interval([r[3] for r in rows]))} | {percent(*interval([r[4] for r in rows]))} | "
                     f"{percent(*interval([r[5] for r in rows]))} | {percent(*interval(gain))} | "
                     f"{percent(*interval(open_gain))} | {100 * np.mean(gain) / np.mean(open_gain):.0f} % |")
    if missing:
        lines += ["", f"Not yet run (rerun the command to fill them in): seeds {', '.join(map(str, missing))}."]
    return lines + ["", provenance(used) if used else "", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--confirm-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the best DP schedule against the best one without DP")
    parser.add_argument("--report", action="store_true", help="only rewrite the report from the cached cells")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results_privacy_levers.md"))
    args = parser.parse_args(argv)
    if not args.report:
        for seed in args.seeds:
            for lever in LEVERS:
                private, _, _ = cells_of(lever, seed, train=True)
                mode = "dat" if lever.method == "feddat" else "shared"
                accuracy = np.mean(site_scores(private, mode))
                print(f"seed {seed} {lever.name}: ε = {EPSILON:g} {accuracy:.3f}", flush=True)
    pairs = [best_levers(size, args.seeds) for size in CONFIRMED_DATA_SIZES]  # after the table's cells have run
    if not args.report:
        for best_private, best_open in pairs:
            for seed in args.confirm_seeds:  # the DP row's own run without DP is not needed here
                private_args = arguments(best_private, seed)
                baseline_cell(Path(CACHE), run_config("fedavg", math.inf, seed, private_args))
                accuracy_cell(Path(CACHE), best_private.method, EPSILON, seed, private_args, train=True)
                accuracy_cell(Path(CACHE), "feddat", math.inf, seed, arguments(best_open, seed), train=True)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report"]  # the command that fills it
    command = "python " + " ".join(["benchmarks/privacy_levers.py", *given])
    sections = [line for pair in pairs if pair is not None for line in confirmation(*pair, args.confirm_seeds)]
    Path(args.output).write_text(report(args.seeds, command) + "\n".join(sections))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
