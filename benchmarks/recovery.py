"""Accuracy recovery on Fashion-MNIST: B-cosified (with or without labels, calibrated or not) vs B-cos from scratch.

Runs, on the same data and architecture (``--arch``: timm ResNet-18, or a small timm ViT; 32 px, grey):
  original      a standard model trained from scratch (its last epoch is the "existing checkpoint")
  converted     that checkpoint converted at b=2, nothing else (test accuracy at epoch 0 only)
  calibrated    the same, then ``bcosify.calibrate`` on ``--calibrate-images`` training images (labels unused)
  fixed         converted, fine-tuned with BCE and labels, b=2 from the first step (paper default)
  ramp          the same with b ramped linearly from 1 to 2 over the first epoch
  distill       converted, fine-tuned to the original's softmax (no labels)
  align         converted, fine-tuned to the original's penultimate features (cosine distance; no labels)
  calibrated+X  calibrated first, then run X (X: fixed, distill, align; best: the best of the three measured before
                it, by final test accuracy, as issue 15's row (g))
  scratch       the same architecture converted at random init and trained as a B-cos network with labels
and prints test accuracy per epoch (epoch 0: before fine-tuning), epochs-to-match and the speed-up, and with
``--gridpg N`` the grid pointing game (N x N) of every B-cos model at the end.

    python benchmarks/recovery.py --epochs 4 --train-limit 20000 --plot docs/images/recovery.png
    python benchmarks/recovery.py --arch vit --epochs 3 --epochs-original 8 --runs issue --gridpg 2
    python benchmarks/recovery.py --table benchmarks/results/recovery_vit.json more.json --plot vit.png
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
import time

import torch
from torch.utils.data import DataLoader

import bcosify
from bcosify.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist
from bcosify.training import evaluate, resolve_device, train_original
from bcosify.weights import build_model

ARCHS = {
    "resnet18": ("timm:resnet18", {}),
    # 8 x 8 patches (16 tokens at 32 px): 4 x 4 patches cost 3.5x the time per image on CPU; dynamic_img_size:
    # GridPG's n x n grids are n times larger than the training images (positional embeddings resampled)
    "vit": ("timm:vit_tiny_patch16_224", {"patch_size": 8, "depth": 6, "dynamic_img_size": True}),  # img_size: --size
}
#: fine-tuning runs: loss and options (b schedule); "calibrated+X" runs X from the calibrated model
FINETUNES = {"fixed": {"loss": "bce", "b_schedule": "fixed"},
             "ramp": {"loss": "bce", "b": 2.0, "b_schedule": "linear"},
             "distill": {"loss": "distill", "b_schedule": "fixed"},
             "align": {"loss": "align", "b_schedule": "fixed"}}
RUN_SETS = {"default": ["original", "fixed", "ramp", "scratch"],
            "issue": ["original", "converted", "calibrated", "fixed", "distill", "align", "calibrated+best", "scratch"],
            "issue-all": ["original", "converted", "calibrated", "fixed", "distill", "align", "calibrated+fixed",
                          "calibrated+distill", "calibrated+align", "scratch"]}
LABELS = {"original": "original (standard training)", "converted": "converted, b=2", "calibrated": "calibrated",
          "fixed": "B-cosified, BCE, b=2 fixed", "ramp": "B-cosified, BCE, b 1->2 ramp",
          "distill": "B-cosified, distill (no labels)", "align": "B-cosified, align (no labels)",
          "scratch": "B-cos from scratch", "calibrated+fixed": "calibrated, then BCE",
          "calibrated+distill": "calibrated, then distill", "calibrated+align": "calibrated, then align",
          "calibrated+ramp": "calibrated, then BCE, b ramp"}


class PerEpoch:
    """A loader that ``finetune`` validates on after every epoch."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def train_bcos(name: str, bmodel, train: DataLoader, test: DataLoader, epochs: int, **options) -> list[float]:
    history = bcosify.finetune(bmodel, train, val=PerEpoch(test), epochs=epochs, progress=False, **options)
    for record in history.epochs:
        print(f"  {name} epoch {record['epoch']}: {record['val_accuracy']:.4f} (b={record['b']:.2f})", flush=True)
    return [record["val_accuracy"] for record in history.epochs]


def epochs_to_reach(accuracies: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accuracies) if a >= target), None)


