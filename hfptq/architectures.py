"""The architecture table: what hfptq knows about model families, in one place.

* :data:`PRESETS` — which module names are attention projections, FFN linears and the LM head
  (regexes searched in the full module name), per ``config.model_type``; :data:`STRUCTURAL` is
  the name-based fallback for families without a preset.
* :data:`DECODER_LAYER_PATHS` — where the decoder (or encoder) layer stack lives;
  :func:`find_decoder_layers` tries them, then a structural heuristic.
* :data:`FINAL_NORM_ATTRS` — the final norm's attribute next to the layer stack
  (:func:`find_final_norm`).
* :data:`SMOOTH_TABLE` — SmoothQuant's smoothing groups (norm or linear -> the linears reading
  its output) per ``model_type``.
* Linear-like modules: :func:`is_conv1d` (GPT-2's ``Conv1D`` stores ``[in, out]``),
  :func:`is_quantizable_linear`, :func:`linear_shape`, :func:`weight_out_in`.

This module imports only torch and :mod:`hfptq.errors`; everything else may import it.

Example:
    >>> sorted(PRESETS["llama"])
    ['attention', 'ffn', 'lm_head']
    >>> [g.name for g in SMOOTH_TABLE["llama"]]
    ['qkv', 'gate_up', 'down']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import CalibrationError

__all__ = [
    "DECODER_LAYER_PATHS",
    "LayerStandIn",
    "FINAL_NORM_ATTRS",
    "PRESETS",
    "SMOOTH_TABLE",
    "STRUCTURAL",
    "SmoothGroup",
    "find_decoder_layers",
    "find_final_norm",
    "find_module",
    "is_conv1d",
    "is_quantizable_linear",
    "linear_shape",
    "split_layer_call",
    "weight_out_in",
]

# --------------------------------------------------------------------------------------------
# Architecture presets: which module names are attention projections, FFN linears, LM head.
# Patterns are regexes searched in the full module name.
# --------------------------------------------------------------------------------------------
_LLAMA_LIKE = {
    "attention": [r"self_attn\.(q|k|v|o)_proj$"],
    "ffn": [r"mlp\.(gate|up|down)_proj$"],
    "lm_head": [r"^lm_head$"],
}
PRESETS: Dict[str, Dict[str, List[str]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    # Gemma 3 multimodal (Gemma3ForConditionalGeneration): the language model only; the SigLIP
    # vision tower and the projector stay as they are ('other' -> skip), visible in the plan.
    "gemma3": {
        "attention": [r"language_model\.(?:.*\.)?self_attn\.(q|k|v|o)_proj$"],
        "ffn": [r"language_model\.(?:.*\.)?mlp\.(gate|up|down)_proj$"],
        "lm_head": [r"^lm_head$"],
    },
    "gemma3_text": _LLAMA_LIKE,
    "phi3": {
        "attention": [r"self_attn\.(qkv_proj|o_proj)$"],
        "ffn": [r"mlp\.(gate_up_proj|down_proj)$"],
        "lm_head": [r"^lm_head$"],
    },
    "gpt2": {
        "attention": [r"attn\.(c_attn|c_proj)$"],
        "ffn": [r"mlp\.(c_fc|c_proj)$"],
        "lm_head": [r"^lm_head$"],
    },
    "opt": {
        "attention": [r"self_attn\.(q|k|v|out)_proj$"],
        "ffn": [r"\.fc(1|2)$"],
        "lm_head": [r"^lm_head$"],
    },
    "gpt_neox": {
        "attention": [r"attention\.(query_key_value|dense)$"],
        "ffn": [r"mlp\.(dense_h_to_4h|dense_4h_to_h)$"],
        "lm_head": [r"^(embed_out|lm_head)$"],
    },
    "bert": {
        "attention": [r"attention\.self\.(query|key|value)$", r"attention\.output\.dense$"],
        "ffn": [r"intermediate\.dense$", r"layer\.\d+\.output\.dense$"],
        "lm_head": [r"cls\.predictions\.decoder$"],
    },
    "distilbert": {
        "attention": [r"attention\.(q_lin|k_lin|v_lin|out_lin)$"],
        "ffn": [r"ffn\.lin(1|2)$"],
        "lm_head": [r"^vocab_projector$"],
    },
}
PRESETS["roberta"] = {**PRESETS["bert"], "lm_head": [r"lm_head\.decoder$"]}
PRESETS["xlm-roberta"] = PRESETS["roberta"]

# Structural fallback for architectures without a preset.
STRUCTURAL = {
    "attention": [r"(attn|attention)[^.]*\.[^.]+$", r"(q|k|v|o|qkv|out)_proj$", r"\.(query|key|value)$"],
    "ffn": [r"(mlp|ffn|feed_forward|feedforward|intermediate)[^.]*\.[^.]+$", r"\.(fc\d|w\d|up_proj|down_proj|gate_proj)$"],
    "lm_head": [r"^(lm_head|embed_out|output)$"],
}


# --------------------------------------------------------------------------------------------
# SmoothQuant's smoothing groups
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmoothGroup:
    """One smoothing site inside a decoder layer (paths relative to the layer).

    Attributes:
        name: short label (``"qkv"``, ``"gate_up"``, ``"down"``), usable in ``options["groups"]``.
        prev: module whose output is the consumers' input (a norm or a linear).
        consumers: linears reading that output.
        prev_rows: for a fused linear ``prev`` (Phi-3 ``gate_up_proj``), which output rows feed the
            consumers: ``"second_half"``; ``None`` means all of them.
        norm_offset: ``1.0`` when the norm scales by ``(1 + w)`` (Gemma), ``0.0`` when by ``w``;
            only a first guess, checked numerically when folding.
    """

    name: str
    prev: str
    consumers: Tuple[str, ...]
    prev_rows: Optional[str] = None
    norm_offset: float = 0.0


def _llama_like(mlp_norm: str, offset: float) -> Tuple[SmoothGroup, ...]:
    return (
        SmoothGroup("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                    norm_offset=offset),
        SmoothGroup("gate_up", mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), norm_offset=offset),
        SmoothGroup("down", "mlp.up_proj", ("mlp.down_proj",)),
    )


#: (prev -> consumers) per ``model_type``. Gemma 1 feeds its MLP from ``post_attention_layernorm``
#: (like Llama, but with the ``1 + w`` scaling); Gemma 2 and 3 apply ``post_attention_layernorm``
#: to the attention output and feed the MLP from ``pre_feedforward_layernorm``.
SMOOTH_TABLE: Dict[str, Tuple[SmoothGroup, ...]] = {
    "llama": _llama_like("post_attention_layernorm", 0.0),
    "mistral": _llama_like("post_attention_layernorm", 0.0),
    "qwen2": _llama_like("post_attention_layernorm", 0.0),
    "qwen3": _llama_like("post_attention_layernorm", 0.0),
    "gemma": _llama_like("post_attention_layernorm", 1.0),
    "gemma2": _llama_like("pre_feedforward_layernorm", 1.0),
    "gemma3": _llama_like("pre_feedforward_layernorm", 1.0),
    "gemma3_text": _llama_like("pre_feedforward_layernorm", 1.0),
    "phi3": (
        SmoothGroup("qkv", "input_layernorm", ("self_attn.qkv_proj",)),
        SmoothGroup("gate_up", "post_attention_layernorm", ("mlp.gate_up_proj",)),
        # Phi3MLP: gate, up = gate_up_proj(x).chunk(2); down_proj(up * act(gate))
        SmoothGroup("down", "mlp.gate_up_proj", ("mlp.down_proj",), prev_rows="second_half"),
    ),
}


#: Where decoder layers live in common Transformers models (tried in order, then a heuristic).
DECODER_LAYER_PATHS = (
    "model.layers",  # Llama, Gemma, Qwen, Mistral, Phi-3 (*ForCausalLM)
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "transformer.layers",
    "transformer.blocks",  # MPT
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "encoder.layer",
    "distilbert.transformer.layer",
    "transformer.layer",
    "layers",
    "h",
    "decoder.layers",
)

#: Attribute names of the final norm, on the module that holds the layer stack.
FINAL_NORM_ATTRS = ("norm", "final_layernorm", "ln_f", "final_norm", "norm_f")


# --------------------------------------------------------------------------------------------
# Linear-like modules
# --------------------------------------------------------------------------------------------


def is_conv1d(module: nn.Module) -> bool:
    """True for Transformers' ``Conv1D`` (GPT-2), a linear whose weight is stored ``[in, out]``.

    Example:
        >>> is_conv1d(torch.nn.Linear(2, 3))
        False
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantizable_linear(module: nn.Module) -> bool:
    """Float ``nn.Linear`` or Transformers ``Conv1D`` (GPT-2).

    Example:
        >>> is_quantizable_linear(torch.nn.Linear(2, 3)), is_quantizable_linear(torch.nn.LayerNorm(2))
        (True, False)
    """
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D (whose weight is ``[in, out]``).

    Example:
        >>> linear_shape(torch.nn.Linear(2, 3))
        (2, 3)
    """
    if is_conv1d(module):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def weight_out_in(module: nn.Module, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``module``'s weight (or ``weight``, laid out like it) as ``[out, in]``: a view, transposed for Conv1D.

    Example:
        >>> weight_out_in(torch.nn.Linear(2, 3)).shape
        torch.Size([3, 2])
    """
    weight = module.weight if weight is None else weight
    return weight.t() if is_conv1d(module) else weight


