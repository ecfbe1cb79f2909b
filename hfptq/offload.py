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

Models larger than memory (offloading device maps)
---------------------------------------------------
``from_pretrained(path, quantization_config=..., device_map=<map with "disk" entries> or
device_map="auto" + max_memory, offload_folder=...)`` loads the float model offloaded by
accelerate and :func:`quantize_offloaded` quantizes it one decoder layer at a time: each layer's
weights are brought into memory (:func:`materialize`, what accelerate's hook loads before a
forward), calibrated by the sequential engine (static activations, SmoothQuant, GPTQ), quantized,
and its float weights dropped; the modules after the layers (final norm, LM head) follow. The
quantized model ends up wholly in memory on the CPU, without offload hooks. Peak memory ≈ the
quantized model + one float layer (and its working copy when SmoothQuant/GPTQ rewrite it) + the
calibration's hidden-state cache; it is estimated and printed before any weight is loaded. The
tensors are those of :func:`hfptq.quantize_model` on the model in memory (bit-identical).
``hfptq.quantize_offloaded(model, config)`` does the same for a model dispatched by hand
(``accelerate.disk_offload`` / ``dispatch_model``).

Refused with :class:`OffloadError` (before any weight is read where possible): ``"meta"`` entries
in the map; Hadamard-rotated plans (the rotation folds into all float weights first); and a
``device_map="auto"`` that still offloads to disk for a plan that quantizes while loading (the
map was sized with the quantized model, which then does not fit in ``max_memory``). Reloading a
saved hfptq checkpoint works with any ``device_map``.
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
from tqdm.auto import tqdm

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


def check_device_map(device_map: Any, *, pre_quantized: bool, streaming: bool = False) -> None:
    """Refuse a resolved ``device_map`` hfptq cannot quantize into, before any weight is read.

    ``"disk"`` entries work: the float model loads offloaded and :func:`quantize_offloaded`
    quantizes it layer by layer. Refused: ``"meta"`` entries (no weights at all), and a map that
    ``device_map="auto"`` sent to disk for a plan that quantizes while loading (``streaming``): the
    map was sized with the *quantized* model, so the quantized model itself does not fit the
    memory given, and hfptq keeps the quantized model in memory. Reloading a saved hfptq
    checkpoint (``pre_quantized``) works with any map.

    Raises:
        OffloadError: as above.

    Example:
        >>> check_device_map({"": "cpu"}, pre_quantized=False)
        >>> check_device_map({"model.layers.1": "disk"}, pre_quantized=False)
        >>> check_device_map({"model.layers.1": "disk"}, pre_quantized=True)
    """
    if pre_quantized or not isinstance(device_map, Mapping):
        return
    refused = _OFFLOAD_DEVICES if streaming else ("meta",)
    offloaded = [name or "<whole model>" for name, device in device_map.items() if str(device) in refused]
    if not offloaded:
        return
    modules = f"{', '.join(offloaded[:3])}{', ...' if len(offloaded) > 3 else ''}"
    if not streaming or all(str(device_map[n if n != "<whole model>" else ""]) == "meta" for n in offloaded):
        raise OffloadError(
            f"device_map sends {len(offloaded)} module(s) to 'meta' ({modules}): their weights would be loaded nowhere. "
            "Fix: send them to 'cpu' or 'disk' (with offload_folder=...); hfptq quantizes a disk-offloaded model layer by "
            "layer.", key="device_map")
    raise OffloadError(
        f"device_map='auto' offloads {len(offloaded)} module(s) to disk ({modules}) although it was sized with the "
        "quantized model: the quantized model does not fit in max_memory, and hfptq keeps the quantized model in memory. "
        "Fix: raise max_memory (or drop it) - this plan quantizes while loading and needs about the quantized size - or "
        "quantize to a smaller plan (e.g. int4 weights).", key="device_map")


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
        >>> streaming_blocker(HfPtqConfig(smoothquant={"alpha": 0.5}, calibration={"dataset": "x"}), Plan([]))
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


