"""Calibration: run token batches through the model and measure what static quantization needs.

:func:`calibrate` feeds the calibration tokens (``[num_samples, seq_len]``, see
:func:`hfptq.data.calibration_batches`) through a float model and returns a
:class:`CalibrationResult`: the frozen per-tensor activation ``(scale, zero_point)`` of every
module whose plan entry is static W8A8, plus the outputs of the accuracy algorithms
(SmoothQuant, GPTQ) when the config enables them. It never quantizes anything itself:
:func:`hfptq.convert.convert_model` consumes the result.

Sequential engine (``calibration.sequential=True``, the default)
-----------------------------------------------------------------
Memory is bounded by one decoder layer, not by the whole model's activations:

1. **Capture.** The embedding part of the model runs on every batch and stops at the first
   decoder layer (a forward pre-hook records its input and raises a private exception). The
   hidden states of all calibration samples are kept in one CPU tensor. For the first batch of
   each batch size the layers are swapped for pass-through stubs (a *probe*) that record the
   extra arguments each layer receives (attention mask, rotary embeddings, position ids, ...):
   they depend on the layer (Gemma 3 alternates sliding-window and global attention) and on the
   batch shape, never on the token values. When the model's loop does not hand each layer's
   output straight to the next layer (layers returning tuples), the probe runs the real layers.
2. **Layers.** The engine knows no algorithm: each one is a :class:`CalibrationStep`
   (:mod:`hfptq.algorithms.base`; :func:`default_steps` builds SmoothQuant's and GPTQ's from the
   config) called before the observing pass, for statistics hooks in it, and after it. In effect,
   for each decoder layer ``i``: [SmoothQuant: a pass collecting the per-channel
   abs-max of every linear input, then ``smooth_layer`` folds the smoothing scales] → the
   observing pass (forward pre-hooks feed the observers of the static modules, the GPTQ Hessians
   and ``extra_stats_hooks``) → [GPTQ: quantize each linear of the layer, then a pass with the
   new weights] → the layer's outputs overwrite its inputs in the cache and become layer
   ``i + 1``'s inputs. With ``gptq.true_sequential`` the layer's GPTQ modules are grouped by
   shared input in call order (q/k/v, o, gate/up, down) and each later group gets its own pass
   (ending at its last module) after the earlier groups were rounded. With
   ``gptq.float_targets`` a second cache carries the float model's hidden states: the unrounded
   layer runs on it first, recording its modules' inputs, and each module's weight is corrected
   towards the float output (:func:`hfptq.algorithms.gptq.float_target_weight`) before GPTQ.
3. **Tail.** Planned modules outside the decoder layers (the LM head) are observed by running
   the model once more per batch with the layers replaced by pass-through stubs, the last one
   returning the cached final hidden states, so the final norm and the LM head see exactly what
   they see in a full forward. The logits are never computed.

Peak memory ≈ the hidden-state cache (``num_samples × seq_len × hidden × dtype size``) + one
layer's parameters and one batch of its activations + the observers' histograms. The estimate is
logged and printed before calibration starts; the measured peak RSS is stored in
``CalibrationResult.info``.

When the model has no recognisable decoder-layer stack (or ``calibration.sequential=False``),
calibration falls back to whole-model forwards with hooks on the static modules (same scales,
memory of one full forward per batch).

Nothing is applied to the model: scales are returned, hooks and stubs are always removed, and
SmoothQuant/GPTQ work on a copy of each layer whose changes are written back only after every
layer calibrated without error. A failure (NaN/Inf activations, ...) leaves the model as it was.

Compute dtype (``calibration.dtype``)
-------------------------------------
``"auto"`` (default): a float32 model on a CPU with native bfloat16 matmuls (AVX512-BF16/AMX)
runs the calibration forwards under ``torch.autocast(dtype=torch.bfloat16)``: the linear layers
and attention multiply in bfloat16 (about 3-4x faster there), norms, softmax and the residual
stream stay in float32, and observers, Hessians and SmoothQuant statistics accumulate in float32.
Everywhere else it computes in the model's dtype. ``"model"`` always computes in the model's
dtype; ``"bfloat16"`` forces the autocast. The choice is recorded in ``info["compute_dtype"]``.

Observers
---------
Each static module gets its own streaming observer (:mod:`hfptq.quant.observers`): the rule's
``activations.observer`` if the matching rule sets one, else ``activations.observer`` when it is
not the default ``"minmax"``, else ``calibration.observer``. Options (``percentile``, ``bins``,
``averaging_constant``) follow the same order and go to the observers that take them.
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from . import algorithms
from .algorithms.base import (
    CalibrationStep,
    ChannelAbsMax,
    CrossAccumulator,
    HessianAccumulator,
    LayerWork,
    StatsHook,
)
from .algorithms.gptq import GPTQStep
from .algorithms.smoothquant import SmoothQuantStep
from .architectures import (
    LayerStandIn,
    find_decoder_layers,
    find_module,
    is_quantizable_linear,
    split_layer_call,
    weight_out_in,
)
from .config import OBSERVER_NAMES, HfPtqConfig
from .errors import CalibrationError, ConfigError
from .plan import ModuleSpec, Plan
from .quant.kernels import cpu_has_fast_bf16
from .quant.observers import Observer, make_observer
from .quant.qparams import qrange
from .utils import accepted_kwargs, format_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrationResult",
    "CalibrationRun",
    "CalibrationStep",
    "ChannelAbsMax",
    "CrossAccumulator",
    "HessianAccumulator",
    "MemoryEstimate",
    "StatsHook",
    "calibrate",
    "default_steps",
    "describe_activation_scheme",
    "estimate_calibration_memory",
    "find_decoder_layers",
    "observer_settings",
]

#: Observer options and the observers that accept them.
_OBSERVER_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "percentile": ("percentile",),
    "bins": ("percentile", "entropy", "mse"),
    "averaging_constant": ("minmax",),
}
_DEFAULT_OBSERVER = "minmax"

_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (never escapes this module)."""


@dataclass
class CalibrationResult:
    """What calibration measured; consumed by :func:`hfptq.convert.convert_model`.

    Attributes:
        input_qparams: module name -> ``(scale, zero_point)`` of its static input activations:
            ``scale`` a float32 scalar tensor, ``zero_point`` an int32 scalar tensor or ``None``
            (symmetric).
        weights: module name -> replacement float weight ``[out, in]`` (SmoothQuant/GPTQ output).
        weight_qparams: module name -> weight ``(scale, zero_point)`` chosen by GPTQ.
        info: human-readable summary (dataset, samples, observers, scheme in words, seconds, peak
            RSS, estimated memory, per-module ranges); stored on ``model.hfptq_calibration``.
    """

    input_qparams: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=dict)
    weights: Dict[str, torch.Tensor] = field(default_factory=dict)
    weight_qparams: Dict[str, tuple] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Model structure
# ------------------------------------------------------------------------------------------------