# --------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------


def find_module(model: nn.Module, name: str) -> Optional[nn.Module]:
    """``model.get_submodule(name)``, or ``None`` when there is no such module.

    Example:
        >>> find_module(torch.nn.Sequential(torch.nn.Linear(2, 2)), "1") is None
        True
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _count_linears(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if is_quantizable_linear(m))


def find_decoder_layers(model: nn.Module) -> Optional[Tuple[str, nn.ModuleList]]:
    """Locate the stack of decoder (or encoder) layers: ``(name, ModuleList)``, or ``None``.

    Known attribute paths (:data:`DECODER_LAYER_PATHS`) are tried first; otherwise the
    ``nn.ModuleList`` of identical blocks holding the most linear layers is taken. ``None`` means
    no such stack exists: calibration then runs whole forwards instead of layer by layer.

    Example:
        >>> name, layers = find_decoder_layers(llama_model)  # doctest: +SKIP
        >>> name, len(layers)  # doctest: +SKIP
        ('model.layers', 32)
    """
    for path in DECODER_LAYER_PATHS:
        candidate = find_module(model, path)
        if isinstance(candidate, nn.ModuleList) and len(candidate) > 0 and _count_linears(candidate) > 0:
            return path, candidate
    best: Optional[Tuple[int, int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        n_linear = _count_linears(module)
        if n_linear == 0:
            continue
        key = (n_linear, -name.count("."))
        if best is None or key > best[:2]:
            best = (n_linear, -name.count("."), name, module)
    if best is None:
        return None
    return best[2], best[3]


def find_final_norm(model: nn.Module, layers_name: str) -> Optional[Tuple[str, nn.Module]]:
    """``(name, module)`` of the final norm next to the layer stack ``layers_name``, or ``None``.

    Example:
        >>> find_final_norm(llama_model, "model.layers")[0]  # doctest: +SKIP
        'model.norm'
    """
    parent_name = layers_name.rpartition(".")[0]
    parent = find_module(model, parent_name) if parent_name else model
    for attr in FINAL_NORM_ATTRS:
        norm = getattr(parent, attr, None) if parent is not None else None
        if isinstance(norm, nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor):
            return (f"{parent_name}.{attr}" if parent_name else attr), norm
    return None


# --------------------------------------------------------------------------------------------
# Stand-ins for decoder layers (run the model without recomputing its layers)
# --------------------------------------------------------------------------------------------


def split_layer_call(args: tuple, kwargs: dict) -> Tuple[Optional[torch.Tensor], tuple, dict]:
    """``(hidden_states, other positional args, kwargs)`` of a decoder-layer call.

    Example:
        >>> split_layer_call((), {"hidden_states": 1, "mask": 2})
        (1, (), {'mask': 2})
    """
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states", None), (), kwargs


_NO_OUTPUT = object()


class LayerStandIn(nn.Module):
    """Stands in for a decoder layer: replays a recorded ``output``, or returns its input.

    Without ``output``, the hidden states it receives (or ``inject``, when set) come back wrapped
    like the real layer's output ``template`` (a tensor, or a tuple/list whose first item is
    replaced); ``recorder(hidden, other args, kwargs)`` sees every call. Attributes the model's
    layer loop reads (e.g. ``attention_type``) come from ``original``, which is not a submodule.

    Example:
        >>> stand_in = LayerStandIn(torch.nn.Identity(), template=(torch.empty(0), None))
        >>> stand_in(torch.ones(1))
        (tensor([1.]), None)
    """

    def __init__(self, original: nn.Module, *, output: Any = _NO_OUTPUT, template: Any = None) -> None:
        super().__init__()
        self.template = template
        self.inject: Optional[torch.Tensor] = None
        self.recorder: Optional[Callable[[Any, tuple, dict], None]] = None
        object.__setattr__(self, "_output", output)
        object.__setattr__(self, "_original", original)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None:
                raise
            return getattr(original, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__["_output"] is not _NO_OUTPUT:
            return self.__dict__["_output"]
        hidden, rest, kw = split_layer_call(args, kwargs)
        if self.recorder is not None:
            self.recorder(hidden, rest, kw)
        if self.inject is not None:
            hidden = self.inject
        template = self.template
        if template is None or isinstance(template, torch.Tensor):
            return hidden
        if isinstance(template, tuple):
            return (hidden,) + tuple(template[1:])
        if isinstance(template, list):
            return [hidden] + list(template[1:])
        raise CalibrationError(f"Unsupported decoder layer output type {type(template).__name__}.")
