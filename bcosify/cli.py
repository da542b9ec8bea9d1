"""The ``bcosify`` command line."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Callable, Sequence

from .config import PADDING_LAYERS, PADDING_MODES, SQUASHES, UNIT_OPTIONS, UNITS
from .errors import BcosifyError


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("demo-output"), help="output folder")
    p.add_argument("--recipe", default="fashion-mnist", help="recipe name or YAML file (Fashion-MNIST recipes)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the recipe's)")
    p.add_argument("--limit", type=int, help="use only the first N training and test images (quick runs)")
    p.add_argument("--cache-dir", type=pathlib.Path, help="where the trained original model is cached")
    p.add_argument("--lite0", action="store_true",
                   help="instead: convert the real ImageNet EfficientNet-Lite0 and show the conversion is exact")


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a ResNet-18 on Fashion-MNIST, B-cosify it in one call, fine-tune, evaluate, explain, export."""
    from .demo import run_demo, run_lite0_demo

    if args.lite0:
        run_lite0_demo()
    else:
        run_demo(args.out, args.recipe, cache_dir=args.cache_dir, epochs=args.epochs, limit=args.limit)
    return 0


def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="timm:NAME, hf-hub:ORG/NAME or torchvision:NAME")
    p.add_argument("--out", required=True, type=pathlib.Path, help="folder to save the converted model in")
    p.add_argument("--weights", default="hub",
                   help="checkpoint file (.safetensors/.pth), 'hub' for the pretrained weights, 'none' for random")
    p.add_argument("--key-map", choices=["positional"], help="match checkpoint tensors to the model by order")
    p.add_argument("--num-classes", type=int, help="replace the classifier with one of this many classes")
    p.add_argument("--unit", choices=list(UNITS), default="bcos",
                   help="alignment layers: B-cos (default) or Dynamic Alignment Units (CoDA-Nets)")
    p.add_argument("--b", type=float, default=2.0, help="alignment exponent of B-cos layers (default 2)")
    p.add_argument("--rank", type=int, help="DAU layers: rank of the dynamic part (default 32)")
    p.add_argument("--squash", choices=list(SQUASHES), help="DAU layers: squashing function (default squash)")
    p.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this (default 1)")
    p.add_argument("--keep-bias", action="store_true", help="keep biases (with --b 1, or DAU layers: the original "
                                                           "function)")
    p.add_argument("--mean", type=float, nargs="+", help="input normalization mean (default: model metadata)")
    p.add_argument("--std", type=float, nargs="+", help="input normalization std (default: model metadata)")
    p.add_argument("--normalize-weights", action="store_true", help="unit-norm weight rows (B-cos v2)")
    p.add_argument("--maxpool-to-avgpool", action="store_true", help="replace max pooling by average pooling")
    p.add_argument("--gap-reorder", action="store_true", help="classifier as 1x1 conv before global pooling")
    p.add_argument("--token-pool", choices=["mean"], default=None,
                   help="ViTs: classify the mean of the patch tokens instead of the class token")
    p.add_argument("--padding-mode", choices=list(PADDING_MODES), default="zeros",
                   help="how the first (or every, --padding-layers all) convolution pads; constant: the colour "
                        "--padding-value (default: the normalization mean), explained as a constant")
    p.add_argument("--padding-layers", choices=list(PADDING_LAYERS), default="first")
    p.add_argument("--padding-value", type=float, nargs="+", metavar="V",
                   help="--padding-mode constant: the padding colour in [0, 1] per channel, e.g. 0 for black")
    p.add_argument("--center-grid", nargs="?", const=True, default=False, choices=["auto"],
                   help="shift the last stride-2 downsampling by one so the output grid is centred on the image "
                        "(refused where it cannot be shifted; --center-grid auto: shifted where it can)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON constructor arguments, e.g. \'{"in_chans": 1}\'')
    _add_calibration_arguments(p, size=True)


def _add_calibration_arguments(p: argparse.ArgumentParser, size: bool) -> None:
    p.add_argument("--calibrate-data", type=pathlib.Path, metavar="DIR",
                   help="calibrate the converted model (bcosify.calibrate) against the original on the images in "
                        "DIR (any depth: class sub-folders or none; labels are not read)")
    p.add_argument("--calibrate-images", type=int, default=64, metavar="N",
                   help="calibrate on at most N images of DIR, evenly spaced (default 64)")
    if size:
        p.add_argument("--size", type=int, default=224,
                       help="calibration images are resized and centre-cropped to this (default 224)")


def _calibration_images(args: argparse.Namespace, size: int, channels: int):
    """The ``--calibrate-data`` images as one batch, or ``None`` without the option."""
    from .data import unlabelled_images

    if args.calibrate_data is None:
        return None
    for flag, value in (("--calibrate-images", args.calibrate_images), ("--size", size)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    return unlabelled_images(args.calibrate_data, size, channels, limit=args.calibrate_images)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a timm/torchvision model (optionally from a local checkpoint) and save it."""
    import bcosify

    weights = None if args.weights.lower() == "none" else args.weights
    images = _calibration_images(args, args.size, int(args.model_kwargs.get("in_chans", 3)))
    bmodel = bcosify.convert(args.spec, weights=weights, key_map=args.key_map, model_kwargs=args.model_kwargs,
                             num_classes=args.num_classes, unit=args.unit, b=args.b, rank=args.rank,
                             squash=args.squash, temperature=args.temperature, keep_bias=args.keep_bias, mean=args.mean,
                             std=args.std, normalize_weights=args.normalize_weights,
                             maxpool_to_avgpool=args.maxpool_to_avgpool, gap_reorder=args.gap_reorder,
                             token_pool=args.token_pool, padding_mode=args.padding_mode,
                             padding_layers=args.padding_layers, padding_value=args.padding_value,
                             center_grid=args.center_grid, calibrate=images)
    bcosify.save(bmodel, args.out)
    counts = ", ".join(f"{n} {a}" for a, n in bmodel.report.counts().items())
    calibrated = f"; calibrated on {len(images)} images from {args.calibrate_data}" if images is not None else ""
    print(f"converted {args.spec} ({counts}){calibrated}; saved to {args.out}")
    return 0


def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=pathlib.Path, help="a folder written by bcosify convert / bcosify.save")
    p.add_argument("--json", action="store_true", help="print the whole config as JSON")


def cmd_info(args: argparse.Namespace) -> int:
    """Show a saved model's config and conversion report."""
    from .export import read_config
    from .surgery.report import ConversionReport

    saved = read_config(args.folder)
    if args.json:
        print(json.dumps(saved, indent=2))
        return 0
    config = saved["config"]
    print(f"source:       {config.get('spec') or config.get('model_class')}  {config.get('model_kwargs') or ''}")
    print(f"format:       {saved['format_version']} (bcosify {saved.get('bcosify_version') or '?'})")
    print(f"input:        {config['in_chans']} channels in [0, 1]; classes: {config['num_classes']}; "
          f"logit bias {config['logit_bias']:.6g}")
    for key, value in config.items():
        print(f"  {key:20s}{value}")
    if saved.get("report"):
        print()
        print(ConversionReport.from_dict(saved["report"]).table())
    return 0


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=pathlib.Path, help="a saved model folder")
    p.add_argument("--onnx", required=True, type=pathlib.Path, help="ONNX file to write")
    p.add_argument("--size", type=int, default=224, help="example image size for tracing (default 224)")


def cmd_export(args: argparse.Namespace) -> int:
    """Export a saved model to ONNX (input: images in [0, 1]; output: logits)."""
    import torch

    import bcosify

    bmodel = bcosify.load(args.folder)
    path = bcosify.export_onnx(bmodel, args.onnx, torch.rand(1, bmodel.in_chans, args.size, args.size))
    print(f"wrote {path}")
    return 0


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a saved model folder (bcosify convert / bcosify.save) or a spec timm:NAME / "
                                 "hf-hub:ORG/NAME / torchvision:NAME, converted on the fly")
    p.add_argument("--weights", help="for a spec: checkpoint file, 'hub' (default) or 'none' for random weights")
    p.add_argument("--key-map", choices=["positional"], help="for a spec: match checkpoint tensors by order")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help="for a spec: JSON constructor arguments")
    p.add_argument("--b", type=float, help="for a spec: alignment exponent (default 2)")
    p.add_argument("--keep-bias", action="store_true", help="for a spec: keep biases (with --b 1: the original "
                                                            "function)")
    p.add_argument("--size", type=int, default=224, help="images are resized and centre-cropped to this (default 224)")