def _hidden_of(output: Any) -> torch.Tensor:
    """The hidden states a layer returned (a tensor, or the first item of a tuple/ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    raise CalibrationError(
        f"A decoder layer returned {type(output).__name__}, not hidden states; this architecture cannot be "
        "calibrated layer by layer. Set calibration.sequential=False."
    )


def _sanitize_call(rest: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """Drop KV caches from a recorded layer call so that replaying it never grows a cache."""
    def is_cache(value: Any) -> bool:
        return type(value).__name__.endswith("Cache")

    rest = tuple(None if is_cache(v) else v for v in rest)
    kwargs = {k: (None if (k in _CACHE_KWARGS or is_cache(v)) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return rest, kwargs


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        if emb.weight.device.type != "meta":
            return emb.weight.device
        # offloaded by accelerate: the weight comes in, for each forward, on its hook's execution device
        device = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
        return torch.device(device if device is not None else "cpu")
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _module_device(module: nn.Module, default: torch.device) -> torch.device:
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return default


def _model_dtype(model: nn.Module) -> torch.dtype:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and isinstance(getattr(emb, "weight", None), torch.Tensor) and emb.weight.is_floating_point():
        return emb.weight.dtype
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def resolve_calibration_dtype(setting: str, model_dtype: torch.dtype, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype of the calibration forwards (``None``: the model's own dtype).

    ``"auto"``: bfloat16 for a float32 model on a CPU with native bfloat16 matmuls, else ``None``;
    ``"bfloat16"``: bfloat16 whenever the model is not already bfloat16; ``"model"``: ``None``.
    """
    if setting == "model" or model_dtype == torch.bfloat16:
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "auto":
        if device.type == "cpu" and model_dtype == torch.float32 and cpu_has_fast_bf16():
            return torch.bfloat16
        return None
    raise ConfigError(f"calibration.dtype={setting!r} is not valid. Choose one of: auto, model, bfloat16.")


def _read_status_bytes(key: str) -> Optional[int]:
    """``VmHWM`` (peak RSS) / ``VmRSS`` of this process from ``/proc/self/status`` (Linux only)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# ------------------------------------------------------------------------------------------------
# Observers per module
# ------------------------------------------------------------------------------------------------


def _rule_for(entry: ModuleSpec, config: HfPtqConfig) -> Optional[Mapping[str, Any]]:
    """The rule that decided ``entry`` (plan entries record its label in ``source``)."""
    for index, rule in enumerate(config.rules):
        if entry.source == (rule.get("name") or f"rules[{index}]"):
            return rule
    return None


def _is_static(entry: ModuleSpec) -> bool:
    return entry.quantized and entry.kind != "embedding" and (entry.activations or {}).get("mode") == "static"


def observer_settings(entry: ModuleSpec, config: HfPtqConfig) -> Dict[str, Any]:
    """Resolve the observer of one static module: ``{"observer", "bits", "symmetric", "granularity", options...}``.

    Precedence: the deciding rule's ``activations.observer`` > ``activations.observer`` (when not
    the default ``"minmax"``) > ``calibration.observer`` > ``"minmax"``; the options
    ``percentile``/``bins``/``averaging_constant`` follow the same order and are passed only to
    the observers that take them.

    Raises:
        ConfigError: ``activations.observer`` and ``calibration.observer`` both name a
            non-default observer and disagree, or the resolved name is unknown.

    Example:
        >>> cfg = HfPtqConfig(activations="static", calibration=dict(dataset="wikitext", observer="entropy"))
        >>> observer_settings(resolve_plan(model, cfg)["model.layers.0.mlp.down_proj"], cfg)  # doctest: +SKIP
        {'observer': 'entropy', 'bits': 8, 'symmetric': True, 'granularity': 'tensor'}
    """
    acts = dict(entry.activations or {})
    calib = dict(config.calibration or {})
    rule = _rule_for(entry, config)
    rule_acts = rule.get("activations") if rule is not None else None
    rule_acts = dict(rule_acts) if isinstance(rule_acts, Mapping) else {}
    global_acts = dict(config.activations or {})

    global_obs = global_acts.get("observer")
    calib_obs = calib.get("observer")
    if rule_acts.get("observer") is not None:
        name = rule_acts["observer"]
    elif global_obs not in (None, _DEFAULT_OBSERVER):
        if calib_obs not in (None, _DEFAULT_OBSERVER, global_obs):
            raise ConfigError(
                f"activations.observer={global_obs!r} and calibration.observer={calib_obs!r} disagree; set the "
                "observer in one place (per module, use rules[i].activations.observer)."
            )
        name = global_obs
    else:
        name = calib_obs or _DEFAULT_OBSERVER
    if name not in OBSERVER_NAMES:
        raise ConfigError(f"Observer {name!r} for {entry.name!r} is unknown; choose one of {', '.join(OBSERVER_NAMES)}.")

    settings: Dict[str, Any] = {
        "observer": name,
        "bits": int(acts.get("bits", 8)),
        "symmetric": bool(acts.get("symmetric", True)),
        "granularity": acts.get("granularity", "tensor"),
    }
    for option, observers in _OBSERVER_OPTIONS.items():
        if name not in observers:
            continue
        for source in (rule_acts, global_acts, calib):
            if source.get(option) is not None:
                settings[option] = source[option]
                break
    return settings


def _build_observer(entry: ModuleSpec, settings: Mapping[str, Any]) -> Observer:
    kwargs = {k: v for k, v in settings.items() if k != "observer"}
    try:
        return make_observer(settings["observer"], **kwargs)
    except ConfigError as exc:
        raise ConfigError(f"Observer of {entry.name!r} ({entry.source}): {exc}") from exc


def describe_activation_scheme(settings: Mapping[str, Any]) -> str:
    """Activation scheme in words, e.g. ``"static per-tensor (symmetric)"``."""
    gran = {"tensor": "per-tensor", "channel": "per-channel", "token": "per-token"}.get(
        settings.get("granularity", "tensor"), str(settings.get("granularity")))
    sym = "symmetric" if settings.get("symmetric", True) else "asymmetric"
    return f"static {gran} ({sym})"


def _observer_state_bytes(settings: Mapping[str, Any]) -> int:
    if settings["observer"] == "minmax":
        return 64
    bins = int(settings.get("bins", 2048))
    return 2 * bins * 8 + 4 * 8 * bins  # int64 histogram + float64 search temporaries


# ------------------------------------------------------------------------------------------------
# Memory estimate
# ------------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Estimated extra host memory of a calibration run, in bytes, by component."""

    hidden_states: int = 0
    layer_params: int = 0
    batch_activations: int = 0
    observers: int = 0
    algorithms: int = 0
    mode: str = "sequential"

    @property
    def total(self) -> int:
        return self.hidden_states + self.layer_params + self.batch_activations + self.observers + self.algorithms

    def describe(self) -> str:
        parts = [f"hidden-state cache {format_bytes(self.hidden_states, digits=1)}",
                 f"one batch of activations {format_bytes(self.batch_activations, digits=1)}",
                 f"observers {format_bytes(self.observers, digits=1)}"]
        if self.layer_params:
            parts.insert(1, f"working layer copy {format_bytes(self.layer_params, digits=1)}")
        if self.algorithms:
            parts.append(f"SmoothQuant/GPTQ state {format_bytes(self.algorithms, digits=1)}")
        return f"~{format_bytes(self.total, digits=1)} on top of the model ({self.mode}: {', '.join(parts)})"

    def to_dict(self) -> Dict[str, Any]:
        return {"total_bytes": self.total, "hidden_states_bytes": self.hidden_states,
                "layer_params_bytes": self.layer_params, "batch_activations_bytes": self.batch_activations,
                "observers_bytes": self.observers, "algorithms_bytes": self.algorithms, "mode": self.mode}


