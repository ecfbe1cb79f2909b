"""Models larger than memory: quantize while loading, and device maps that cannot work.

Quantize while loading
----------------------
``from_pretrained(path, quantization_config=HfPtqConfig(...))`` with a plan that needs no
calibration (dynamic or weight-only activations, no SmoothQuant/GPTQ, no Hadamard rotation, no
quantized or tied embedding) never materialises the float model: before the weights load, the
planned modules are swapped for empty quantized ones on the meta device, and Transformers hands
each planned float weight, as it is read from the checkpoint, to :class:`QuantizeOnLoad`, which
returns the integer tensors and scales (or the FP16 copy of a 16-bit module). The result is
bit-identical to quantizing the loaded float model (:func:`hfptq.quantize_model`): the same
``QuantLinear.from_float`` runs on the same tensor.

Memory: Transformers memory-maps every safetensors shard for the whole load. Pages of a mapped
file count in the process's resident set (``RssFile``) until they are unmapped, so reading a
checkpoint through would leave all of it resident. After a weight is quantized, its pages are
handed back to the kernel (``madvise(MADV_DONTNEED)``; the file is read-only, so touching them
again just reads the file again). Peak memory is then about the quantized model plus one float
tensor and its quantization temporaries.

Other plans (calibration, rotation, quantized embeddings, GPT-2 ``Conv1D``) load the float model
first and quantize after loading, as before; set ``HFPTQ_QUANTIZE_WHILE_LOADING=0`` to force that
path.

Device maps
-----------
Quantizing at load with a ``device_map`` that offloads to ``"disk"`` (or leaves weights on
``"meta"``) is refused with :class:`OffloadError` before any weight is read: the float weights
of offloaded modules are not in memory when hfptq quantizes, so the integer weights would stay
on the meta device. Quantize without offloading (quantize-while-loading needs about the
quantized size), ``save_pretrained`` the result, and load *that* with any ``device_map``:
reloading an hfptq checkpoint with disk offload works.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from .config import HfPtqConfig
from .errors import ConfigError
from .plan import ModuleSpec, Plan

logger = logging.getLogger(__name__)

#: Environment variable: ``0`` forces load-then-quantize even where quantize-while-loading applies.
ENV_SWITCH = "HFPTQ_QUANTIZE_WHILE_LOADING"
_OFFLOAD_DEVICES = ("disk", "meta")
_MADV_DONTNEED = 4  # linux/mman-common.h


class OffloadError(ConfigError):
    """A ``device_map`` hfptq cannot quantize into (disk or meta offload during quantize-at-load)."""


# ------------------------------------------------------------------------------------------------
# Device maps
# ------------------------------------------------------------------------------------------------


def check_device_map(device_map: Any, *, pre_quantized: bool) -> None:
    """Refuse a resolved ``device_map`` that offloads weights while hfptq quantizes at load.

    Reloading a saved hfptq checkpoint (``pre_quantized``) with disk offload is allowed: the
    integer tensors load by name and accelerate's hooks bring offloaded ones in at run time.

    Raises:
        OffloadError: ``device_map`` sends modules to ``"disk"`` or ``"meta"`` and the model is
            quantized while loading.

    Example:
        >>> check_device_map({"": "cpu"}, pre_quantized=False)
        >>> check_device_map({"model.layers.1": "disk"}, pre_quantized=True)
    """
    if pre_quantized or not isinstance(device_map, Mapping):
        return
    offloaded = [name or "<whole model>" for name, device in device_map.items() if str(device) in _OFFLOAD_DEVICES]
    if not offloaded:
        return
    devices = sorted({str(device_map[n if n != "<whole model>" else ""]) for n in offloaded})
    raise OffloadError(
        f"device_map offloads {len(offloaded)} module(s) to {'/'.join(devices)} ({', '.join(offloaded[:3])}"
        f"{', ...' if len(offloaded) > 3 else ''}) while hfptq quantizes at load: offloaded float weights are not in "
        "memory when hfptq quantizes, so their integer weights would stay on the meta device. Fix: load with "
        "device_map='cpu' (or a map without 'disk'; with max_memory, raise it or drop offload_folder) - plans without "
        "calibration quantize while loading and need about the quantized size - then save_pretrained the result and "
        "load that checkpoint with your offloading device_map (reloading an hfptq checkpoint with disk offload works).",
        key="device_map",
    )


# ------------------------------------------------------------------------------------------------
# Quantize while loading
# ------------------------------------------------------------------------------------------------


@dataclass
class StreamState:
    """What the quantizer remembers between the hooks of one ``from_pretrained``."""

    plan: Plan
    config: HfPtqConfig
    dtype: Optional[torch.dtype]
    entries: Dict[str, ModuleSpec] = field(default_factory=dict)  # "<module>.weight" -> entry
    started: float = field(default_factory=time.perf_counter)


def streaming_blocker(config: HfPtqConfig, plan: Plan) -> Optional[str]:
    """Why ``plan`` cannot be quantized while loading (``None`` when it can).

    Example:
        >>> from hfptq.plan import Plan
        >>> streaming_blocker(HfPtqConfig(), Plan([])) is None
        True
        >>> streaming_blocker(HfPtqConfig(activations="static", calibration={"dataset": "x"}), Plan([]))
        'the plan needs calibration (static activations, SmoothQuant or GPTQ)'
    """
    from .api import needs_calibration

    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_SWITCH}=0"
    if needs_calibration(config, plan):
        return "the plan needs calibration (static activations, SmoothQuant or GPTQ)"
    for entry in plan:
        if entry.precision == "skip":
            continue
        if entry.tied_to or entry.kind == "embedding":
            return f"{entry.name}: quantized or tied embeddings are converted after loading"
        if entry.module_class != "Linear" and entry.module_class is not None:
            return f"{entry.name}: {entry.module_class} modules are converted after loading"
        if (entry.activations or {}).get("rotation"):
            return f"{entry.name}: Hadamard rotation is folded after loading"
        if (entry.weights or {}).get("observer") not in (None, "minmax"):
            return f"{entry.name}: weight observer {entry.weights['observer']!r} runs after loading"
    return None


def prepare_streaming(model: nn.Module, config: HfPtqConfig, dtype: Optional[torch.dtype]) -> Optional[StreamState]:
    """Before the weights load: swap planned modules for empty quantized ones, if the plan allows.

    Returns the state the quantize op and :func:`finish_streaming` use, or ``None`` (the model is
    then loaded in float and quantized after loading).
    """
    from .checkpoint import _shield_containers_from_init
    from .convert import build_skeleton
    from .plan import resolve_plan
    from .quant.linear import QuantLinear

    plan = resolve_plan(model, config)  # on the meta model: the plan only reads names, classes and shapes
    blocker = streaming_blocker(config, plan)
    if blocker is not None:
        logger.info("hfptq: quantizing after loading (%s)", blocker)
        return None
    build_skeleton(model, plan, fake=config.mode == "fake", compute_dtype=config.compute_dtype, dtype=dtype)
    state = StreamState(plan=plan, config=config, dtype=dtype)
    for entry in plan:
        if entry.precision == "skip":
            continue
        module = model.get_submodule(entry.name)
        if isinstance(module, QuantLinear):
            # Transformers only reads checkpoint keys the model's state_dict names: a zero-size
            # placeholder keeps "<m>.weight" there (and out of device-map size estimates) until the op
            # has turned the float weight into qweight/weight_scale; finish_streaming removes it
            module.register_buffer("weight", torch.empty(0, dtype=dtype or torch.float32, device="meta"))
        state.entries[f"{entry.name}.weight"] = entry
    model.hfptq_plan = plan
    _shield_containers_from_init(model, plan)
    return state


def _release_pages(tensor: torch.Tensor) -> None:
    """Hand the pages of a tensor that lives in a memory-mapped file back to the kernel.

    Only for storage PyTorch did not allocate (a mapped checkpoint): the mapping is read-only, so
    a later access reads the file again. Only whole pages inside the tensor are released.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.untyped_storage().resizable():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
    except (OSError, AttributeError):  # no libc madvise: the pages stay until the file is unmapped
        pass