def _model_from_args(args: argparse.Namespace):
    """``(BcosModel, original model or None)`` from a saved folder or a spec plus conversion options."""
    spec_only = [flag for flag, given in (("--weights", args.weights is not None), ("--key-map", args.key_map),
                                          ("--model-kwargs", args.model_kwargs), ("--keep-bias", args.keep_bias),
                                          ("--b", args.b is not None)) if given]
    return _load_or_convert(args.model, args.weights, args.key_map, args.model_kwargs, spec_only,
                            b=2.0 if args.b is None else args.b, keep_bias=args.keep_bias)


def _load_or_convert(model: str, weights: str | None, key_map: str | None, model_kwargs: dict, spec_only: list[str],
                     **convert_options):
    """``(BcosModel, original model or None)``: a saved folder loaded, or a spec built and converted."""
    import bcosify
    from bcosify.weights import build_model

    if pathlib.Path(model).is_dir():
        if spec_only:
            raise ValueError(f"{', '.join(spec_only)} apply to a model spec, not to a saved model folder")
        return bcosify.load(model).eval(), None
    if ":" not in model:
        raise ValueError(f"MODEL must be a saved model folder or a spec such as timm:resnet18; {model!r} is neither")
    weights = weights or "hub"
    original = build_model(model, None if weights.lower() == "none" else weights, model_kwargs, key_map).eval()
    # the spec and its arguments go into the config, so that bcosify.load rebuilds this very architecture
    config = bcosify.BcosConfig(spec=model, model_kwargs=model_kwargs, **convert_options)
    return bcosify.convert(original, config).eval(), original


