"""bcosify: turn pretrained image classifiers into exact, explainable B-cos networks."""

__version__ = "0.1.0"

from .config import BcosConfig  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import BcosifyError, CheckpointError, ConversionError  # noqa: E402
from .explain import Explanation, explain  # noqa: E402
from .export import export_onnx  # noqa: E402
from .model import BcosModel  # noqa: E402
from .saving import load, save  # noqa: E402
from .training import FinetuneConfig, History, finetune  # noqa: E402

__all__ = ["BcosConfig", "FinetuneConfig", "History", "finetune", "BcosModel", "BcosifyError", "CheckpointError", "ConversionError", "Explanation",
           "__version__", "convert", "explain", "export_onnx", "load", "save"]
