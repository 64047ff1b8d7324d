"""Every code block in the README and the docs pages that claims to run does run.

The convention (docs/testing.md): a block fenced ```python runs; the blocks of one page run in order, in one
namespace, in a fresh working directory. ```python-norun is illustrative and never runs; ```text (or bash,
console, json, toml, yaml) is shell, output or data. Any other fence (or none) fails `test_every_block_is_tagged`,
so no Python block is left untested by accident.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# ```python runs; the others are shown only. No tag (or another one) fails: a Python example must say which it is.
TAGS = {"python", "python-norun", "text", "json", "toml", "yaml", "bash", "console", "shell"}
FENCE = re.compile(r"^(\s*)```(.*)$")


def pages() -> list[Path]:
    """The README and every markdown page of the docs site (the hook folder excluded)."""
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_hooks" not in p.parts)
    return [ROOT / "README.md", *docs]


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """(tag, first line number, dedented code) of each fenced block of a page, in order."""
    out, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        indent, tag, start = m.group(1), m.group(2).strip(), i + 1
        i += 1
        body = []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start}: a code fence is never closed")
        out.append((tag, start, "\n".join(body) + "\n"))
        i += 1
    return out


def runnable(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for tag, line, code in blocks(path) if tag == "python"]


def test_the_parser_reads_tags_and_order(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("x\n```python\na = 1\n```\n  ```python-norun\n  b = 2\n  ```\n```text\nmake\n```\n")
    assert blocks(page) == [("python", 2, "a = 1\n"), ("python-norun", 5, "b = 2\n"), ("text", 8, "make\n")]
    assert runnable(page) == [(2, "a = 1\n")]


@pytest.mark.parametrize("path", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_block_is_tagged(path):
    wrong = [(line, tag) for tag, line, _ in blocks(path) if tag not in TAGS]
    assert not wrong, (
        f"{path.relative_to(ROOT)}: code blocks at lines {wrong} need one of the tags {sorted(TAGS)}: "
        "```python runs in tests/test_docs.py, ```python-norun is shown but never run, ```text is shell/output"
    )


RUNNABLE = [p for p in pages() if runnable(p)]


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_in_order(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write folders write them here
    scope: dict = {"__name__": "__docs__"}
    for line, code in runnable(path):
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), scope)


def test_there_are_runnable_pages():
    # The README, the API guide, resuming and meta pages carry runnable examples; losing them all would make
    # the test above vacuous.
    names = {p.name for p in RUNNABLE}
    assert {"README.md", "guide.md", "resuming.md", "meta.md"} <= names, names


def _hook():
    pytest.importorskip("mkdocs")  # the docs extra; CI builds the site with it
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_pages", ROOT / "docs" / "_hooks" / "api_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_signature_table_lists_every_eif_function_and_keyword():
    import inspect

    import jaxeif

    hook = _hook()
    table = hook.signature_table()
    for shown, _, _ in hook.EIF_FUNCTIONS:
        assert f"`{shown}`" in table and f"\n{shown}(" in table
    for p in inspect.signature(jaxeif.eif).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            assert f"| `{p.name}` |" in table


def test_build_stops_on_a_public_name_missing_from_the_api_pages():
    from mkdocs.exceptions import PluginError

    import jaxeif

    hook = _hook()
    hook._anchors.clear()
    hook._anchors.update(f"{ns}.{n}" for ns in hook.NAMESPACES for n in __import__(ns, fromlist=["_"]).__all__)
    hook.on_post_build(config=None)  # everything rendered: no error
    hook._anchors.discard("jaxeif.eif_sweep")
    hook._anchors.discard(f"{jaxeif.eif_sweep.__module__}.eif_sweep")
    with pytest.raises(PluginError, match="jaxeif.eif_sweep"):
        hook.on_post_build(config=None)