def _trim_heap() -> None:
    """Give the allocator's free memory back to the system (glibc ``malloc_trim``).

    The quantization temporaries of one weight are tens of MB; glibc serves blocks that size from
    its heap once a freed block of that size has raised its mmap threshold, and keeps them after
    they are freed, so without trimming the peak grows by a few hundred MB of free heap.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _FloatWeight:
    """The one attribute ``QuantLinear.from_float`` reads from a float module."""

    bias = None

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


try:  # Transformers >= 5
    from transformers.core_model_loading import ConversionOps as _ConversionOps
except ImportError:  # pragma: no cover - older Transformers never call get_quantize_ops
    _ConversionOps = object


#: Rows are quantized in blocks of about this many weights: quantization works in float32 with a
#: few temporaries of the block's size, so a whole LM head at once (Llama 3B: 98 M weights) would add
#: over 1 GB to the peak. Per-channel and per-group scales depend on their row only: bit-identical.
CHUNK_ELEMENTS = 1 << 23


def _quantize_rows(tensor: torch.Tensor, entry: ModuleSpec, config: HfPtqConfig) -> Dict[str, torch.Tensor]:
    """``QuantLinear.from_float`` on ``tensor``, block of rows by block of rows where that is exact."""
    from .quant.linear import QuantLinear

    def quantize(rows: torch.Tensor) -> QuantLinear:
        return QuantLinear.from_float(_FloatWeight(rows), entry.weights, entry.activations,
                                      fake=config.mode == "fake", compute_dtype=config.compute_dtype)

    weights = entry.weights or {}
    out_features, in_features = tensor.shape
    block = max(1, CHUNK_ELEMENTS // max(1, in_features))
    row_wise = weights.get("granularity", "channel") in ("channel", "group") and weights.get("observer") in (None, "minmax")
    if not row_wise or out_features <= block:
        return dict(quantize(tensor).named_buffers(recurse=False))
    full: Optional[Dict[str, torch.Tensor]] = None
    for start in range(0, out_features, block):
        part = dict(quantize(tensor[start:start + block]).named_buffers(recurse=False))
        if full is None:
            full = {name: torch.empty((out_features,) + tuple(b.shape[1:]), dtype=b.dtype) for name, b in part.items()}
        for name, b in part.items():
            full[name][start:start + b.shape[0]] = b
    return full


class QuantizeOnLoad(_ConversionOps):
    """Weight-conversion op: one planned float weight in, its quantized tensors out.

    Called by Transformers' loader with ``{"<m>.weight": [tensor]}``; returns
    ``{"<m>.qweight": int8/uint8, "<m>.weight_scale": fp32, ["<m>.weight_zero_point"],
    "<m>.weight": placeholder}`` for an integer module or ``{"<m>.weight": fp16 copy}`` for a
    16-bit one, then releases the float tensor's mapped pages.
    """

    def __init__(self, state: StreamState) -> None:
        self.state = state

    @torch.no_grad()
    def convert(self, input_dict: Dict[str, Any], source_patterns: Any = None, target_patterns: Any = None,
                **kwargs: Any) -> Dict[str, torch.Tensor]:
        from .convert import _FLOAT_DTYPES

        out: Dict[str, torch.Tensor] = {}
        for key, value in input_dict.items():
            tensor = value[0] if isinstance(value, (list, tuple)) else value
            entry = self.state.entries.get(key)
            if entry is None:  # not ours (cannot happen with param_needs_quantization): pass through
                out[key] = tensor
                continue
            prefix = key[: -len(".weight")]
            config = self.state.config
            if entry.quantized:
                for name, buffer in _quantize_rows(tensor, entry, config).items():
                    out[f"{prefix}.{name}"] = buffer
                out[key] = torch.empty(0, dtype=tensor.dtype)  # the placeholder, dropped after loading
            else:
                out[key] = tensor.to(_FLOAT_DTYPES[entry.precision], copy=True).contiguous()
            _release_pages(tensor)
        _trim_heap()
        return out

    @property
    def reverse_op(self):  # pragma: no cover - the quantized model is saved by hfptq's own hooks
        raise NotImplementedError("hfptq saves quantized tensors under their own names")


def finish_streaming(model: nn.Module, state: StreamState) -> nn.Module:
    """After the weights load: drop the placeholders, check nothing stayed on meta, mark the model quantized."""
    from .api import _entry_bytes, attach_plan, model_bytes, release_checkpoint_mapping
    from .checkpoint import mark_quantized
    from .errors import CheckpointError
    from .quant.linear import QuantLinear

    float_bytes = 0
    unloaded = []
    for entry in state.plan:
        if entry.precision == "skip":
            continue
        module = model.get_submodule(entry.name)
        if isinstance(module, QuantLinear):
            module._buffers.pop("weight", None)
        if any(t.device.type == "meta" for t in list(module.parameters()) + list(module.buffers())):
            unloaded.append(entry.name)
        n = entry.in_features * entry.out_features + (entry.out_features if entry.has_bias else 0)
        float_bytes += n * torch.finfo(state.dtype or torch.float32).bits // 8 - _entry_bytes(model, entry.name)
    if unloaded:
        raise CheckpointError(
            f"{len(unloaded)} planned module(s) got no weight from the checkpoint and stay on the meta device "
            f"({', '.join(unloaded[:3])}): the checkpoint lacks their '.weight' tensors; check that it matches the model "
            "config (or set HFPTQ_QUANTIZE_WHILE_LOADING=0 to load in float first and see Transformers' report).",
            key="checkpoint")
    release_checkpoint_mapping(model, release=_release_pages)  # each mapped tensor's pages handed back after its copy
    config = state.config
    config.plan = state.plan.to_dict()
    attach_plan(model, state.plan)
    mark_quantized(model, config, state.plan)
    model.hfptq_bytes_before = model_bytes(model) + float_bytes
    model.hfptq_calibration = None
    model.hfptq_seconds = time.perf_counter() - state.started
    model.hfptq_streamed = True
    logger.info("hfptq: quantized while loading: %s", state.plan.summary())
    return model
