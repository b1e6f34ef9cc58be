"""What secure aggregation and audit logging add to a whole federated round, in the real runner.

Runs the embedded demo's configuration (FedDAT, 5 sites, 200 examples each, 20 local steps)
for a few rounds under each setting, in this one process, and prints the mean seconds per
round (local training, the protocol, evaluation and the logging of those exchanges), the whole
run's wall time (also model set-up, key generation, tree-head exchanges, checkpoints and saving),
and their ratios to the baseline: plain aggregation without audit logs.

    .venv/bin/python benchmarks/round_overhead.py [--rounds 2] [--repeats 2] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from feddat_secure.config import load_config
from feddat_secure.federation.runner import run

SETTINGS = [  # (label, protocol, audit)
    ("plain, no audit log (baseline)", "plain", False),
    ("plain + audit log", "plain", True),
    ("masked + audit log", "masked", True),
    ("he + audit log", "he", True),
]


def measure(rounds: int, repeats: int) -> list[tuple[str, float, int, float]]:
    """Each setting ``repeats`` times, settings interleaved; the fastest repeat of each is kept (the
    machine's other load only ever adds time)."""
    base = load_config(resources.files("feddat_secure") / "configs" / "demo.toml")
    best: dict[str, tuple[str, float, int, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        # Warm-up, not measured: the first run in a process pays for torch's kernels and thread pools.
        run(dataclasses.replace(base, name="warm-up", output_dir=folder,
                                federation=dataclasses.replace(base.federation, rounds=1)),
            progress=False, echo=lambda _: None)
        for repeat in range(repeats):
            for label, protocol, audit in SETTINGS:
                config = dataclasses.replace(
                    base, name=f"{protocol}-{audit}-{repeat}", output_dir=folder,
                    federation=dataclasses.replace(base.federation, rounds=rounds),
                    secure_aggregation=dataclasses.replace(base.secure_aggregation, protocol=protocol),
                    audit=dataclasses.replace(base.audit, enabled=audit))
                start = time.perf_counter()
                result = run(config, progress=False, echo=lambda _: None)
                total = time.perf_counter() - start
                per_round = sum(r["seconds"] for r in result.history) / len(result.history)
                print(f"{label:34s} {per_round:7.2f} s/round  (whole run {total:.1f} s)", flush=True)
                if label not in best or total < best[label][3]:
                    best[label] = (label, per_round, result.history[-1]["bytes_to_server_total"], total)
    rows = [best[label] for label, _, _ in SETTINGS]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, help="write the table as Markdown here")
    args = parser.parse_args()
    rows = measure(args.rounds, args.repeats)
    baseline = rows[0][1]
    whole = rows[0][3]
    lines = ["| setting | seconds per round | × baseline | whole run (s) | × baseline | bytes to the server |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {seconds:.2f} | {seconds / baseline:.2f} | {total:.1f} | {total / whole:.2f} | "
              f"{received:,} |" for label, seconds, received, total in rows]
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(
            "Command: `.venv/bin/python benchmarks/round_overhead.py "
            f"--rounds {args.rounds} --repeats {args.repeats}`; "
            f"{platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads.\n\n"
            + table + "\n")


if __name__ == "__main__":
    main()
