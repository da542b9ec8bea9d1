"""Faithfulness of a fine-tuned B-cosified Fashion-MNIST model's own explanations against post-hoc methods on the
original model: GridPG 2x2 and 3x3, deletion and insertion AUC, faithfulness correlation and model-parameter
randomisation (quantus), cost per explanation, and the border signal before/after a padding option.

Inputs are what ``bcosify demo`` writes: its output folder (``model/``, ``summary.json``) and its cache folder
(the original model). Methods: ``bcos`` (:class:`bcosify.Attribution` of the B-cosified model) and, on the
original model, ``ixg`` (input x gradient), ``ig`` (integrated gradients), ``gradcam`` (Grad-CAM, captum) and
``lrp`` (zennit's EpsilonPlusFlat composite)::

    bcosify demo --out /tmp/demo --cache-dir /tmp/cache
    python benchmarks/faithfulness.py --demo /tmp/demo --cache-dir /tmp/cache            # the metrics
    python benchmarks/faithfulness.py --demo /tmp/demo --cache-dir /tmp/cache --only cost  # timing: idle cores!
    python benchmarks/faithfulness.py --border zeros=/tmp/demo replicate=/tmp/demo-rep --cache-dir /tmp/cache
    python benchmarks/faithfulness.py --layer-origin /tmp/demo --cache-dir /tmp/cache  # where the border signal enters
    python benchmarks/faithfulness.py --table benchmarks/results/faithfulness.json         # markdown table

Results go to ``benchmarks/results/faithfulness.json`` (``faithfulness_cost.json``, ``border.json``) and the
pictures to ``docs/``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import bcosify
from bcosify.data import Normalized
from bcosify.demo import BORDER_PX, CORNER_PX, GARMENT, demo_data  # the demo's own border and garment measures
from bcosify.explanation.attribution import Attribution, method_name, posthoc_attribution, quantus_explain
from bcosify.explanation.faithfulness import border_share, curve_auc, foreground_share, perturbation_curves
from bcosify.explanation.gridpg import run_gridpg
from bcosify.training import load_recipe
from bcosify.training.data import build_datasets
from bcosify.weights import build_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS, DOCS = ROOT / "benchmarks" / "results", ROOT / "docs"
METHODS = ("bcos", "ixg", "ig", "gradcam", "lrp")
METRICS = ("gridpg", "deletion", "faithfulness", "randomisation")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=pathlib.Path, help="a `bcosify demo` output folder (model/, summary.json)")
    p.add_argument("--cache-dir", type=pathlib.Path, help="the demo's cache folder (the original model)")
    p.add_argument("--recipe", default="fashion-mnist", help="the demo's recipe (default fashion-mnist)")
    p.add_argument("--only", default=",".join(METRICS),
                   help=f"comma-separated metrics of {', '.join(METRICS)}, or 'cost' (time it on idle cores)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated of {', '.join(METHODS)}")
    p.add_argument("--grids", type=int, nargs=2, default=(100, 100), metavar=("G2", "G3"),
                   help="GridPG 2x2 and 3x3 grids (default 100 100)")
    p.add_argument("--images", type=int, default=200,
                   help="test images for deletion/insertion, faithfulness correlation, randomisation (default 200)")
    p.add_argument("--ig-steps", type=int, default=16, help="integrated gradients steps (default 16)")
    p.add_argument("--out", type=pathlib.Path, help="result JSON (default benchmarks/results/faithfulness.json)")
    p.add_argument("--picture", type=pathlib.Path, help="picture path (default docs/faithfulness_methods.png)")
    p.add_argument("--border", nargs="+", metavar="NAME=DEMO_DIR",
                   help="border signal of several demo outputs (e.g. zeros=... replicate=...)")
    p.add_argument("--layer-origin", type=pathlib.Path, metavar="DEMO_DIR",
                   help="per-layer origin of the border signal of a zero-padded demo model")
    p.add_argument("--label", help="name this run's row bcos@LABEL, LABEL the model column (another converted model next to the "
                        "first; a LABEL starting with DAU is a DAU model)")
    p.add_argument("--table", type=pathlib.Path, help="print the markdown table of a result JSON and exit")
    p.add_argument("--merge", type=pathlib.Path, nargs="+", metavar="JSON",
                   help="merge the method rows of result JSONs (runs split over processes) into --out and exit")
    args = p.parse_args(argv)
    if args.table is None and args.merge is None and (args.cache_dir is None or (
            args.demo is None and not args.border and args.layer_origin is None)):
        p.error("give --demo (or --border) and --cache-dir, or --table")
    return args


# --------------------------------------------------------------------------- models, data, methods


def load_models(demo: pathlib.Path, cache_dir: pathlib.Path, recipe_name: str):
    """The fine-tuned B-cos model of a demo folder, the original it was converted from, and the test set."""
    recipe = load_recipe(recipe_name)
    weights = cache_dir / f"{recipe.name}-original.safetensors"
    if not weights.is_file():
        raise SystemExit(f"no cached original model {weights}; run `bcosify demo --cache-dir {cache_dir}` first")
    original = build_model(recipe.model, weights=None, model_kwargs=recipe.model_kwargs)
    original.load_state_dict(load_file(str(weights)))
    bmodel = bcosify.load(demo / "model").float().eval()
    _, test_set, classes = build_datasets(demo_data(recipe))
    return bmodel, original.eval(), test_set, list(classes)


def attribution_methods(bmodel, original, names, ig_steps: int) -> dict[str, Any]:
    """``name -> method with .attribute(images in [0, 1], target)`` for every requested method."""
    mean, std = bmodel.config.mean, bmodel.config.std
    out = {}
    for name in names:
        if name == "bcos":
            out[name] = Attribution(bmodel)
        else:
            out[name] = posthoc_attribution(original, name, mean=mean, std=std, steps=ig_steps)
    return out


def classifier(name: str, bmodel, original) -> torch.nn.Module:
    """The model a method explains, taking images in [0, 1]."""
    return bmodel if name == "bcos" else Normalized(original, bmodel.config.mean, bmodel.config.std).eval()


def _attribute(method, x: torch.Tensor, y: torch.Tensor, batch: int = 50) -> torch.Tensor:
    return torch.cat([method.attribute(x[i:i + batch], target=y[i:i + batch]).detach().float()
                      for i in range(0, len(x), batch)])


def _both_correct(bmodel, original, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first ``n`` images both models classify correctly (so every method explains a hit)."""
    with torch.no_grad():
        ok = (bmodel(x).argmax(1) == y) & (classifier("ixg", bmodel, original)(x).argmax(1) == y)
    return torch.nonzero(ok)[:n, 0]


