"""The results pages an auditor reads are what the benchmark scripts write from the committed cells: every number
in docs/results.md and docs/results_privacy.md can be traced to a cached `feddat-secure run`, and a page edited by
hand, or left stale after its cells changed, fails here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_methods  # noqa: E402  (benchmarks are scripts, not a package)
import privacy_tradeoff  # noqa: E402


def without_command(text: str) -> list[str]:
    """The page without its command line (which names the output file it was written to)."""
    return [line for line in text.splitlines() if not line.startswith("python benchmarks/")]


@pytest.mark.parametrize("page, write", [
    ("results.md", lambda out: compare_methods.main(["--report-only", "--output", str(out)])),
    ("results_privacy.md", lambda out: privacy_tradeoff.main(["report", "--output", str(out)])),
])
def test_a_results_page_is_its_script_report_of_the_committed_cells(tmp_path, page, write):
    committed = ROOT / "docs" / page
    out = tmp_path / page
    if committed.with_suffix(".json").exists():  # measurements kept beside the page (the cost of DP-SGD)
        shutil.copy(committed.with_suffix(".json"), out.with_suffix(".json"))
    write(out)
    assert without_command(out.read_text()) == without_command(committed.read_text())
    command = next(line for line in committed.read_text().splitlines() if line.startswith("python benchmarks/"))
    assert "--output" not in command  # the page says how to rebuild itself, not where a copy went
