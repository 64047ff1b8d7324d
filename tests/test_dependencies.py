"""What the code imports is declared, and the lock (constraints.txt) satisfies what pyproject.toml declares.

A module imported anywhere in the shipped code must come from the standard library, from jaxeif itself, or
from a distribution that pyproject.toml declares; which distribution provides which module is read from the
installed distributions' metadata (importlib.metadata.packages_distributions), not from a hand-kept table.
Module-level imports of the library itself (jaxeif/, meta/) must come from the runtime dependencies; the
experiments, benchmarks and lazy (function-level) imports may also use the optional extras.
"""

import ast
import importlib.metadata as md
import os
import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("jaxeif", "meta", "experiments", "benchmarks")  # the folders pip installs (as jaxeif.*)
LIBRARY = ("jaxeif", "meta")  # what `import jaxeif` may load without an extra


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extras: bool) -> list[Requirement]:
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    if extras:
        reqs += [Requirement(r) for group in project.get("optional-dependencies", {}).values() for r in group]
    return reqs


def _declared(extras: bool) -> set[str]:
    """Canonical names of the declared distributions (whatever their markers: a platform may need the other)."""
    return {canonicalize_name(r.name) for r in _requirements(extras)}


def imports_of(source: str) -> list[tuple[str, bool]]:
    """(top-level module name, imported at module level) for each absolute import in `source`."""
    found = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], top))
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try))
            visit(child, top and not nested)

    visit(ast.parse(source), True)
    return found


def undeclared_imports(folders=SHIPPED) -> list[str]:
    """'path: module' for every import that no declared distribution provides."""
    providers = md.packages_distributions()
    runtime, everything = _declared(extras=False), _declared(extras=True)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    problems = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for module, top in imports_of(path.read_text()):
                if module in stdlib or module == "jaxeif":
                    continue
                dists = {canonicalize_name(d) for d in providers.get(module, [])}
                allowed = runtime if (top and folder in LIBRARY) else everything
                if not dists & allowed:
                    where = "runtime dependencies" if allowed is runtime else "dependencies or extras"
                    problems.append(
                        f"{path.relative_to(ROOT)}: imports {module!r}, provided by "
                        f"{sorted(dists) or 'no installed distribution'}, none of them in the {where}"
                    )
    return problems


def test_every_import_is_declared():
    problems = undeclared_imports()
    assert not problems, "declare these in pyproject.toml:\n" + "\n".join(problems)


def test_the_check_catches_an_undeclared_import(tmp_path, monkeypatch):
    """A module of the shipped code importing a package that is installed (as a dependency of a dependency)
    but not declared is reported; the same import through a declared distribution is not."""
    module = "yaml"  # PyYAML: installed here by flax/transformers, declared by jaxeif nowhere
    pytest.importorskip(module)
    assert canonicalize_name("PyYAML") not in _declared(extras=True)
    fake_root = tmp_path / "root"
    (fake_root / "jaxeif").mkdir(parents=True)
    (fake_root / "jaxeif" / "new.py").write_text(f"import numpy\nimport {module}\n")
    (fake_root / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    problems = undeclared_imports(folders=("jaxeif",))
    assert len(problems) == 1 and "'yaml'" in problems[0] and "pyyaml" in problems[0], problems


def test_module_level_library_imports_need_runtime_dependencies():
    """`import torch` at the top of a library module is refused although torch is in the test extra."""
    imports = imports_of("import torch\ndef f():\n    import torch\n")
    assert imports == [("torch", True), ("torch", False)]


def test_tensorflow_datasets_runtime_need_is_declared():
    """tfds needs importlib_resources at run time (etils.epath) without declaring it; jaxeif declares it."""
    assert "importlib-resources" in _declared(extras=False)
    tfds_requires = md.requires("tensorflow-datasets") or []
    if any(
        canonicalize_name(Requirement(r).name) == "importlib-resources" and not Requirement(r).marker
        for r in tfds_requires
    ):
        pytest.fail("tensorflow-datasets declares importlib_resources now: the explicit declaration can go")


# ----------------------------------------------------------------------------- the lock
def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not a NAME==VERSION pin; regenerate it with `make lock`"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def test_lock_satisfies_pyproject():
    """Every declared requirement (runtime and extras) that applies on this platform is pinned in the lock to
    a version inside pyproject.toml's range."""
    pins = _lock()
    problems = []
    for req in _requirements(extras=True):
        env = dict(default_environment(), extra="")
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name} is declared but not in constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}: constraints.txt pins {pins[name]}, outside {req.specifier}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


@pytest.mark.skipif(os.environ.get("JAXEIF_LOCKED") == "0", reason="installed with CONSTRAINTS= (from ranges)")
def test_installed_versions_are_the_locked_ones():
    """The environment running these tests was installed from the lock (the Makefile passes it to pip)."""
    pins = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in md.distributions()}
    drift = [
        f"{name}: installed {installed[name]}, locked {version}"
        for name, version in sorted(pins.items())
        if name in installed and installed[name] != version
    ]
    assert not drift, "the environment is not the locked one (reinstall with `make test`):\n" + "\n".join(drift)