# --------------------------------------------------------------------------- metrics


def gridpg(bmodel, original, x, y, names, grids, ig_steps) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, count in zip((2, 3), grids):
        results = run_gridpg(x, y, n, bcos_model=bmodel, original=original, methods=list(names), num_grids=count,
                             per_class=20, ig_steps=ig_steps, seed=0)
        for name, r in results.items():
            out.setdefault(name, {})[f"gridpg_{n}x{n}"] = {"mean": r.scores.mean().item(),
                                                          "std": r.scores.std().item(), "grids": count}
        print(f"GridPG {n}x{n}: " + ", ".join(f"{k} {r.scores.mean().item():.3f}" for k, r in results.items()),
              flush=True)
    return out


def deletion_insertion(bmodel, original, methods, x, y, steps: int = 16) -> dict[str, Any]:
    out = {}
    for name, method in methods.items():
        a = _attribute(method, x, y)
        model = classifier(name, bmodel, original)
        row = {}
        for mode in ("deletion", "insertion"):
            auc = curve_auc(perturbation_curves(model, x, y, a, mode=mode, steps=steps))
            row[f"{mode}_auc"] = {"mean": auc.mean().item(), "std": auc.std().item(), "images": len(x),
                                  "steps": steps, "baseline": 0.0}
        out[name] = row
        print(f"{name}: deletion {row['deletion_auc']['mean']:.3f} insertion {row['insertion_auc']['mean']:.3f}",
              flush=True)
    return out


