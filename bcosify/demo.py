"""The end-to-end demo: an existing checkpoint -> one-call conversion -> fine-tuning -> evaluation -> export."""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import viz
from .data import fashion_mnist
from .recipes import Recipe, load_recipe
from .training import evaluate

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
DEFAULT_CACHE = pathlib.Path(os.environ.get("BCOSIFY_CACHE", pathlib.Path.home() / ".cache" / "bcosify"))


def loaders(recipe: Recipe, limit: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Train and test loaders of the recipe's Fashion-MNIST data."""
    data = recipe.data
    if data.get("dataset") != "fashion-mnist":
        raise ValueError(f"the demo runs Fashion-MNIST recipes only, not {data.get('dataset')!r}")
    kwargs = dict(size=data.get("size"), channels=data.get("channels", 1), root=data.get("root"))
    train = fashion_mnist("train", limit=limit or data.get("limit"), **kwargs)
    test = fashion_mnist("test", limit=limit, **kwargs)
    batch = data.get("batch_size", 128)
    g = torch.Generator().manual_seed(0)
    return (DataLoader(train, batch_size=batch, shuffle=True, generator=g, drop_last=True),
            DataLoader(test, batch_size=512))


def train_original(recipe: Recipe, train: DataLoader, cache_dir: pathlib.Path, progress: bool = True) -> nn.Module:
    """The "existing checkpoint": a standard model trained on the recipe's data, cached in ``cache_dir``."""
    from safetensors.torch import load_file, save_file

    from .convert import build_model

    settings = {"model": recipe.model, "model_kwargs": recipe.model_kwargs, "data": recipe.data,
                "original": recipe.original, "samples": len(train.dataset)}
    key = f"{recipe.name}-original"
    weights, meta = cache_dir / f"{key}.safetensors", cache_dir / f"{key}.json"
    torch.manual_seed(0)
    model = build_model(recipe.model, weights=None, model_kwargs=recipe.model_kwargs)
    if weights.is_file() and meta.is_file() and json.loads(meta.read_text()) == settings:
        model.load_state_dict(load_file(str(weights)))
        print(f"reusing the cached original model {weights}")
        return model.eval()
    mean = torch.tensor(FASHION_MNIST_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(FASHION_MNIST_STD).view(1, -1, 1, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.original.get("lr", 1e-3))
    model.train()
    for epoch in range(recipe.original.get("epochs", 1)):
        bar = tqdm(train, desc=f"original {epoch + 1}", leave=False, disable=not progress)
        for x, y in bar:
            loss = nn.functional.cross_entropy(model((x - mean) / std), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, weights)
    meta.write_text(json.dumps(settings))
    return model.eval()


def run_demo(out: str | os.PathLike = "demo-output", recipe: str = "fashion-mnist", *,
             cache_dir: str | os.PathLike | None = None, epochs: int | None = None, limit: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the demo; write the explanation grid, the exported model and ``summary.json`` to ``out``."""
    import bcosify

    start = time.perf_counter()
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_recipe(recipe)
    train, test = loaders(spec, limit)
    original = train_original(spec, train, pathlib.Path(cache_dir) if cache_dir else DEFAULT_CACHE, progress)
    original_accuracy = evaluate(original, test, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, progress=progress)

    bmodel = bcosify.convert(original, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, **spec.convert)
    finetune_options = {**spec.finetune, "progress": progress}
    if epochs is not None:
        finetune_options["epochs"] = epochs
    history = bcosify.finetune(bmodel, train, **finetune_options)
    bcosified_accuracy = evaluate(bmodel, test, progress=progress)

    x, y = next(iter(DataLoader(test.dataset, batch_size=64)))
    explanation = bcosify.explain(bmodel.double(), x.double())  # float64: completeness to rounding error
    bmodel.float()
    completeness = explanation.completeness_error.max().item()
    classes = list(test.dataset.classes)
    bcosify.save(bmodel, out / "model", class_names=classes)
    shown = explanation[:8]
    pictures = [viz.save_explanation_grid(out / "explanations.png", x[:8], shown, class_names=classes,
                                          labels=[f"true {classes[int(t)]}" for t in y[:8]])]

    summary = {"original_accuracy": original_accuracy, "bcosified_accuracy": bcosified_accuracy,
               "completeness_error_max": completeness, "epochs": len(history.epochs),
               "seconds": time.perf_counter() - start, "recipe": spec.name, "history": history.epochs,
               "pictures": [str(p) for p in pictures]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"{'model':28s} {'test accuracy':>14s}")
    print(f"{'original ' + spec.model:28s} {original_accuracy:>14.2%}")
    print(f"{'B-cosified (b=' + format(bmodel.b, 'g') + ')':28s} {bcosified_accuracy:>14.2%}")
    print(f"completeness error (max over 64 test images, float64): {completeness:.1e}")
    print(f"fine-tuning epochs: {len(history.epochs)}; total time {summary['seconds']:.0f} s; outputs in {out}/")
    return summary