def estimate_calibration_memory(
    model: nn.Module,
    plan: Plan,
    config: HfPtqConfig,
    num_samples: int,
    seq_len: int,
    *,
    layers: Optional[Tuple[str, nn.ModuleList]] = None,
    sequential: bool = True,
) -> MemoryEstimate:
    """Estimate the host memory calibration needs on top of the model itself.

    Sequential mode: the hidden-state cache (``num_samples × seq_len × hidden × dtype size``,
    updated in place layer after layer), one batch of a layer's activations (its linears'
    outputs, a few residual-sized buffers and the attention scores), a working copy of one layer
    when SmoothQuant/GPTQ rewrite weights, the observers' histograms, and GPTQ's Hessians plus
    replacement weights. Whole-model mode: one batch of activations of every layer.

    Example:
        >>> est = estimate_calibration_memory(model, plan, cfg, num_samples=128, seq_len=512)  # doctest: +SKIP
        >>> print(est.describe())  # doctest: +SKIP
        ~223.4 MiB on top of the model (sequential: hidden-state cache 160.0 MiB, ...)
    """
    mconf = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hidden = getattr(mconf, "hidden_size", None) or getattr(emb, "embedding_dim", None) or 0
    heads = getattr(mconf, "num_attention_heads", None) or 1
    dsize = torch.empty((), dtype=_model_dtype(model)).element_size()
    batch = min(int((config.calibration or {}).get("batch_size") or 8), num_samples)
    tokens = batch * seq_len

    if layers is None and sequential:
        layers = find_decoder_layers(model)
    static = [e for e in plan if _is_static(e)]
    est = MemoryEstimate(mode="sequential" if (sequential and layers is not None) else "whole-model")
    for entry in static:
        try:
            est.observers += _observer_state_bytes(observer_settings(entry, config))
        except ConfigError:
            est.observers += _observer_state_bytes({"observer": "entropy"})
    per_layer_out = 0
    per_layer_params = 0
    per_layer_hessian = 0
    per_layer_inputs = 0  # gptq.float_targets: float inputs of a layer's GPTQ modules, every calibration token
    n_layers = 1
    if layers is not None:
        name, stack = layers
        n_layers = len(stack)
        for index, layer in enumerate(stack):
            params = sum(t.numel() * t.element_size() for t in layer.parameters())
            per_layer_params = max(per_layer_params, params)
            prefix = f"{name}.{index}."
            outs = sum(e.out_features for e in plan if e.name.startswith(prefix) and e.kind != "embedding")
            per_layer_out = max(per_layer_out, outs)
            hess = sum(e.in_features ** 2 * 4 for e in plan if e.name.startswith(prefix) and e.quantized
                       and e.kind != "embedding")
            per_layer_hessian = max(per_layer_hessian, hess)
            per_layer_inputs = max(per_layer_inputs, sum(e.in_features for e in plan if e.name.startswith(prefix)
                                                         and e.quantized and e.kind != "embedding"))
    activations = tokens * dsize * (per_layer_out + 4 * hidden) + batch * heads * seq_len * seq_len * 4
    if est.mode == "sequential":
        est.hidden_states = num_samples * seq_len * hidden * dsize
        est.batch_activations = activations + 2 * batch * seq_len * seq_len * 4  # + recorded attention masks
    else:
        est.batch_activations = activations * n_layers
    algorithms = config.smoothquant is not None or config.gptq is not None
    if algorithms:
        est.layer_params = per_layer_params
        extra = sum(e.in_features * 4 for e in plan if e.kind != "embedding")
        if config.gptq is not None:
            extra += per_layer_hessian
            extra += sum(e.in_features * e.out_features * 4 for e in plan if e.quantized and e.kind != "embedding")
            if bool(dict(config.gptq).get("float_targets")) and est.mode == "sequential":
                # the float stream's hidden states, the float inputs of one layer's modules, their cross terms
                extra += num_samples * seq_len * (hidden * dsize + per_layer_inputs * 4) + per_layer_hessian
        est.algorithms = extra
    return est


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """Observer state of one static module."""

    entry: ModuleSpec
    settings: Dict[str, Any]
    observer: Observer