def parse_runs(text: str) -> list[str]:
    runs = RUN_SETS.get(text) or [r.strip() for r in text.split(",") if r.strip()]
    known = {"original", "converted", "calibrated", "scratch", *FINETUNES,
             *(f"calibrated+{name}" for name in [*FINETUNES, "best"])}
    unknown = [r for r in runs if r not in known]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {sorted(known)} or a set {sorted(RUN_SETS)}")
    return ["original"] + [r for r in runs if r != "original"]  # every run starts from the original


def merge_results(paths: list[pathlib.Path]) -> tuple[dict, dict, dict, int]:
    """``(accuracy per run, epoch-0 accuracy, GridPG, epochs)`` of saved JSON results, merged; the invocations must
    have trained the same original (same accuracies) for the same number of epochs."""
    results: dict[str, list[float]] = {}
    start_accuracy: dict[str, float] = {}
    gridpg: dict[str, float] = {}
    epochs = None
    for path in paths:
        saved = json.loads(path.read_text())
        if results and saved["accuracy"]["original"] != results["original"]:
            raise SystemExit(f"{path}: another original ({saved['accuracy']['original'][-1]:.4f} vs "
                             f"{results['original'][-1]:.4f}): not one comparison")
        if epochs is not None and int(saved["args"]["epochs"]) != epochs:
            raise SystemExit(f"{path}: {saved['args']['epochs']} epochs per B-cos run, not {epochs}")
        epochs = int(saved["args"]["epochs"])
        for name, accuracies in saved["accuracy"].items():
            results.setdefault(name, accuracies)
        for name, value in saved["epoch0"].items():
            start_accuracy.setdefault(name, value)
        gridpg.update({k: v for k, v in saved["gridpg"].items() if k not in gridpg})
    order = ["original", "fixed", "ramp", "distill", "align", *(f"calibrated+{n}" for n in FINETUNES), "scratch"]
    results = {k: results[k] for k in sorted(results, key=lambda k: order.index(k) if k in order else len(order))}
    return results, start_accuracy, gridpg, epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", choices=sorted(ARCHS))
    parser.add_argument("--runs", default="default",
                        help="comma-separated run names, or a set: default (original,fixed,ramp,scratch), issue "
                             "(the runs of issue 15: calibrated+best after fixed, distill, align) or issue-all "
                             "(calibrated+ each of them)")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning (and from-scratch B-cos) epochs")
    parser.add_argument("--epochs-original", type=int,
                        help="epochs of the original's standard training (default: --epochs)")
    parser.add_argument("--train-limit", type=int, help="first N training images (default: all 60k)")
    parser.add_argument("--test-limit", type=int, help="first N test images (default: all 10k; smoke runs)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr-original", type=float, default=1e-3)
    parser.add_argument("--lr-bcos", type=float, default=1e-3, help="fine-tuning and from-scratch B-cos lr")
    parser.add_argument("--calibrate-images", type=int, default=256, help="training images calibrate uses")
    parser.add_argument("--gridpg", type=int, default=0, metavar="N", help="N x N grid pointing game (0: none)")
    parser.add_argument("--gridpg-grids", type=int, default=200, help="grids per GridPG score")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"], help="finetune's mixed precision")
    parser.add_argument("--json", type=pathlib.Path, help="default: benchmarks/results/recovery[_ARCH].json")
    parser.add_argument("--plot", type=pathlib.Path, help="PNG plot of accuracy per epoch (needs matplotlib)")
    parser.add_argument("--table", type=pathlib.Path, nargs="+", metavar="JSON",
                        help="measure nothing: print the table (and --plot) of saved results, merged (runs of one "
                             "original in several invocations, e.g. --runs issue then the other calibrated+X)")
    args = parser.parse_args()
    if args.table:
        results, start_accuracy, gridpg, epochs = merge_results(args.table)
        _report(results, start_accuracy, gridpg, epochs)
        if args.plot:
            _plot(results, start_accuracy, args.plot, args.arch)
        return
    runs = parse_runs(args.runs)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    device = resolve_device(args.device)
    train_set = fashion_mnist("train", args.data_root, size=args.size, limit=args.train_limit)
    test_set = fashion_mnist("test", args.data_root, size=args.size, limit=args.test_limit)
    test = DataLoader(test_set, batch_size=512)

    def loader(seed: int) -> DataLoader:
        return DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed))

    spec, arch_kwargs = ARCHS[args.arch]
    kwargs = {"in_chans": 1, "num_classes": 10, **arch_kwargs}
    if args.arch == "vit":
        kwargs["img_size"] = args.size
    torch.manual_seed(0)
    original = build_model(spec, weights=None, model_kwargs=kwargs)
    init = copy.deepcopy(original)
    epochs_original = args.epochs_original or args.epochs
    print(f"device {device}; {args.arch}; {len(train_set)} training images; original {epochs_original} epochs, "
          f"{args.epochs} epochs per B-cos run", flush=True)
    accuracies = train_original(original, loader(0), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                                epochs=epochs_original,
                                lr=args.lr_original, schedule="cosine", device=str(device), val=test, progress=False)
    for epoch, accuracy in enumerate(accuracies, 1):
        print(f"  original epoch {epoch}: {accuracy:.4f}", flush=True)
    original.eval()
    results: dict[str, list[float]] = {"original": accuracies}
    start_accuracy: dict[str, float] = {}
    norm = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    calibration = torch.stack([train_set[i][0] for i in range(min(args.calibrate_images, len(train_set)))])

    def starting_point(name: str) -> bcosify.BcosModel:
        """A fresh converted model, calibrated for "calibrated..." runs; its epoch-0 test accuracy is recorded."""
        bmodel = bcosify.convert(original, **norm)
        if name.startswith("calibrated"):
            bcosify.calibrate(bmodel.to(device), calibration, original=original.to(device), progress=False)
        key = "calibrated" if name.startswith("calibrated") else "converted"
        if key not in start_accuracy:
            start_accuracy[key] = evaluate(bmodel, test, device=str(device))
            print(f"  {key} epoch 0: {start_accuracy[key]:.4f}", flush=True)
        return bmodel

    seconds_per_run: dict[str, float] = {"original": time.perf_counter() - start}
    gridpg: dict[str, float] = {}
    out = args.json or pathlib.Path(f"benchmarks/results/recovery{'' if args.arch == 'resnet18' else '_' + args.arch}"
                                    ".json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(summary: dict | None) -> None:
        """The JSON so far (after every run, so that a stopped benchmark keeps what it measured)."""
        out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "accuracy": results,
                                   "epoch0": start_accuracy, "gridpg": gridpg, "summary": summary,
                                   "complete": summary is not None, "seconds": time.perf_counter() - start,
                                   "seconds_per_run": seconds_per_run}, indent=2))

    common = dict(lr=args.lr_bcos, schedule="cosine", agc_clip=0.01, device=str(device), amp=args.amp)
    for name in runs[1:]:
        run_start = time.perf_counter()
        if name in ("converted", "calibrated"):
            starting_point(name)
            seconds_per_run[name] = time.perf_counter() - run_start
            write(None)
            continue
        if name == "scratch":
            bmodel = bcosify.convert(init.eval(), **norm)
            results[name] = train_bcos(name, bmodel, loader(1), test, args.epochs, loss="bce", b_schedule="fixed",
                                       **common)
        else:
            if name == "calibrated+best":
                measured = {k: results[k][-1] for k in ("fixed", "distill", "align") if k in results}
                if not measured:
                    raise SystemExit("calibrated+best needs fixed, distill or align to run before it")
                name = "calibrated+" + max(measured, key=measured.get)
                print(f"  calibrated+best: {name} (final accuracies {measured})", flush=True)
            bmodel = starting_point(name)
            options = FINETUNES[name.rpartition("+")[2]]
            teacher = original if options["loss"] in ("distill", "align") else None
            results[name] = train_bcos(name, bmodel, loader(1), test, args.epochs, teacher=teacher,
                                       **options, **common)
        seconds_per_run[name] = time.perf_counter() - run_start
        print(f"  {name}: {seconds_per_run[name]:.0f} s", flush=True)
        if args.gridpg:  # right after the run: the model need not be kept
            gridpg.update(_gridpg({name: bmodel}, test_set, args.gridpg, args.gridpg_grids))
            bmodel.to(device)
        write(None)

    summary = _report(results, start_accuracy, gridpg, args.epochs)
    print(f"total {time.perf_counter() - start:.0f} s")
    write(summary)
    if args.plot:
        _plot(results, start_accuracy, args.plot, args.arch)