def prepare_streaming(model: nn.Module, config: HfPtqConfig, dtype: Optional[torch.dtype],
                      device_map: Any = None) -> Optional[StreamState]:
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
    if isinstance(device_map, Mapping) and any(str(d) == "disk" for d in device_map.values()):
        _refuse_offloaded_plan(plan)  # before any weight is read
        blocker = blocker or "the device_map offloads to disk: quantized layer by layer after loading (quantize_offloaded)"
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


# ------------------------------------------------------------------------------------------------
# Calibration and conversion over an offloaded model
# ------------------------------------------------------------------------------------------------


def _align_hooks(module: nn.Module) -> list:
    """The accelerate ``AlignDevicesHook``\\ s attached to ``module`` itself (inside a ``SequentialHook`` too)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = list(getattr(hook, "hooks", None) or [hook])
    return [h for h in hooks if type(h).__name__ == "AlignDevicesHook"]


def offloaded_module_names(model: nn.Module) -> list:
    """Modules whose weights accelerate keeps off memory (disk or CPU offload), in model order.

    Example:
        >>> offloaded_module_names(torch.nn.Linear(2, 2))
        []
    """
    return [name for name, module in model.named_modules()
            if any(h.offload and h.weights_map is not None for h in _align_hooks(module))]


def is_offloaded(model: nn.Module) -> bool:
    """True when accelerate offloads some of ``model``'s weights (they sit on the meta device between forwards).

    Example:
        >>> is_offloaded(torch.nn.Linear(2, 2))
        False
    """
    return bool(offloaded_module_names(model))


def _load_tensor(module: nn.Module, name: str, value: torch.Tensor, device: Any) -> None:
    """Put ``value`` at ``module.<name>`` as accelerate's hook does before a forward (same dtype cast)."""
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(module, name, device, value=value)


def _remove_hook(module: nn.Module) -> None:
    """accelerate's ``remove_hook_from_module``, without the reference cycle it leaves behind.

    It restores ``module.forward`` as an instance attribute bound to ``module`` itself: a cycle, so
    the module (and a float weight it holds) outlives its replacement until the garbage collector
    runs. Where that attribute is just the class's ``forward``, it is dropped instead.
    """
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(module)
    bound = module.__dict__.get("forward")
    if getattr(bound, "__self__", None) is module and getattr(bound, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]


def shared_parameters(model: nn.Module) -> list:
    """Groups of parameter names that name one shared parameter (tied weights), e.g. the embedding and LM head.

    Example:
        >>> lin = torch.nn.Linear(2, 2); seq = torch.nn.Sequential(lin, torch.nn.Linear(2, 2))
        >>> seq[1].weight = lin.weight
        >>> shared_parameters(seq)
        [['0.weight', '1.weight']]
    """
    names: Dict[int, list] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _tie_loaded(model: nn.Module, groups: list) -> None:
    """Where one name of a tied group is loaded and others are still offloaded, point those at the loaded one.

    accelerate's hooks replace an offloaded parameter by a new meta tensor after each forward, which
    unties it on the meta device; tying by name keeps the float table loaded once.
    """
    for group in groups:
        params = {name: model.get_parameter(name) for name in group}
        loaded = next((p for p in params.values() if p.device.type != "meta"), None)
        if loaded is None:
            continue
        for name, param in params.items():
            if param.device.type == "meta":
                path, _, leaf = name.rpartition(".")
                (model.get_submodule(path) if path else model)._parameters[leaf] = loaded