def _check_batches(b: Any, model: nn.Module, batch_size: int) -> None:
    """Calibration batches: a non-empty integer ``[num_samples, seq_len]`` tensor within the vocabulary."""
    if not isinstance(b, torch.Tensor):
        raise CalibrationError(f"Calibration batches must be a LongTensor [num_samples, seq_len] (got {type(b).__name__}).")
    if b.dim() != 2 or b.numel() == 0:
        raise CalibrationError(
            f"Calibration batches must be a non-empty [num_samples, seq_len] tensor of token ids (got shape "
            f"{tuple(b.shape)}); build them with hfptq.data.calibration_batches(spec, tokenizer)."
        )
    if b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
        raise CalibrationError(f"Calibration batches must hold integer token ids (got dtype {b.dtype}).")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    low, high = int(b.min()), int(b.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise CalibrationError(
            f"Calibration token ids span [{low}, {high}] but the model's vocabulary has {vocab} entries; the "
            "tokenizer does not match the model (set calibration.tokenizer to the model's own tokenizer)."
        )
    if batch_size <= 0:
        raise ConfigError(f"calibration.batch_size must be a positive integer (got {batch_size}).")


class _LayerInputs:
    """The layer stack's inputs, captured once: every sample's hidden states at the first layer
    (``cache``), each layer's extra call arguments per batch size (``calls``), each layer's output
    structure (``templates``) and the order the model calls its layers in (``order``)."""

    def __init__(self, run: "CalibrationRun") -> None:
        self.run = run
        self.cache: Optional[torch.Tensor] = None
        self.calls: Dict[int, Dict[int, Tuple[tuple, dict]]] = {}
        self.templates: Dict[int, Dict[int, Any]] = {}
        self.order: List[int] = []

    def probe(self, ids: torch.Tensor, size: int, real: bool) -> Optional[Tuple[torch.Tensor, dict, dict, list]]:
        """Run one batch recording every layer's call: ``(layer-0 input, calls, output templates, order)``.

        ``real=False`` swaps the layers for recording pass-through stubs (costs only the embedding);
        ``real=True`` runs the real layers with hooks (needed when a layer's output is not a plain
        tensor). Returns None when the layers do not form a simple chain.
        """
        run = self.run
        name, layers = run.layers
        n = len(layers)
        calls: Dict[int, Tuple[tuple, dict]] = {}
        templates: Dict[int, Any] = {}
        order: List[int] = []
        state: Dict[str, Any] = {"first": None, "last_out": None, "chain": True}

        def record(index: int, hidden: Any, rest: tuple, kw: dict, passthrough: bool = False) -> None:
            if not isinstance(hidden, torch.Tensor):
                state["chain"] = False
                raise _StopForward
            order.append(index)
            if state["first"] is None:
                state["first"] = hidden
            elif state["last_out"] is not None and not (
                hidden is state["last_out"]
                or (hidden.shape == state["last_out"].shape and torch.equal(hidden, state["last_out"]))
            ):
                state["chain"] = False
            # a pass-through stub returns its input: the next layer must receive that very tensor
            state["last_out"] = hidden if passthrough else None
            calls[index] = _sanitize_call(rest, kw)

        def pre(index: int):
            def hook(module, args, kwargs):
                hidden, rest, kw = split_layer_call(args, kwargs)
                record(index, hidden, rest, kw)
            return hook

        def post(index: int):
            def hook(module, args, kwargs, output):
                templates[index] = _strip_template(output)
                state["last_out"] = _hidden_of(output)
                if index == n - 1:
                    raise _StopForward
            return hook

        def stop(module, args, kwargs):
            raise _StopForward

        handles = []
        originals = {i: layers[i] for i in range(n)}
        try:
            if real:
                for index in range(n):
                    handles.append(layers[index].register_forward_pre_hook(pre(index), with_kwargs=True))
                    handles.append(layers[index].register_forward_hook(post(index), with_kwargs=True))
            else:
                for index in range(n):
                    stub = LayerStandIn(originals[index], template=torch.empty(0))
                    stub.recorder = (lambda h, r, k, _i=index: record(_i, h, r, k, passthrough=True))
                    layers[index] = stub
            # never compute logits, even when the loop skips the last layers of the list
            out_emb = run.model.get_output_embeddings() if hasattr(run.model, "get_output_embeddings") else None
            if out_emb is not None:
                handles.append(out_emb.register_forward_pre_hook(stop, with_kwargs=True))
            try:
                run._run_model(ids)
            except CalibrationError:
                raise
            except Exception as exc:  # a stub broke the model's loop: retry with the real layers
                if real:
                    raise
                logger.debug("hfptq calibration: pass-through probe failed (%s); probing with the real layers", exc)
                return None
        finally:
            for handle in handles:
                handle.remove()
            for i, module in originals.items():
                layers[i] = module
        first = state["first"]
        if first is None or not state["chain"] or not order or order[0] != 0 or order != sorted(set(order)):
            return None  # layers called out of order, twice (shared weights), not at all, or not chained
        if not real:
            templates = {i: torch.empty(0) for i in order}
        return first, calls, templates, order

    def capture(self) -> bool:
        """Fill the hidden-state cache and record each layer's call per batch size.

        Returns False when the layer stack is not a simple chain (fall back to whole-model mode).
        """
        run = self.run
        name, layers = run.layers
        self.calls, self.templates, self.order, self.cache = {}, {}, [], None
        real_probe = False
        for b, (start, end) in enumerate(run.slices):
            run.batch_index = b
            size = end - start
            ids = run._ids(start, end)
            if size not in self.calls:
                probed = None if real_probe else self.probe(ids, size, real=False)
                if probed is None:
                    real_probe = True
                    probed = self.probe(ids, size, real=True)
                if probed is None:
                    return False
                first, calls, templates, order = probed
                if not self.order:
                    self.order = order
                elif order != self.order:
                    return False
                self.calls[size] = calls
                self.templates[size] = templates
            else:
                captured: Dict[str, Any] = {}

                def capture(module, args, kwargs):
                    captured["hidden"] = split_layer_call(args, kwargs)[0]
                    raise _StopForward

                handle = layers[self.order[0]].register_forward_pre_hook(capture, with_kwargs=True)
                try:
                    run._run_model(ids)
                finally:
                    handle.remove()
                first = captured.get("hidden")
                if not isinstance(first, torch.Tensor):
                    return False
            if first.dim() < 2 or first.shape[0] != size:
                return False
            if self.cache is None:
                self.cache = torch.empty((run.num_samples,) + tuple(first.shape[1:]), dtype=first.dtype, device="cpu")
            elif tuple(first.shape[1:]) != tuple(self.cache.shape[1:]):
                return False
            if not bool(torch.isfinite(first).all()):
                raise CalibrationError(
                    f"The input of {name}.0 (the embedding output) holds NaN/Inf in calibration batch {b} (samples "
                    f"{start}-{end - 1}); check the model's embedding weights. Nothing was applied to the model."
                )
            self.cache[start:end].copy_(first)
            run._tick("hfptq: calibration inputs")
        return True


class CalibrationRun:
    """One calibration run (made by :func:`calibrate`): passes, memory, commit-on-success; algorithms are ``steps``.

    Steps (:class:`hfptq.algorithms.base.CalibrationStep`) reach the run through ``model``,
    ``plan``, ``config``, ``slots``, ``steps``, the result dicts ``weights`` / ``weight_qparams`` /
    ``plan_updates``, and the passes :meth:`layer_pass`, :meth:`tail_pass`,
    :meth:`forward_first_batch`.

    Example:
        >>> result = CalibrationRun(model, plan, config, ids, progress=False, extra_stats_hooks=(),
        ...                         steps=default_steps(config)).run()                  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, plan: Plan, config: HfPtqConfig, batches: torch.Tensor, progress: bool,
                 extra_stats_hooks: Sequence[StatsHook], steps: Sequence[CalibrationStep]) -> None:
        self.model, self.plan, self.config, self.batches, self.progress = model, plan, config, batches, progress
        self.extra_stats_hooks = list(extra_stats_hooks)
        self.steps = list(steps)
        calib = config.calibration or {}
        self.batch_size = int(calib.get("batch_size") or 8)
        self.sequential = bool(calib.get("sequential", True))
        self.input_device = _input_device(model)
        self.autocast_dtype = resolve_calibration_dtype(str(calib.get("dtype") or "auto"), _model_dtype(model),
                                                        self.input_device)
        self.num_samples, self.seq_len = 0, 0
        self.slices: List[Tuple[int, int]] = []
        self.slots: Dict[str, _Slot] = {}
        self.layers: Optional[Tuple[str, nn.ModuleList]] = None
        self.batch_index = 0
        self.bar: Optional[tqdm] = None
        # the layer stack's captured inputs: hidden-state cache, recorded calls per batch size, output templates
        self.cache: Optional[torch.Tensor] = None
        self.calls: Dict[int, Dict[int, Tuple[tuple, dict]]] = {}
        self.templates: Dict[int, Dict[int, Any]] = {}
        self.order: List[int] = []
        self.last_needed, self.tail_needed = -1, False
        # results; changes to the model wait in ``pending`` until everything succeeded
        self.weights: Dict[str, torch.Tensor] = {}
        self.weight_qparams: Dict[str, tuple] = {}
        self.pending: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (model tensor, new value)
        self.smoothed: Dict[str, nn.Module] = {}  # planned linears whose weight a step changed
        self.plan_updates: List[Tuple[Any, Any]] = []  # (embedding entry tied to a smoothed head, 1 / s)
        self.smoothed_heads: List[str] = []  # heads whose smoothed weight a step handed over in ``weights``
        # an offloaded model (hfptq.offload): ``enter(run, index)`` brings a decoder layer's weights into memory
        # before its work, ``leave(run, index)`` commits and quantizes it after, ``before_tail(run)`` loads the rest
        self.layer_hooks: Optional[Any] = None

    # -------------------------------------------------------------------- commit
    def _mark_smoothed(self, full: str) -> None:
        # recorded in the plan (and checkpoint): on CPUs whose FBGEMM saturates, a module whose weight a step
        # scaled (SmoothQuant moved activation outliers into it) takes 7-bit activations, not 7-bit weights
        entry = self.plan.get(full)
        if entry is not None:
            entry.extra["smoothed"] = True

    def commit_pending(self, only: Optional[set] = None) -> None:
        """Copy the steps' pending values into the model (those whose target's ``id`` is in ``only``, if given);
        run() commits all at the end, an offloaded run each layer's when it leaves it."""
        kept = []
        with torch.no_grad():
            for target, value in self.pending:
                if only is None or id(target) in only:
                    target.copy_(value.to(device=target.device, dtype=target.dtype))
                else:
                    kept.append((target, value))
        self.pending = kept

    def hand_over_smoothed(self, names: Sequence[str]) -> None:
        """Hand the smoothed planned linears ``names`` over as the model's own, updated, weights (``weights``),
        marked ``smoothed`` in the plan; run() does it for all at the end, an offloaded run per layer."""
        for full in names:
            self.weights[full] = weight_out_in(self.smoothed.pop(full)).detach()
            self._mark_smoothed(full)

    # -------------------------------------------------------------------- validation
    def validate(self) -> None:
        b = self.batches
        _check_batches(b, self.model, self.batch_size)
        self.num_samples, self.seq_len = int(b.shape[0]), int(b.shape[1])
        self.slices = [(s, min(s + self.batch_size, self.num_samples)) for s in range(0, self.num_samples, self.batch_size)]
        for entry in self.plan:
            if not _is_static(entry):
                continue
            module = find_module(self.model, entry.name)
            if module is None or not is_quantizable_linear(module):
                raise CalibrationError(
                    f"The plan names {entry.name!r} ({entry.module_class}) but the model has no float Linear there; "
                    "was the model already quantized? Calibrate the float model."
                )
            settings = observer_settings(entry, self.config)
            if settings["granularity"] != "tensor":
                raise ConfigError(
                    f"{entry.source}: static activations of {entry.name!r} use granularity="
                    f"{settings['granularity']!r}; the quantized Linear stores one frozen input scale per tensor. "
                    "Use activations granularity='tensor' (or mode='dynamic' for per-token scales)."
                )
            self.slots[entry.name] = _Slot(entry, settings, _build_observer(entry, settings))
        for step in self.steps:
            step.validate(self)
        self.layers = find_decoder_layers(self.model) if self.sequential else None
        if self.layers is None and self.steps:
            raise ConfigError(
                "SmoothQuant/GPTQ calibrate one decoder layer at a time, but "
                + ("calibration.sequential=False." if not self.sequential else
                   f"no decoder-layer stack was found in {type(self.model).__name__}.")
                + " Set calibration.sequential=True (and use a model with a layer stack) or disable smoothquant/gptq."
            )
        if not self.slots and not self.steps and not self.extra_stats_hooks:
            logger.info("hfptq calibration: no module needs calibration statistics; nothing to do.")

    # -------------------------------------------------------------------- forwards and hooks
    def _ids(self, start: int, end: int) -> torch.Tensor:
        return self.batches[start:end].to(device=self.input_device, dtype=torch.long)

    def _compute_words(self) -> str:
        """The calibration compute dtype in words (``"bfloat16 (autocast)"``, ``"float32"``)."""
        if self.autocast_dtype is not None:
            return f"{str(self.autocast_dtype).replace('torch.', '')} (autocast)"
        return str(_model_dtype(self.model)).replace("torch.", "")

    def compute(self):
        """Context of every calibration forward: bfloat16 autocast when ``calibration.dtype`` asks for it."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.input_device.type, dtype=self.autocast_dtype)

    def _run_model(self, ids: torch.Tensor) -> None:
        kwargs: Dict[str, Any] = {"input_ids": ids}
        if "use_cache" in accepted_kwargs(self.model)[0]:
            kwargs["use_cache"] = False
        try:
            with self.compute():
                self.model(**kwargs)
        except _StopForward:
            pass

    def _feed(self, name: str, x: torch.Tensor, consumers: Sequence[StatsHook], slot: Optional[_Slot]) -> None:
        if not isinstance(x, torch.Tensor):
            raise CalibrationError(f"{name!r} was called without a tensor input ({type(x).__name__}); cannot observe it.")
        x2 = x.detach().reshape(-1, x.shape[-1])
        if slot is not None:
            try:
                slot.observer.observe(x2)
            except CalibrationError as exc:
                start, end = self.slices[self.batch_index]
                if bool(torch.isfinite(x2).all()):
                    raise CalibrationError(
                        f"Observer of {name!r} failed in calibration batch {self.batch_index}: {exc}"
                    ) from exc
                raise CalibrationError(
                    f"Non-finite activation (NaN/Inf) at the input of {name!r} in calibration batch "
                    f"{self.batch_index} (samples {start}-{end - 1}): {exc}. Likely causes: float16 overflow (load the "
                    "model in float32 or bfloat16) or NaN/Inf in the model's weights. Nothing was applied to the model."
                ) from exc
        for hook in consumers:
            hook(name, x2, self.batch_index)

    @contextmanager
    def _hooks(self, modules: Mapping[str, nn.Module], consumers: Sequence[StatsHook], observe: bool,
               stop_after: Optional[nn.Module] = None) -> Iterator[None]:
        """Forward pre-hooks feeding ``consumers`` (and the observers when ``observe``)."""
        handles = []
        stops = False
        try:
            for name, module in modules.items():
                slot = self.slots.get(name) if observe else None
                if slot is None and not consumers:
                    continue
                stops = stops or module is stop_after

                def hook(mod, args, kwargs, _name=name, _slot=slot):
                    x = args[0] if args else next(iter(kwargs.values()))
                    self._feed(_name, x, consumers, _slot)
                    if mod is stop_after:
                        raise _StopForward

                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if stop_after is not None and not stops:
                def stop(mod, args, kwargs):
                    raise _StopForward

                handles.append(stop_after.register_forward_pre_hook(stop, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _tick(self, desc: Optional[str] = None) -> None:
        if self.bar is not None:
            if desc is not None:
                self.bar.set_description(desc, refresh=False)
            self.bar.update(1)

    def _announce(self, message: str) -> None:
        """Log ``message``; with progress bars on and INFO logging off, also show it above the bars
        (on stderr, with the bars: once, never on stdout)."""
        logger.info(message)
        if self.progress and not logger.isEnabledFor(logging.INFO):
            tqdm.write(message, file=sys.stderr)

    # -------------------------------------------------------------------- passes (also used by the steps)
    def layer_pass(self, layer: LayerWork, *, write: bool, modules: Optional[Mapping[str, nn.Module]] = None,
                   consumers: Sequence[StatsHook] = (), observe: bool = False, stop_after: Optional[nn.Module] = None,
                   module: Optional[nn.Module] = None, cache: Optional[torch.Tensor] = None) -> None:
        """Run ``module`` (default ``layer.work``) over every calibration batch of ``cache`` (default: the
        quantized stream) with pre-hooks on ``modules`` feeding ``consumers`` (and the observers when
        ``observe``), writing the outputs back when ``write``; ``stop_after`` ends each batch at that module."""
        name, index = layer.name, layer.index
        module = layer.work if module is None else module
        cache = self.cache if cache is None else cache
        device = _module_device(module, self.input_device)
        with torch.inference_mode(), self._hooks(modules or {}, consumers, observe, stop_after):
            for b, (start, end) in enumerate(self.slices):
                self.batch_index = b
                rest, kwargs = self.calls[end - start][index]
                hidden = cache[start:end].to(device)
                try:
                    with self.compute():
                        out = _hidden_of(module(hidden, *rest, **kwargs))
                except _StopForward:
                    self._tick(layer.desc)
                    continue
                if not bool(torch.isfinite(out).all()):
                    raise CalibrationError(
                        f"Decoder layer {name} produced NaN/Inf in calibration batch {b} (samples {start}-{end - 1}). "
                        "Likely causes: float16 overflow (load the model in float32 or bfloat16) or NaN/Inf in the "
                        "layer's weights. Nothing was applied to the model."
                    )
                if write:
                    if out.shape != hidden.shape:
                        raise CalibrationError(
                            f"Decoder layer {name} changes the hidden-state shape ({tuple(hidden.shape)} -> "
                            f"{tuple(out.shape)}); calibrate this architecture with calibration.sequential=False."
                        )
                    cache[start:end].copy_(out)
                self._tick(layer.desc)

    def forward_first_batch(self, layer: LayerWork, module: Optional[nn.Module] = None) -> None:
        """One forward of ``module`` (default ``layer.work``) on the first calibration batch (for probes)."""
        module = layer.work if module is None else module
        start, end = self.slices[0]
        rest, kwargs = self.calls[end - start][layer.index]
        with torch.inference_mode(), self.compute():
            module(self.cache[start:end].to(_module_device(module, self.input_device)), *rest, **kwargs)

    def tail_pass(self, modules: Mapping[str, nn.Module], consumers: Sequence[StatsHook], observe: bool,
                  extra_hooks: Sequence[Tuple[nn.Module, Callable]] = ()) -> None:
        """Run the planned modules after the layer stack on the cached last-layer outputs: the layers are
        replaced by pass-through stubs, the last one returning the cache (the logits are never computed)."""
        name, layers = self.layers
        out_emb = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        originals = {i: layers[i] for i in self.order}
        last = self.order[-1]
        handles = []
        try:
            for module, hook in extra_hooks:
                handles.append(module.register_forward_hook(hook))
            for b, (start, end) in enumerate(self.slices):
                self.batch_index = b
                templates = self.templates[end - start]
                stubs = {i: LayerStandIn(originals[i], template=templates[i]) for i in self.order}
                stubs[last].inject = self.cache[start:end].to(_module_device(originals[last], self.input_device))
                for i, stub in stubs.items():
                    layers[i] = stub
                try:
                    with torch.inference_mode(), self._hooks(modules, consumers, observe=observe, stop_after=out_emb):
                        self._run_model(self._ids(start, end))
                finally:
                    for i, module in originals.items():
                        layers[i] = module
                self._tick("hfptq: calibrating outside the layers")
        finally:
            for handle in handles:
                handle.remove()
            for i, module in originals.items():
                layers[i] = module

    # -------------------------------------------------------------------- sequential: layers
    def _plan_work(self) -> None:
        """Which layers must run (``last_needed``) and whether the tail pass is needed."""
        inside = f"{self.layers[0]}."
        self.tail_needed = bool(any(not n.startswith(inside) for n in self.slots) or self._extra_tail()
                                or any(step.tail_needed(self) for step in self.steps))
        self.last_needed = len(self.order) - 1
        if self.tail_needed or self.extra_stats_hooks or any(step.needs_every_layer for step in self.steps):
            return
        busy = list(self.slots) + [n for step in self.steps for n in step.module_names(self)]
        self.last_needed = -1
        for position, index in enumerate(self.order):
            if any(n.startswith(f"{self.layers[0]}.{index}.") for n in busy):
                self.last_needed = position

    def _run_layers(self) -> None:
        name, layers = self.layers
        for step in self.steps:
            step.start_layers(self)
        linear_entries = [e for e in self.plan if e.kind != "embedding" and e.precision != "skip"]
        for position, index in enumerate(self.order):
            if position > self.last_needed:
                break  # later layers feed no observer, algorithm or tail module
            if self.layer_hooks is not None:
                self.layer_hooks.enter(self, index)
            layer = layers[index]
            prefix = f"{name}.{index}."
            if self.steps:  # steps change a working copy, committed only when everything succeeded
                with torch.no_grad():
                    work = copy.deepcopy(layer)
            else:
                work = layer
            lw = LayerWork(index, f"{name}.{index}", layer, work,
                           modules={e.name: work.get_submodule(e.name[len(prefix):])
                                    for e in linear_entries if e.name.startswith(prefix)},
                           all_linears={f"{prefix}{rel}": m for rel, m in work.named_modules()
                                        if rel and is_quantizable_linear(m)},
                           desc=f"hfptq: calibrating layer {position + 1}/{len(self.order)}")
            for step in self.steps:
                step.before_observe(self, lw)
            # the observing pass: observers of the static modules, extra hooks, the steps' statistics
            consumers: List[StatsHook] = list(self.extra_stats_hooks)
            stops = []
            for step in self.steps:
                hooks, stop = step.observe_hooks(self, lw)
                consumers += hooks
                stops += [stop] if stop is not None else []
            others_need_all = self.extra_stats_hooks or any(n in self.slots for n in lw.modules)
            stop_after = stops[0] if len(stops) == 1 and not others_need_all else None
            rewrites = any([step.rewrites_outputs(self, lw) for step in self.steps])
            self.layer_pass(lw, write=not rewrites, modules=lw.modules, consumers=consumers, observe=True,
                            stop_after=stop_after)
            for step in self.steps:
                step.after_observe(self, lw)
            if rewrites:  # the next layer's inputs come from the changed layer
                self.layer_pass(lw, write=True)
            if self.steps:
                self._record_changes(layer, work, prefix)
            del work, lw  # (an offloaded layer's float modules must not outlive its conversion)
            if self.layer_hooks is not None:
                self.layer_hooks.leave(self, index)
        for step in self.steps:
            step.end_layers(self)

    def _record_changes(self, layer: nn.Module, work: nn.Module, prefix: str) -> None:
        """Remember the tensors the steps changed in ``work``; written to ``layer`` after success.

        Weights a step hands over in ``weights`` (GPTQ's, in float32) are not written back;
        everything else that changed (smoothed norms and linears) is.
        """
        original = dict(layer.named_parameters())
        original.update(dict(layer.named_buffers()))
        changed = dict(work.named_parameters())
        changed.update(dict(work.named_buffers()))
        handed_over = {f"{n[len(prefix):]}.weight" for n in self.weights if n.startswith(prefix)}
        with torch.no_grad():
            for rel, new in changed.items():
                old = original.get(rel)
                if old is None or old.shape != new.shape or rel in handed_over:
                    continue
                if not torch.equal(old, new):
                    self.pending.append((old, new.detach()))
                    module_rel = rel.rpartition(".")[0]
                    full = f"{prefix}{module_rel}"
                    entry = self.plan.get(full)
                    if rel.endswith(".weight") and entry is not None and entry.precision != "skip" \
                            and entry.kind != "embedding":
                        self.smoothed[full] = layer.get_submodule(module_rel)

    # -------------------------------------------------------------------- sequential: tail
    def _extra_tail(self) -> Dict[str, nn.Module]:
        """Planned linears outside the layer stack, for ``extra_stats_hooks``."""
        if not self.extra_stats_hooks:
            return {}
        inside = f"{self.layers[0]}."
        return {e.name: self.model.get_submodule(e.name) for e in self.plan
                if e.kind != "embedding" and e.precision != "skip" and not e.name.startswith(inside)}

    def _run_tail(self) -> None:
        if not self.tail_needed:
            return
        changed: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for step in self.steps:
            changed += step.before_tail(self)
        self.pending.extend((p, w.detach()) for p, w in changed)
        # the tail's observers and statistics must see those changes (SmoothQuant's smoothed final norm)
        saved = [p.detach().clone() for p, _ in changed]
        try:
            with torch.no_grad():
                for p, w in changed:
                    p.copy_(w)
            self._run_tail_stats()
        finally:
            with torch.no_grad():
                for (p, _), old in zip(changed, saved):
                    p.copy_(old)

    def _run_tail_stats(self) -> None:
        inside = f"{self.layers[0]}."
        names = [n for n in self.slots if not n.startswith(inside)]
        consumers: List[StatsHook] = list(self.extra_stats_hooks)
        for step in self.steps:
            step_names, hooks = step.tail_hooks(self)
            names += [n for n in step_names if n not in names]
            consumers += hooks
        extra_tail = self._extra_tail()
        if not (names or extra_tail):
            return
        modules = {n: self.model.get_submodule(n) for n in names}
        modules.update(extra_tail)
        self.tail_pass(modules, consumers, observe=True)
        for step in self.steps:
            step.after_tail(self, modules)

    # -------------------------------------------------------------------- whole-model fallback
    def _run_whole_model(self) -> None:
        modules = {n: self.model.get_submodule(n) for n in self.slots}
        if self.extra_stats_hooks:
            modules.update({e.name: self.model.get_submodule(e.name) for e in self.plan
                            if e.kind != "embedding" and e.precision != "skip"})
        out_emb = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        with torch.inference_mode(), self._hooks(modules, list(self.extra_stats_hooks), observe=True, stop_after=out_emb):
            for b, (start, end) in enumerate(self.slices):
                self.batch_index = b
                self._run_model(self._ids(start, end))
                self._tick("hfptq: calibrating (whole model)")

    # -------------------------------------------------------------------- driver
    def run(self) -> CalibrationResult:
        started = time.perf_counter()
        rss_before = _read_status_bytes("VmRSS")
        self.validate()
        estimate = estimate_calibration_memory(self.model, self.plan, self.config, self.num_samples, self.seq_len,
                                               layers=self.layers, sequential=self.layers is not None)
        n_batches = len(self.slices)
        passes = 1 + sum(step.passes_per_layer(self) for step in self.steps)
        observers = sorted({s.settings["observer"] for s in self.slots.values()})
        self._announce(
            f"hfptq calibration: {self.num_samples} samples x {self.seq_len} tokens in {n_batches} batches of "
            f"{self.batch_size}; {len(self.slots)} static modules (observer: {', '.join(observers) or 'none'}); "
            f"computing in {self._compute_words()}; estimated memory {estimate.describe()}"
        )
        was_training = self.model.training
        self.model.eval()
        mode = estimate.mode
        try:
            chained = False
            if self.layers is not None:
                self.bar = tqdm(total=n_batches * (1 + passes * len(self.layers[1]) + 1), desc="hfptq: calibration inputs",
                                disable=not self.progress, leave=False)
                inputs = _LayerInputs(self)
                with torch.inference_mode():
                    chained = inputs.capture()
                self.cache, self.calls, self.templates, self.order = (inputs.cache, inputs.calls, inputs.templates,
                                                                      inputs.order)
                if not chained:
                    if self.steps:
                        raise ConfigError(
                            f"The layers of {self.layers[0]} are not called one after the other on the previous layer's "
                            "output, so SmoothQuant/GPTQ cannot calibrate them layer by layer; disable smoothquant/gptq."
                        )
                    logger.warning("hfptq calibration: %s is not a simple chain of layers; falling back to whole-model "
                                   "forwards.", self.layers[0])
                    mode, self.cache = "whole-model", None
                    self.bar.close()
            if chained:
                self._plan_work()
                self.bar.total = n_batches * (1 + passes * (self.last_needed + 1) + int(self.tail_needed))
                self.bar.refresh()
                self._run_layers()
                if self.layer_hooks is not None:
                    self.layer_hooks.before_tail(self)
                self._run_tail()
            else:
                self.bar = tqdm(total=n_batches, desc="hfptq: calibrating (whole model)", disable=not self.progress,
                                leave=False)
                self._run_whole_model()
            input_qparams, ranges = _frozen_qparams(self.slots)
        finally:
            if self.bar is not None:
                self.bar.close()
            self.cache, self.calls, self.templates = None, {}, {}
            self.model.train(was_training)
        seconds = time.perf_counter() - started
        peak = _read_status_bytes("VmHWM")
        info = _run_info(self, mode, observers, seconds, peak, rss_before, estimate, ranges)
        # Everything succeeded: only now do the steps' changes reach the model (GPTQ weights travel in the
        # result); the smoothed planned linears are handed over as the model's own, updated, weights.
        self.commit_pending()
        for entry, inverse in self.plan_updates:
            entry.extra["embed_channel_scale"] = inverse
        self.plan_updates = []
        self.hand_over_smoothed(list(self.smoothed))
        for full in self.smoothed_heads:  # their weights are already in ``weights``
            self._mark_smoothed(full)
        self.smoothed_heads = []
        logger.info("hfptq calibration done in %.1f s (peak RSS %s)", seconds, format_bytes(peak, digits=1))
        return CalibrationResult(input_qparams=input_qparams, weights=dict(self.weights),
                                 weight_qparams=dict(self.weight_qparams), info=info)

def _run_info(run: "CalibrationRun", mode: str, observers: List[str], seconds: float, peak: Optional[int],
              rss_before: Optional[int], estimate: MemoryEstimate, ranges: Dict[str, Any]) -> Dict[str, Any]:
    """``CalibrationResult.info``: what ran, on what, how long, how much memory; each step's records."""
    schemes: Dict[str, int] = {}
    for slot in run.slots.values():
        words = describe_activation_scheme(slot.settings)
        schemes[words] = schemes.get(words, 0) + 1
    calib = dict(run.config.calibration or {})
    dataset = calib.get("dataset")
    info: Dict[str, Any] = {
        "dataset": dataset if isinstance(dataset, str) or dataset is None else f"<in-memory {type(dataset).__name__}>",
        "config": calib.get("config"),
        "split": calib.get("split"),
        "num_samples": run.num_samples,
        "seq_len": run.seq_len,
        "batch_size": run.batch_size,
        "num_tokens": run.num_samples * run.seq_len,
        "engine": (f"sequential, layer by layer ({len(run.order)} layers of {run.layers[0]})"
                   if mode == "sequential" else "whole-model forwards"),
        "observer": observers[0] if len(observers) == 1 else (observers or None),
        "activation_scheme": (next(iter(schemes)) if len(schemes) == 1 else
                              "; ".join(f"{w} for {c} modules" for w, c in schemes.items()) or None),
        "compute_dtype": run._compute_words(),
        "seconds": round(seconds, 3),
        "peak_rss_bytes": peak,
        "rss_before_bytes": rss_before,
        "estimated_memory_bytes": estimate.total,
        "estimated_memory": estimate.to_dict(),
        "modules": ranges,
    }
    for step in run.steps:
        info[step.name] = step.records
    if run.steps:
        # what each accuracy algorithm bought, for the report
        info["algorithms"] = algorithms.summarize_algorithms(info.get("smoothquant"), info.get("gptq"), run.config)
    return info


def _frozen_qparams(slots: Mapping[str, _Slot]) -> Tuple[Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]],
                                                        Dict[str, Dict[str, Any]]]:
    """The frozen input ``(scale, zero_point)`` of every static module, and its range in words for the report."""
    missing = [n for n, s in slots.items() if s.observer.num_batches == 0]
    if missing:
        raise CalibrationError(
            f"{len(missing)} static module(s) never received an input during calibration (e.g. {missing[0]!r}): "
            "the model's forward does not call them on token ids. Keep them dynamic or skip them with a rule; "
            "nothing was applied to the model."
        )
    input_qparams: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    ranges: Dict[str, Dict[str, Any]] = {}
    for name, slot in slots.items():
        with torch.inference_mode():
            scale, zero_point = slot.observer.compute_qparams()
            observed = _observed_range(slot.observer)
        scale = scale.detach().clone().float().reshape(())
        symmetric = slot.settings["symmetric"]
        zp = None if symmetric else zero_point.detach().clone().to(torch.int32).reshape(())
        input_qparams[name] = (scale, zp)
        qmin, qmax = qrange(slot.settings["bits"], symmetric)
        z = 0 if zp is None else int(zp)
        ranges[name] = {
            "observer": slot.settings["observer"],
            "scheme": describe_activation_scheme(slot.settings),
            "scale": float(scale),
            "zero_point": None if zp is None else int(zp),
            "range": [float((qmin - z) * scale), float((qmax - z) * scale)],
            "observed_range": observed,
        }
    return input_qparams, ranges


