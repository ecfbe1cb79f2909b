"""The Python entry points: quantize an already loaded model, inspect the plan, summarise.

``from_pretrained(..., quantization_config=HfPtqConfig(...))`` calls :func:`quantize_model`
from the Transformers adapter; users holding a model can call it directly.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from .config import HfPtqConfig
from .convert import convert_model, refuse_quantized
from .errors import ConfigError
from .plan import Plan, resolve_plan
from .utils import format_bytes

logger = logging.getLogger(__name__)


def needs_calibration(config: HfPtqConfig, plan: Optional[Plan] = None) -> bool:
    """True when static activations, SmoothQuant or GPTQ need calibration data."""
    if config.smoothquant is not None or config.gptq is not None:
        return True
    if plan is not None:
        return any(e.quantized and (e.activations or {}).get("mode") == "static" for e in plan)
    return config.activations["mode"] == "static"


def _load_tokenizer(model: nn.Module, config: HfPtqConfig, tokenizer: Any) -> Any:
    if tokenizer is not None:
        return tokenizer
    calib = config.calibration or {}
    source = calib.get("tokenizer")
    if source is not None and not isinstance(source, str):
        return source
    source = source or getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not source:
        raise ConfigError(
            "calibration needs a tokenizer: set calibration.tokenizer to a path/Hub id, or pass tokenizer= to quantize_model."
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        field = "calibration.tokenizer" if calib.get("tokenizer") else "the model's name_or_path"
        raise ConfigError(
            f"calibration needs a tokenizer, and {field} ({source!r}) does not load one "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Set calibration.tokenizer to a "
            "folder with tokenizer files or a Hub id (online), or pass tokenizer= to quantize_model.",
            key="calibration.tokenizer",
        ) from exc


def quantize_model(
    model: nn.Module,
    config: Optional[HfPtqConfig] = None,
    *,
    tokenizer: Any = None,
    calibration_data: Optional[torch.Tensor] = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize a loaded float model in place and return it.

    Resolves the plan, calibrates when the config asks for it (static activations, SmoothQuant,
    GPTQ), converts the modules, and records the plan on ``model.hfptq_plan`` and in
    ``config.plan`` (saved in ``config.json``).

    Args:
        model: a float Transformers model (or any ``nn.Module`` with Linear layers and a ``config``).
        config: defaults to ``HfPtqConfig()`` (attention FP16, FFN + LM head INT8 W8A8 dynamic).
        tokenizer: used to tokenize the calibration split; defaults to the model's own path.
        calibration_data: ready token ids ``[num_samples, seq_len]`` instead of ``config.calibration``.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(path)          # doctest: +SKIP
        >>> hfptq.quantize_model(model, hfptq.HfPtqConfig(activations="none"))  # doctest: +SKIP
    """
    config = config if config is not None else HfPtqConfig()
    started = time.perf_counter()
    refuse_quantized(model)  # "already quantized; call dequantize() first" instead of a 0-module plan
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ConfigError(
            f"{len(offloaded)} weight(s) of this model are on the meta device (e.g. {offloaded[0]!r}): accelerate offloads "
            "them. Use hfptq.quantize_offloaded(model, config), which brings one decoder layer into memory at a time, "
            "or pass quantization_config= to from_pretrained with your device_map.", key="device_map")
    plan = resolve_plan(model, config)
    bytes_before = model_bytes(model)
    logger.info(plan.summary())
    result = None
    from .quant.rotation import fold_input_rotations, undo_input_rotations

    # modules with activations.rotation: W -> W H and the input rotated by a hook, exact in float, so that
    # calibration observes (and conversion quantizes) the rotated problem; the hooks go with the float modules
    rotated = fold_input_rotations(model, plan)
    try:
        result = _calibrate_and_convert(model, plan, config, tokenizer, calibration_data, progress)
    except BaseException:
        undo_input_rotations(rotated)  # nothing half-applied: the float model is as it was
        raise
    del rotated  # the float originals
    _record_quantized(model, config, plan, bytes_before, getattr(result, "info", None), started)
    return model


def _record_quantized(model: nn.Module, config: HfPtqConfig, plan: Plan, bytes_before: int, info: Any,
                      started: float) -> None:
    """After conversion (:func:`quantize_model`, :func:`hfptq.offload.quantize_offloaded`): release the mapped
    float checkpoint, record the plan and the run's numbers on ``model`` and ``config``."""
    release_checkpoint_mapping(model)
    config.plan = plan.to_dict()
    attach_plan(model, plan)
    if hasattr(model, "config"):
        from .checkpoint import mark_quantized

        mark_quantized(model, config, plan)  # saveable as an hfptq checkpoint, also when quantized by hand
    model.hfptq_bytes_before = bytes_before
    model.hfptq_calibration = info
    model.hfptq_seconds = time.perf_counter() - started


def _calibration_data(model: nn.Module, config: HfPtqConfig, tokenizer: Any,
                      calibration_data: Optional[torch.Tensor], progress: bool) -> torch.Tensor:
    """``calibration_data``, or ``config.calibration``'s split tokenized when it is ``None`` (a plan that calibrates)."""
    if calibration_data is not None:
        return calibration_data
    if config.calibration is None:
        raise ConfigError(
            "This config needs calibration data (static activations, SmoothQuant or GPTQ): set "
            "calibration=dict(dataset=..., split=...) or pass calibration_data= token ids.", key="calibration")
    from .data import calibration_batches

    return calibration_batches(config.calibration, _load_tokenizer(model, config, tokenizer), progress=progress)


