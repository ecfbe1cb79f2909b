"""hfptq: post-training quantization for Hugging Face Transformers.

Importing ``hfptq`` registers the ``"hfptq"`` quantization method with Transformers::

    import hfptq
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=hfptq.HfPtqConfig())
    print(hfptq.summary(model))
"""
from .api import get_plan, quantize_model, summary
from .checkpoint import mark_quantized, verify_checkpoint
from .config import HfPtqConfig
from .errors import (
    CalibrationError,
    CheckpointError,
    ConfigError,
    ConfigTypeError,
    DataError,
    HfPtqError,
    PlanError,
    RecipeError,
)
from .plan import Plan, resolve_plan
from .export import export_compressed_tensors
from .offload import quantize_offloaded
from .quantizer import HfPtqQuantizer, register

__version__ = "0.1.0"

register()

__all__ = [
    "HfPtqConfig",
    "HfPtqQuantizer",
    "Plan",
    "quantize_model",
    "quantize_offloaded",
    "resolve_plan",
    "get_plan",
    "summary",
    "mark_quantized",
    "verify_checkpoint",
    "export_compressed_tensors",
    "HfPtqError",
    "ConfigError",
    "ConfigTypeError",
    "PlanError",
    "CalibrationError",
    "DataError",
    "CheckpointError",
    "RecipeError",
    "__version__",
]
