"""The README's API example runs as written and gives what it claims."""
import re
from pathlib import Path

import numpy as np


def test_readme_api_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## The API in ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    M, dlr = scope["M"], scope["dlr"]
    assert M.shape == (100, 100) and dlr.shape == (100,)
    assert np.all(np.isfinite(np.asarray(M)))
    assert float(np.trace(np.asarray(M))) < 0  # each sample's own loss falls after training on it
