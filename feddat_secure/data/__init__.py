"""Benchmarks: synthetic heterogeneity (function, domain, scene), real digits, easy-VQA, users' folders."""

from __future__ import annotations

from .digits import digits_benchmark
from .easy_vqa import NAME as EASY_VQA
from .easy_vqa import easy_vqa_benchmark
from .folder import load_folder_benchmark
from .images import load_image, to_rgb
from .questions import FAMILIES
from .report import DataReport, SiteDataReport, TextCoverage, data_report, site_report, text_coverage
from .synthetic import GROUNDED_FAMILIES, SITE_BUILDERS, synthetic_benchmark
from .vqa import Benchmark, ClientData, DataError, VQAExample, hold_out_validation


def build_benchmark(name: str, *, path: str, num_clients: int, train_per_client: int, test_per_client: int,
                    image_size: int, seed: int, validation_fraction: float = 0.0,
                    question_families: tuple[str, ...] = FAMILIES) -> Benchmark:
    """The benchmark ``name``; with ``validation_fraction`` > 0, scored on a held-out part of each site's
    training examples instead of its test split (:func:`~feddat_secure.data.vqa.hold_out_validation`);
    ``question_families``: the synthetic benchmarks' question families (:mod:`.synthetic`; ValueError for another
    benchmark unless all five)."""
    if tuple(question_families) != FAMILIES and name not in SITE_BUILDERS:
        raise ValueError(f"question families apply to the synthetic benchmarks ({', '.join(SITE_BUILDERS)}), "
                         f"not {name!r}")
    if name == "folder":
        benchmark = load_folder_benchmark(path, image_size=image_size)
    else:
        sizes = dict(num_clients=num_clients, train_per_client=train_per_client, test_per_client=test_per_client,
                     image_size=image_size, seed=seed)
        if name in SITE_BUILDERS:
            benchmark = synthetic_benchmark(name, **sizes, families=question_families)
        elif name == EASY_VQA:
            benchmark = easy_vqa_benchmark(**sizes)
        else:
            benchmark = digits_benchmark(name, **sizes)
    return hold_out_validation(benchmark, validation_fraction) if validation_fraction else benchmark


__all__ = ["FAMILIES", "GROUNDED_FAMILIES", "Benchmark", "ClientData", "DataError", "DataReport", "SiteDataReport",
           "TextCoverage", "VQAExample",
           "build_benchmark", "data_report", "hold_out_validation", "load_image", "site_report", "text_coverage",
           "to_rgb"]
