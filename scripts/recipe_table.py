"""Generate the README's table of shipped fine-tuning recipes (what each one sets) from their YAML files.

    python scripts/recipe_table.py --write README.md
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from readme_block import write_block  # noqa: E402

from bcosify.training import FinetuneConfig, list_recipes, load_recipe  # noqa: E402
from bcosify.training.data import DataConfig  # noqa: E402

START, END = "<!-- recipe-table:start -->", "<!-- recipe-table:end -->"
HEADER = ("| recipe | model | data | global batch | optimiser, lr | schedule | epochs | loss, b | other |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _number(value: float) -> str:
    """``1e-4`` for small values, ``0.05`` and ``2`` otherwise."""
    return f"{value:.0e}".replace("e-0", "e-") if 0 < abs(value) < 0.01 else f"{value:g}"


def row(name: str) -> str:
    """The table row of one shipped recipe (defaults filled in from ``DataConfig`` and ``FinetuneConfig``)."""
    recipe = load_recipe(name)
    data, ft = DataConfig.from_dict(recipe.data), FinetuneConfig.from_dict(recipe.finetune)
    library, _, arch = recipe.model.partition(":")
    kwargs = recipe.model_kwargs
    extra = [f"{kwargs['in_chans']} channel{'s' * (kwargs['in_chans'] != 1)}" if "in_chans" in kwargs else None,
             f"{kwargs['num_classes']} classes" if "num_classes" in kwargs else None]
    model = f"{library} `{arch}`" + (f" ({', '.join(e for e in extra if e)})" if any(extra) else "")
    source = {"fashion-mnist": "Fashion-MNIST", "image-folder": "ImageFolder"}[data.dataset]
    data_text = f"{source} at {data.size} px" + (f", first {data.limit} images" if data.limit else "")
    if data.auto_augment:
        data_text += f", `{data.auto_augment}`"
    optimiser = {"adam": "Adam", "adamw": "AdamW"}[ft.optimizer] + f" {_number(ft.lr)}"
    if ft.weight_decay:
        optimiser += f", wd {_number(ft.weight_decay)}"
    schedule = (f"{ft.warmup_steps} warm-up steps, " if ft.warmup_steps else "") + ft.schedule
    loss = {"bce": "BCE", "bce_uniform": "BCE (uniform off-labels)", "ce": "CE", "distill": "distillation",
            "align": "feature alignment"}[ft.loss]
    b = _number(ft.b if ft.b is not None else recipe.convert.get("b", 2.0))
    other = [f"AGC {_number(ft.agc_clip)}" if ft.agc_clip is not None else "no AGC"]
    other += [f"{label} {_number(value)}" for label, value in (
        ("mixup", ft.mixup_alpha), ("CutMix", ft.cutmix_alpha), ("label smoothing", ft.label_smoothing),
        ("grad accumulation", ft.grad_accum if ft.grad_accum > 1 else 0)) if value]
    if recipe.calibrate_images:
        other.append(f"calibrated on {recipe.calibrate_images} training images")
    if recipe.original:
        other.append(f"trains the original first ({recipe.original.get('epochs', 1)} epochs): the demo")
    return (f"| `{name}` | {model} | {data_text} | {data.batch_size} | {optimiser} | {schedule} | {ft.epochs} | "
            f"{loss}, b={b} {ft.b_schedule} | {'; '.join(other)} |")


def table() -> str:
    """The whole markdown table, one row per shipped recipe."""
    return "\n".join([HEADER, *(row(name) for name in list_recipes())])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=pathlib.Path, help="README to update in place (default: print the table)")
    args = parser.parse_args()
    if args.write:
        write_block(args.write, START, END, table())
    else:
        print(table())
