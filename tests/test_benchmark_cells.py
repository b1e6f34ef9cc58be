"""The benchmarks' cell cache (``benchmarks/cells.py``): a cached result is found again only for the configuration
and the foundation checkpoint it ran on."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from feddat_secure.model.backbone import EMBEDDED_FOUNDATION

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import cells  # noqa: E402  (benchmarks are scripts, not a package)


def test_a_cell_is_keyed_by_its_configuration_and_by_the_bytes_of_its_foundation(tmp_path):
    folder = tmp_path / "foundation"
    shutil.copytree(EMBEDDED_FOUNDATION, folder)
    config = {"seed": 0, "model": {"head": "local", "path": str(folder)}}
    first = cells.cell_path(tmp_path, "x", config)
    assert cells.cell_path(tmp_path, "x", json.loads(json.dumps(config))) == first
    assert cells.cell_path(tmp_path, "x", {**config, "seed": 1}) != first
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "layer_norm_eps": 1e-6}))  # re-pretrained in place
    cells.foundation_digest.cache_clear()  # a process reads each foundation's digest once
    assert cells.cell_path(tmp_path, "x", config) != first


def test_every_committed_cell_sits_under_the_key_of_what_it_ran_on():
    """Fails when a committed foundation changes without its cells being re-run: the tables would be stale."""
    found = 0
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        cell = json.loads(path.read_text())
        if "config" not in cell or "baselines" in path.name:
            continue
        found += 1
        assert cell["foundation"] == cells.foundation_digest(cells.model_path(cell["config"])), path.name
        assert cells.cell_path(path.parent, path.stem.rsplit("-", 1)[0], cell["config"]) == path, path.name
    assert found > 500


def test_a_foundation_that_names_no_folder_is_refused_not_keyed_by_the_digest_of_nothing(tmp_path):
    with pytest.raises(SystemExit, match="is not a folder"):
        cells.cell_path(tmp_path, "x", {"seed": 0, "model": {"path": "embeded-v2"}})
