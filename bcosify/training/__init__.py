"""Fine-tuning: the options (``FinetuneConfig``), the loop (``finetune``), its resume state, recipes, and the
label-free calibration right after conversion (``calibrate``)."""

from .calibration import calibrate
from .config import FinetuneConfig, History
from .loop import TrainingDivergedError, compute_loss, evaluate, finetune, resolve_device, train_original
from .recipes import Recipe, list_recipes, load_recipe
from .state import latest_checkpoint

__all__ = ["FinetuneConfig", "History", "Recipe", "TrainingDivergedError", "calibrate", "compute_loss", "evaluate",
           "finetune", "latest_checkpoint", "list_recipes", "load_recipe", "resolve_device", "train_original"]
