"""The scripts under bench/ and examples/ run with their own folder first on sys.path, so a script
named like a standard-library module would be imported in its place (a bench/profile.py once broke
PyTorch's import of cProfile in bench/quality.py)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["bench", "examples"])
def test_no_script_shadows_a_standard_module(folder):
    names = {p.stem for p in (ROOT / folder).glob("*.py")}
    assert not names & set(sys.stdlib_module_names), sorted(names & set(sys.stdlib_module_names))
