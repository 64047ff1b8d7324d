"""mkdocs hook: the generated EIF signature table, and the API pages' completeness checks.

* `signatures.md` holds the marker `<!-- eif-signatures -->`; it is replaced at build time by a table built
  from `inspect.signature` of every EIF function, so the table cannot drift from the code.
* Every name in `jaxeif.__all__`, `jaxeif.lm.__all__` and `jaxeif.meta.__all__` must be rendered on an API
  page (an HTML anchor `id="<module>.<name>"`, which mkdocstrings writes for each object it documents);
  a missing one stops the build with an error naming it and the page to add it to.
* Every public function or class on an API page without a docstring is a warning, which
  `mkdocs build --strict` turns into a failure.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re

from mkdocs.exceptions import PluginError

log = logging.getLogger("mkdocs.hooks.jaxeif_api")

MARKER = "<!-- eif-signatures -->"
# (shown name, module, attribute): the EIF functions that share one keyword contract.
EIF_FUNCTIONS = [
    ("eif", "jaxeif", "eif"),
    ("eif_sweep", "jaxeif", "eif_sweep"),
    ("eif_linearized", "jaxeif", "eif_linearized"),
    ("eif_sharded", "jaxeif", "eif_sharded"),
    ("noise_floor", "jaxeif", "noise_floor"),
    ("runs.sweep_eif", "jaxeif.runs", "sweep_eif"),
    ("lm.finetuned_eif", "jaxeif.lm", "finetuned_eif"),
    ("lm.lora_eif", "jaxeif.lm", "lora_eif"),
    ("lm.lowrank_sgd_eif", "jaxeif.lm", "lowrank_sgd_eif"),
    ("lm.linearized_sgd_eif", "jaxeif.lm", "linearized_sgd_eif"),
    ("lm.prompted_eif", "jaxeif.lm", "prompted_eif"),
]
# Namespaces whose every public name must be on an API page.
NAMESPACES = ["jaxeif", "jaxeif.lm", "jaxeif.meta", "jaxeif.store", "jaxeif.streaming"]
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)", re.M)

_anchors: set[str] = set()


def _default(p: inspect.Parameter) -> str:
    if p.kind is inspect.Parameter.VAR_KEYWORD:
        return "`**" + p.name + "`"
    if p.kind is inspect.Parameter.VAR_POSITIONAL:
        return "`*" + p.name + "`"
    if p.default is inspect.Parameter.empty:
        return "required"
    text = repr(_bare(p).default)
    if len(text) > 28:  # an object's repr (an optax transformation): its type says enough
        text = type(p.default).__name__
    return "`" + text.replace("|", "\\|") + "`"


class _Named:
    """A default shown by name (a function's repr holds its memory address, which changes every run)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _bare(p: inspect.Parameter) -> inspect.Parameter:
    """The parameter without its annotation, a callable default shown by its qualified name."""
    p = p.replace(annotation=inspect.Parameter.empty)
    if p.default is not inspect.Parameter.empty and callable(p.default) and hasattr(p.default, "__qualname__"):
        p = p.replace(default=_Named(f"{p.default.__module__}.{p.default.__qualname__}"))
    return p


def signature_table() -> str:
    """Markdown: each function's full signature, then a keyword x function table of defaults."""
    sigs = []
    for shown, module, attr in EIF_FUNCTIONS:
        fn = getattr(importlib.import_module(module), attr)
        sigs.append((shown, inspect.signature(fn)))
    lines = ["```python-norun"]
    for shown, sig in sigs:
        bare = sig.replace(
            parameters=[_bare(p) for p in sig.parameters.values()], return_annotation=inspect.Signature.empty
        )
        lines.append(f"{shown}{bare}")
    lines += ["```", ""]
    # Keyword-only parameters, in first-appearance order, against each function.
    names: list[str] = []
    for _, sig in sigs:
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names:
                names.append(p.name)
    lines.append("| keyword | " + " | ".join(f"`{s}`" for s, _ in sigs) + " |")
    lines.append("|---" * (len(sigs) + 1) + "|")
    for name in names:
        cells = []
        for _, sig in sigs:
            p = sig.parameters.get(name)
            cells.append(_default(p) if p is not None and p.kind is inspect.Parameter.KEYWORD_ONLY else "-")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _public_objects(module_name: str):
    """(qualified name, object) of each public function or class a `::: module` directive renders."""
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, o in vars(module).items()
            if not n.startswith("_") and getattr(o, "__module__", None) == module_name
        ]
    for name in names:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            yield f"{module_name}.{name}", obj


def on_page_markdown(markdown, page, config, files):
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, signature_table())
    if page.file.src_uri.startswith("api/"):
        for module_name in DIRECTIVE.findall(markdown):
            try:
                importlib.import_module(module_name)
            except ImportError:
                continue  # `::: module.function`, not a module: nothing more to list
            for qualname, obj in _public_objects(module_name):
                if not inspect.getdoc(obj):
                    log.warning("%s (on %s) has no docstring: write one with Args/Returns", qualname, page.file.src_uri)
    return markdown


def on_page_content(html, page, config, files):
    if page.file.src_uri.startswith("api/"):
        _anchors.update(re.findall(r'id="([\w.]+)"', html))
    return html


def on_post_build(config):
    missing = []
    for namespace in NAMESPACES:
        module = importlib.import_module(namespace)
        for name in module.__all__:
            obj = getattr(module, name)
            # A name equal to its own submodule (`jaxeif.noise_floor`) is rendered where it is defined.
            defined = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
            if f"{namespace}.{name}" not in _anchors and defined not in _anchors:
                missing.append(f"{namespace}.{name}")
    if missing:
        raise PluginError(
            "public names missing from the API pages (docs/api/*.md): "
            + ", ".join(missing)
            + ". Render them there (a `::: namespace` directive renders every name in its __all__)."
        )
