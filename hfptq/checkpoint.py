"""Reloading hfptq checkpoints: rebuild the quantized skeleton from the stored plan.

``save_pretrained`` needs nothing special: the quantized modules' persistent buffers carry the
checkpoint key names, and ``config.json`` gets ``quantization_config`` (with the resolved plan).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import HfPtqConfig
from .errors import CheckpointError
from .plan import Plan


def stored_plan(config: HfPtqConfig) -> Plan:
    if not config.plan:
        raise CheckpointError(
            "This checkpoint's quantization_config has no hfptq plan, so the quantized modules cannot be rebuilt. "
            "It was not written by hfptq's save_pretrained; re-quantize the float model."
        )
    return Plan.from_dict(config.plan)


def prepare_reload(model: nn.Module, config: HfPtqConfig, dtype: Optional[torch.dtype] = None) -> None:
    """Before weights load: swap the planned modules for empty quantized ones (on meta)."""
    from .convert import build_skeleton

    plan = stored_plan(config)
    build_skeleton(model, plan, fake=config.mode == "fake", compute_dtype=config.compute_dtype, dtype=dtype)
    model.hfptq_plan = plan


def finish_reload(model: nn.Module, config: HfPtqConfig) -> None:
    """After weights load: re-link tied embeddings (the LM head's storage may have moved)."""
    from .quant.linear import QuantEmbedding

    plan = model.hfptq_plan
    for entry in plan:
        if entry.tied_to:
            emb = model.get_submodule(entry.name)
            if isinstance(emb, QuantEmbedding):
                emb.tie_to(model.get_submodule(entry.tied_to))


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every hfptq module by a float ``nn.Linear``/``nn.Embedding`` holding its dequantized weight."""
    from .convert import _set_module
    from .quant.linear import FloatLinear, QuantEmbedding, QuantLinear

    dtype = dtype or torch.float32
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, FloatLinear)):
            weight = module.dequantized_weight(dtype) if isinstance(module, QuantLinear) else module.weight.to(dtype)
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype,
                            device=weight.device)
            lin.weight.data.copy_(weight)
            if module.bias is not None:
                lin.bias.data.copy_(module.bias.to(dtype))
            _set_module(model, name, lin)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantEmbedding):
            ids = torch.arange(module.num_embeddings, device=module.source.qweight.device)
            scale = module.embed_scale
            module.embed_scale = None
            weight = module(ids).to(dtype)
            module.embed_scale = scale
            emb = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                               dtype=dtype, device=weight.device)
            emb.weight.data.copy_(weight)
            _set_module(model, name, emb)
    return model
