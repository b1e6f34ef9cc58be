"""Does masked secure aggregation change what FedDAT learns? The demo's configuration, plain vs masked.

Masked aggregation quantizes every update value to a grid (16 bits over [-0.25, 0.25] by
default, a step of 7.6e-6) with stochastic rounding; plain adds float64 values. Runs the embedded
demo configuration for each seed under both protocols, in this process, and prints the final
mean accuracy of each FedDAT inference mode and the masked − plain difference.

    .venv/bin/python benchmarks/protocol_accuracy.py [--seeds 0 1 2 3] [--baselines-only]

It also prints the references every accuracy table carries, computed on the same data without training
(mean over sites): the majority answer (each site's most frequent training answer) and question-only (each
question's most frequent training answer at that site, never looking at the image).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from importlib import resources

import numpy as np

from feddat_secure.config import RunConfig, load_config
from feddat_secure.data import build_benchmark
from feddat_secure.data.baselines import site_baselines
from feddat_secure.federation.runner import run
from feddat_secure.model.backbone import load_foundation

MODES = ("dat", "shared", "client")


def baselines(config: RunConfig) -> dict[str, float]:
    """Test accuracy without training, averaged over the sites: the majority answer and question-only
    (``feddat_secure.data.baselines``, the same references as every accuracy table)."""
    image_size = load_foundation(config.model.path).image_size
    data = config.data
    benchmark = build_benchmark(data.benchmark, path=data.path, num_clients=data.num_clients,
                                train_per_client=data.train_per_client, test_per_client=data.test_per_client,
                                image_size=image_size, seed=config.seed, question_families=data.question_families)
    scores = site_baselines(benchmark).values()
    return {"majority": float(np.mean([s.majority for s in scores])),
            "question-only": float(np.mean([s.question_only for s in scores]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--baselines-only", action="store_true", help="print the untrained references only")
    args = parser.parse_args()
    base = load_config(resources.files("feddat_secure") / "configs" / "demo.toml")
    references = [baselines(dataclasses.replace(base, seed=seed)) for seed in args.seeds]
    for seed, reference in zip(args.seeds, references):
        print(seed, "references", {k: round(v, 3) for k, v in reference.items()}, flush=True)
    print("references, mean over seeds: " + ", ".join(
        f"{k} {np.mean([r[k] for r in references]):.3f}" for k in references[0]))
    if args.baselines_only:
        return
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
