"""The ``bcosify`` command line."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Callable, Sequence

from .errors import BcosifyError


def _photos(size: int = 224):
    """scikit-image's sample photos as a ``[0, 1]`` batch (short side resized, centre-cropped)."""
    try:
        from skimage import data
    except ImportError:
        raise BcosifyError("the demo needs scikit-image: pip install scikit-image") from None
    import torch
    import torch.nn.functional as F

    names = ["chelsea", "coffee", "astronaut", "rocket"]
    batch = []
    for name in names:
        image = torch.from_numpy(getattr(data, name)()[..., :3].copy()).permute(2, 0, 1).float() / 255
        h, w = image.shape[1:]
        scale = round(size / 0.875) / min(h, w)
        image = F.interpolate(image[None], size=(round(h * scale), round(w * scale)), mode="bilinear",
                              antialias=True, align_corners=False)[0]
        top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
        batch.append(image[:, top:top + size, left:left + size].clamp(0, 1))
    return names, torch.stack(batch)


def _imagenet_categories() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


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
    if args.lite0:
        return _demo_lite0()
    from .demo import run_demo

    run_demo(args.out, args.recipe, cache_dir=args.cache_dir, epochs=args.epochs, limit=args.limit)
    return 0


def _demo_lite0() -> int:
    """Convert the real ImageNet EfficientNet-Lite0 in one call and show that the conversion is exact."""
    import torch

    import bcosify
    from bcosify.checkpoints import efficientnet_lite0_checkpoint_path
    from bcosify.convert import build_model

    path = efficientnet_lite0_checkpoint_path()
    names, x = _photos()
    categories = _imagenet_categories()
    original = build_model("timm:efficientnet_lite0", weights=path, key_map="positional").eval()
    start = time.perf_counter()
    exact = bcosify.convert(original, b=1, keep_bias=True)
    seconds = time.perf_counter() - start
    bmodel = bcosify.convert(original)  # b=2, biases removed: the model you would fine-tune
    print(f"Converted timm efficientnet_lite0 (real ImageNet weights) in {seconds:.2f} s")
    print(f"  {exact.report.counts()}")
    mean = torch.tensor(exact.options.mean).view(1, -1, 1, 1)
    std = torch.tensor(exact.options.std).view(1, -1, 1, 1)
    with torch.no_grad():
        reference = original((x - mean) / std).softmax(1)
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
    return 0


def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="timm:NAME or torchvision:NAME")
    p.add_argument("--out", required=True, type=pathlib.Path, help="folder to save the converted model in")
    p.add_argument("--weights", default="hub",
                   help="checkpoint file (.safetensors/.pth), 'hub' for the pretrained weights, 'none' for random")
    p.add_argument("--key-map", choices=["positional"], help="match checkpoint tensors to the model by order")
    p.add_argument("--num-classes", type=int, help="replace the classifier with one of this many classes")
    p.add_argument("--b", type=float, default=2.0, help="alignment exponent (default 2)")
    p.add_argument("--keep-bias", action="store_true", help="keep biases (with --b 1: the original function)")
    p.add_argument("--mean", type=float, nargs="+", help="input normalisation mean (default: model metadata)")
    p.add_argument("--std", type=float, nargs="+", help="input normalisation std (default: model metadata)")
    p.add_argument("--normalize-weights", action="store_true", help="unit-norm weight rows (B-cos v2)")
    p.add_argument("--maxpool-to-avgpool", action="store_true", help="replace max pooling by average pooling")
    p.add_argument("--gap-reorder", action="store_true", help="classifier as 1x1 conv before global pooling")
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON constructor arguments, e.g. \'{"in_chans": 1}\'')


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a timm/torchvision model (optionally from a local checkpoint) and save it."""
    import bcosify

    weights = None if args.weights.lower() == "none" else args.weights
    bmodel = bcosify.convert(args.spec, weights=weights, key_map=args.key_map, model_kwargs=args.model_kwargs,
                             num_classes=args.num_classes, b=args.b, keep_bias=args.keep_bias, mean=args.mean,
                             std=args.std, normalize_weights=args.normalize_weights,
                             maxpool_to_avgpool=args.maxpool_to_avgpool, gap_reorder=args.gap_reorder)
    bcosify.save(bmodel, args.out)
    counts = ", ".join(f"{n} {a}" for a, n in bmodel.report.counts().items())
    print(f"converted {args.spec} ({counts}); saved to {args.out}")
    return 0


def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=pathlib.Path, help="a folder written by bcosify convert / bcosify.save")
    p.add_argument("--json", action="store_true", help="print the whole config as JSON")


def cmd_info(args: argparse.Namespace) -> int:
    """Show a saved model's config and conversion report."""
    from .saving import read_config
    from .surgery.report import ConversionReport

    config = read_config(args.folder)
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    source = config["source"]
    print(f"source:       {source.get('spec') or source.get('class')}  {source.get('model_kwargs') or ''}")
    print(f"format:       {config['format_version']} (bcosify {config.get('bcosify_version', '?')})")
    print(f"input:        {config['in_chans']} channels in [0, 1]; classes: {config['num_classes']}; "
          f"logit bias {config['logit_bias']:.6g}")
    for key, value in config["options"].items():
        print(f"  {key:20s}{value}")
    if config.get("report"):
        print()
        print(ConversionReport.from_dict(config["report"]).table())
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


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {
    "demo": (cmd_demo, _configure_demo),
    "convert": (cmd_convert, _configure_convert),
    "info": (cmd_info, _configure_info),
    "export": (cmd_export, _configure_export),
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
        print(f"bcosify {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
