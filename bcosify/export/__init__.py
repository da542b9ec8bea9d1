"""Export: our folder format (``save``/``load``: safetensors + JSON config + model card) and ONNX."""

from .folder import load, model_card, read_config, save
from .onnx import export_onnx

__all__ = ["export_onnx", "load", "model_card", "read_config", "save"]
