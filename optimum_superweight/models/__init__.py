"""Framework glue: the transformers quantizer and model-level module replacement."""

from .quantizer import SuperWeightQuantizer, register
from .replace import dequantize_model, quantize_model

__all__ = ["SuperWeightQuantizer", "register", "quantize_model", "dequantize_model"]
