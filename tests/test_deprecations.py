"""Names moved in the layout change keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import bcosify


@pytest.mark.parametrize("old, new", [("bcosify.viz", "bcosify.explanation.viz"),
                                      ("bcosify.metrics", "bcosify.explanation.gridpg"),
                                      ("bcosify.checks", "bcosify.explanation.checks"),
                                      ("bcosify.recipes", "bcosify.training.recipes"),
                                      ("bcosify.saving", "bcosify.export.folder"),
                                      ("bcosify.checkpoints", "bcosify.weights")])
def test_old_module_paths_are_the_new_modules(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert callable(bcosify.convert) and callable(bcosify.explain)  # the package's functions are not shadowed


def test_from_import_of_an_old_path():
    sys.modules.pop("bcosify.viz", None)
    with pytest.warns(DeprecationWarning):
        from bcosify.viz import contribution_map
    assert contribution_map is bcosify.explanation.viz.contribution_map


def test_old_attribute_names_warn():
    bmodel = bcosify.convert(_tiny(), mean=0.5, std=0.5)
    with pytest.warns(DeprecationWarning, match="use BcosModel.config"):
        assert bmodel.options is bmodel.config
    from bcosify.explanation import viz

    e = bcosify.explain(bmodel, torch.rand(1, 3, 8, 8))
    with pytest.warns(DeprecationWarning, match="use color_explanation"):
        torch.testing.assert_close(viz.colour_explanation(e), viz.color_explanation(e))


def _tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))
