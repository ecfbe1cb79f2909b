"""Apply a :class:`~hfptq.plan.Plan` to a model: swap float modules for quantized ones.

Two entry points:
* :func:`convert_model` turns a loaded float model into the quantized one (real tensors).
* :func:`build_skeleton` builds empty quantized modules (on the meta device during
  ``from_pretrained``) so that a saved checkpoint loads into them by name.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .plan import ModuleSpec, Plan
from .quant.linear import FloatLinear, QuantEmbedding, QuantLinear

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _drop_tied_keys(model: nn.Module, plan: Plan) -> None:
    """Forget Transformers' tying of modules hfptq now owns (the embedding reads the LM head's ints)."""
    owned = {e.name for e in plan if e.tied_to or (e.kind == "lm_head" and e.precision != "skip")}
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict) and tied:
        for key in list(tied):
            if key.rsplit(".", 1)[0] in owned or tied[key].rsplit(".", 1)[0] in owned:
                tied.pop(key)


def embedding_scale(entry: Any) -> Any:
    """What a quantized embedding multiplies its lookups by: ``embed_scale`` (Gemma's ``sqrt(hidden)``)
    times ``embed_channel_scale``, the per-channel ``1 / s`` of an embedding tied to an LM head that
    SmoothQuant smoothed (the shared integers hold ``W * s``). A float, a list, or ``None``.

    Example:
        >>> from hfptq.plan import ModuleSpec
        >>> e = ModuleSpec(name="emb", kind="embedding", module_class="Embedding", precision="int8", in_features=2, out_features=4)
        >>> e.extra.update(embed_scale=2.0, embed_channel_scale=[1.0, 0.5])
        >>> embedding_scale(e)
        [2.0, 1.0]
    """
    scalar = entry.extra.get("embed_scale")
    channel = entry.extra.get("embed_channel_scale")
    if channel is None:
        return scalar
    return [float(c) * (1.0 if scalar is None else float(scalar)) for c in channel]


def _mark_channel_scale(module: nn.Module, entry: Any) -> None:
    # remembered for dequantize_model, which rebuilds the plain (unscaled) embedding table
    channel = entry.extra.get("embed_channel_scale")
    if channel is not None:
        module.hfptq_channel_scale = list(channel)


@torch.no_grad()
def convert_model(
    model: nn.Module,
    plan: Plan,
    *,
    fake: bool = False,
    compute_dtype: str = "auto",
    input_qparams: Optional[Mapping[str, tuple]] = None,
    weights: Optional[Mapping[str, torch.Tensor]] = None,
    weight_qparams: Optional[Mapping[str, tuple]] = None,
    progress: bool = True,
) -> nn.Module:
    """Replace every planned module of ``model`` in place.

    Args:
        input_qparams: static activation ``(scale, zero_point)`` per module name (from calibration).
        weights: replacement float weights ``[out, in]`` per module name (SmoothQuant/GPTQ output).
        weight_qparams: weight ``(scale, zero_point)`` per module name (GPTQ/MSE observer).
    """
    input_qparams = input_qparams or {}
    weights = weights or {}
    weight_qparams = weight_qparams or {}
    todo = [e for e in plan if e.precision != "skip" and not e.tied_to]
    check_float_storage(model, todo, weights)  # before any module is swapped: a refusal leaves the model as it was
    if not todo and not any(e.tied_to for e in plan):  # (tied entries alone: converted below)
        logger.warning(
            "hfptq: the plan skips every module (%d planned), so nothing is quantized and the model stays float. Check "
            "the rules, scheme and modules_to_not_convert (hfptq plan prints the plan).", len(plan.entries)
        )
    for entry in tqdm(todo, desc="hfptq: converting", disable=not progress, leave=False):
        module = model.get_submodule(entry.name)
        if entry.kind == "embedding":
            new = QuantEmbedding.from_float(module, entry.weights, embed_scale=entry.extra.get("embed_scale"))
        elif entry.quantized:
            new = QuantLinear.from_float(
                module, entry.weights, entry.activations, fake=fake, compute_dtype=compute_dtype,
                weight=weights.get(entry.name), input_qparams=input_qparams.get(entry.name),
                weight_qparams=weight_qparams.get(entry.name),
            )
            new.smoothed = bool(entry.extra.get("smoothed"))
        else:
            new = FloatLinear.from_float(module, _FLOAT_DTYPES[entry.precision], compute_dtype)
            if entry.name in weights:
                new.weight.data = weights[entry.name].to(new.storage_dtype)
        _set_module(model, entry.name, new)
        del module
    for entry in plan:
        if entry.tied_to:
            module = model.get_submodule(entry.name)
            source = model.get_submodule(entry.tied_to)
            _set_module(model, entry.name, QuantEmbedding.from_float(
                module, entry.weights, tied_to=source, embed_scale=embedding_scale(entry)))
            _mark_channel_scale(model.get_submodule(entry.name), entry)
    _drop_tied_keys(model, plan)
    return model


def check_float_storage(model: nn.Module, entries: Any, weights: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Refuse a plan that stores a weight in FP16 when its values do not fit FP16 (|w| > 65504).

    Such a weight becomes ``inf`` in storage and the model's outputs NaN. The error names the module
    and suggests a bf16 (same range as float32) or fp32 rule for it.

    Raises:
        ConfigError: a planned FP16 module holds values outside FP16's range.

    Example:
        >>> lin = nn.Linear(2, 2); _ = lin.weight.data.fill_(1e5)
        >>> from hfptq.plan import ModuleSpec
        >>> e = ModuleSpec(name="", kind="attention", module_class="Linear", precision="fp16", in_features=2, out_features=2)
        >>> check_float_storage(lin, [e])
        Traceback (most recent call last):
        ...
        hfptq.errors.ConfigError: ...
    """
    from .errors import ConfigError

    limit = torch.finfo(torch.float16).max
    weights = weights or {}
    for entry in entries:
        if entry.precision != "fp16":
            continue
        module = model.get_submodule(entry.name) if entry.name else model
        tensors = [weights.get(entry.name, getattr(module, "weight", None)), getattr(module, "bias", None)]
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or not tensor.is_floating_point():
                continue
            peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
            if peak > limit:
                raise ConfigError(
                    f"Module {entry.name!r} is planned as fp16, but its weights reach {peak:.4g}, beyond FP16's range "
                    f"(+-{limit:.0f}): stored in FP16 they would become inf and the outputs NaN. Keep it in bf16 (same "
                    f"range as float32) or fp32, e.g. rules=[{{'targets': '{entry.name}', 'precision': 'bf16'}}], or "
                    "scheme={'" + entry.kind + "': 'bf16'}."
                )


def refuse_quantized(model: nn.Module) -> None:
    """Raise if ``model`` already holds hfptq modules: quantizing it again would plan nothing (the quantized
    modules are no longer ``nn.Linear``) and save a checkpoint whose plan does not describe its weights.

    Raises:
        ConfigError: the model is already quantized.
    """
    from .errors import ConfigError

    found = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, FloatLinear, QuantEmbedding))]
    if found:
        raise ConfigError(
            f"This model is already quantized by hfptq ({len(found)} quantized modules, e.g. {found[0]!r}): call "
            "model.dequantize() first to quantize it differently, or start again from the float model."
        )


