"""The end-to-end demo on real Fashion-MNIST, shortened (a few hundred images, one epoch)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from PIL import Image

import bcosify
from bcosify.demo import run_demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    summary = run_demo(tmp_path / "out", limit=640, epochs=1, cache_dir=tmp_path / "cache", progress=False)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("original_accuracy", "bcosified_accuracy", "completeness_error_max", "epochs", "seconds"):
        assert key in saved and saved[key] == summary[key]
    assert 0 <= saved["original_accuracy"] <= 1 and 0 <= saved["bcosified_accuracy"] <= 1
    # epoch 0: converted, and calibrated (the model fine-tuning starts from if the recipe calibrates)
    assert 0 <= saved["converted_accuracy"] <= 1 and 0 <= saved["calibrated_accuracy"] <= 1
    assert saved["fine_tuned_from"] in ("converted", "calibrated")
    assert saved["completeness_error_max"] < 1e-6 and saved["epochs"] == 1
    assert 0 <= saved["border_share"] <= 1 and 0 <= saved["top_left_share"] <= 1 and 0 <= saved["foreground_share"] <= 1
    gridpg = saved["gridpg_2x2"]
    assert gridpg["grids"] == 20 and set(gridpg) >= {"bcos", "ixg"}
    if gridpg["bcos"] is not None:  # None (with the reason) when too few classes are classified correctly
        assert 0 <= gridpg["bcos"] <= 1 and 0 <= gridpg["ixg"] <= 1
    else:
        assert "distinct classes" in gridpg["skipped"]
    picture = Image.open(tmp_path / "out" / "explanations.png")
    assert picture.width > 300 and picture.height > 8 * 100
    model = bcosify.load(tmp_path / "out" / "model")
    assert model.class_names[0] == "T-shirt/top" and model.in_chans == 1
    # a second run reuses the cached original model
    assert (tmp_path / "cache" / "fashion-mnist-original.safetensors").is_file()
    again = run_demo(tmp_path / "out2", limit=640, epochs=1, cache_dir=tmp_path / "cache", progress=False)
    assert again["original_accuracy"] == summary["original_accuracy"]
    assert torch.tensor(again["seconds"]) > 0
    # a recipe with a label-free loss fine-tunes against the original: the demo hands it over as the teacher
    shipped = (pathlib.Path(bcosify.__file__).parent / "training" / "recipes" / "fashion-mnist.yaml").read_text()
    assert "loss: bce" in shipped
    recipe = tmp_path / "fashion-mnist.yaml"  # the same name and data: the cached original is reused
    recipe.write_text(shipped.replace("loss: bce", "loss: align"))
    aligned = run_demo(tmp_path / "out3", recipe=str(recipe), limit=640, epochs=1, cache_dir=tmp_path / "cache",
                       progress=False)
    assert aligned["original_accuracy"] == summary["original_accuracy"] and aligned["epochs"] == 1
