"""Throughput of batched ``bcosify.explain`` against a per-image loop (the research code's only option).

Both are measured in the same run, alternating, after a warm-up; the medians are compared::

    .venv/bin/python benchmarks/explain_throughput.py            # ResNet-18, 32 images, 112 px, CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import bcosify


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32, help="number of images (default 32)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of each way (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--b", type=float, default=2.0, help="alignment exponent of the converted model (default 2)")
    return p.parse_args(argv)


def batched(model: bcosify.BcosModel, x: torch.Tensor) -> torch.Tensor:
    """All images in one call: one forward and one backward pass."""
    return bcosify.explain(model, x).contributions


def per_image(model: bcosify.BcosModel, x: torch.Tensor) -> torch.Tensor:
    """One call per image, as the research code's ``model.explain(image)`` requires."""
    return torch.cat([bcosify.explain(model, x[i:i + 1]).contributions for i in range(len(x))])


def _time(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bcosify.convert(torchvision.models.resnet18(), b=args.b).eval()
    x = torch.rand(args.images, 3, args.size, args.size)
    torch.testing.assert_close(batched(model, x), per_image(model, x), rtol=1e-4, atol=1e-6 * batched(model, x).abs().max().item())
    times: dict[str, list[float]] = {"batched": [], "per-image": []}
    _time(batched, model, x), _time(per_image, model, x)  # warm-up
    for _ in range(args.repeats):
        times["batched"].append(_time(batched, model, x))
        times["per-image"].append(_time(per_image, model, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ResNet-18 (torchvision, converted, b={args.b:g}), {args.images} images of {args.size} px, CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:9s} {v:8.3f} s  ({args.images / v:7.1f} images/s)  all: "
              + " ".join(f"{t:.3f}" for t in times[k]))
    print(f"batched / per-image throughput ratio: {med['per-image'] / med['batched']:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