def build_skeleton(model: nn.Module, plan: Plan, *, fake: bool = False, compute_dtype: str = "auto",
                   dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Swap planned modules for empty quantized ones with the right buffer shapes (used on reload)."""
    missing = [e.name for e in plan if e.precision != "skip" and _get(model, e.name) is None]
    if missing:
        from .errors import CheckpointError

        raise CheckpointError(
            f"The checkpoint's hfptq plan names modules this model does not have: {missing[:5]}. The config.json "
            "plan does not match the architecture; re-quantize from the float model."
        )
    for entry in plan:
        if entry.precision == "skip" or entry.tied_to:
            continue
        old = model.get_submodule(entry.name)
        device = _module_device(old)
        model_dtype = dtype or _module_dtype(old) or torch.float32
        if entry.kind == "embedding":
            new = QuantEmbedding(entry.out_features, entry.in_features, weight_args=entry.weights,
                                 padding_idx=entry.extra.get("padding_idx"), embed_scale=entry.extra.get("embed_scale"),
                                 output_dtype=model_dtype, device=device)
        elif entry.quantized:
            new = QuantLinear(entry.in_features, entry.out_features, entry.has_bias, weight_args=entry.weights,
                              act_args=entry.activations, fake=fake, compute_dtype=compute_dtype, dtype=model_dtype,
                              device=device)
            new.smoothed = bool(entry.extra.get("smoothed"))
        else:
            new = FloatLinear(entry.in_features, entry.out_features, entry.has_bias,
                              storage_dtype=_FLOAT_DTYPES[entry.precision], compute_dtype=compute_dtype, device=device)
        _set_module(model, entry.name, new)
    for entry in plan:
        if entry.tied_to:
            old = model.get_submodule(entry.name)
            model_dtype = dtype or _module_dtype(old) or torch.float32
            _set_module(model, entry.name, QuantEmbedding(
                entry.out_features, entry.in_features, padding_idx=entry.extra.get("padding_idx"),
                embed_scale=embedding_scale(entry), output_dtype=model_dtype,
                tied_to=model.get_submodule(entry.tied_to)))
            _mark_channel_scale(model.get_submodule(entry.name), entry)
    _drop_tied_keys(model, plan)
    return model


def _get(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _module_device(module: nn.Module) -> Optional[torch.device]:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return t.device
    return None


def _module_dtype(module: nn.Module) -> Optional[torch.dtype]:
    for t in module.parameters(recurse=False):
        if t.is_floating_point():
            return t.dtype
    return None
