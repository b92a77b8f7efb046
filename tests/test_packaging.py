"""The version has one source; the citation file and the changelog follow it."""

from __future__ import annotations

import re
from pathlib import Path

import torchdion

ROOT = Path(__file__).resolve().parents[1]


def test_citation_and_pyproject_follow_the_package_version():
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(torchdion.__version__)}$", cff, re.M), \
        "CITATION.cff's version differs from torchdion.__version__"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "torchdion.__version__" }' in pyproject
    assert "Ahn" in cff and "2504.05295" in cff  # the paper is credited


def test_py_typed_ships():
    assert (Path(torchdion.__file__).parent / "py.typed").is_file()
