"""Thin Transformers adapter: ``HfQuantizer`` hooks that delegate to :mod:`hfptq.api`.

* Quantize at load (float checkpoint + ``HfPtqConfig``): the float model loads normally; after
  loading, :func:`hfptq.api.quantize_model` plans, calibrates and converts it.
* Reload (checkpoint whose ``config.json`` holds an hfptq ``quantization_config``): before
  loading, the stored plan rebuilds the quantized skeleton on the meta device and the saved
  integer tensors load into it by name; nothing is recalibrated.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import QUANT_METHOD, HfPtqConfig

_LOAD_PROGRESS: "contextvars.ContextVar[bool]" = contextvars.ContextVar("hfptq_load_progress", default=True)


@contextlib.contextmanager
def load_progress(enabled: bool) -> Iterator[None]:
    """Show (``True``, the default) or hide hfptq's progress bars while ``from_pretrained(...,
    quantization_config=HfPtqConfig(...))`` calibrates and converts inside the ``with`` block
    (Transformers' own loading bar is :func:`transformers.utils.logging.disable_progress_bar`'s).

    Example:
        >>> with load_progress(False):                                                        # doctest: +SKIP
        ...     model = AutoModelForCausalLM.from_pretrained(path, quantization_config=HfPtqConfig())
    """
    token = _LOAD_PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _LOAD_PROGRESS.reset(token)


class HfPtqQuantizer(HfQuantizer):
    """Transformers quantizer for ``quant_method="hfptq"``."""

    requires_calibration = False
    required_packages = ["torch"]

    def __init__(self, quantization_config: HfPtqConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._dtype: Optional[torch.dtype] = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        from .offload import check_device_map

        # called again with the resolved device_map before any weight is read (issue 21)
        check_device_map(kwargs.get("device_map"), pre_quantized=self.pre_quantized,
                         streaming=getattr(self, "_hfptq_stream", None) is not None)

    def update_dtype(self, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
        self._dtype = dtype
        return dtype

    def update_attn_implementation(self, config):
        """Before the model is built (and before Transformers reads the files): undo the checkpoint's load
        guard and check the local files it would otherwise fail on with a bare error."""
        if self.pre_quantized:
            from .checkpoint import clear_load_guard, early_checks

            early_checks(config)
            clear_load_guard(config)
        return config

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        # quantize-while-loading (hfptq.offload): planned float weights go through get_quantize_ops
        stream = getattr(self, "_hfptq_stream", None)
        return stream is not None and param_name in stream.entries

    def get_quantize_ops(self):
        from .offload import QuantizeOnLoad

        return QuantizeOnLoad(self._hfptq_stream)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs: Any) -> None:
        if not self.pre_quantized:
            from .offload import prepare_streaming

            self._hfptq_stream = prepare_streaming(model, self.quantization_config, self._dtype,
                                                   kwargs.get("device_map"))
            return
        from .checkpoint import prepare_reload

        # checkpoint_files: the safetensors about to be read; their headers are checked against the plan
        prepare_reload(model, self.quantization_config, dtype=self._dtype, checkpoint_files=checkpoint_files)

    def _process_model_after_weight_loading(self, model, **kwargs: Any) -> None:
        from .checkpoint import finish_reload, mark_quantized

        if self.pre_quantized:
            finish_reload(model, self.quantization_config)
            return
        stream = getattr(self, "_hfptq_stream", None)
        if stream is not None:
            from .offload import finish_streaming

            self._hfptq_stream = None
            finish_streaming(model, stream)
            return
        from .offload import is_offloaded, quantize_offloaded

        if is_offloaded(model):  # a device_map with "disk" (or CPU offload): one decoder layer in memory at a time
            quantize_offloaded(model, self.quantization_config, progress=_LOAD_PROGRESS.get())
        else:
            from .api import quantize_model

            quantize_model(model, self.quantization_config, progress=_LOAD_PROGRESS.get())
        mark_quantized(model, self.quantization_config)

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    def get_state_dict_and_metadata(self, model):
        """Tensors + safetensors metadata for ``save_pretrained`` (see :mod:`hfptq.checkpoint`)."""
        from .checkpoint import state_dict_for_save

        return state_dict_for_save(model)

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """``torch.compile`` traces hfptq's modules (their reference formulas under Dynamo) and matches eager
        within float rounding; lets ``generate`` compile with a static cache (see the README, *Speed*)."""
        return True

    def _dequantize(self, model, dtype=None):
        from .checkpoint import dequantize_model

        return dequantize_model(model, dtype)


def register() -> None:
    """Register the config and quantizer with Transformers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is None:
        register_quantization_config(QUANT_METHOD)(HfPtqConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is None:
        register_quantizer(QUANT_METHOD)(HfPtqQuantizer)
