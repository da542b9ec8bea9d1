"""Accuracy recovery on Fashion-MNIST: B-cosified vs B-cos from scratch (and fixed b=2 vs a linear b ramp).

Runs, on the same data and architecture (timm ResNet-18, 32 px, grey):
  original   a standard model trained from scratch (its last epoch is the "existing checkpoint")
  fixed      that checkpoint B-cosified with b=2 from the first step, fine-tuned (paper default)
  ramp       the same with b ramped linearly from 1 to 2 over the first epoch
  scratch    the same architecture converted at random init and trained as a B-cos network
and prints test accuracy per epoch, epochs-to-match and the speed-up.

    python benchmarks/recovery.py --epochs 4 --train-limit 20000 --plot docs/images/recovery.png
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
from bcosify.training import resolve_device, train_original
from bcosify.weights import build_model


def train_bcos(name: str, bmodel, train: DataLoader, test: DataLoader, epochs: int, **options) -> list[float]:
    accuracies = []

    class PerEpoch:  # evaluate after every epoch through finetune's val hook
        def __iter__(self):
            return iter(test)

        def __len__(self):
            return len(test)

    history = bcosify.finetune(bmodel, train, val=PerEpoch(), epochs=epochs, progress=False, **options)
    for record in history.epochs:
        accuracies.append(record["val_accuracy"])
        print(f"  {name} epoch {record['epoch']}: {record['val_accuracy']:.4f} (b={record['b']:.2f})", flush=True)
    return accuracies


def epochs_to_reach(accuracies: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accuracies) if a >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-limit", type=int, help="first N training images (default: all 60k)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr-original", type=float, default=1e-3)
    parser.add_argument("--lr-bcos", type=float, default=1e-3, help="fine-tuning and from-scratch B-cos lr")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--data-root", help="folder of the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16"], help="finetune's mixed precision")
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("benchmarks/results/recovery.json"))
    parser.add_argument("--plot", type=pathlib.Path, help="PNG plot of accuracy per epoch (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    device = resolve_device(args.device)
    train_set = fashion_mnist("train", args.data_root, size=args.size, limit=args.train_limit)
    test = DataLoader(fashion_mnist("test", args.data_root, size=args.size), batch_size=512)

    def loader(seed: int) -> DataLoader:
        return DataLoader(train_set, batch_size=args.batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(seed))

    kwargs = {"in_chans": 1, "num_classes": 10}
    torch.manual_seed(0)
    original = build_model("timm:resnet18", weights=None, model_kwargs=kwargs)
    init = copy.deepcopy(original)
    print(f"device {device}; {len(train_set)} training images; {args.epochs} epochs per run", flush=True)
    accuracies = train_original(original, loader(0), mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, epochs=args.epochs,
                                lr=args.lr_original, schedule="cosine", device=str(device), val=test, progress=False)
    for epoch, accuracy in enumerate(accuracies, 1):
        print(f"  original epoch {epoch}: {accuracy:.4f}", flush=True)
    results = {"original": accuracies}
    norm = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    common = dict(lr=args.lr_bcos, loss="bce", schedule="cosine", agc_clip=0.01, device=str(device), amp=args.amp)
    results["fixed"] = train_bcos("fixed", bcosify.convert(original.eval(), **norm), loader(1), test, args.epochs,
                                  b_schedule="fixed", **common)
    results["ramp"] = train_bcos("ramp", bcosify.convert(original.eval(), **norm), loader(1), test, args.epochs,
                                 b=2.0, b_schedule="linear", **common)
    results["scratch"] = train_bcos("scratch", bcosify.convert(init.eval(), **norm), loader(1), test, args.epochs,
                                    b_schedule="fixed", **common)

    target = results["scratch"][-1]
    summary = {}
    print(f"\n| epoch | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
    for e in range(args.epochs):
        print(f"| {e + 1} | " + " | ".join(f"{results[k][e]:.2%}" for k in results) + " |")
    for name in ("fixed", "ramp"):
        reached = epochs_to_reach(results[name], target)
        summary[name] = {"epochs_to_match_scratch_final": reached,
                         "speedup_vs_scratch": (args.epochs / reached) if reached else None,
                         "final_gap_to_original": results["original"][-1] - results[name][-1]}
        speed = f">= {args.epochs / reached:.1f}x" if reached == 1 else (f"{args.epochs / reached:.1f}x" if reached
                                                                             else "not reached")
        print(f"{name}: reaches B-cos-from-scratch's final accuracy ({target:.2%}) after {reached} epoch(s): "
              f"speed-up {speed}; final gap to the original {summary[name]['final_gap_to_original'] * 100:+.2f} points")
    seconds = time.perf_counter() - start
    print(f"total {seconds:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "accuracy": results,
                                     "summary": summary, "seconds": seconds}, indent=2))
    if args.plot:
        _plot(results, args.plot)


def _plot(results: dict[str, list[float]], path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    labels = {"original": "original (standard training)", "fixed": "B-cosified, b=2 fixed",
              "ramp": "B-cosified, b 1->2 ramp", "scratch": "B-cos from scratch"}
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for name, acc in results.items():
        ax.plot(range(1, len(acc) + 1), [a * 100 for a in acc], marker="o", label=labels[name])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, ResNet-18 (32 px)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
