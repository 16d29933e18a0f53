"""One import namespace and a wheel that works outside the checkout."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env=None, timeout=300):
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_user_model_and_rewards_do_not_shadow_ours(tmp_path):
    """A project with its own `model/` package and `rewards.py` (common in this field) runs `python -m lance_rl.cli`
    in its working directory without importing either, and a custom reward still plugs in by import path."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("raise SystemExit('the user model package was imported')\n")
    (tmp_path / "rewards.py").write_text(
        "def brightness(*, images, **kwargs):\n    return [float(im.mean()) / 255 for im in images]\n"
    )
    r = _run([sys.executable, "-m", "lance_rl.cli", "init-tiny", str(tmp_path / "tiny")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "wrote a tiny random Lance" in r.stdout
    code = (
        "import numpy as np, lance_rl.rewards as R\n"
        "mix = R.build_mix({'rewards:brightness': 1.0})\n"
        "print(mix(prompts=['x'], images=[np.full((4, 4, 3), 255, np.uint8)]).scores)\n"
        "import rewards; assert rewards.__file__.startswith(%r), rewards.__file__\n" % str(tmp_path)
    )
    r = _run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[1.0]"


@pytest.mark.timeout(600)
def test_wheel_ships_every_package_and_the_recipes(tmp_path):
    """`pip install .` (not editable) gives lance_rl.model, lance_rl.rewards and the recipes; the quickstart's recipes
    load from the installed copy in another directory."""
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))  # fmt: skip
    r = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
              str(source)], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = next((tmp_path / "dist").glob("lance_rl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("lance_rl/cli.py", "lance_rl/model/lance.py", "lance_rl/rewards/base.py",
                     "lance_rl/recipes/quickstart/rl.yaml", "lance_rl/recipes/lance-3b/t2i_pickscore.yaml"):  # fmt: skip
        assert required in names, f"{required} missing from {wheel.name}"
    assert not any(n.startswith(("model/", "rewards/", "recipes/")) for n in names), "top-level packages in the wheel"
    # Every module of the checkout ships (a new subpackage missing from pyproject's list would not).
    for folder, package in (("lance_rl", "lance_rl"), ("model", "lance_rl/model"), ("rewards", "lance_rl/rewards")):
        for module in (ROOT / folder).rglob("*.py"):
            shipped = f"{package}/{module.relative_to(ROOT / folder).as_posix()}"
            assert shipped in names, f"{shipped} missing from {wheel.name} (add its package to pyproject.toml)"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import lance_rl, lance_rl.pipeline as p, lance_rl.rl as rl\n"
        "from lance_rl.config import load_recipe\n"
        "from lance_rl.recipes import RECIPES_DIR\n"
        f"assert lance_rl.__file__.startswith({str(site)!r}), lance_rl.__file__\n"
        "cfg = load_recipe(p.PipelineConfig, RECIPES_DIR / 'quickstart' / 'pipeline.yaml')\n"
        "print(RECIPES_DIR.relative_to(RECIPES_DIR.parents[1]), cfg.rl.recipe)\n"
    )
    r = _run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "lance_rl/recipes"


def test_version():
    r = _run([sys.executable, "-m", "lance_rl.cli", "--version"], cwd=ROOT)
    from lance_rl import __version__

    assert r.returncode == 0 and r.stdout.strip() == f"lance-rl {__version__}"
