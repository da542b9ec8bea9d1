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


def test_bad_recipes_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped recipes"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: timm:resnet18\nfinetune: {lr: 0.1, learning_rate: 3}\n")
    with pytest.raises(ValueError, match="unknown finetune options \\['learning_rate'\\]"):
        load_recipe(bad)
    bad.write_text("name: x\nmodel: timm:resnet18\nfinetune: {loss: hinge}\n")
    with pytest.raises(ValueError, match="loss must be one of"):
        load_recipe(bad)
    bad.write_text("name: x\nmodel: timm:resnet18\nconvert: {b: 0.5}\n")
    with pytest.raises(ValueError, match="b must be"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_recipe(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(bad)