def _gridpg(models: dict, test_set, n: int, grids: int) -> dict[str, float]:
    """Mean GridPG score (``n x n`` grids of test images) of each fine-tuned B-cos model's own explanations."""
    from bcosify.explanation.gridpg import run_gridpg

    count = min(len(test_set), 2000)
    x = torch.stack([test_set[i][0] for i in range(count)])
    y = torch.tensor([int(test_set[i][1]) for i in range(count)])
    scores = {}
    for name, bmodel in models.items():
        try:
            result = run_gridpg(x, y, n, bcos_model=bmodel.cpu().eval(), methods=["bcos"], num_grids=grids)
        except ValueError as error:  # e.g. a model that classifies too few classes correctly to fill a grid
            print(f"  {name} GridPG {n}x{n}: not measured ({error})", flush=True)
            continue
        scores[name] = result["bcos"].summary()["mean"]
        print(f"  {name} GridPG {n}x{n}: {scores[name]:.3f}", flush=True)
    return scores


def _report(results: dict[str, list[float]], start: dict[str, float], gridpg: dict[str, float],
            epochs: int) -> dict:
    """Print the table (a row per run, a column per epoch) and the speed-ups; return the summary."""
    names = ["original", *(k for k in ("converted", "calibrated") if k in start), *(k for k in results
                                                                                   if k != "original")]
    header = "| run | " + " | ".join(f"epoch {e}" for e in range(epochs + 1)) + (" | GridPG |" if gridpg else " |")
    print("\n" + header + "\n|---|" + "---|" * (epochs + 1 + bool(gridpg)))
    for name in names:
        first = start.get("calibrated" if name.startswith("calibrated") else "converted") \
            if name not in ("original", "scratch") else None
        if name in ("converted", "calibrated"):
            cells = [f"{start[name]:.2%}"] + ["" for _ in range(epochs)]
        elif name == "original":  # trained for its own number of epochs: its final accuracy in the last column
            cells = [""] * epochs + [f"{results[name][-1]:.2%}"]
        else:
            cells = [f"{first:.2%}" if first is not None else ""] + [f"{a:.2%}" for a in results[name]]
        score = [f"{gridpg[name]:.3f}" if name in gridpg else ""] if gridpg else []
        label = LABELS.get(name, name) + (f", {len(results[name])} epochs" if name == "original" else "")
        print(f"| {label} | " + " | ".join(cells + score) + " |")
    summary = {}
    if "scratch" in results:
        target = results["scratch"][-1]
        for name in (k for k in results if k not in ("original", "scratch")):
            reached = epochs_to_reach(results[name], target)
            summary[name] = {"epochs_to_match_scratch_final": reached,
                             "speedup_vs_scratch": (epochs / reached) if reached else None,
                             "final_gap_to_original": results["original"][-1] - results[name][-1]}
            speed = f">= {epochs / reached:.1f}x" if reached == 1 else (f"{epochs / reached:.1f}x" if reached
                                                                        else "not reached")
            print(f"{name}: reaches B-cos-from-scratch's final accuracy ({target:.2%}) after {reached} epoch(s): "
                  f"speed-up {speed}; final gap to the original "
                  f"{summary[name]['final_gap_to_original'] * 100:+.2f} points")
    return summary


def _plot(results: dict[str, list[float]], start: dict[str, float], path: pathlib.Path, arch: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    bcos_epochs = max((len(acc) for name, acc in results.items() if name != "original"), default=0)
    for name, acc in results.items():
        if name == "original" and len(acc) != bcos_epochs:  # trained longer: its final accuracy as a line
            ax.axhline(acc[-1] * 100, color="black", linestyle="--", linewidth=1,
                       label=f"original after {len(acc)} epochs ({acc[-1]:.2%})")
            continue
        first = start.get("calibrated" if name.startswith("calibrated") else "converted") \
            if name not in ("original", "scratch") else None
        xs = list(range(1, len(acc) + 1))
        if first is not None:
            xs, acc = [0] + xs, [first] + acc
        ax.plot(xs, [a * 100 for a in acc], marker="o", label=LABELS.get(name, name),
                linestyle="--" if name.startswith("calibrated") else "-")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Fashion-MNIST, {arch} (32 px)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
