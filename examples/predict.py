"""Answer questions about images with a finished run's model, as the site (or the global model) does.

    .venv/bin/python examples/predict.py runs/demo --site client0 scan.png "is there a red circle ?"
    .venv/bin/python examples/predict.py runs/demo --site client0        # the site's own test split, re-scored

With image/question pairs it prints each question's three most probable answers. Without any, it regenerates
the run's test examples from its config.toml (a built-in benchmark or a data folder) and compares the accuracy
with the one the run reported in metrics.jsonl (under differential privacy the sites keep their accuracies: then
the one the site kept in its own parties/<site>/metrics.jsonl). docs/api.md describes the API.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import feddat_secure
from feddat_secure.data import build_benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run folder (runs/<name>)")
    parser.add_argument("--site", help="the site whose model answers (default: the global model)")
    parser.add_argument("pairs", nargs="*", metavar="IMAGE QUESTION", help="image files, each with its question")
    args = parser.parse_intermixed_args()
    if len(args.pairs) % 2:
        parser.error("give an image and a question for each prediction")
    try:
        predictor = feddat_secure.Predictor.from_run(args.run, site=args.site)
        if args.pairs:
            show_answers(predictor, args.pairs[0::2], args.pairs[1::2])
        else:
            rescore_test_split(predictor, args.run)
    except feddat_secure.FeddatError as error:
        print(f"predict.py: {error}", file=sys.stderr)
        return 2
    return 0


def show_answers(predictor: feddat_secure.Predictor, images: list[str], questions: list[str]) -> None:
    for image, question, row in zip(images, questions, predictor.predict_proba(images, questions)):
        best = sorted(zip(row, predictor.answers), reverse=True)[:3]
        print(f"{image}: {question}  ->  " + ", ".join(f"{answer} ({p:.2f})" for p, answer in best))


def rescore_test_split(predictor: feddat_secure.Predictor, run: Path) -> None:
    config = feddat_secure.load_config(run / "config.toml")
    benchmark = build_benchmark(config.data.benchmark, path=config.data.path, num_clients=config.data.num_clients,
                                train_per_client=config.data.train_per_client,
                                test_per_client=config.data.test_per_client, image_size=predictor.image_size,
                                seed=config.seed, question_families=config.data.question_families)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for client in benchmark.clients:
        if predictor.site not in (None, client.client_id):
            continue
        answers = predictor.predict([ex.image for ex in client.test], [ex.question for ex in client.test])
        accuracy = sum(a == ex.answer for a, ex in zip(answers, client.test)) / len(client.test)
        reported = last["clients"][client.client_id]
        if reported is None:  # withheld from the server under DP: the site's own record of the same round
            kept = (run / "parties" / client.client_id / "metrics.jsonl").read_text().splitlines()
            reported = next(r["accuracy"] for r in map(json.loads, kept) if r["round"] == last["round"])
        print(f"{client.client_id}: accuracy {accuracy:.3f} on {len(client.test)} test examples "
              f"(the run reported {predictor.metric} = {reported[predictor.metric]:.3f})")


if __name__ == "__main__":
    sys.exit(main())
