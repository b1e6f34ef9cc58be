"""Benchmarks: synthetic heterogeneity (function, domain, scene), real digits, users' folders."""

from __future__ import annotations

from .digits import digits_benchmark
from .folder import load_folder_benchmark
from .images import load_image, to_rgb
from .report import DataReport, SiteDataReport, TextCoverage, data_report, site_report, text_coverage
from .synthetic import SITE_BUILDERS, synthetic_benchmark
from .vqa import Benchmark, ClientData, DataError, VQAExample


def build_benchmark(name: str, *, path: str, num_clients: int, train_per_client: int, test_per_client: int,
                    image_size: int, seed: int) -> Benchmark:
    if name == "folder":
        return load_folder_benchmark(path, image_size=image_size)
    sizes = dict(num_clients=num_clients, train_per_client=train_per_client, test_per_client=test_per_client,
                 image_size=image_size, seed=seed)
    if name in SITE_BUILDERS:
        return synthetic_benchmark(name, **sizes)
    return digits_benchmark(name, **sizes)


__all__ = ["Benchmark", "ClientData", "DataError", "DataReport", "SiteDataReport", "TextCoverage", "VQAExample",
           "build_benchmark", "data_report", "load_image", "site_report", "text_coverage", "to_rgb"]