def materialize(module: nn.Module) -> int:
    """Bring every offloaded weight under ``module`` into memory for good and drop accelerate's hooks there.

    Exactly what the offload hook loads before a forward (the stored tensor, cast to the
    parameter's dtype), on the hook's execution device (the CPU here); afterwards ``module`` is a
    plain in-memory module. Returns the bytes loaded.

    Example:
        >>> layer = model.model.layers[5]   # dispatched with disk offload   # doctest: +SKIP
        >>> materialize(layer)                                                 # doctest: +SKIP
        1048576
    """
    from accelerate.utils.modeling import named_module_tensors

    loaded = 0
    for sub in list(module.modules()):
        for hook in _align_hooks(sub):
            if hook.offload and hook.weights_map is not None:
                device = hook.execution_device if hook.execution_device is not None else "cpu"
                for name, tensor in list(named_module_tensors(sub, include_buffers=hook.offload_buffers,
                                                              recurse=hook.place_submodules, remove_non_persistent=True)):
                    if tensor.device.type != "meta":
                        continue
                    value = hook.weights_map[name]
                    _load_tensor(sub, name, value, device)
                    loaded += value.numel() * torch.empty((), dtype=tensor.dtype).element_size()
                hook.offload = False  # detach_hook would reload the weights map into non-meta originals
        if hasattr(sub, "_hf_hook"):
            _remove_hook(sub)
    leftover = [f"{n}" for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.device.type == "meta"]
    if leftover:
        raise OffloadError(
            f"{len(leftover)} tensor(s) under this module stay on the meta device after loading its offloaded weights "
            f"({', '.join(leftover[:3])}): accelerate has no stored value for them. Fix: load the model with a device_map "
            "that sends whole decoder layers to 'disk' or 'cpu' (never 'meta').", key="device_map")
    return loaded


def _planned_bytes(entry: ModuleSpec, dtype: torch.dtype, config: HfPtqConfig) -> int:
    """Bytes of the module the plan turns ``entry`` into (built empty on the meta device)."""
    from .convert import _FLOAT_DTYPES
    from .quant.linear import FloatLinear, QuantEmbedding, QuantLinear

    if entry.precision == "skip" or entry.tied_to:
        return 0
    if entry.kind == "embedding":
        module = QuantEmbedding(entry.out_features, entry.in_features, weight_args=entry.weights, device="meta")
    elif entry.quantized:
        module = QuantLinear(entry.in_features, entry.out_features, entry.has_bias, weight_args=entry.weights,
                             act_args=entry.activations, fake=config.mode == "fake", dtype=dtype, device="meta")
    else:
        module = FloatLinear(entry.in_features, entry.out_features, entry.has_bias,
                             storage_dtype=_FLOAT_DTYPES[entry.precision], device="meta")
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@dataclass
class OffloadEstimate:
    """Peak host memory of quantizing an offloaded model, by component (bytes)."""

    quantized_model: int
    float_layer: int
    calibration: int
    float_model: int
    process: int = 0  # resident before quantizing (VmRSS): interpreter, libraries, the model's in-memory part

    @property
    def peak(self) -> int:
        """Expected peak resident memory of the process: what it held before + :attr:`total`."""
        return self.process + self.total

    @property
    def total(self) -> int:
        return self.quantized_model + self.float_layer + self.calibration

    def describe(self) -> str:
        from .utils import format_bytes

        return (f"peak ~{format_bytes(self.peak, digits=1)} ({self.peak / max(1, self.float_model):.2f}x the float "
                f"model's {format_bytes(self.float_model, digits=1)}): {format_bytes(self.process, digits=1)} resident now + "
                f"quantized model {format_bytes(self.quantized_model, digits=1)} + one float layer "
                f"{format_bytes(self.float_layer, digits=1)} + calibration {format_bytes(self.calibration, digits=1)}")

    def to_dict(self) -> Dict[str, int]:
        return {"peak_bytes": self.peak, "process_bytes": self.process, "total_bytes": self.total,
                "quantized_model_bytes": self.quantized_model,
                "float_layer_bytes": self.float_layer, "calibration_bytes": self.calibration,
                "float_model_bytes": self.float_model}


