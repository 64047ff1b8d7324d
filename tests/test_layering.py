"""The package's import graph flows one way (built with ast, nothing imported):
core (jaxeif/*.py, jaxeif/lm, jaxeif/models, jaxeif/data) <- meta <- experiments <- benchmarks.

Fails on any import circle (lazy imports inside functions included: they still tie the modules
together), any experiments -> benchmarks import, any core -> experiments/benchmarks/meta import, and any
module that uses another module's private (_underscored) name."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# import name prefix -> folder (pyproject's package-dir)
PACKAGES = {
    "jaxeif": ROOT / "jaxeif",
    "jaxeif.meta": ROOT / "meta",
    "jaxeif.experiments": ROOT / "experiments",
    "jaxeif.benchmarks": ROOT / "benchmarks",
}
TOP = ("jaxeif.meta", "jaxeif.experiments", "jaxeif.benchmarks")


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def layer(module: str) -> str:
    for top in TOP:
        if module == top or module.startswith(top + "."):
            return top.split(".")[1]
    return "core"


def _imports(module: str, path: pathlib.Path):
    """(imported module, names taken from it, line) for every import statement of `module` (any depth)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], alias.asname or alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from pkg import submodule`
                    yield sub, [], alias.asname or alias.name, node.lineno
                else:
                    yield base, [alias.name], None, node.lineno


def _graph() -> dict[str, set[str]]:
    return {
        m: {target for target, *_ in _imports(m, p) if target in MODULES and target != m} for m, p in MODULES.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_found():
    graph = _graph()
    assert {"jaxeif.influence", "jaxeif.experiments.cnn_noise", "jaxeif.benchmarks.cnn", "jaxeif.meta.outer"} <= set(
        graph
    )
    assert (
        "jaxeif.influence" in graph["jaxeif"] and "jaxeif.experiments.options" in graph["jaxeif.experiments.cnn_noise"]
    )


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(
    "source, forbidden",
    [
        ("core", ("meta", "experiments", "benchmarks")),
        ("meta", ("experiments", "benchmarks")),
        ("experiments", ("benchmarks",)),
    ],
)
def test_layers_import_only_downward(source, forbidden):
    bad = [
        f"{m} imports {t}" for m, deps in _graph().items() if layer(m) == source for t in deps if layer(t) in forbidden
    ]
    assert bad == []


def test_no_module_uses_another_modules_private_name():
    """What a sibling module needs is a public, documented name; an _underscored one stays in its module."""
    bad = []
    for module, path in MODULES.items():
        aliases = {}
        for target, names, alias, line in _imports(module, path):
            if target not in MODULES or target == module:
                continue
            bad += [f"{module}:{line} imports {target}.{n}" for n in names if n.startswith("_")]
            if alias:
                aliases[alias] = target
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert bad == []
