"""Throughput of batched ``bcosify.explain`` against a per-image loop (the research code's only option).

Both ways explain the same images with the same converted model, measured in one run: a warm-up of each,
then alternating timed rounds; the medians are compared. Wall-clock time is what a user waits; process CPU
time (all threads) is the work done, and is less disturbed by other programs on a shared machine::

    .venv/bin/python benchmarks/explain_throughput.py                 # ResNet-18, 32 images, 112 px, CPU
    .venv/bin/python benchmarks/explain_throughput.py --pictures      # also the colour explanation and heat map
    .venv/bin/python benchmarks/explain_throughput.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import bcosify
from bcosify.explanation import viz


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=32, help="number of images (default 32)")
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds of each way (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; e.g. cuda)")
    p.add_argument("--b", type=float, default=2.0, help="alignment exponent of the converted model (default 2)")
    p.add_argument("--pictures", action="store_true",
                   help="also make the colour explanation and contribution map (as the research code's explain)")
    return p.parse_args(argv)


def _run(model: bcosify.BcosModel, x: torch.Tensor, pictures: bool) -> torch.Tensor:
    e = bcosify.explain(model, x)
    if pictures:
        viz.color_explanation(e), viz.contribution_map(e)
    return e.contributions


def batched(model: bcosify.BcosModel, x: torch.Tensor, pictures: bool = False) -> torch.Tensor:
    """All images in one call: one forward and one backward pass."""
    return _run(model, x, pictures)


def per_image(model: bcosify.BcosModel, x: torch.Tensor, pictures: bool = False) -> torch.Tensor:
    """One call per image, as the research code's ``model.explain(image)`` requires."""
    return torch.cat([_run(model, x[i:i + 1], pictures) for i in range(len(x))])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fn, model, x, pictures) -> tuple[float, float]:
    _sync(x.device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn(model, x, pictures)
    _sync(x.device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = bcosify.convert(torchvision.models.resnet18(), b=args.b).eval().to(device)
    x = torch.rand(args.images, 3, args.size, args.size, device=device)
    reference = batched(model, x)
    scale = reference.abs().max().item()
    # the same results both ways (on CUDA, cuDNN's TF32 convolutions round at about 1e-3)
    tolerance = 1e-5 if device.type == "cpu" else 1e-2
    torch.testing.assert_close(per_image(model, x), reference, rtol=0, atol=tolerance * scale)
    ways = {"batched": batched, "per-image": per_image}
    for fn in ways.values():  # warm-up
        fn(model, x, args.pictures)
    wall: dict[str, list[float]] = {k: [] for k in ways}
    cpu: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            w, c = _measure(fn, model, x, args.pictures)
            wall[name].append(w)
            cpu[name].append(c)
    what = "explain + pictures" if args.pictures else "explain"
    where = (f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu"
             else torch.cuda.get_device_name(device) if device.type == "cuda" else str(device))
    print(f"{what}: ResNet-18 (torchvision, converted, b={args.b:g}), {args.images} images of {args.size} px, "
          f"{where}, median of {args.rounds} alternating rounds")
    for name in ways:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:9s} wall {w:7.3f} s ({args.images / w:6.1f} images/s)   cpu {c:7.3f} s   "
              f"wall rounds: " + " ".join(f"{t:.2f}" for t in wall[name]))
    ratio_wall = statistics.median(wall["per-image"]) / statistics.median(wall["batched"])
    ratio_cpu = statistics.median(cpu["per-image"]) / statistics.median(cpu["batched"])
    print(f"batched / per-image throughput: {ratio_wall:.2f}x wall-clock, {ratio_cpu:.2f}x CPU time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
