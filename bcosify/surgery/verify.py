"""Conversion-time verification: the two properties every conversion must have, checked on a float64 copy."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import BcosConfig
from ..data import normalize
from ..errors import ConversionError
from ..utils import copy_module, eval_mode
from .report import VERIFIED, ReportEntry

EQUIVALENCE_BOUND, COMPLETENESS_BOUND = 1e-5, 1e-6
#: b=2 logits smaller than this make completeness uninformative. At b=2 every layer shrinks activations by
#: ``|cos|``; once patch norms fall below ``sqrt(eps)`` (1e-3) the epsilon dominates the norm and each layer squares
#: its input's scale, so a deep random-init network (VGG, MobileNets, EfficientNets) underflows to exactly 0. The
#: verification then calibrates its b=2 copy before checking completeness.
DEGENERATE_BELOW = 1e-20


def verify_conversion(prepared: nn.Module, config: BcosConfig, size: int,
                      convert: Callable[[nn.Module, BcosConfig], nn.Module]) -> ReportEntry:
    """Check ``convert`` (the conversion of a prepared network with a resolved config) in float64 on a random
    ``size`` px input: equivalence at b=1 with biases kept, completeness at b=2 without biases. ``prepared`` is
    consumed (pass a copy).

    Returns the report entry that records both errors. A failure raises ``ConversionError`` (naming the first
    module whose output diverges when equivalence fails) unless ``config.strict`` is false: then the entry records
    it (modules left as they are make no promise).
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, config.in_chans, size, size, dtype=torch.float64, generator=generator)
    try:
        return _verify(prepared, config, size, convert, x)
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - a converted model that cannot run or be explained is refused
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ConversionError(f"verification failed: the converted model cannot be run or explained in float64 "
                              f"({type(error).__name__}: {detail})") from error


def _verify(prepared: nn.Module, config: BcosConfig, size: int, convert, x: torch.Tensor) -> ReportEntry:
    from ..explanation import explain

    reference = prepared.double().eval()  # the caller's copy, ours to change
    # the surgery alone: the options that change the function on purpose are off
    plain = dict(b=1.0, normalize_weights=False) if config.unit == "bcos" else {}  # (a DAU layer starts plain)
    exact = convert(copy_module(reference), config.replace(
        keep_bias=True, logit_bias=0.0, temperature=1.0, maxpool_to_avgpool=False, padding_mode="zeros",
        padding_value=None, center_grid=False, **plain)).eval()
    with torch.no_grad():
        equivalence = _relative_error(exact(x), reference(normalize(x, config.mean, config.std)))
    failures = []
    if not equivalence < EQUIVALENCE_BOUND:
        where = _first_divergence(reference, exact, x, config)
        failures.append(f"at b=1 with biases the converted model differs from the original by {equivalence:.1e} "
                        f"(relative); the first module whose output diverges is {where}")
    bcos = convert(reference, config.replace(b=2.0, keep_bias=False, logit_bias=0.0)).eval()  # the last use
    e = explain(bcos, x)
    scale = _logit_scale(e.explained_logit)
    rescaled = ""
    if scale < DEGENERATE_BELOW:
        rescaled = _restore_scale(bcos, x, config)
        if rescaled.startswith("calibrated"):
            e = explain(bcos, x)
            rescaled = f"b=2 logits {scale:.0e}: {rescaled}, logits {_logit_scale(e.explained_logit):.0e} after"
    degenerate = _logit_scale(e.explained_logit) < DEGENERATE_BELOW
    completeness = e.completeness_error.max().item()
    if not completeness < COMPLETENESS_BOUND:
        failures.append(f"at b=2 the contributions miss the logit by {completeness:.1e} (relative): the converted "
                        "model is not dynamic linear")
    if failures and config.strict:
        raise ConversionError("verification failed: " + "; ".join(failures))
    exact_at, complete_at = ("b=1", "b=2") if config.unit == "bcos" else ("DAU at init", "DAU")
    note = (f"float64, {size} px: equivalence {equivalence:.1e} ({exact_at}, biases kept), completeness "
            f"{completeness:.1e} ({complete_at})" + (f"; {rescaled}" if rescaled else "")
            + (f"; logits below {DEGENERATE_BELOW:.0e} at b=2 (underflow), completeness not informative"
               if degenerate else "")
            + "".join(f"; FAILED: {f}" for f in failures))
    return ReportEntry("<verification>", "", VERIFIED, "", note)


def _logit_scale(logits: torch.Tensor) -> float:
    """The smallest logit magnitude (NaN when a logit is NaN: the completeness check then fails)."""
    return logits.abs().min().item()


def _restore_scale(bcos: nn.Module, x: torch.Tensor, config: BcosConfig) -> str:
    """Bring the b=2 copy's activations back to scale with :func:`bcosify.calibrate` on the verification input
    (gains baked into the weights: the copy stays dynamic linear, so its completeness is still the conversion's).
    Returns what was done, for the report note."""
    if config.unit != "bcos" or config.normalize_weights:
        return f"not calibrated ({'DAU layers' if config.unit != 'bcos' else 'unit-norm weights'} take no gains)"
    from ..training.calibration import calibrate

    try:
        calibrate(bcos, x, progress=False)
    except Exception as error:  # noqa: BLE001 - the check goes on with the uncalibrated copy, and says why
        return f"calibration failed ({type(error).__name__}: {str(error).strip()[:120]})"
    return "calibrated first (bcosify.calibrate on the verification input)"


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny)).item()


def _first_divergence(reference: nn.Module, exact: nn.Module, x: torch.Tensor, config: BcosConfig) -> str:
    """Path and type of the first module (in call order) whose output differs between the two models."""
    outputs: dict[str, list[torch.Tensor]] = {"ref": {}, "new": {}}

    def record(store: dict, path: str):
        def hook(_module, _inputs, out):
            if isinstance(out, torch.Tensor) and path not in store:
                store[path] = out.detach()
        return hook

    order: list[str] = []
    handles = []
    for path, module in reference.named_modules():
        if path:
            handles.append(module.register_forward_hook(record(outputs["ref"], path)))
            handles.append(module.register_forward_pre_hook(lambda m, i, _p=path: order.append(_p)))
    for path, module in exact.network.named_modules():
        if path:
            handles.append(module.register_forward_hook(record(outputs["new"], path)))
    try:
        with torch.no_grad(), eval_mode(reference, exact):
            reference(normalize(x, config.mean, config.std))
            exact(x)
    finally:
        for handle in handles:
            handle.remove()
    for path in order:
        ref, new = outputs["ref"].get(path), outputs["new"].get(path)
        if ref is not None and new is not None and ref.shape == new.shape and _relative_error(new, ref) > 1e-6:
            return f"{path} ({type(reference.get_submodule(path)).__name__})"
    return "not found (the difference is in the glue between modules)"
