"""Peak memory of one training step of a DAU network relative to the model it was converted from (CPU).

    python benchmarks/dau_memory.py                          # timm ResNet-50, batch 8, 224 px, ranks 1 and 4
    python benchmarks/dau_memory.py --ranks 1 4 8 --json benchmarks/results/dau_memory.json

Each model is measured in a subprocess of its own (only one model in memory at a time): the original (train
mode, normalised input) and ``bcosify.convert(model, unit="dau", rank=R)`` for each rank (train mode, images in
[0, 1]). One step is forward, cross-entropy, backward. Measured, in bytes:

* ``parameters``: the model's parameters and buffers (they exist before the step).
* ``step peak``: the peak of the bytes held by tensors allocated during the step, gradients and activations
  (and the DAU layers' recomputed chunks) included, from the PyTorch profiler's record of every CPU allocation
  and free (as in ``benchmarks/overhead.py``).
* ``total``: ``parameters + step peak``, the memory a training step needs; the ratios are taken of it and of
  the step peak alone.

Also printed, computed: the bytes the materialising form of the CoDA-Nets reference code would hold for the
dynamic weights of the largest layer alone (``N * H_out * W_out * K * C_in/groups * k * k`` values).
No time is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def _measure(spec: str, rank: int | None, batch: int, size: int) -> dict:
    """One model's memory (run in a subprocess of its own)."""
    import torch
    import torch.nn.functional as F

    import bcosify
    from bcosify.data import normalize
    from bcosify.weights import build_model

    sys.path.insert(0, str(HERE))
    from overhead import _peak_train_memory

    torch.manual_seed(0)
    model = build_model(spec, weights=None, model_kwargs={})
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    largest = None
    if rank is None:
        mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
        x = normalize(x, mean, std)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        largest = _largest_materialised(model, convs, x)
    else:
        model = bcosify.convert(model, unit="dau", rank=rank)
    model.train()
    params = list(model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])

    def step():
        F.cross_entropy(model(x), y).backward()

    step_peak = _peak_train_memory(step, params, torch.device("cpu"))
    return {"rank": rank, "parameters": state_bytes, "step_peak": step_peak, "total": state_bytes + step_peak,
            "num_parameters": sum(p.numel() for p in params), "largest_materialised": largest}


def _largest_materialised(model, convs, x) -> dict:
    """The largest ``N * H_out * W_out * K * d`` (dynamic weights of the materialising form) over ``convs``."""
    import torch

    sizes = {}

    def hook(conv, inputs, out):
        d = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        sizes[conv] = out.numel() * d * 4  # float32

    handles = [c.register_forward_hook(hook) for c in convs]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    names = {m: n for n, m in model.named_modules()}
    conv = max(sizes, key=sizes.get)
    return {"layer": names[conv], "bytes": sizes[conv]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:resnet50")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: measure one model (0 = original)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_measure(args.model, args.worker or None, args.batch, args.size)))
        return {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    results = []
    for rank in [0, *args.ranks]:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--size",
                              str(args.size), "--worker", str(rank)], capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"measuring rank {rank or 'original'} failed:\n{out.stderr}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"measured {'original' if not rank else f'DAU rank {rank}'}", file=sys.stderr)
    original = results[0]
    gib = 2 ** 30
    print(f"{args.model}, batch {args.batch}, {args.size} px, one training step (forward, cross-entropy, backward), CPU")
    print(f"{'model':16s} {'parameters':>12s} {'step peak':>12s} {'total':>12s} {'total ratio':>12s} "
          f"{'step ratio':>11s}")
    for r in results:
        name = "original" if r["rank"] is None else f"DAU rank {r['rank']}"
        print(f"{name:16s} {r['parameters'] / gib:10.2f} G {r['step_peak'] / gib:10.2f} G {r['total'] / gib:10.2f} G "
              f"{r['total'] / original['total']:11.2f}x {r['step_peak'] / original['step_peak']:10.2f}x")
    big = original["largest_materialised"]
    print(f"materialised dynamic weights of {big['layer']} alone (reference form): {big['bytes'] / gib:.1f} G")
    report = {"model": args.model, "batch": args.batch, "size": args.size,
              "threads": env["OMP_NUM_THREADS"], "results": results,
              "ratios": {str(r["rank"]): {"total": r["total"] / original["total"],
                                          "step_peak": r["step_peak"] / original["step_peak"]} for r in results[1:]}}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
