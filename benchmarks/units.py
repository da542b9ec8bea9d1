"""B-cos layers against Dynamic Alignment Units (CoDA-Nets) on Fashion-MNIST (32 px, grey, [x, 1 - x]).

Models, all measured on the same first ``--test-limit`` test images:
  original      the demo's trained timm ResNet-18 (``bcosify demo``'s "existing checkpoint", cached in
                ``--cache-dir``; trained there if missing: 30k images, 2 epochs)
  resnet-bcos   that checkpoint converted to B-cos layers (b=2) and fine-tuned
  resnet-dau    that checkpoint converted to DAU layers (``--rank``) and fine-tuned with the same budget
                (the first ``--train-limit`` training images, ``--finetune-epochs``, lr, batch and loss alike)
  coda-dau      the 9-layer CoDA-Net of the paper (:func:`bcosify.coda.coda_net9`) trained from scratch
  coda-bcos     its B-cos twin (the same network of B-cos layers, b=2), trained alike
                (the first ``--coda-limit`` training images, ``--coda-epochs``, batch ``--coda-batch``)
Columns: test accuracy, GridPG 2x2 and 3x3 of each model's own explanations (input x gradient and Grad-CAM on the
original as the baselines; grids of the images each model classifies correctly and most confidently, as
``benchmarks/faithfulness.py`` computes them), completeness error (float64), and one training step's
(forward + backward, train mode, batch ``--cost-batch``) median time and peak memory relative to the original's::

    python benchmarks/units.py --cache-dir /tmp/cache          # everything; results/units.json, docs/images/units.png
    python benchmarks/units.py --cost-only                     # re-measure the cost only (idle cores!)
    python benchmarks/units.py --table benchmarks/results/units.json

``--cost-only`` needs no training (the cost does not depend on the weights) and replaces the ``cost`` entries of an
existing JSON. Runs on one thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

import bcosify
from bcosify.coda import coda_net9
from bcosify.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, Normalized
from bcosify.demo import DEFAULT_CACHE, cached_original, demo_data
from bcosify.training import evaluate, load_recipe
from bcosify.training.data import build_datasets, build_loaders

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from faithfulness import _attribute, attribution_methods, gridpg, picture  # noqa: E402
from overhead import _peak_train_memory  # noqa: E402

ROOT = HERE.parent
MODELS = ("original", "resnet-bcos", "resnet-dau", "coda-dau", "coda-bcos")
LABELS = {"original": "original ResNet-18", "resnet-bcos": "ResNet-18 B-cosified (b=2)",
          "resnet-dau": "ResNet-18 to DAU (rank {rank})", "coda-dau": "CoDA-Net 9L, DAU, from scratch",
          "coda-bcos": "CoDA-Net 9L, B-cos twin, from scratch"}
NORM = dict(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=pathlib.Path, default=DEFAULT_CACHE, help="the demo's original model")
    parser.add_argument("--rank", type=int, default=1, help="DAU rank of the converted ResNet-18")
    parser.add_argument("--train-limit", type=int, default=10000, help="fine-tuning images (first N)")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="fine-tuning batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning lr (the demo recipe's)")
    parser.add_argument("--coda-limit", type=int, default=4000, help="CoDA-Net training images (first N)")
    parser.add_argument("--coda-epochs", type=int, default=1)
    parser.add_argument("--coda-batch", type=int, default=16, help="the paper's")
    parser.add_argument("--coda-lr", type=float, default=2.5e-4, help="the paper's (Adam)")
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--grids", type=int, nargs=2, default=(40, 40), metavar=("G2", "G3"),
                        help="GridPG grids of 2x2 and of 3x3")
    parser.add_argument("--cost-batch", type=int, default=32)
    parser.add_argument("--cost-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-only", action="store_true", help="measure time and memory only (no training)")
    parser.add_argument("--json", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "units.json")
    parser.add_argument("--picture", type=pathlib.Path, default=ROOT / "docs" / "images" / "units.png")
    parser.add_argument("--table", type=pathlib.Path, help="print the markdown table of a results JSON and exit")
    return parser.parse_args(argv)


def _log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)


def build_models(original: torch.nn.Module, rank: int) -> dict[str, torch.nn.Module]:
    """The four alignment models, untrained: the two conversions of ``original`` and the two fresh CoDA-Nets."""
    torch.manual_seed(0)
    return {"resnet-bcos": bcosify.convert(original, **NORM),
            "resnet-dau": bcosify.convert(original, unit="dau", rank=rank, **NORM),
            "coda-dau": coda_net9(10, in_chans=1),
            "coda-bcos": coda_net9(10, unit="bcos", in_chans=1)}


def cost(models: dict[str, torch.nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, Any]:
    """Median seconds and peak bytes of one training step (forward, cross-entropy, backward; train mode) of every
    model, and their ratios to the original's (which sees normalised images)."""
    out: dict[str, Any] = {}
    for name, model in models.items():
        model.train()
        params = list(model.parameters())

        def step():
            F.cross_entropy(model(x), y).backward()

        step()  # warm-up
        times = []
        for _ in range(rounds):
            for p in params:
                p.grad = None
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = _peak_train_memory(step, params, torch.device("cpu"))
        for p in params:
            p.grad = None
        model.eval()
        out[name] = {"seconds": statistics.median(times), "peak_bytes": peak}
    base = out["original"]
    for row in out.values():
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
    print("cost: " + ", ".join(f"{k} {v['seconds'] * 1e3:.0f} ms ({v['time_ratio']:.1f}x), "
                               f"{v['peak_bytes'] / 2 ** 20:.0f} MiB ({v['memory_ratio']:.1f}x)"
                               for k, v in out.items()), flush=True)
    return {"batch": len(x), "rounds": rounds, "threads": torch.get_num_threads(), "models": out}


