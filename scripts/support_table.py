"""Generate the README's supported-architecture table from the support matrix (``bcosify.list_supported()``).

Runs, for every claimed family, the same float64 checks as tests/surgery/test_families.py and writes the
measured errors between the README's support-table markers.

    python scripts/support_table.py --write README.md
    python scripts/support_table.py --write README.md --new-only   # measure only families with no row yet
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from readme_block import write_block

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers

import bcosify  # noqa: E402
from bcosify.explanation.checks import equivalence_error  # noqa: E402
from helpers import randomise_zero_weights  # noqa: E402

START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
EQUIVALENCE_BOUND, COMPLETENESS_BOUND = 1e-5, 1e-6


def measure(family) -> tuple[float, float]:
    torch.manual_seed(0)
    model = randomise_zero_weights(
        family.build(num_classes=10).double().eval())
    x = torch.rand(3, 3, family.size, family.size, dtype=torch.float64)
    equivalence = equivalence_error(model, x)
    bmodel = bcosify.calibrate(bcosify.convert(model), torch.rand(4, 3, family.size, family.size, dtype=torch.float64),
                               progress=False)
    completeness = bcosify.explain(bmodel, x).completeness_error.max().item()
    return equivalence, completeness


def _row_key(family) -> str:
    kwargs = f" ({family.kwargs_text})" if family.kwargs else ""
    return f"| {family.family} | {family.library} | `{family.name}`{kwargs} |"


def table(kept: dict[str, str] | None = None) -> str:
    """The table; ``kept``: rows measured before, by their first three cells, reused instead of measured again."""
    rows = ["| Family | Library | Model | Equivalence error (b=1, biases kept) | Completeness error (b=2) | Status |",
            "|---|---|---|---|---|---|"]
    for family in bcosify.list_supported():
        if (kept or {}).get(_row_key(family)):
            rows.append(kept[_row_key(family)])
            continue
        eq, comp = measure(family)
        kwargs = f" ({family.kwargs_text})" if family.kwargs else ""
        ok = eq < EQUIVALENCE_BOUND and comp < COMPLETENESS_BOUND
        rows.append(f"| {family.family} | {family.library} | `{family.name}`{kwargs} | {eq:.1e} | {comp:.1e} | "
                    f"{'exact' if ok else 'FAILS'} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=pathlib.Path, help="README to update in place")
    parser.add_argument("--new-only", action="store_true", help="measure only the families the README table lacks")
    args = parser.parse_args()
    kept = {}
    if args.new_only and args.write:
        block = args.write.read_text().split(START)[1].split(END)[0]
        kept = {"|".join(line.split("|")[:4]) + "|": line for line in block.splitlines() if line.startswith("| ")}
    text = table(kept)
    if args.write:
        write_block(args.write, START, END, text)


if __name__ == "__main__":
    main()
