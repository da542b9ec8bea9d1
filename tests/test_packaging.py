"""The wheel ships what the package needs at run time: recipes and the support matrix load from an installed
wheel (not from the source tree), and ``python -m bcosify`` runs."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

CHECK = """
import pathlib, sys
import bcosify
from bcosify.training import list_recipes, load_recipe
where = pathlib.Path(bcosify.__file__).resolve()
assert where.is_relative_to(pathlib.Path(sys.argv[1]).resolve()), where
names = list_recipes()
assert {"fashion-mnist", "resnet-imagenet", "densenet-imagenet", "vit-imagenet"} <= set(names), names
for name in names:
    load_recipe(name)
assert len(bcosify.list_supported()) >= 30
print("ok", len(names), "recipes from", where.parent)
"""


@pytest.mark.slow
def test_wheel_ships_recipes_and_support_matrix(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(ROOT)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("bcosify-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, cwd=tmp_path, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", CHECK, str(target)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok"), result.stdout
    cli = subprocess.run([sys.executable, "-m", "bcosify", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0 and "convert" in cli.stdout, cli.stderr