def estimate_offloaded_memory(model: nn.Module, plan: Plan, config: HfPtqConfig,
                              calibration_shape: Optional[tuple] = None) -> OffloadEstimate:
    """Estimate the peak memory of :func:`quantize_offloaded`: the quantized model (it stays in memory) + one float
    decoder layer + the calibration's own memory (:func:`hfptq.calibration.estimate_calibration_memory`).

    Example:
        >>> est = estimate_offloaded_memory(model, resolve_plan(model, cfg), cfg, (4, 128))   # doctest: +SKIP
        >>> print(est.describe())                                                               # doctest: +SKIP
        peak ~2.7 GiB (0.48x the float model's 5.6 GiB): 392.1 MiB resident now + quantized model 2.0 GiB + ...
    """
    from .architectures import find_decoder_layers
    from .calibration import _model_dtype, estimate_calibration_memory

    dtype = _model_dtype(model)
    planned = {e.name: e for e in plan if e.precision != "skip"}
    quantized = sum(_planned_bytes(e, dtype, config) for e in planned.values())
    float_bytes = 0
    seen = set()
    for name, tensor in list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        float_bytes += size
        owner = name.rpartition(".")[0]
        if owner not in planned:  # norms, a float embedding, ...: kept as they are
            quantized += size
    layers = find_decoder_layers(model)
    layer_bytes = 0
    if layers is not None:
        layer_bytes = max(sum(t.numel() * t.element_size() for t in layer.parameters()) for layer in layers[1])
    calibration = 0
    if calibration_shape is not None:
        calibration = estimate_calibration_memory(model, plan, config, int(calibration_shape[0]),
                                                  int(calibration_shape[1]), layers=layers,
                                                  sequential=layers is not None).total
    from .calibration import _read_status_bytes

    return OffloadEstimate(quantized_model=quantized, float_layer=layer_bytes, calibration=calibration,
                           float_model=float_bytes, process=_read_status_bytes("VmRSS") or 0)


def offload_blocker(plan: Plan) -> Optional[str]:
    """Why ``plan`` cannot be applied to an offloaded model (``None`` when it can).

    Example:
        >>> offload_blocker(Plan([])) is None
        True
    """
    for entry in plan:
        if entry.precision != "skip" and (entry.activations or {}).get("rotation"):
            return (f"{entry.name}: the Hadamard rotation is folded into the float weights of the whole model before "
                    "calibration")
    return None


#: Offloaded models: weights above this many elements are quantized in blocks of rows of about this size
#: (float32 temporaries of 4 MB instead of several copies of the whole weight).
OFFLOAD_BLOCK_ELEMENTS = 1 << 20


def _in_blocks(module: nn.Module, entry: ModuleSpec) -> bool:
    """Whether ``entry`` is converted block of rows by block of rows (:func:`_quant_linear_in_blocks`)."""
    from .architectures import is_quantizable_linear

    weights = entry.weights or {}
    return (entry.quantized and entry.kind != "embedding" and isinstance(module, nn.Linear)
            and is_quantizable_linear(module) and module.weight.numel() > OFFLOAD_BLOCK_ELEMENTS
            and weights.get("granularity", "channel") in ("channel", "group")
            and weights.get("observer") in (None, "minmax"))


