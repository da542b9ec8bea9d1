"""Recipes are data with one loader; every shipped recipe loads and validates."""

from __future__ import annotations

import pytest

from bcosify.training import list_recipes, load_recipe


def test_shipped_recipes_load():
    names = list_recipes()
    assert {"fashion-mnist", "resnet-imagenet", "densenet-imagenet", "vit-imagenet"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.model.split(":")[0] in ("timm", "torchvision")
    paper = load_recipe("resnet-imagenet").finetune
    assert paper["lr"] == 1e-4 and paper["loss"] == "bce" and paper["optimizer"] == "adam"
    assert load_recipe("resnet-imagenet").data["batch_size"] == 256


def test_mixup_cutmix_and_smoothing_are_recipe_keys(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("name: mix\nmodel: timm:resnet18\nfinetune: {mixup_alpha: 0.8, cutmix_alpha: 1.0, "
                    "label_smoothing: 0.1}\n")
    assert load_recipe(path).finetune == {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="shipped recipes: .*fashion-mnist"):
        load_recipe("no-such-recipe")


def test_calibrate_is_a_recipe_section(tmp_path):
    path = tmp_path / "calibrated.yaml"
    path.write_text("name: c\nmodel: timm:resnet18\ncalibrate: {images: 64}\n")
    assert load_recipe(path).calibrate_images == 64
    path.write_text("name: c\nmodel: timm:resnet18\n")
    assert load_recipe(path).calibrate_images == 0


@pytest.mark.parametrize("text, message", [
    ("name: x\nmodel: timm:resnet18\nfinetune: {lr: 0.1, learning_rate: 3}\n",
     "unknown finetune options \\['learning_rate'\\]"),
    ("name: x\nmodel: timm:resnet18\nfinetune: {loss: hinge}\n", "loss must be one of"),
    ("name: x\nmodel: timm:resnet18\nconvert: {b: 0.5}\n", "b must be"),
    ("name: x\nmodel: timm:resnet18\nfinetune: {mixup_alpha: 0.8, label_smoothing: 1.5}\n", "label_smoothing in"),
    ("name: x\nmodel: timm:resnet18\ncalibrate: {batches: 2}\n", "unknown calibrate options \\['batches'\\]"),
    ("name: x\nmodel: timm:resnet18\ncalibrate: {images: -1}\n", "calibrate images must be a non-negative"),
    ("- just\n- a list\n", "mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes_are_refused(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(bad)
