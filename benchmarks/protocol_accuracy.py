"""Does masked secure aggregation change what FedDAT learns? The demo's configuration, plain vs masked.

Masked aggregation quantizes every update value to a grid (16 bits over [-0.25, 0.25] by
default, a step of 7.6e-6) with stochastic rounding; plain adds float64 values. Runs the embedded
demo configuration for each seed under both protocols, in this process, and prints the final
mean accuracy of each FedDAT inference mode and the masked − plain difference.

    .venv/bin/python benchmarks/protocol_accuracy.py [--seeds 0 1 2 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from importlib import resources

import numpy as np

from feddat_secure.config import load_config
from feddat_secure.federation.runner import run

MODES = ("dat", "shared", "client")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    base = load_config(resources.files("feddat_secure") / "configs" / "demo.toml")
    finals: dict[str, list[dict]] = {"plain": [], "masked": []}
    with tempfile.TemporaryDirectory() as folder:
        for seed in args.seeds:
            for protocol in finals:
                config = dataclasses.replace(
                    base, name=f"{protocol}-{seed}", seed=seed, output_dir=folder,
                    secure_aggregation=dataclasses.replace(base.secure_aggregation, protocol=protocol))
                finals[protocol].append(run(config, progress=False, echo=lambda _: None).final_mean)
                print(seed, protocol, {m: round(finals[protocol][-1][m], 3) for m in MODES}, flush=True)
    print("| seed | " + " | ".join(f"{m} plain | {m} masked | Δ" for m in MODES) + " |")
    print("|---" * (1 + 3 * len(MODES)) + "|")
    for index, seed in enumerate(args.seeds):
        plain, masked = finals["plain"][index], finals["masked"][index]
        cells = [f"{plain[m]:.3f} | {masked[m]:.3f} | {masked[m] - plain[m]:+.3f}" for m in MODES]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    means = [np.mean([f[m] for f in finals["masked"]]) - np.mean([f[m] for f in finals["plain"]]) for m in MODES]
    print("mean masked − plain: " + ", ".join(f"{m} {d:+.3f}" for m, d in zip(MODES, means)))


if __name__ == "__main__":
    main()