def _calibrate_and_convert(model: nn.Module, plan: Plan, config: HfPtqConfig, tokenizer: Any,
                           calibration_data: Optional[torch.Tensor], progress: bool) -> Any:
    result = None
    if needs_calibration(config, plan):
        from .calibration import calibrate

        calibration_data = _calibration_data(model, config, tokenizer, calibration_data, progress)
        result = calibrate(model, plan, config, calibration_data, progress=progress)
    convert_model(
        model, plan, fake=config.mode == "fake", compute_dtype=config.compute_dtype,
        input_qparams=getattr(result, "input_qparams", None), weights=getattr(result, "weights", None),
        weight_qparams=getattr(result, "weight_qparams", None), progress=progress,
    )
    return result


def release_checkpoint_mapping(model: nn.Module, release: Optional[Callable[[torch.Tensor], None]] = None) -> int:
    """Copy the float tensors that still point into the memory-mapped float checkpoint; return their count.

    Transformers maps ``model.safetensors`` into memory and, where dtypes match, leaves parameters
    there. After conversion only small float tensors remain (norm weights, skipped modules), but any
    one of them keeps the whole mapping, and every page quantization read stays resident: Gemma 3
    270M kept its 1 GB FP32 file resident after quantizing to 285 MiB, through its norm weights
    (a few KB). Those tensors are recognised by storage PyTorch did not allocate (not resizable) and
    copied into ordinary memory, so the mapping is released once the loader lets go of it. Tied
    parameters stay tied (``.data`` is replaced on the shared parameter). ``release``, when given, is
    called on each mapped tensor right after its copy (quantize-while-loading hands its pages back
    there, so the file pages and the copies are never both resident).
    """
    copies: Dict[int, torch.Tensor] = {}  # buffers shared by several modules get one copy
    count = 0
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu" or tensor.untyped_storage().resizable():
                    continue
                if isinstance(tensor, nn.Parameter):
                    old = tensor.data
                    tensor.data = old.clone()  # in place: a tied parameter's next visit sees the copy
                    count += 1
                    if release is not None:
                        release(old)
                    continue
                if id(tensor) not in copies:
                    copies[id(tensor)] = tensor.detach().clone()
                    count += 1
                    if release is not None:
                        release(tensor)
                table[name] = copies[id(tensor)]
    if count:
        logger.debug("hfptq: copied %d tensors out of the memory-mapped checkpoint", count)
    return count


def attach_plan(model: nn.Module, plan: Plan) -> None:
    model.hfptq_plan = plan


def get_plan(model: nn.Module) -> Plan:
    """The plan a quantized model was built with."""
    plan = getattr(model, "hfptq_plan", None)
    if plan is None:
        raise ConfigError("This model was not quantized by hfptq (no model.hfptq_plan).")
    return plan


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared storage counted once)."""
    seen = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.device, tensor.data_ptr()) if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def summary(model: nn.Module, float_bytes: Optional[int] = None) -> str:
    """Modules per precision and bytes before/after quantization (first line), then which kernels
    (backend) each module kind runs on this machine and why (see :mod:`hfptq.quant.backends`).

    ``float_bytes`` defaults to the size measured just before conversion (recorded by
    :func:`quantize_model`); for a reloaded checkpoint, to the planned modules' size in float32
    plus everything else as it is.

    Example:
        >>> print(hfptq.summary(model))  # doctest: +SKIP
        127 modules: 72 fp16, 55 int8; 1.0 GiB -> 285.3 MiB (27.9%)
        backends on x86_64 AVX512: avx2 avx512f avx512_vnni avx_vnni avx512_bf16
          W8A8 dynamic asym (55 modules): onednn-vnni - avx512_vnni: torch._int_mm runs oneDNN's VNNI int8 GEMM; ...
          float16 storage (72 modules): bf16-prepacked - native bf16 (avx512_bf16/amx_bf16); oneDNN prepacked weight
    """
    from .quant.backends import format_backends

    plan = get_plan(model)
    after = model_bytes(model)
    if float_bytes is None:
        float_bytes = getattr(model, "hfptq_bytes_before", None)
    if float_bytes is None:
        float_bytes = after
        for e in plan:
            if e.precision == "skip" or e.tied_to:
                continue
            n = e.in_features * e.out_features + (e.out_features if e.has_bias else 0)
            float_bytes += n * 4 - _entry_bytes(model, e.name)
    ratio = after / float_bytes if float_bytes else 1.0
    return (f"{plan.summary()}; {format_bytes(float_bytes, digits=1)} -> {format_bytes(after, digits=1)} ({ratio:.1%})\n"
            + format_backends(model))


def _entry_bytes(model: nn.Module, name: str) -> int:
    module = model.get_submodule(name)
    return sum(t.numel() * t.element_size() for t in list(module.parameters(recurse=False)) + list(module.buffers()))
