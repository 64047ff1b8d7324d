"""The README stays short, its API example runs and gives what it claims, and its links lead somewhere."""

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_short():
    assert len(README.splitlines()) <= 200, "the README is read in five minutes: move detail into docs/"


def test_readme_api_example_runs():
    code = re.search(r"## The API in ten lines\n\n```python\n(.*?)```", README, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    M, dlr = scope["M"], scope["dlr"]
    assert M.shape == (100, 100) and dlr.shape == (100,)
    assert np.all(np.isfinite(np.asarray(M))) and np.all(np.isfinite(np.asarray(dlr)))
    assert float(np.trace(np.asarray(M))) < 0  # each sample's own loss falls after training on it
    assert float(np.abs(np.asarray(dlr)).max()) > 0  # the trace depends on the rates


def test_readme_links_resolve():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links the docs pages"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
