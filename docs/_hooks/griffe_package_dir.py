"""Griffe extension: the subpackages setuptools installs from other folders (`package-dir` in pyproject).

`jaxeif.meta` lives in the repository's `meta/` folder, not in `jaxeif/meta/`, so static analysis of the
`jaxeif` package does not find it. This extension parses `meta/` and attaches it as `jaxeif.meta`.
"""

from __future__ import annotations

from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = {"meta": ROOT / "meta"}


class PackageDirs(griffe.Extension):
    def on_package(self, *, pkg, loader, **kwargs):
        if pkg.name != "jaxeif":
            return
        for name, folder in PACKAGE_DIRS.items():
            if name in pkg.members:
                continue
            sub = loader.load(folder)
            pkg.set_member(name, sub)
