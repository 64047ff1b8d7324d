"""One import name: a user's own `meta`, `experiments` or `benchmarks` package neither shadows nor is shadowed
by jaxeif's, in scripts, `python -m` and the `jaxeif` command (they install as jaxeif.meta, jaxeif.experiments
and jaxeif.benchmarks)."""

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
MINE = ("meta", "experiments", "benchmarks")


@pytest.fixture
def user_repo(tmp_path):
    """A research repository with its own meta/, experiments/ and benchmarks/ packages, each saying whose it is."""
    for name in MINE:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user'\nNAME = {name!r}\n")
    (tmp_path / "experiments" / "mine.py").write_text("print('the user study ran')\n")
    return tmp_path


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_installed_distribution_adds_one_top_level_name():
    """pyproject installs every package under jaxeif (the repository's top-level folders mapped into it)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "jaxeif" or p.startswith("jaxeif.") for p in tool["packages"]), tool["packages"]
    folders = {p: ROOT / d for p, d in tool["package-dir"].items()}
    assert {folders[f"jaxeif.{name}"].name for name in MINE} == set(MINE)
    # every folder with an __init__.py inside a shipped package is listed, so nothing is left out of the wheel
    for package, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            sub = ".".join((package, *init.parent.relative_to(folder).parts))
            assert sub in tool["packages"], f"{sub} ({init.parent}) is not in [tool.setuptools] packages"


@pytest.mark.slow
def test_a_users_packages_and_jaxeifs_do_not_collide(user_repo):
    """In a folder holding the user's meta/ and experiments/, `import meta` is the user's and jaxeif.meta is
    jaxeif's; `python -m experiments.mine` runs the user's module, `python -m jaxeif.experiments.cnn_noise` and
    the `jaxeif` command run jaxeif's (the README's example uses `from jaxeif import meta`)."""
    code = (
        "import meta, experiments, benchmarks, jaxeif\n"
        "from jaxeif import meta as jmeta\n"
        "assert (meta.OWNER, experiments.OWNER, benchmarks.OWNER) == ('user',) * 3\n"
        "assert callable(jmeta.fit) and jmeta.__name__ == 'jaxeif.meta'\n"
        "import jaxeif.experiments.cnn_noise as s; assert s.__name__ == 'jaxeif.experiments.cnn_noise'\n"
        "print('ok')\n"
    )
    out = _run(["-c", code], user_repo)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr
    out = _run(["-m", "experiments.mine"], user_repo)
    assert out.returncode == 0 and "the user study ran" in out.stdout, out.stderr
    out = _run(["-m", "jaxeif.experiments.cnn_noise", "--help"], user_repo)
    assert out.returncode == 0 and "--quick" in out.stdout, out.stderr
    out = _run(["-c", "from jaxeif import cli; cli.main(['meta-cnn', '--help'])"], user_repo)
    assert "--quick" in out.stdout, out.stderr
