"""optimum-superweight: low-bit quantization that keeps a model's super weights bit-exact.

Importing the package registers the ``"superweight"`` quantization method with transformers, so that
``from_pretrained`` can both quantize (``quantization_config=SuperWeightConfig(...)``) and reload a
compressed checkpoint with a plain call.
"""

from .config import SuperWeightConfig
from .default_model import default_model_path
from .detection import DetectionReport, detect_super_weights
from .errors import SuperWeightError, SuperWeightHubError, SuperWeightRepoNotFoundError
from .hub import attach_card_hook, build_model_card, known_super_weights, push_to_hub, read_super_weights
from .kernels import kernel_summary, prepare_kernels, set_float32_policy
from .ablation import AblationReport, ablate
from .evaluation import PerplexityResult, builtin_text, load_text, perplexity
from .models import SuperWeightQuantizer, dequantize_model, quantize_model, register
from .nn.linear import SuperWeightLinear
from .records import SuperWeight

__version__ = "0.1.0"

register()

__all__ = [
    "SuperWeight",
    "SuperWeightConfig",
    "SuperWeightError",
    "SuperWeightHubError",
    "SuperWeightRepoNotFoundError",
    "SuperWeightLinear",
    "SuperWeightQuantizer",
    "default_model_path",
    "quantize_model",
    "dequantize_model",
    "perplexity",
    "ablate",
    "AblationReport",
    "PerplexityResult",
    "builtin_text",
    "load_text",
    "build_model_card",
    "read_super_weights",
    "known_super_weights",
    "push_to_hub",
    "attach_card_hook",
    "detect_super_weights",
    "DetectionReport",
    "prepare_kernels",
    "kernel_summary",
    "set_float32_policy",
]