def _class_names(bmodel) -> list[str] | None:
    from .data import imagenet_categories

    if bmodel.class_names:
        return list(bmodel.class_names)
    return imagenet_categories() if bmodel.num_classes == 1000 else None


def _configure_explain(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument("images", nargs="+", type=pathlib.Path, help="image files (anything Pillow reads)")
    p.add_argument("--out", required=True, type=pathlib.Path, help="folder for the PNG grids")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--target", type=int, help="explain this class for every image (default: the prediction)")
    which.add_argument("--topk", type=int, help="explain each image's N highest-scoring classes (one row each)")
    p.add_argument("--rows", type=int, default=8, help="rows per PNG grid (default 8)")
    p.add_argument("--batch-size", type=int, default=16, help="images explained at once (default 16)")
    p.add_argument("--colors", type=int, help="write palette PNGs with this many colors (2-256): smaller files")


def cmd_explain(args: argparse.Namespace) -> int:
    """Explain a model's predictions for image files and write PNG grids (image | explanation | contributions)."""
    import torch
    from tqdm import tqdm

    import bcosify
    from bcosify.data import load_image
    from bcosify.explanation.viz import row_titles, save_explanation_grid

    for flag, value in (("--rows", args.rows), ("--batch-size", args.batch_size), ("--size", args.size),
                        ("--topk", args.topk if args.topk is not None else 1)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    bmodel, _ = _model_from_args(args)
    if args.target is not None and not 0 <= args.target < bmodel.num_classes:
        raise ValueError(f"--target must lie in [0, {bmodel.num_classes}), got {args.target}")
    k = args.topk or 1
    if k > bmodel.num_classes:
        raise ValueError(f"--topk {k} is more than the model's {bmodel.num_classes} classes")
    names = _class_names(bmodel)
    per_page = max(1, args.rows // k)
    pages = [args.images[i:i + per_page] for i in range(0, len(args.images), per_page)]
    args.out.mkdir(parents=True, exist_ok=True)
    tiny = 0.0
    written = []
    with tqdm(total=len(args.images), unit="image", desc="explain", disable=len(args.images) <= args.batch_size,
              file=sys.stderr) as bar:
        for number, paths in enumerate(pages, 1):
            x = torch.stack([load_image(p, args.size, channels=bmodel.in_chans) for p in paths])
            targets = args.target  # an int, or None: explain the predicted class
            if k > 1:  # the top-k classes need the logits first
                with torch.no_grad():
                    targets = torch.cat([bmodel(x[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]
                                        ).topk(k, dim=1).indices.flatten()
            rows_x = x.repeat_interleave(k, 0)
            e = bcosify.explain(bmodel, rows_x, targets, batch_size=args.batch_size)
            labels = [p.name for p in paths for _ in range(k)]
            titles = row_titles(e, names, labels)
            for title in titles[::k]:
                print(title)
            tiny = max(tiny, e.explained_logit.abs().max().item())
            name = "explanations.png" if len(pages) == 1 else f"explanations-{number:03d}.png"
            written.append(save_explanation_grid(args.out / name, rows_x, e, titles=titles, colors=args.colors))
            bar.update(len(paths))
    if tiny < 1e-20:
        print(f"note: the explained logits are tiny (|logit| <= {tiny:.1e}); a freshly converted pretrained model "
              "at b=2 needs fine-tuning first; --b 1 --keep-bias explains the original model")
    for path in written:
        print(f"wrote {path}")
    return 0


def _folder_labels(classes: list[str], bmodel) -> list[int]:
    """Model class index of each ImageFolder class folder name."""
    index = {name: i for i, name in enumerate(_class_names(bmodel) or [])}
    if all(c.isdigit() for c in classes):
        labels = [int(c) for c in classes]
    elif index and all(c in index for c in classes):
        labels = [index[c] for c in classes]
    elif len(classes) == bmodel.num_classes:
        labels = list(range(len(classes)))
    else:
        raise ValueError(f"cannot match the {len(classes)} class folders to the model's {bmodel.num_classes} "
                         "classes: name them by class index (0, 1, ...) or by the model's class names, or give "
                         "one folder per class in the model's order")
    bad = [c for c, k in zip(classes, labels) if k >= bmodel.num_classes]
    if bad:
        raise ValueError(f"class folders {bad} name classes beyond the model's {bmodel.num_classes}")
    return labels


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    _add_model_arguments(p)
    p.add_argument("--data", required=True, type=pathlib.Path,
                   help="image folder with one sub-folder per class (torchvision ImageFolder), named by class "
                        "index or class name")
    p.add_argument("--gridpg", type=int, required=True, metavar="N", help="grid pointing game on N x N grids")
    p.add_argument("--grids", type=int, help="number of grids (default: each image used once)")
    p.add_argument("--methods", type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
                   help="comma-separated: bcos,ixg,gradcam,ig (default: all that apply; the post-hoc methods "
                        "need MODEL as a spec, they run on the original model)")
    p.add_argument("--per-class", type=int, default=10, help="images read per class folder (default 10)")
    p.add_argument("--ig-steps", type=int, default=20, help="integrated gradients steps (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed for the grid layout (default 0)")
    p.add_argument("--json", type=pathlib.Path, help="also write the results to this JSON file")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate explanations with the grid pointing game (B-cos and post-hoc methods on the original model)."""
    import torch
    from torchvision.datasets import ImageFolder

    from bcosify.data import load_image
    from bcosify.explanation.gridpg import POSTHOC_METHODS, run_gridpg

    for flag, value in (("--gridpg", args.gridpg), ("--per-class", args.per_class), ("--ig-steps", args.ig_steps),
                        ("--size", args.size), ("--grids", args.grids or 1)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if not args.data.is_dir():
        raise FileNotFoundError(f"data folder not found: {str(args.data)!r}")
    bmodel, original = _model_from_args(args)
    methods = args.methods or (["bcos"] + (list(POSTHOC_METHODS) if original is not None else []))
    if original is None and any(m in POSTHOC_METHODS for m in methods):
        raise ValueError("post-hoc methods run on the original model: give MODEL as a spec (e.g. timm:resnet50 "
                         "--weights FILE), not a saved folder")
    dataset = ImageFolder(str(args.data))
    labels_of = _folder_labels(dataset.classes, bmodel)
    taken: dict[int, int] = {}
    images, labels = [], []
    for path, folder in dataset.samples:
        if taken.get(folder, 0) < args.per_class:
            taken[folder] = taken.get(folder, 0) + 1
            images.append(load_image(path, args.size, channels=bmodel.in_chans))
            labels.append(labels_of[folder])
    x, y = torch.stack(images), torch.tensor(labels)
    with torch.no_grad():
        accuracy = (torch.cat([bmodel(x[i:i + 32]) for i in range(0, len(x), 32)]).argmax(1) == y).float().mean()
    print(f"{len(x)} images of {len(dataset.classes)} classes from {args.data}; B-cos model top-1 accuracy "
          f"{accuracy.item():.3f}")
    results = run_gridpg(x, y, args.gridpg, bcos_model=bmodel, original=original, methods=methods,
                         num_grids=args.grids, seed=args.seed, ig_steps=args.ig_steps, progress=len(methods) > 1)
    n = args.gridpg
    print(f"\nGridPG {n}x{n} (score: share of positive attribution in the explained cell; chance {1 / n ** 2:.3f})")
    print(f"{'method':24s} {'model':9s} {'grids':>5s} {'mean':>6s} {'median':>6s} {'std':>6s}")
    for key, result in results.items():
        s = result.summary()
        print(f"{result.method:24s} {'B-cos' if key == 'bcos' else 'original':9s} {s['grids']:5d} {s['mean']:6.3f} "
              f"{s['median']:6.3f} {s['std']:6.3f}")
    if args.json:
        args.json.write_text(json.dumps({"images": len(x), "accuracy": accuracy.item(),
                                         "gridpg": {k: r.summary() for k, r in results.items()}}, indent=2))
        print(f"wrote {args.json}")
    return 0


def _configure_finetune(p: argparse.ArgumentParser) -> None:
    from .training.config import LOSSES

    p.add_argument("recipe", help="a shipped recipe name (bcosify.training.list_recipes()) or a recipe YAML file")
    p.add_argument("--out", required=True, type=pathlib.Path,
                   help="output folder: checkpoints/, metrics.jsonl (one JSON line per epoch), model/ (final model)")
    p.add_argument("--model", help="the recipe's model instead: a spec (timm:NAME, torchvision:NAME, hf-hub:ORG/NAME), "
                                   "converted with the recipe's options, or a saved bcosify model folder")
    p.add_argument("--weights", help="for a spec: checkpoint file, 'hub' (default) or 'none' for random weights")
    p.add_argument("--key-map", choices=["positional"], help="for a spec: match checkpoint tensors by order")
    p.add_argument("--model-kwargs", type=json.loads, default={},
                   help="for a spec: JSON constructor arguments (added to the recipe's)")
    p.add_argument("--unit", choices=list(UNITS),
                   help="for a spec: alignment layers, B-cos or Dynamic Alignment Units (default: the recipe's, else bcos)")
    p.add_argument("--rank", type=int, help="for a spec with --unit dau: rank of the dynamic part (default 32)")
    p.add_argument("--temperature", type=float, help="set the model's logit temperature (logits / T) before "
                                                     "fine-tuning; kept in the saved model (default: the recipe's, "
                                                     "else the model's)")
    p.add_argument("--data", type=pathlib.Path,
                   help="ImageFolder root with train/ and val/ (one sub-folder of images per class; train/ may be a "
                        "plain folder of images for --loss distill or align), or a plain folder of images alone "
                        "(label-free, no validation); for a fashion-mnist recipe: the folder of its IDX files")
    p.add_argument("--loss", choices=LOSSES,
                   help="training loss (default: the recipe's); distill and align use no labels")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="images per process and step (default: the recipe's global "
                                                  "batch divided by the number of processes)")
    p.add_argument("--grad-accum", type=int, help="micro-batches of --batch-size per update (default: the recipe's, "
                                                  "else 1)")
    p.add_argument("--workers", type=int, help="data loader workers per process (default: the recipe's, else on GPUs "
                                                  "the CPU cores per process up to 8, on CPU 0)")
    p.add_argument("--limit", type=int, help="fashion-mnist: use only the first N training and test images")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT/checkpoints "
                                                        "(any number of processes at the same global batch)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also write a checkpoint every N updates (default: the recipe's, else at epoch ends only)")
    p.add_argument("--seed", type=int, help="seed of the initialisation order and the data shuffle (default 0)")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu, cuda")
    p.add_argument("--amp", choices=["auto", "off", "bf16"], help="bf16 autocast (default auto: on CUDA)")
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics of the global batch, synchronised "
                                                         "over the processes (default: each process's own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_calibration_arguments(p, size=False)


def cmd_finetune(args: argparse.Namespace) -> int:
    """Fine-tune a converted model with a recipe; under torchrun --nproc-per-node=N, with N processes (DDP)."""
    import torch

    import bcosify
    from .training import FinetuneConfig, load_recipe
    from .data import DataError, PlainImageFolder
    from .training.config import LABEL_FREE_LOSSES
    from .training.data import DataConfig, build_datasets, first_images, folder_root, per_process_batch
    from .training.distributed import world
    from .training.run import CHECKPOINTS, MODEL, run_finetune

    recipe = load_recipe(args.recipe)
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    data = DataConfig.from_dict(recipe.data)
    changes = {k: v for k, v in (("workers", args.workers), ("limit", args.limit), ("val_limit", args.limit))
               if v is not None}
    if args.data is not None:
        changes.update(folder_root(args.data) if data.dataset == "image-folder" else {"root": str(args.data)})
    data = data.replace(**changes)
    rank, world_size, _ = world()
    batch = args.batch_size or per_process_batch(data.batch_size, world_size)
    config = FinetuneConfig.from_dict(recipe.finetune).replace(**{k: v for k, v in (
        ("epochs", args.epochs), ("lr", args.lr), ("loss", args.loss), ("grad_accum", args.grad_accum),
        ("seed", args.seed), ("checkpoint_every", args.checkpoint_every), ("temperature", args.temperature),
        ("device", args.device), ("amp", args.amp))
        if v is not None}, resume=args.resume, checkpoint_dir=str(args.out / CHECKPOINTS), progress=not args.no_progress,
        **({"sync_bn": True} if args.sync_bn else {}))
    train, val, classes = build_datasets(data)
    unlabelled = isinstance(train, PlainImageFolder)
    if unlabelled and config.loss not in LABEL_FREE_LOSSES:
        raise DataError(f"loss {config.loss!r} needs labels, but the training folder {data.root!r} is a plain folder "
                        "of images without class sub-folders: use --loss align or --loss distill (label-free), or "
                        "sort the images into one sub-folder per class")
    if config.seed is not None:
        torch.manual_seed(config.seed)  # new layers (--weights none, a new classifier) start alike in every run
    model = args.model or recipe.model
    spec_only = [flag for flag, given in (("--weights", args.weights is not None), ("--key-map", args.key_map),
                                          ("--model-kwargs", args.model_kwargs), ("--unit", args.unit),
                                          ("--rank", args.rank is not None)) if given]
    unit = {k: v for k, v in (("unit", args.unit), ("rank", args.rank)) if v is not None}
    convert = dict(recipe.convert)
    recipe_unit = convert.get("unit", "bcos")
    if args.unit is not None and args.unit != recipe_unit:  # the recipe's options of its own unit do not apply
        dropped = [k for k in UNIT_OPTIONS[recipe_unit] if convert.pop(k, None) is not None]
        if dropped and rank == 0:
            print(f"--unit {args.unit}: not using the recipe's {recipe_unit} options {', '.join(dropped)}",
                  file=sys.stderr)
    bmodel, original = _load_or_convert(model, args.weights, args.key_map,
                                        {**recipe.model_kwargs, **args.model_kwargs},
                                        spec_only, **{**convert, **unit, **(
                                            {} if unlabelled else {"num_classes": len(classes),
                                                                   "class_names": classes})})
    if bmodel.in_chans != data.channels or (classes is not None and bmodel.num_classes != len(classes)):
        data_classes = f" and {len(classes)} classes" if classes is not None else ""
        raise ValueError(f"the model {model!r} takes {bmodel.in_chans} channels and has {bmodel.num_classes} "
                         f"classes; the data have {data.channels} channels{data_classes}")
    if args.calibrate_data is not None:
        if original is None:
            raise ValueError("--calibrate-data matches the converted model to the original: give the model as a "
                             "spec, or calibrate when converting (bcosify convert --calibrate-data)")
        bcosify.calibrate(bmodel, _calibration_images(args, data.size, data.channels), original=original,
                          progress=not args.no_progress)
    elif recipe.calibrate_images and original is not None:  # the recipe's default: its first training images
        bcosify.calibrate(bmodel, first_images(train, recipe.calibrate_images), original=original,
                          progress=not args.no_progress)
    elif recipe.calibrate_images and rank == 0:
        print(f"recipe {recipe.name!r} calibrates a converted model against its original; the saved model {model} "
              "has none, so it is fine-tuned as it is (calibrate when converting: bcosify convert --calibrate-data)")
    history = run_finetune(bmodel, train, val, config, args.out, batch_size=batch, workers=data.workers,
                           class_names=classes,
                           teacher=original if config.loss in LABEL_FREE_LOSSES else None)
    if rank == 0:
        last = history.epochs[-1] if history.epochs else {}
        accuracy = f"; validation accuracy {last['val_accuracy']:.2%}" if "val_accuracy" in last else ""
        print(f"fine-tuned {model} for {len(history.epochs)} epochs{accuracy}; saved to {args.out / MODEL}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {
    "demo": (cmd_demo, _configure_demo),
    "convert": (cmd_convert, _configure_convert),
    "info": (cmd_info, _configure_info),
    "export": (cmd_export, _configure_export),
    "explain": (cmd_explain, _configure_explain),
    "evaluate": (cmd_evaluate, _configure_evaluate),
    "finetune": (cmd_finetune, _configure_finetune),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcosify", description="Turn pretrained image classifiers into B-cos networks.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, configure) in COMMANDS.items():
        p = sub.add_parser(name, help=(func.__doc__ or "").strip().splitlines()[0])
        configure(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BcosifyError, ValueError, TypeError, OSError) as e:
        if args.debug:
            raise
        sys.stderr.write(f"bcosify {args.command}: error: {e}\n")  # one write: processes of a run share stderr
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    sys.exit(main())
