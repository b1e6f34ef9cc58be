"""protocols/ and audits/ stand on their own: no torch, no feddat_secure (in code or at import), TenSEAL when used."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"torch", "feddat_secure", "transformers", "peft", "opacus"}


@pytest.mark.parametrize("package", ["protocols", "audits"])
def test_package_source_never_imports_torch_or_feddat_secure(package):
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path}: imports {name}"


@pytest.mark.parametrize("package", ["protocols", "audits"])
def test_importing_the_package_loads_no_torch(package):
    code = f"import sys, {package}; print(sorted(m for m in {sorted(FORBIDDEN)!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_he_protocol_is_registered_and_configured_without_tenseal_which_loads_only_when_it_is_built():
    code = ("import sys, protocols\n"
            "from protocols.he import HEOptions\n"
            "assert 'he' in protocols.registered_protocols() and protocols.options_class('he') is HEOptions\n"
            "HEOptions(poly_modulus_degree=4096)\n"
            "print('tenseal' in sys.modules)\n"
            "protocols.make_protocol('he', poly_modulus_degree=4096)\n"
            "print('tenseal' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "True"]
