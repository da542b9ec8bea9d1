"""The fast per-family check of the coverage sweep (``scripts/coverage.py``): every architecture module the
committed sweep calls exact and the support matrix does not claim is converted here, as a small member of the
same module, with the sweep's own check (``convert(verify=True)``: float64, equivalence at b=1 with biases and
completeness at b=2, on random weights with random BatchNorm statistics)."""

from __future__ import annotations

import json
import pathlib
import re
import warnings

import pytest
import torch
import yaml

import bcosify
from bcosify import SupportedModel
from bcosify.surgery.support import randomised

HERE = pathlib.Path(__file__).resolve().parent
COVERAGE = HERE.parent.parent / "benchmarks" / "results" / "coverage.json"
#: module (as the sweep names it) -> the small model that checks it: rows like ``supported.yaml``'s
CHECK_FILES = sorted(HERE.glob("coverage_checks*.yaml"))


def _checks() -> dict[str, SupportedModel]:
    out: dict[str, SupportedModel] = {}
    for path in CHECK_FILES:
        for row in yaml.safe_load(path.read_text()) or []:
            key = f"{row['spec'].partition(':')[0]}:{row['module']}"
            assert key not in out, f"{key} is checked twice"
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (row.get("kwargs") or {}).items()}
            out[key] = SupportedModel(row["module"], row["spec"], kwargs=kwargs, builder=row.get("builder"))
    return out


CHECKS = _checks()


def _module(spec: str) -> str:
    """The sweep's name for a model's architecture module (timm: its module; torchvision: its builder's)."""
    library, _, name = spec.partition(":")
    if library == "timm":
        import timm

        return next(m for m in timm.list_modules() if name in timm.list_models(module=m))
    import torchvision.models as tvm

    return tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1]


def test_every_module_the_sweep_calls_exact_is_checked_here_or_claimed():
    claimed = {f"{f.library}:{_module(f.spec)}" for f in bcosify.list_supported()}
    rows = json.loads(COVERAGE.read_text())["rows"]
    exact = {f"{r['library']}:{r['module']}" for r in rows if r["status"].startswith("exact")}
    unchecked = sorted(exact - claimed - set(CHECKS))
    assert not unchecked, f"exact in the coverage sweep, but no test checks them: {unchecked}"
    for key, check in CHECKS.items():  # each check builds a model of the module it names
        assert f"{check.library}:{_module(check.spec)}" == key, f"{check.spec} is not a model of {key}"


@pytest.mark.parametrize("check", list(CHECKS.values()), ids=lambda c: f"{c.library}:{c.family}")
def test_coverage_family_converts_exactly(check: SupportedModel, one_thread):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = randomised(check.build(num_classes=10).double().eval())
    bmodel = bcosify.convert(original, verify=True)
    (entry,) = bmodel.report.by_action("verified")
    assert "not informative" not in entry.note, entry.note  # non-degenerate logits at b=2
    errors = {k: float(v) for k, v in re.findall(r"(equivalence|completeness) ([0-9.e+-]+)", entry.note)}
    assert errors["equivalence"] < 1e-10 and errors["completeness"] < 1e-6, entry.note
    assert bmodel.report.leftovers == []
