"""Cost of a B-cos network relative to the model it was converted from.

The original and the converted model (``bcosify.convert(model)``, b=2) are measured **alternately in one
process** (A B B A A B ...), so that load from other processes on a shared machine hits both alike; every
ratio is the ratio of the two medians. Printed too, as an honest measure of the noise: the paired
per-repetition ratios (min - max), the ratio of the fastest repetitions (min/min) and the ratio of the
median process CPU times (cpu-time).

    python benchmarks/overhead.py                       # torchvision ResNet-50, batch 8, 224 px, 2 CPU threads
    python benchmarks/overhead.py --device cuda         # on a GPU (peak memory from torch.cuda)
    python benchmarks/overhead.py --model timm:resnet18 --no-compile --json out.json

What is measured (per model):

* ``eager forward``: eval mode, ``torch.no_grad()``, one forward pass.
* ``eager fwd+bwd``: train mode, forward, cross-entropy, backward (``zero_grad(set_to_none=True)`` first).
* ``compiled forward`` / ``compiled fwd+bwd``: the same under ``torch.compile`` (default mode); compilation
  happens in the warm-up and is not timed.
* ``peak train memory``: the peak of the bytes held by tensors allocated during one eager training step
  (parameters and inputs, which exist before the step, are not counted; gradients and activations are).
  On CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation before the step. On CPU the same
  quantity is recovered from the PyTorch profiler (``profile_memory=True``): every allocation and free of
  the CPU allocator is recorded with its size, and the peak of their running sum is taken. This counts
  tensor storage exactly (including oneDNN buffers allocated through PyTorch's allocator) and ignores the
  malloc/RSS behaviour of the process, which on CPU mostly measures glibc's caching rather than the model.

The original model sees normalised images (normalisation is done outside the timed region); the converted
model sees raw images in [0, 1] and its timed forward includes its own input check and ``[x, 1-x]``
encoding.

Also printed: ``conversion time`` of ``bcosify.convert`` on a freshly built model (median of 3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bcosify  # noqa: E402
from bcosify.data import normalize  # noqa: E402
from bcosify.weights import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def _forward_fn(model, x):
    def run():
        with torch.no_grad():
            model(x)
    return run


def _train_fn(model, x, y, params):
    def run():
        for p in params:
            p.grad = None
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    return run


def _alternate(name: str, fns: dict, device: torch.device, warmup: int, repeats: int, verbose: bool) -> dict:
    """Time ``fns['original']`` and ``fns['bcos']`` alternately; order flips every repetition."""
    keys = ["original", "bcos"]
    for i in range(warmup):
        for key in (keys if i % 2 == 0 else keys[::-1]):
            t, _ = _timed(fns[key], device)
            if verbose:
                print(f"  [{name}] warm-up {i} {key}: {t * 1e3:.0f} ms", flush=True)
    times = {key: [] for key in keys}
    cpu = {key: [] for key in keys}
    for i in range(repeats):
        for key in (keys if i % 2 == 0 else keys[::-1]):
            t, c = _timed(fns[key], device)
            times[key].append(t)
            cpu[key].append(c)
            if verbose:
                print(f"  [{name}] {i} {key}: {t * 1e3:.0f} ms (cpu {c * 1e3:.0f} ms)", flush=True)
    med = {key: statistics.median(v) for key, v in times.items()}
    med_cpu = {key: statistics.median(v) for key, v in cpu.items()}
    paired = [b / o for o, b in zip(times["original"], times["bcos"])]
    return {
        "original_ms": med["original"] * 1e3,
        "bcos_ms": med["bcos"] * 1e3,
        "ratio": med["bcos"] / med["original"],
        "paired_ratio_min": min(paired),
        "paired_ratio_max": max(paired),
        "cpu_ratio": med_cpu["bcos"] / med_cpu["original"] if med_cpu["original"] > 0 else None,
        "min_ratio": min(times["bcos"]) / min(times["original"]),
        "original_all_ms": [t * 1e3 for t in times["original"]],
        "bcos_all_ms": [t * 1e3 for t in times["bcos"]],
    }


def _peak_train_memory(step, params, device: torch.device) -> int:
    """Peak bytes allocated (above what existed before) during one training step."""
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        ev = stack.pop()
        if ev.tag == _EventType.Allocation and ev.extra_fields.device.type == "cpu":
            events.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        stack.extend(ev.children)
    events.sort()
    total = peak = 0
    for _, size in events:
        total += size
        peak = max(peak, total)
    return peak


def _conversion_time(spec: str, repeats: int = 3, threads: int | None = None) -> float:
    """Median seconds of ``bcosify.convert`` on a freshly built model (optionally with ``threads`` threads)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(repeats):
            model = build_model(spec, weights=None)
            start = time.perf_counter()
            bcosify.convert(model)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="torchvision:resnet50", help="timm:NAME or torchvision:NAME")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per model (>= 5 recommended)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    parser.add_argument("--b", type=float, default=2.0)
    parser.add_argument("--channels-last", action="store_true", help="models and inputs in channels-last")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-conversion", action="store_true", help="skip the conversion-time line")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of: forward,train,compiled_forward,compiled_train")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = build_model(args.model, weights=None).to(device)
    bmodel = bcosify.convert(original, b=args.b).to(device)
    x = torch.rand(args.batch, bmodel.in_chans, args.size, args.size, device=device)
    x_norm = normalize(x, bmodel.config.mean, bmodel.config.std)
    y = torch.randint(0, bmodel.num_classes, (args.batch,), device=device)
    if args.channels_last:
        original = original.to(memory_format=torch.channels_last)
        bmodel = bmodel.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        x_norm = x_norm.contiguous(memory_format=torch.channels_last)
    models = {"original": original, "bcos": bmodel}
    inputs = {"original": x_norm, "bcos": x}
    params = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}

    info = {
        "model": args.model, "batch": args.batch, "size": args.size, "b": args.b, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "channels_last": args.channels_last,
        "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    print(" ".join(f"{k}={v}" for k, v in info.items() if v is not None), flush=True)
    only = set(args.only.split(",")) if args.only else None
    results: dict = {"info": info, "timings": {}}

    def want(name):
        return only is None or name in only

    def run_phase(name, fns):
        r = _alternate(name, fns, device, args.warmup, args.repeats, args.verbose)
        results["timings"][name] = r
        print(f"{name:<18} original {r['original_ms']:8.1f} ms   bcos {r['bcos_ms']:8.1f} ms   ratio {r['ratio']:.3f}"
              f"   (paired {r['paired_ratio_min']:.3f}-{r['paired_ratio_max']:.3f}; min/min {r['min_ratio']:.3f};"
              f" cpu-time {r['cpu_ratio']:.3f})",
              flush=True)

    if want("forward"):
        for m in models.values():
            m.eval()
        run_phase("eager forward", {k: _forward_fn(m, inputs[k]) for k, m in models.items()})
    if want("train"):
        for m in models.values():
            m.train()
        run_phase("eager fwd+bwd", {k: _train_fn(m, inputs[k], y, params[k]) for k, m in models.items()})
    if not args.no_memory:
        for m in models.values():
            m.train()
        mem = {}
        for k, m in models.items():
            step = _train_fn(m, inputs[k], y, params[k])
            step()  # warm (lazy allocations, oneDNN primitives)
            mem[k] = _peak_train_memory(step, params[k], device)
        ratio = mem["bcos"] / mem["original"]
        results["memory"] = {"original_bytes": mem["original"], "bcos_bytes": mem["bcos"], "ratio": ratio}
        print(f"{'peak train memory':<18} original {mem['original'] / 2**20:8.1f} MiB  bcos {mem['bcos'] / 2**20:8.1f} MiB"
              f"  ratio {ratio:.3f}", flush=True)
    if not args.no_compile:
        compiled = {k: torch.compile(m) for k, m in models.items()}
        if want("compiled_forward"):
            for m in models.values():
                m.eval()
            run_phase("compiled forward", {k: _forward_fn(c, inputs[k]) for k, c in compiled.items()})
        if want("compiled_train"):
            for m in models.values():
                m.train()
            run_phase("compiled fwd+bwd", {k: _train_fn(c, inputs[k], y, params[k]) for k, c in compiled.items()})
    if not args.no_conversion:
        seconds = _conversion_time(args.model)
        results["conversion_s"] = seconds
        line = f"{'conversion time':<18} {seconds:.3f} s"
        if device.type == "cpu" and torch.get_num_threads() > 1:
            # convert() runs one small forward pass and many small copies: on a busy machine each of those ops
            # can wait for a descheduled OpenMP thread, so the single-threaded time is printed as well
            single = _conversion_time(args.model, threads=1)
            results["conversion_s_1_thread"] = single
            line += f" ({torch.get_num_threads()} threads), {single:.3f} s (1 thread)"
        print(f"{line}   (bcosify.convert on a freshly built {args.model}, median of 3)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