def completeness(model: bcosify.BcosModel, x: torch.Tensor) -> float:
    """The largest completeness error over ``x`` in float64 (the model stays float32)."""
    error = bcosify.explain(model.double().eval(), x.double()).completeness_error.max().item()
    model.float()
    return error


def _write(path: pathlib.Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def table(results: dict[str, Any]) -> str:
    rank = results.get("args", {}).get("rank", "?")
    cost_rows = results.get("cost", {}).get("models", {})
    head = ("| model | test accuracy | GridPG 2x2 | GridPG 3x3 | completeness error | time (fwd+bwd) | "
            "peak memory |\n|---|---|---|---|---|---|---|")
    lines = [head]

    def grid(row: dict, n: int) -> str:
        return f"{row[f'gridpg_{n}x{n}']['mean']:.3f}" if f"gridpg_{n}x{n}" in row else ""

    for name in MODELS:
        row = results.get("models", {}).get(name, {})
        c = cost_rows.get(name)
        accuracy = f"{row['accuracy']:.2%}" if "accuracy" in row else ""
        err = f"{row['completeness_error']:.1e}" if "completeness_error" in row else ""
        cells = [accuracy]
        if name == "original":
            baselines = results.get("baselines", {})
            cells += [" / ".join(f"{baselines[m][f'gridpg_{n}x{n}']['mean']:.3f}" for m in ("ixg", "gradcam")
                                 if m in baselines) + (" (IxG / Grad-CAM)" if baselines else "") for n in (2, 3)]
        else:
            cells += [grid(row.get("gridpg", {}), 2), grid(row.get("gridpg", {}), 3)]
        cells += [err, f"{c['time_ratio']:.1f}x" if c else "", f"{c['memory_ratio']:.1f}x" if c else ""]
        lines.append(f"| {LABELS[name].format(rank=rank)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    recipe = load_recipe("fashion-mnist")
    data = demo_data(recipe)
    train_set, test_set, classes = build_datasets(data)
    train, _ = build_loaders(train_set, test_set, data.batch_size)
    original = cached_original(recipe, train, args.cache_dir, FASHION_MNIST_MEAN, FASHION_MNIST_STD, progress=False)
    wrapped = Normalized(original, FASHION_MNIST_MEAN, FASHION_MNIST_STD).eval()
    _log("original ready", start)
    x_cost = torch.stack([test_set[i][0] for i in range(args.cost_batch)])
    y_cost = torch.tensor([int(test_set[i][1]) for i in range(args.cost_batch)])

    if args.cost_only:
        models = {"original": wrapped, **build_models(original, args.rank)}
        results = json.loads(args.json.read_text()) if args.json.is_file() else {"args": {"rank": args.rank}}
        if results.get("args", {}).get("rank") != args.rank:
            raise SystemExit(f"{args.json} holds rank {results['args'].get('rank')}; pass --rank to match")
        results["cost"] = cost(models, x_cost, y_cost, args.cost_rounds)
        _write(args.json, results)
        print(table(results))
        return 0

    results: dict[str, Any] = {"args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
                               "models": {}, "baselines": {}, "seconds": {}}
    test = Subset(test_set, range(min(args.test_limit, len(test_set))))
    test_loader = DataLoader(test, batch_size=256)
    x_test = torch.stack([test[i][0] for i in range(len(test))])
    y_test = torch.tensor([int(test[i][1]) for i in range(len(test))])
    results["models"]["original"] = {"accuracy": evaluate(original, test_loader, progress=False, **NORM)}
    models = build_models(original, args.rank)

    def loader(limit: int, batch: int) -> DataLoader:
        subset = Subset(train_set, range(min(limit, len(train_set))))
        return DataLoader(subset, batch_size=batch, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(1))

    common = dict(loss="bce", schedule="cosine", device="cpu", amp="off", progress=False)
    plans = {"resnet-bcos": (loader(args.train_limit, args.batch), args.finetune_epochs, args.lr, 0.01),
             "resnet-dau": (loader(args.train_limit, args.batch), args.finetune_epochs, args.lr, 0.01),
             "coda-dau": (loader(args.coda_limit, args.coda_batch), args.coda_epochs, args.coda_lr, None),
             "coda-bcos": (loader(args.coda_limit, args.coda_batch), args.coda_epochs, args.coda_lr, None)}
    for name, model in models.items():
        batches, epochs, lr, agc = plans[name]
        begun = time.perf_counter()
        bcosify.finetune(model, batches, epochs=epochs, lr=lr, agc_clip=agc, **common)
        results["seconds"][f"train {name}"] = time.perf_counter() - begun
        model.eval()
        row = {"accuracy": evaluate(model, test_loader, progress=False),
               "completeness_error": completeness(model, x_test[:8])}
        results["models"][name] = row
        _log(f"{name}: trained in {results['seconds'][f'train {name}']:.0f} s, test accuracy {row['accuracy']:.2%}, "
             f"completeness error {row['completeness_error']:.1e}", start)
        _write(args.json, results)

    begun = time.perf_counter()
    results["baselines"] = gridpg(models["resnet-bcos"], original, x_test, y_test, ["ixg", "gradcam"],
                                  tuple(args.grids), 20)
    results["seconds"]["gridpg baselines"] = time.perf_counter() - begun
    for name, model in models.items():
        begun = time.perf_counter()
        try:
            results["models"][name]["gridpg"] = gridpg(model, original, x_test, y_test, ["bcos"], tuple(args.grids),
                                                       20)["bcos"]
        except ValueError as error:  # too few images classified correctly to fill a grid
            print(f"{name}: GridPG not measured ({error})", flush=True)
        results["seconds"][f"gridpg {name}"] = time.perf_counter() - begun
        _log(f"{name}: GridPG done", start)
        _write(args.json, results)

    shown = torch.cat([torch.nonzero(y_test == c)[:1, 0] for c in (0, 1, 7, 8, 9)])
    xs, ys = x_test[shown], y_test[shown]
    columns = {f"{m} (original)": _attribute(method, xs, ys) for m, method in
               attribution_methods(models["resnet-bcos"], original, ["ixg", "gradcam"], 20).items()}
    for name, model in models.items():
        columns[name] = _attribute(attribution_methods(model, original, ["bcos"], 20)["bcos"], xs, ys)
    results["picture"] = str(picture(args.picture, xs, ys, columns, list(classes)))

    results["cost"] = cost({"original": wrapped, **models}, x_cost, y_cost, args.cost_rounds)
    results["seconds"]["total"] = time.perf_counter() - start
    _write(args.json, results)
    print(table(results))
    _log("done", start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