@torch.no_grad()
def _quant_linear_in_blocks(module: nn.Module, entry: ModuleSpec, config: HfPtqConfig, weight: Optional[torch.Tensor],
                            input_qparams: Optional[tuple], weight_qparams: Optional[tuple]) -> nn.Module:
    """``QuantLinear.from_float`` with its float32 temporaries bounded by :data:`OFFLOAD_BLOCK_ELEMENTS` weights.

    ``from_float`` quantizes the whole weight at once in float32 (an LM head of 98 M weights adds
    over 1 GB of temporaries to the peak); here ``quantize_weight`` runs on blocks of rows. Channel
    and group scales depend on their own row only, so the tensors are those of ``from_float``.
    """
    from .errors import CalibrationError
    from .quant.linear import QuantLinear
    from .quant.qparams import pack_int4, quantize_weight

    w = module.weight.detach() if weight is None else weight
    out_features, in_features = w.shape
    bias = module.bias
    q = QuantLinear(in_features, out_features, bias is not None, weight_args=entry.weights, act_args=entry.activations,
                    fake=config.mode == "fake", compute_dtype=config.compute_dtype,
                    dtype=bias.dtype if bias is not None else None, device=w.device)
    block = max(1, OFFLOAD_BLOCK_ELEMENTS // max(1, in_features))
    # written straight into the module's own buffers where set_weight would store the same dtype and shape
    full: Dict[str, torch.Tensor] = {}
    own = {"qweight": q.qweight, "weight_scale": q.weight_scale, "weight_zero_point": q.weight_zero_point}
    for start in range(0, out_features, block):
        stop = min(out_features, start + block)
        scale = zp = None
        if weight_qparams is not None:
            scale, zp = weight_qparams
            scale, zp = scale[start:stop], None if zp is None else zp[start:stop]
        qb, sb, zb = quantize_weight(w[start:stop], q.weight_bits, q.weight_symmetric, q.weight_granularity,
                                     q.group_size, scale=scale, zero_point=zp)
        parts = {"qweight": pack_int4(qb) if q.weight_bits == 4 else qb, "weight_scale": sb, "weight_zero_point": zb}
        for name, part in parts.items():
            if part is None:
                continue
            if name not in full:
                shape = (out_features,) + tuple(part.shape[1:])
                mine = own.get(name)
                fits = mine is not None and tuple(mine.shape) == shape and mine.dtype == part.dtype
                full[name] = mine if fits else torch.empty(shape, dtype=part.dtype, device=part.device)
            full[name][start:stop] = part
        del qb, sb, zb, parts
    # as QuantLinear.set_weight stores them
    if full["qweight"] is not q.qweight:
        q.qweight.data = full["qweight"].to(q.qweight.device)
    if full["weight_scale"] is not q.weight_scale:
        q.weight_scale.data = full["weight_scale"].to(q.weight_scale.device)
    if "weight_zero_point" in full and full["weight_zero_point"] is not q.weight_zero_point:
        q.weight_zero_point.data = full["weight_zero_point"].to(q.weight_scale.device)
    q.clear_cache()
    if bias is not None:
        q.bias.data.copy_(bias.detach())
    if q.act_mode == "static":
        if input_qparams is None:
            raise CalibrationError(f"{entry.name}: static activations need input_qparams measured by calibration")
        q.set_input_qparams(*input_qparams)
    return q


def _refuse_offloaded_plan(plan: Plan) -> None:
    blocker = offload_blocker(plan)
    if blocker is not None:
        raise OffloadError(
            f"This plan cannot be applied to an offloaded model ({blocker}). Fix: drop activations.rotation, or load the "
            "model without offloading.", key="device_map")


class _LayerByLayer:
    """Drives an offloaded model through calibration and conversion one decoder layer at a time.

    The calibration engine calls :meth:`enter` before a layer's work (its weights come into memory),
    :meth:`leave` after it (the steps' changes to that layer are applied, its static scales frozen,
    its planned modules converted: the float weights go) and :meth:`before_tail` before the
    modules after the layer stack are calibrated; :meth:`finish` converts whatever calibration did
    not reach. The numbers are those of :func:`hfptq.quantize_model` on the model in memory: the
    same tensors reach the same ``convert_model``.
    """

    def __init__(self, model: nn.Module, plan: Plan, config: HfPtqConfig, progress: bool) -> None:
        from .architectures import find_decoder_layers

        self.model, self.plan, self.config, self.progress = model, plan, config, progress
        self.layers = find_decoder_layers(model)
        self.ties = shared_parameters(model)  # tied weights (embedding / LM head) load once and stay tied
        self.done: set = set()
        self.float_loaded = 0  # bytes of offloaded weights brought into memory

    def _entries(self, prefix: Optional[str]) -> list:
        inside = f"{self.layers[0]}." if self.layers is not None else None
        if prefix is not None:
            return [e for e in self.plan if e.name.startswith(prefix) and e.precision != "skip" and not e.tied_to]
        return [e for e in self.plan if e.precision != "skip" and (inside is None or not e.name.startswith(inside))]

    def _convert(self, entries: list, input_qparams: Mapping, weights: Mapping, weight_qparams: Mapping) -> None:
        from .convert import _drop_tied_keys, _set_module, convert_model

        if not entries:
            return
        rest = []
        for entry in entries:  # large weights (LM head, FFN): float32 temporaries of one block of rows at a time
            module = self.model.get_submodule(entry.name)
            if entry.tied_to or not _in_blocks(module, entry):
                rest.append(entry)
                continue
            if weights.get(entry.name) is not None and not any(
                    p is module.weight for n, p in self.model.named_parameters(remove_duplicate=False)
                    if not n.startswith(f"{entry.name}.")):
                # quantized from the steps' replacement weight: the module's own float weight (not shared) can go now
                module.weight.data = torch.empty(0, dtype=module.weight.dtype)
            new = _quant_linear_in_blocks(module, entry, self.config, weights.get(entry.name),
                                          input_qparams.get(entry.name), weight_qparams.get(entry.name))
            _set_module(self.model, entry.name, new)
            del module, new
            _trim_heap()
        if rest:
            convert_model(self.model, Plan(rest, self.plan.preset, self.plan.model_type),
                          fake=self.config.mode == "fake", compute_dtype=self.config.compute_dtype,
                          input_qparams=input_qparams, weights=weights, weight_qparams=weight_qparams, progress=False)
        _drop_tied_keys(self.model, Plan(entries))
        _trim_heap()

    def _materialize(self, module: nn.Module) -> None:
        _tie_loaded(self.model, self.ties)
        self.float_loaded += materialize(module)
        _tie_loaded(self.model, self.ties)

    # ---- the engine's hooks
    def enter(self, run: Any, index: int) -> None:
        self._materialize(self.layers[1][index])

    def leave(self, run: Any, index: int) -> None:
        from .calibration import _frozen_qparams

        name, stack = self.layers
        prefix = f"{name}.{index}."
        layer = stack[index]
        # what run() commits at the end, committed now for this layer
        run.commit_pending({id(t) for t in list(layer.parameters()) + list(layer.buffers())})
        run.hand_over_smoothed([n for n in run.smoothed if n.startswith(prefix)])  # as run() does at the end
        entries = self._entries(prefix)
        names = {e.name for e in entries}
        input_qparams, _ = _frozen_qparams({n: s for n, s in run.slots.items() if n in names})
        weights = {n: run.weights.pop(n) for n in list(run.weights) if n in names}
        self._convert(entries, input_qparams, weights, run.weight_qparams)
        self.done.add(index)

    def before_tail(self, run: Any) -> None:
        self._materialize_rest()

    # ---- after calibration (or without it)
    def _materialize_rest(self) -> None:
        inside = f"{self.layers[0]}." if self.layers is not None else None
        for name, module in list(self.model.named_modules()):
            if inside is not None and (name + ".").startswith(inside):
                continue
            if any(h.offload and h.weights_map is not None for h in _align_hooks(module)):
                self._materialize(module)

    def finish(self, result: Any) -> None:
        input_qparams = getattr(result, "input_qparams", None) or {}
        weights = dict(getattr(result, "weights", None) or {})
        weight_qparams = getattr(result, "weight_qparams", None) or {}
        if self.layers is not None:
            name, stack = self.layers
            todo = [i for i in range(len(stack)) if i not in self.done]
            for index in tqdm(todo, desc="hfptq: converting offloaded layers", disable=not self.progress or not todo,
                              leave=False):
                self._materialize(stack[index])
                entries = self._entries(f"{name}.{index}.")
                self._convert(entries, input_qparams, {n: weights.pop(n) for n in list(weights)
                                                       if n.startswith(f"{name}.{index}.")}, weight_qparams)
                self.done.add(index)
        self._materialize_rest()
        self._convert(self._entries(None), input_qparams, weights, weight_qparams)
        for module in self.model.modules():  # everything is in memory now: no hook left to run
            if hasattr(module, "_hf_hook"):
                _remove_hook(module)
        if hasattr(self.model, "hf_device_map"):  # no longer dispatched: a plain in-memory model (saved as one)
            del self.model.hf_device_map


def quantize_offloaded(
    model: nn.Module,
    config: Optional[HfPtqConfig] = None,
    *,
    tokenizer: Any = None,
    calibration_data: Optional[torch.Tensor] = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize a model whose weights accelerate offloads (to disk or CPU), one decoder layer at a time.

    For models larger than memory: load the float model with an offloading ``device_map`` (or
    dispatch it with accelerate's ``disk_offload`` / ``dispatch_model``) and call this, or pass
    ``quantization_config=`` to that ``from_pretrained``, which calls it. Each decoder layer's
    weights are brought into memory, calibrated (static activations, SmoothQuant, GPTQ, exactly as
    :func:`hfptq.quantize_model`), quantized, and its float weights dropped; the quantized model
    ends up wholly in memory on the CPU, without offload hooks. Peak memory is about the quantized
    model + one float layer + the calibration's hidden-state cache: estimated and printed before
    any weight is loaded (also on ``model.hfptq_offload["estimate"]``, with the measured peak RSS).

    The result equals :func:`hfptq.quantize_model` on the same model in memory (same tensors,
    same logits). Unlike it, a failure part way leaves the model part converted: reload it.

    Raises:
        OffloadError: the plan rotates activations (Hadamard), which folds into every float weight first.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(path, device_map={"": "disk"},
        ...                                              offload_folder="off")          # doctest: +SKIP
        >>> hfptq.quantize_offloaded(model, HfPtqConfig(smoothquant={"alpha": 0.5},
        ...     calibration=dict(dataset="wikitext", config="wikitext-2-raw-v1", num_samples=8)))  # doctest: +SKIP
    """
    from .api import _calibration_data, _record_quantized, model_bytes, needs_calibration
    from .calibration import CalibrationRun, _read_status_bytes, default_steps
    from .convert import refuse_quantized
    from .plan import resolve_plan

    config = config if config is not None else HfPtqConfig()
    started = time.perf_counter()
    refuse_quantized(model)
    plan = resolve_plan(model, config)
    _refuse_offloaded_plan(plan)
    bytes_before = model_bytes(model)
    logger.info(plan.summary())
    calibrated = needs_calibration(config, plan)
    if calibrated:
        calibration_data = _calibration_data(model, config, tokenizer, calibration_data, progress)
    shape = tuple(calibration_data.shape) if calibrated and isinstance(calibration_data, torch.Tensor) else None
    estimate = estimate_offloaded_memory(model, plan, config, shape)
    message = f"hfptq: quantizing an offloaded model layer by layer; estimated memory {estimate.describe()}"
    logger.info(message)
    if progress and not logger.isEnabledFor(logging.INFO):
        tqdm.write(message, file=sys.stderr)
    driver = _LayerByLayer(model, plan, config, progress)
    result = None
    if calibrated:
        run = CalibrationRun(model, plan, config, calibration_data, progress, (), default_steps(config))
        run.layer_hooks = driver
        result = run.run()
        del run
    driver.finish(result)
    info = getattr(result, "info", None)
    del result  # the steps' float replacement weights (a smoothed LM head in float32) go before the copies below
    _record_quantized(model, config, plan, bytes_before, info, started)
    model.hfptq_offload = {"estimate": estimate.to_dict(), "peak_rss_bytes": _read_status_bytes("VmHWM"),
                           "float_bytes_loaded": driver.float_loaded}
    return model
