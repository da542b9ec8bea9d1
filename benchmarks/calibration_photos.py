"""The real ImageNet EfficientNet-Lite0 at b=2: how many sample photos keep the original's prediction, before and
after ``bcosify.calibrate`` on the same photos with augmented crops (no labels).

    python benchmarks/calibration_photos.py --crops 8 --dtype float64
    python benchmarks/calibration_photos.py --crops 8 --picture docs/images/explain_efficientnet_lite0_b2.png
"""

from __future__ import annotations

import argparse
import json

import torch

import bcosify
from bcosify.data import augmented_views, imagenet_categories, normalize, sample_photos
from bcosify.demo import efficientnet_lite0_checkpoint_path
from bcosify.weights import build_model


def kept(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, int]:
    """How many images keep the reference's top-1 as top-1, and within the top-5."""
    target = reference.argmax(1)
    top5 = logits.topk(5, dim=1).indices
    return {"top1": int((logits.argmax(1) == target).sum()), "top5": int((top5 == target[:, None]).any(1).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=8, help="random resized crops per photo (plus each mirrored)")
    parser.add_argument("--batches", type=int, default=1, help="split the calibration images into this many batches")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--b", type=float, default=2.0)
    parser.add_argument("--picture", help="PNG of the calibrated model's explanations of the original's top-1 class")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    original = build_model("timm:efficientnet_lite0", weights=str(efficientnet_lite0_checkpoint_path()),
                           key_map="positional").to(dtype).eval()
    names, photos = sample_photos(224)
    photos = photos.to(dtype)
    calibration = augmented_views(photos, args.crops)
    categories = imagenet_categories()
    with torch.no_grad():
        reference = original(normalize(photos, bcosify.data.IMAGENET_MEAN, bcosify.data.IMAGENET_STD))
        bmodel = bcosify.convert(original, b=args.b)
        converted = bmodel.network(bmodel.encode(photos))
    bcosify.calibrate(bmodel, list(calibration.chunk(args.batches)), original=original)
    with torch.no_grad():
        calibrated = bmodel.network(bmodel.encode(photos))
    result = {
        "photos": names, "calibration_images": len(calibration), "batches": args.batches, "dtype": args.dtype,
        "b": args.b,
        "original_top1": [categories[i] for i in reference.argmax(1)],
        "calibrated_top1": [categories[i] for i in calibrated.argmax(1)],
        "logit_rms": {name: logits.pow(2).mean().sqrt().item() for name, logits in
                      (("original", reference), ("converted", converted), ("calibrated", calibrated))},
        "kept_of_4": {"converted": kept(converted, reference), "calibrated": kept(calibrated, reference)},
    }
    if args.picture:
        from bcosify.explanation import viz

        e = bcosify.explain(bmodel, photos, target=reference.argmax(1))
        result["picture"] = str(viz.save_explanation_grid(
            args.picture, photos, e, colors=256, class_names=categories,
            labels=[f"b={args.b:g}, calibrated; original's top-1" for _ in names]))
        result["completeness_error_max"] = e.completeness_error.max().item()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