def _strip_template(output: Any) -> Any:
    """Keep only the structure of a layer output (no reference to its hidden states)."""
    if isinstance(output, torch.Tensor):
        return torch.empty(0)
    if isinstance(output, tuple):
        return (torch.empty(0),) + tuple(output[1:])
    if isinstance(output, list):
        return [torch.empty(0)] + list(output[1:])
    return output


def _observed_range(observer: Observer) -> Optional[List[float]]:
    lo, hi = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
    if isinstance(lo, torch.Tensor) and isinstance(hi, torch.Tensor) and lo.numel() == 1 and hi.numel() == 1:
        return [float(lo), float(hi)]
    return None


def calibrate(
    model: nn.Module,
    plan: Plan,
    config: HfPtqConfig,
    batches: torch.LongTensor,
    *,
    progress: bool = True,
    extra_stats_hooks: Sequence[StatsHook] = (),
    steps: Optional[Sequence[CalibrationStep]] = None,
) -> CalibrationResult:
    """Run the calibration tokens through ``model`` and measure static activation ranges.

    Everything (batches, observer names and options, granularities, algorithm availability) is
    validated before the model runs; the model's weights, modules and hooks are unchanged
    unless calibration succeeds, and even then only SmoothQuant/GPTQ write to it.

    Args:
        model: the float model (a Transformers model, or any module with ``get_input_embeddings``
            whose forward takes ``input_ids``).
        plan: the resolved plan; modules with ``activations.mode == "static"`` get observers.
        config: supplies ``calibration`` (``batch_size``, ``observer``, ``sequential``...),
            ``activations``/rules (observer overrides), ``smoothquant`` and ``gptq``.
        batches: token ids ``[num_samples, seq_len]`` (see :func:`hfptq.data.calibration_batches`).
        progress: show tqdm progress bars and print the memory estimate.
        extra_stats_hooks: callables ``hook(module_name, x, batch_index)`` that receive the 2-D
            input of every planned linear during the observing pass (e.g. :class:`ChannelAbsMax`).
        steps: the algorithms run inside the sequential engine
            (:class:`hfptq.algorithms.base.CalibrationStep`); default :func:`default_steps`
            (SmoothQuant then GPTQ, as the config enables them).

    Returns:
        A :class:`CalibrationResult`.

    Raises:
        CalibrationError: bad batches, NaN/Inf activations (naming the module or layer and the
            batch), or a static module the forward never reaches.
        ConfigError: conflicting/invalid observer settings, unsupported granularity.

    Example:
        >>> cfg = HfPtqConfig(activations="static", calibration=dict(dataset="wikitext", config="wikitext-2-raw-v1",
        ...                   observer="entropy", num_samples=128, seq_len=512))
        >>> plan = resolve_plan(model, cfg)                                          # doctest: +SKIP
        >>> ids = hfptq.data.calibration_batches(cfg.calibration, tokenizer)         # doctest: +SKIP
        >>> result = calibrate(model, plan, cfg, ids)                                # doctest: +SKIP
        >>> result.input_qparams["model.layers.0.mlp.down_proj"]                     # doctest: +SKIP
        (tensor(0.0123), None)
    """
    steps = default_steps(config) if steps is None else list(steps)
    return CalibrationRun(model, plan, config, batches, progress, extra_stats_hooks, steps).run()


def default_steps(config: HfPtqConfig) -> List[CalibrationStep]:
    """The calibration steps ``config`` enables, in order: SmoothQuant (``config.smoothquant``), GPTQ (``config.gptq``).

    Example:
        >>> [step.name for step in default_steps(HfPtqConfig(smoothquant={"alpha": 0.5}, gptq={}))]  # doctest: +SKIP
        ['smoothquant', 'gptq']
    """
    steps: List[CalibrationStep] = []
    if config.smoothquant is not None:
        steps.append(SmoothQuantStep(config.smoothquant))
    if config.gptq is not None:
        steps.append(GPTQStep(config.gptq))
    return steps
