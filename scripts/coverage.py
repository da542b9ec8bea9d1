"""Coverage of the timm registry and torchvision's classifiers: which architectures convert exactly.

For one model per timm architecture module (the smallest by parameter count) and every torchvision
classification builder: build it randomly initialised in float64 (random BatchNorm statistics), run
``bcosify.convert(model, verify=True)`` (equivalence at b=1 with biases, completeness at b=2, on a small random
input) and record: exact / refused (the first reason) / crashed (the exception) / too big. Writes a JSON file
and, with ``--write README.md``, the table between the README's coverage markers.

    python scripts/coverage.py --json benchmarks/results/coverage.json --write README.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import pathlib
import re
import signal
import subprocess
import sys
import time
import warnings

import torch
from readme_block import write_block
from torch import nn

# this checkout's bcosify (the model subprocesses run this file too), not one installed elsewhere
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import bcosify  # noqa: E402
from bcosify.surgery.support import randomised  # noqa: E402

START, END = "<!-- coverage-table:start -->", "<!-- coverage-table:end -->"
MAX_PARAMS = 150e6


class _Timeout(BaseException):  # not an Exception: code under test must not swallow it
    pass


@contextlib.contextmanager
def _time_limit(seconds: int):
    def expire(signum, frame):
        raise _Timeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _param_count(build) -> float:
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def timm_candidates() -> list[tuple[str, str, float]]:
    """(architecture module, model name, parameters) of the smallest model of every timm architecture module."""
    import timm

    out = []
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        if not names:
            continue
        counted = []
        for name in names:
            try:
                counted.append((_param_count(lambda: timm.create_model(name, num_classes=10)), name))
            except Exception:  # noqa: BLE001 - models that cannot be built on the meta device are counted last
                counted.append((float("inf"), name))
        params, name = min(counted)
        out.append((module, name, params))
    return out


def torchvision_candidates() -> list[tuple[str, str, float]]:
    import torchvision.models as tvm

    out = []
    for name in tvm.list_models(module=tvm):
        try:
            params = _param_count(lambda: tvm.get_model(name, num_classes=10))
        except Exception:  # noqa: BLE001
            params = float("inf")
        out.append((tvm.get_model_builder(name).__module__.rsplit(".", 1)[-1], name, params))
    return out


def _build(source: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    if source == "timm":
        import timm

        try:  # transformers built for a small image where the constructor allows it and the model then runs
            model = timm.create_model(name, num_classes=10, img_size=64)
            with torch.no_grad():
                model.eval()(torch.rand(1, model.pretrained_cfg.get("input_size", (3,))[0], 64, 64))
            return model
        except Exception:  # noqa: BLE001
            return timm.create_model(name, num_classes=10)
    import torchvision.models as tvm

    kwargs = {"num_classes": 10}
    if name.startswith(("googlenet", "inception")):
        kwargs["aux_logits"], kwargs["init_weights"] = False, False
        kwargs["transform_input"] = True  # as built for torchvision's weights
    return tvm.get_model(name, **kwargs)


def check(source: str, name: str, params: float, limit: int) -> dict:
    row = {"library": source, "model": name, "params_m": round(params / 1e6, 2) if params != float("inf") else None}
    if params > MAX_PARAMS and params != float("inf"):
        return {**row, "status": "too big", "reason": f"{params / 1e6:.0f}M parameters (limit {MAX_PARAMS / 1e6:.0f}M)"}
    start = time.perf_counter()
    try:
        with _time_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = randomised(_build(source, name).double().eval())
            bmodel = bcosify.convert(model, verify=True)
        (entry,) = bmodel.report.by_action("verified")
        numbers = dict(re.findall(r"(equivalence|completeness) ([0-9.e+-]+)", entry.note))
        degenerate = "not informative" in entry.note
        row.update(status="exact (degenerate logits)" if degenerate else "exact",
                   equivalence=float(numbers["equivalence"]), completeness=float(numbers["completeness"]),
                   read=len(bmodel.report.by_action("read")))
    except bcosify.ConversionError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.startswith("  ")] or [str(error)]
        row.update(status="refused", reason=lines[0][:300], refused_modules=len(lines))
    except _Timeout as error:
        row.update(status="timeout", reason=str(error))
    except Exception as error:  # noqa: BLE001 - a crash is a finding, recorded as such
        row.update(status="crashed", reason=f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def check_in_subprocess(source: str, name: str, params: float, limit: int, threads: int) -> dict:
    """:func:`check` in a fresh interpreter (nothing a timeout interrupts can leak into the next model)."""
    command = [sys.executable, __file__, "--one", source, name, repr(params), "--limit", str(limit),
               "--threads", str(threads)]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit + 60)
    except subprocess.TimeoutExpired:
        return {"library": source, "model": name, "status": "timeout", "reason": f"over {limit + 60} s",
                "seconds": round(time.perf_counter() - start, 1)}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"library": source, "model": name, "status": "crashed",
                "reason": f"the subprocess exited with {done.returncode}: {tail}",
                "seconds": round(time.perf_counter() - start, 1)}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    counts = collections.Counter((r["library"], r["status"]) for r in rows)
    lines = []
    for library in ("timm", "torchvision"):
        mine = {status: n for (lib, status), n in counts.items() if lib == library}
        exact, degenerate = mine.get("exact", 0), mine.get("exact (degenerate logits)", 0)
        fits = sum(mine.values()) - mine.get("too big", 0)
        logits = (f"in {degenerate} of them the random-init logits at b=2 stay below 1e-20 even after calibration, so "
                  "completeness is not informative there" if degenerate else
                  "b=2 logits non-degenerate in all, calibrated by the verification where they underflow")
        lines.append(f"- {library}: {exact + degenerate} of {fits} architectures that fit this machine convert exactly "
                     f"({(exact + degenerate) / max(fits, 1):.0%}; {logits}); "
                     + ", ".join(f"{n} {status}" for status, n in sorted(mine.items()) if not status.startswith("exact")))
    lines += ["", f"<details><summary>every model ({len(rows)})</summary>", "",
              "| library | module | model | status | equivalence | completeness | reason |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        eq = f"{r['equivalence']:.0e}" if "equivalence" in r else ""
        comp = f"{r['completeness']:.0e}" if "completeness" in r else ""
        reason = (r.get("reason") or "").replace("|", "\\|")
        lines.append(f"| {r['library']} | {r['module']} | `{r['model']}` | {r['status']} | {eq} | {comp} | {reason} |")
    return "\n".join(lines + ["", "</details>"])


def _cached_candidates(path: pathlib.Path) -> list[tuple[str, str, str, float]]:
    """The sweep's models, counted once per timm/torchvision version (building 1,400 models on the meta device
    takes minutes) and kept in ``path``."""
    import timm
    import torchvision

    versions = {"timm": timm.__version__, "torchvision": torchvision.__version__}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("versions") == versions:
            return [tuple(c) for c in cached["candidates"]]
    candidates = [("timm", *c) for c in timm_candidates()] + [("torchvision", *c) for c in torchvision_candidates()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"versions": versions, "candidates": candidates}, indent=1))
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, default=pathlib.Path("benchmarks/results/coverage.json"))
    parser.add_argument("--write", type=pathlib.Path, help="README to update between the coverage markers")
    parser.add_argument("--limit", type=int, default=120, help="seconds per model")
    parser.add_argument("--only", help="regular expression on model names (re-measure these, keep the other rows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("LIBRARY", "MODEL", "PARAMS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:  # the subprocess: one model, one JSON line
        source, name, params = args.one
        print(json.dumps(check(source, name, float(params), args.limit)))
        return
    candidates = _cached_candidates(args.json.with_name("coverage_candidates.json"))
    previous = json.loads(args.json.read_text()) if args.only and args.json.is_file() else {"rows": []}
    if args.only:
        candidates = [c for c in candidates if re.search(args.only, c[2])]
    measured: dict[tuple[str, str], dict] = {}

    def rows() -> list[dict]:  # the previous rows, re-measured ones replaced in place, then the new ones
        again = dict(measured)
        return [again.pop((r["library"], r["model"]), r) for r in previous["rows"]] + list(again.values())

    for i, (source, module, name, params) in enumerate(candidates, 1):
        row = {"module": module, **check_in_subprocess(source, name, params, args.limit, args.threads)}
        measured[(source, name)] = row
        print(f"[{i}/{len(candidates)}] {source}:{name} {row['status']} {row.get('reason', '')[:120]} "
              f"({row.get('seconds', 0)} s)", flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)  # written after every model: a long sweep keeps its part
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows(),
                                         **({"note": previous["note"]} if "note" in previous else {})}, indent=1))
    if args.write:
        write_block(args.write, START, END, table(rows()))


if __name__ == "__main__":
    sys.exit(main())
