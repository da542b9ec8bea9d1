"""bcosify: turn pretrained image classifiers into exact, explainable B-cos networks.

The pipeline, one room each: ``nn`` (layers), ``surgery`` (the engine and its rules), ``training``
(fine-tuning and recipes), ``explanation`` (explanations, pictures, GridPG, checks), ``export`` (save/load,
ONNX); ``weights`` (original models and foreign checkpoints in) and ``data`` (datasets, images,
normalization constants).
"""

__version__ = "0.1.0"

from .config import BcosConfig  # noqa: E402
from .conversion import convert  # noqa: E402
from .errors import BcosifyError, CheckpointError, ConversionError  # noqa: E402
from .explanation import Attribution, Explanation, explain  # noqa: E402
from .export import export_onnx, load, save  # noqa: E402
from .model import BcosModel  # noqa: E402
from .surgery.support import SupportedModel, list_supported  # noqa: E402
from .training import FinetuneConfig, History, calibrate, finetune  # noqa: E402
from ._deprecated import install as _install_moved_modules  # noqa: E402

_install_moved_modules()

__all__ = ["Attribution", "BcosConfig", "BcosModel", "BcosifyError", "CheckpointError", "ConversionError",
           "Explanation", "FinetuneConfig", "History", "SupportedModel", "__version__", "calibrate", "convert",
           "explain", "export_onnx", "finetune", "list_supported", "load", "save"]