def _explain_func(name: str, bmodel, ig_steps: int) -> Callable:
    """A quantus ``explain_func`` for ``name``, on whatever (possibly randomised) model quantus passes."""
    mean, std = bmodel.config.mean, bmodel.config.std

    def explain(model, inputs, targets, **_):
        model = model.get_model() if hasattr(model, "get_model") else model
        if name == "bcos":
            return quantus_explain(model, inputs, targets)
        inner = model.model if isinstance(model, Normalized) else model
        method = posthoc_attribution(inner, name, mean=mean, std=std, steps=ig_steps)
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        a = method.attribute(x, torch.as_tensor(np.asarray(targets)).long().reshape(-1)).detach()
        return a.expand(-1, x.shape[1], -1, -1).numpy()  # Grad-CAM's one channel, as quantus wants C channels

    return explain


def quantus_metrics(bmodel, original, methods, x, y, which, ig_steps: int) -> dict[str, Any]:
    import quantus

    out: dict[str, Any] = {}
    xs, ys = x.numpy(), y.numpy()
    for name, method in methods.items():
        model = classifier(name, bmodel, original)
        a = _attribute(method, x, y).expand(-1, x.shape[1], -1, -1).numpy()
        row = out.setdefault(name, {})
        if "faithfulness" in which:
            metric = quantus.FaithfulnessCorrelation(nr_runs=50, subset_size=64, perturb_baseline="black",
                                                     abs=False, normalise=False, return_aggregate=False,
                                                     disable_warnings=True)
            torch.manual_seed(0)
            np.random.seed(0)
            scores = np.asarray(metric(model=model, x_batch=xs, y_batch=ys, a_batch=a, channel_first=True,
                                       device="cpu", softmax=False), dtype=float)
            row["faithfulness_correlation"] = {"mean": float(np.nanmean(scores)), "std": float(np.nanstd(scores)),
                                               "images": len(xs), "nr_runs": 50, "subset_size": 64}
        if "randomisation" in which:
            metric = quantus.MPRT(layer_order="top_down", skip_layers=True, return_last_correlation=True, seed=42,
                                  disable_warnings=True)
            scores = np.asarray(metric(model=model, x_batch=xs, y_batch=ys, a_batch=a, channel_first=True,
                                       device="cpu", explain_func=_explain_func(name, bmodel, ig_steps)),
                                dtype=float)
            row["randomisation_similarity"] = {"mean": float(np.nanmean(scores)), "std": float(np.nanstd(scores)),
                                               "images": len(xs), "similarity": "spearman, |a| normalised",
                                               "randomised": "all layers (quantus MPRT, last cascade step)"}
        print(f"{name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in row.items()), flush=True)
    return out


def cost(bmodel, original, methods, x, y, rounds: int = 5) -> dict[str, Any]:
    """Median seconds per batch of each method and its ratio to one forward+backward of the original."""
    wrapped = classifier("ixg", bmodel, original)

    def forward_backward():
        xx = x.clone().requires_grad_(True)
        wrapped(xx).gather(1, y[:, None]).sum().backward()
        original.zero_grad(set_to_none=True)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    base = timed(forward_backward)
    out = {"forward_backward_s": base, "batch": len(x), "threads": torch.get_num_threads(), "rounds": rounds}
    for name, method in methods.items():
        seconds = timed(lambda: method.attribute(x, target=y))
        out[name] = {"seconds": seconds, "ratio": seconds / base}
        print(f"{name}: {seconds * 1e3:.1f} ms per batch of {len(x)} ({seconds / base:.1f}x forward+backward)",
              flush=True)
    return out


# --------------------------------------------------------------------------- pictures


def _signed(a: torch.Tensor) -> np.ndarray:
    m = a.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (a / m).numpy()


def picture(path: pathlib.Path, x: torch.Tensor, y: torch.Tensor, columns: dict[str, torch.Tensor],
            classes: list[str]) -> pathlib.Path:
    """The images and every method's map side by side (red positive, blue negative, each map scaled to its
    largest absolute value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = len(x), len(columns) + 1
    fig, axes = plt.subplots(n, k, figsize=(1.6 * k, 1.6 * n), squeeze=False)
    maps = {name: _signed(a.sum(1) if a.dim() == 4 else a) for name, a in columns.items()}
    for i in range(n):
        axes[i, 0].imshow(x[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_ylabel(classes[int(y[i])], fontsize=8)
        for j, (name, m) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(m[i], cmap="bwr", vmin=-1, vmax=1)
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- border


def border_report(variants: list[str], cache_dir: pathlib.Path, recipe: str, images: int) -> dict[str, Any]:
    """Border share of the B-cos contributions of several demo outputs, the accuracy each demo measured, and a
    before/after picture."""
    out: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "border_px": BORDER_PX,
                           "corner_px": CORNER_PX, "garment_threshold": GARMENT, "images": images, "variants": {}}
    columns, shown = {}, None
    for spec in variants:
        name, _, folder = spec.partition("=")
        folder = pathlib.Path(folder)
        bmodel, _, test_set, classes = load_models(folder, cache_dir, recipe)
        x, y = next(iter(DataLoader(test_set, batch_size=images)))
        e = bcosify.explain(bmodel.double(), x.double(), target=y)
        c = bmodel.in_chans
        per_value = e.encoded * e.weights
        share = border_share(e.contributions, BORDER_PX)
        positive = e.contributions.clamp_min(0)
        inner = torch.zeros_like(positive, dtype=torch.bool)
        inner[:, BORDER_PX:-BORDER_PX, BORDER_PX:-BORDER_PX] = True
        border_pos = positive.masked_fill(inner, 0)
        from_complement = (per_value[:, c:].sum(1).clamp_min(0).masked_fill(inner, 0).sum()
                           / border_pos.sum().clamp_min(1e-300)).item()
        corner = positive[:, :CORNER_PX, :CORNER_PX].flatten(1).sum(1) / positive.flatten(1).sum(1).clamp_min(1e-300)
        strongest = e.contributions.flatten(1).argmax(1)
        rows, cols = strongest // e.contributions.shape[2], strongest % e.contributions.shape[2]
        summary = json.loads((folder / "summary.json").read_text())
        out["variants"][name] = {
            "folder": str(folder), "padding_mode": bmodel.config.padding_mode,
            "padding_layers": bmodel.config.padding_layers,
            "bcosified_accuracy": summary["bcosified_accuracy"], "original_accuracy": summary["original_accuracy"],
            "border_share_mean": share.mean().item(), "border_share_median": share.median().item(),
            "images_over_half_on_border": (share > 0.5).float().mean().item(),
            "top_left_corner_share_mean": corner.mean().item(),
            "strongest_pixel_in_top_left_corner": ((rows < CORNER_PX) & (cols < CORNER_PX)).double().mean().item(),
            "on_garment_share_mean": foreground_share(e.contributions, x, GARMENT).mean().item(),
            "border_positive_from_1_minus_x": from_complement,
            "center_grid": bmodel.config.center_grid, "padding_value": bmodel.config.padding_value,
            # the padding colour's part of the explained logit (0 unless padding_mode="constant")
            "constant_share_of_logit_mean": (e.constant_contribution / e.explained_logit).mean().item(),
            "gridpg_2x2_demo": summary.get("gridpg_2x2", {}).get("bcos"),
            "completeness_error_max": e.completeness_error.max().item()}
        print(f"{name}: accuracy {summary['bcosified_accuracy']:.2%}, border share {share.mean().item():.1%} "
              f"(outer {BORDER_PX} px = {1 - (28 / 32) ** 2:.1%} of the area), top-left {CORNER_PX}x{CORNER_PX} "
              f"{corner.mean().item():.1%} (area {CORNER_PX ** 2 / 1024:.1%}), strongest pixel there in "
              f"{out['variants'][name]['strongest_pixel_in_top_left_corner']:.0%} of the images", flush=True)
        columns[name] = e.contributions[:8].float()
        shown = (x[:8], y[:8], classes)
        if "original (input x gradient)" not in out:  # the same measures for the original model's post-hoc map
            _, original, _, _ = load_models(folder, cache_dir, recipe)
            a = posthoc_attribution(original, "ixg", mean=bmodel.config.mean, std=bmodel.config.std).attribute(
                x.float(), y).sum(1).double()
            pos = a.clamp_min(0)
            top = pos[:, :CORNER_PX, :CORNER_PX].flatten(1).sum(1) / pos.flatten(1).sum(1).clamp_min(1e-300)
            idx = a.flatten(1).argmax(1)
            out["original (input x gradient)"] = {
                "top_left_corner_share_mean": top.mean().item(),
                "strongest_pixel_in_top_left_corner": ((idx // a.shape[2] < CORNER_PX)
                                                       & (idx % a.shape[2] < CORNER_PX)).double().mean().item(),
                "border_share_mean": border_share(a, BORDER_PX).mean().item()}
            print(f"original, input x gradient: {out['original (input x gradient)']}", flush=True)
    picture(DOCS / "border_before_after.png", shown[0], shown[1], columns, shown[2])
    return out


def layer_origin(folder: pathlib.Path, cache_dir: pathlib.Path, recipe: str, images: int) -> dict[str, Any]:
    """Where the border signal enters: switch one convolution at a time of a trained (zero-padded) model to
    replicate padding, without retraining, and measure accuracy and the top-left share of the contributions."""
    from bcosify.explanation.faithfulness import top_left_share
    from bcosify.nn import BcosConv2d

    bmodel, _, test_set, _ = load_models(folder, cache_dir, recipe)
    bmodel = bmodel.double()
    x, y = next(iter(DataLoader(test_set, batch_size=images)))
    x = x.double()

    def measure() -> dict[str, float]:
        e = bcosify.explain(bmodel, x, target=y)
        return {"accuracy": (e.logits.argmax(1) == y).double().mean().item(),
                "top_left_share": top_left_share(e.contributions, CORNER_PX).mean().item(),
                "border_share": border_share(e.contributions, BORDER_PX).mean().item()}

    out = {"command": " ".join(["python", *sys.argv]), "images": images, "as trained": measure(), "layers": {}}
    for name, conv in bmodel.network.named_modules():
        if isinstance(conv, BcosConv2d) and any(conv.padding) and conv.padding_mode == "zeros":
            conv.padding_mode = "replicate"
            out["layers"][f"{name} (stride {conv.stride[0]})"] = measure()
            conv.padding_mode = "zeros"
    for name, row in [("as trained", out["as trained"]), *out["layers"].items()]:
        print(f"{name:28s} accuracy {row['accuracy']:.3f} top-left {row['top_left_share']:.3f} "
              f"border {row['border_share']:.3f}", flush=True)
    return out


# --------------------------------------------------------------------------- table


def table(results: dict[str, Any]) -> str:
    """The markdown table of a result JSON."""
    columns = [("gridpg_2x2", "GridPG 2x2 ↑"), ("gridpg_3x3", "GridPG 3x3 ↑"), ("deletion_auc", "deletion AUC ↓"),
               ("insertion_auc", "insertion AUC ↑"), ("faithfulness_correlation", "faithfulness corr. ↑"),
               ("randomisation_similarity", "randomisation sim. ↓")]
    rows = ["| method | model | " + " | ".join(t for _, t in columns) + " |",
            "|---|---|" + "---|" * len(columns)]
    for name, row in results["methods"].items():
        cells = [(f"{row[k]['mean']:.3f}" + (f" ({row[k]['grids']} grids)" if row[k].get("grids", 100) != 100 else ""))
                 if k in row else "–" for k, _ in columns]
        method, _, label = name.partition("@")
        model = "original" if method != "bcos" else label or "B-cosified (fine-tuned)"
        shown = "DAU contributions" if method == "bcos" and label.startswith("DAU") else method_name(method)
        rows.append(f"| {shown} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.merge is not None:
        merged: dict[str, Any] = {}
        for path in args.merge:
            part = json.loads(path.read_text())
            rows = merged.setdefault("methods", {})
            for name, values in part.pop("methods").items():
                rows.setdefault(name, {}).update(values)
            commands = part.pop("commands", []) + ([part.pop("command")] if "command" in part else [])
            merged.setdefault("commands", []).extend(commands)
            if not pathlib.Path(part.get("picture", "/")).is_absolute():
                merged["picture"] = part["picture"]  # the one in the repository
            merged.update({k: v for k, v in part.items() if k not in merged})
        (args.out or RESULTS / "faithfulness.json").write_text(json.dumps(merged, indent=2) + "\n")
        print(table(merged))
        return 0
    torch.manual_seed(0)
    if args.layer_origin is not None:
        result = layer_origin(args.layer_origin, args.cache_dir, args.recipe, images=200)
        (RESULTS / "border_layers.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.border:
        result = border_report(args.border, args.cache_dir, args.recipe, images=500)
        (RESULTS / "border.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    names = [m for m in args.methods.split(",") if m]
    which = [m for m in args.only.split(",") if m]
    unknown = sorted(set(names) - set(METHODS)) + sorted(set(which) - set(METRICS) - {"cost"})
    if unknown:
        raise SystemExit(f"unknown methods or metrics {unknown}")
    bmodel, original, test_set, classes = load_models(args.demo, args.cache_dir, args.recipe)
    methods = attribution_methods(bmodel, original, names, args.ig_steps)
    x_all, y_all = next(iter(DataLoader(test_set, batch_size=2000)))
    if which == ["cost"]:
        x, y = x_all[:32], y_all[:32]
        result = {"command": " ".join(sys.argv), "cost": cost(bmodel, original, methods, x, y)}
        (args.out or RESULTS / "faithfulness_cost.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    out = args.out or RESULTS / "faithfulness.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows: dict[str, dict] = previous.get("methods", {})
    chosen = _both_correct(bmodel, original, x_all, y_all, args.images)
    x, y = x_all[chosen], y_all[chosen]
    parts = []
    if "gridpg" in which:
        parts.append(gridpg(bmodel, original, x_all, y_all, names, args.grids, args.ig_steps))
    if "deletion" in which:
        parts.append(deletion_insertion(bmodel, original, methods, x, y))
    if {"faithfulness", "randomisation"} & set(which):
        parts.append(quantus_metrics(bmodel, original, methods, x, y, which, args.ig_steps))
    for part in parts:
        for name, values in part.items():
            rows.setdefault(f"{name}@{args.label}" if args.label and name == "bcos" else name, {}).update(values)
    shown = torch.cat([torch.nonzero(y == k)[:1, 0] for k in range(10)])[:6]
    columns = {method_name(k): _attribute(m, x[shown], y[shown]) for k, m in methods.items()}
    pic = picture(args.picture or DOCS / "faithfulness_methods.png", x[shown], y[shown], columns, classes)
    result = {"command": " ".join(["python", *sys.argv]), "demo_summary": json.loads((args.demo / "summary.json")
                                                                                      .read_text()),
              "padding_mode": bmodel.config.padding_mode, "padding_layers": bmodel.config.padding_layers,
              "test_images_pool": len(x_all), "picture": str(pic.relative_to(ROOT) if pic.is_relative_to(ROOT) else pic), "methods": rows}
    result["demo_summary"].pop("history", None)
    if args.label:  # another model than the main rows': its own summary
        result[f"demo_summary@{args.label}"] = result.pop("demo_summary")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
