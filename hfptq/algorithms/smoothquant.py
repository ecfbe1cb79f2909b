"""SmoothQuant: move activation outliers into the weights, folded so inference cost is unchanged.

For a linear ``y = x W^T`` whose input has a few outlier channels, dividing input channel ``j`` by
``s_j`` and multiplying weight column ``j`` by ``s_j`` leaves ``y`` unchanged in exact arithmetic
while flattening the activation range that per-token/per-tensor INT8 must cover::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

The division of ``x`` is folded into whatever produced it, so nothing is added at run time:

* a norm (RMSNorm / LayerNorm) feeding q/k/v or gate/up: its weight (and bias) is divided by
  ``s``. Gemma norms scale by ``(1 + w)``, so there ``w' = (1 + w) / s - 1``;
* ``up_proj`` feeding ``down_proj`` in a gated MLP: ``down_proj`` sees ``act(gate(x)) * up(x)``,
  which is linear in ``up(x)``, so dividing ``up_proj``'s output rows by ``s`` divides
  ``down_proj``'s input channels by ``s``.

Which norm feeds which linears is architecture specific and easy to get wrong (Gemma 2/3 apply
``post_attention_layernorm`` to the attention *output*; their MLP input norm is
``pre_feedforward_layernorm``). :data:`SMOOTH_TABLE` spells it out per ``model_type``; every
fold into a norm is also verified numerically on a probe input (the norm output must become
exactly ``output / s``), with the other offset convention tried when the first one fails, so a
wrong table entry cannot silently corrupt a model.

Groups whose consumers are W8A8 in the plan are smoothed as above. Groups whose consumers are all
*weight-only* integer (INT4 groups, say) gain nothing from a flatter activation range; with
``alpha="search"`` they get activation-aware scaling instead (the AWQ recipe, Lin et al. 2023):
``s_j = mean|X_j| ** alpha``, which enlarges the weight columns that meet large activations so
their rounding error shrinks relative to what they contribute, with alpha searched on
``weight_only_grid`` against the group's simulated output error (and "no scaling" always among the
candidates). ``weight_only=False`` turns that off.

In calibration, :class:`SmoothQuantStep` collects each layer's statistics and calls
:func:`smooth_layer` on the layer's working copy (and :func:`smooth_head` for the LM head).

Example:
    >>> absmax = {"model.layers.0.mlp.gate_proj": torch.ones(64), ...}            # doctest: +SKIP
    >>> record = smooth_layer(layer, "model.layers.0", plan, absmax, {"alpha": 0.5}, model.config)  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..architectures import (
    SMOOTH_TABLE,
    SmoothGroup,
    find_final_norm,
    find_module,
    is_quantizable_linear,
    weight_out_in,
)
from ..errors import CalibrationError
from ..quant.qparams import compute_qparams, dequantize, dequantize_weight, quantize, quantize_per_token, quantize_weight
from . import validate_options
from .base import CalibrationStep, ChannelAbsMax, LayerWork

logger = logging.getLogger(__name__)

#: Rows of a consumer's weight scored by the alpha search (LM heads have one row per token).
_SEARCH_MAX_ROWS = 16384

__all__ = [
    "SMOOTH_TABLE",
    "InputSampler",
    "SmoothGroup",
    "SmoothQuantStep",
    "activation_aware_scales",
    "groups_for",
    "smooth_head",
    "smooth_layer",
    "smoothing_scales",
]


def groups_for(model_type: str, options: Optional[Mapping[str, Any]] = None) -> Tuple[SmoothGroup, ...]:
    """The smoothing groups for ``model_type`` (``options["table"]`` overrides the built-in table).

    Returns an empty tuple for architectures without a table (smoothing is then skipped and
    reported); ``options["groups"]`` keeps only the named groups.

    Example:
        >>> [g.prev for g in groups_for("gemma3_text")]
        ['input_layernorm', 'pre_feedforward_layernorm', 'mlp.up_proj']
    """
    options = options or {}
    table = options.get("table")
    if table:
        groups = tuple(
            SmoothGroup(row["name"], row["prev"], tuple(row["consumers"]), row.get("prev_rows"),
                        float(row["norm_offset"]) if row.get("norm_offset") is not None else 0.0)
            for row in table
        )
    else:
        groups = SMOOTH_TABLE.get(model_type, ())
    wanted = options.get("groups")
    if wanted is not None:
        known = {g.name for g in groups}
        unknown = [w for w in wanted if w not in known and w != "head"]  # "head": final norm -> LM head
        if unknown and groups:
            from ..errors import ConfigError

            raise ConfigError(
                f"smoothquant.groups names {unknown} that the {model_type!r} table does not have; "
                f"its groups are {sorted(known)}."
            )
        groups = tuple(g for g in groups if g.name in wanted)
    return groups


# --------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------


def smoothing_scales(
    act_absmax: torch.Tensor,
    weight_absmax: torch.Tensor,
    alpha: float,
    min_scale: float = 1e-5,
    max_scale: float = 1e5,
) -> torch.Tensor:
    """Per-channel factors ``s_j = a_j**alpha / w_j**(1 - alpha)`` (float32).

    Channels whose activation or weight maximum is zero (dead in the calibration data) get
    ``s_j = 1``; the rest are clamped to ``[min_scale, max_scale]``.

    Example:
        >>> smoothing_scales(torch.tensor([4.0, 1.0, 0.0]), torch.tensor([1.0, 1.0, 2.0]), 0.5)
        tensor([2., 1., 1.])
    """
    a = act_absmax.detach().float()
    w = weight_absmax.detach().float().to(a.device)
    live = (a > 0) & (w > 0) & torch.isfinite(a) & torch.isfinite(w)
    s = torch.ones_like(a)
    s[live] = a[live].pow(alpha) / w[live].pow(1.0 - alpha)
    return s.clamp(min_scale, max_scale)


def activation_aware_scales(
    act_mean: torch.Tensor,
    alpha: float,
    min_scale: float = 1e-5,
    max_scale: float = 1e5,
) -> torch.Tensor:
    """Activation-aware factors for weight-only groups: ``s_j = mean|X_j| ** alpha``, normalised.

    Channels that meet large activations get their weight columns enlarged (``W * s``), so their
    share of the group's rounding error shrinks. The factors are divided by
    ``sqrt(max(s) * min(s))`` so they straddle 1 (a common factor would change nothing under
    per-group scales). Dead channels (mean 0) keep ``s_j = 1``.

    Example:
        >>> activation_aware_scales(torch.tensor([4.0, 1.0, 0.0]), 0.5)
        tensor([1.4142, 0.7071, 1.0000])
    """
    a = act_mean.detach().float()
    live = (a > 0) & torch.isfinite(a)
    s = torch.ones_like(a)
    if not bool(live.any()):
        return s
    v = a[live].pow(alpha)
    s[live] = v / (v.max() * v.min()).sqrt()
    return s.clamp(min_scale, max_scale)


def _fake_weight(weight: torch.Tensor, args: Mapping[str, Any]) -> torch.Tensor:
    q, scale, zp = quantize_weight(weight, int(args.get("bits", 8)), bool(args.get("symmetric", True)),
                                   args.get("granularity", "channel"), args.get("group_size"))
    return dequantize_weight(q, scale, zp)


def _fake_act(x: torch.Tensor, args: Mapping[str, Any], absmax_scaled: torch.Tensor,
              observer: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    mode = args.get("mode", "none")
    symmetric = bool(args.get("symmetric", True))
    if mode == "dynamic":
        q, scale, zp = quantize_per_token(x, 8, symmetric)
        return dequantize(q, scale, zp)
    if mode == "static":
        if observer is not None and observer.get("observer", "minmax") != "minmax":
            # the module's own observer (percentile, entropy, MSE) on the sample rows: the search then
            # scores the clipped range static quantization will really use, not the raw maximum
            from ..quant.observers import make_observer

            obs = make_observer(observer["observer"], **{k: v for k, v in observer.items() if k != "observer"})
            obs.observe(x)
            scale, zp = obs.compute_qparams()
            return dequantize(quantize(x, scale, zp, int(observer.get("bits", 8)), symmetric), scale, zp)
        if symmetric:
            # exactly the per-tensor range a min/max observer would freeze over the calibration set
            top = absmax_scaled.max()
            scale, zp = compute_qparams(-top, top, 8, True)
        else:
            scale, zp = compute_qparams(x.min(), x.max(), 8, False)
        return dequantize(quantize(x, scale, zp, 8, symmetric), scale, zp)
    return x


# --------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------


def _probe_norm(norm: nn.Module, hidden: int, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(1234)
    x = (torch.randn(8, hidden, generator=gen) * 3.0).to(device=device, dtype=dtype)
    with torch.no_grad():
        return x, norm(x).float()


def _fold_into_norm(norm: nn.Module, s: torch.Tensor, offset_first: float) -> Tuple[float, float]:
    """Divide the norm's output by ``s`` in place; returns ``(offset used, max relative error)``.

    Tries ``offset_first`` then the other convention; each attempt is verified on a probe input.
    Raises :class:`CalibrationError` (weights restored) when neither reproduces ``output / s``.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != s.numel():
        raise CalibrationError(f"{type(norm).__name__} has no per-channel weight of size {s.numel()} to fold into.")
    bias = getattr(norm, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) else None
    saved_w = weight.detach().clone()
    saved_b = None if bias is None else bias.detach().clone()
    x, ref = _probe_norm(norm, s.numel(), weight.dtype if weight.is_floating_point() else torch.float32, weight.device)
    target = ref / s.to(ref.device)
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(weight.dtype, 2e-2)
    denom = target.abs().amax().clamp_min(1e-30)
    last_err = math.inf
    for offset in (offset_first, 1.0 - offset_first):
        with torch.no_grad():
            s64 = s.to(device=weight.device, dtype=torch.float64)
            new_w = (saved_w.double() + offset) / s64 - offset
            weight.copy_(new_w.to(weight.dtype))
            if bias is not None:
                bias.copy_((saved_b.double() / s64).to(bias.dtype))
            got = norm(x).float()
        err = float((got - target).abs().amax() / denom)
        if err <= tol:
            return offset, err
        last_err = min(last_err, err)
        with torch.no_grad():
            weight.copy_(saved_w)
            if bias is not None:
                bias.copy_(saved_b)
    raise CalibrationError(
        f"Could not fold SmoothQuant scales into {type(norm).__name__}: neither the 'w' nor the '1 + w' "
        f"convention reproduces output / s (best relative error {last_err:.2e} > {tol:.0e}; a low-precision norm "
        "weight cannot represent the folded values). Weights were restored; smooth this group in float32 or "
        "exclude it with smoothquant.groups."
    )


def _fold_into_linear(prev: nn.Module, s: torch.Tensor, prev_rows: Optional[str]) -> None:
    weight = weight_out_in(prev)
    out_features = weight.shape[0]
    if prev_rows == "second_half":
        start = out_features // 2
    else:
        start = 0
    if out_features - start != s.numel():
        raise CalibrationError(
            f"{type(prev).__name__} has {out_features - start} output rows feeding the consumers but the smoothing "
            f"factors have {s.numel()} channels."
        )
    with torch.no_grad():
        factor = s.to(device=weight.device, dtype=torch.float32)
        rows = weight[start:].float() / factor.view(-1, 1)
        weight[start:].copy_(rows.to(weight.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias[start:].copy_((bias[start:].float() / factor).to(bias.dtype))


def _scale_consumers(consumers: Sequence[nn.Module], s: torch.Tensor) -> None:
    with torch.no_grad():
        for module in consumers:
            weight = weight_out_in(module)
            factor = s.to(device=weight.device, dtype=torch.float32).view(1, -1)
            if weight.dtype == torch.float32:  # the same product, without a weight-sized temporary (LM head: 393 MB)
                weight.mul_(factor)
            else:
                weight.copy_((weight.float() * factor).to(weight.dtype))


# --------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------


def _is_w8a8(entry: Any) -> bool:
    return entry is not None and entry.quantized and (entry.activations or {}).get("mode", "none") != "none"


def _search_alpha(
    group: SmoothGroup,
    x: torch.Tensor,
    consumers: Sequence[nn.Module],
    entries: Sequence[Any],
    act_absmax: torch.Tensor,
    weight_absmax: torch.Tensor,
    opts: Mapping[str, Any],
    extra_error: Optional[Any] = None,
    scales_for: Optional[Any] = None,
    grid: Optional[Sequence[float]] = None,
    observers: Optional[Sequence[Optional[Mapping[str, Any]]]] = None,
) -> Tuple[Optional[float], Dict[str, float]]:
    """Grid search of alpha minimising the summed relative output error of the quantized consumers.

    ``scales_for(alpha)`` gives the candidate factors (default :func:`smoothing_scales` of the
    activation and weight maxima) and ``grid`` the alphas (default ``opts["alpha_grid"]``); the
    weight-only (activation-aware) search passes its own. ``observers`` (one per consumer, or
    ``None``) are the observer settings of static consumers: their simulated activation range
    comes from that observer run on the sample rows (default: the min/max of the statistics).

    ``extra_error(s)``, when given, is added to each candidate's score (the tied embedding's
    relative error for an LM head, see :func:`smooth_head`).

    Very tall weights (LM heads: one row per vocabulary entry) are scored on at most
    :data:`_SEARCH_MAX_ROWS` evenly spaced rows: per-channel weight quantization treats each row on
    its own and the error is relative to the output energy, so this estimates the same quantity.
    """
    x = x.float()
    refs = []
    observers = list(observers) if observers is not None else [None] * len(consumers)
    for module, entry, observer in zip(consumers, entries, observers):
        if entry is None or not entry.quantized:
            continue
        w = weight_out_in(module).detach()
        if w.shape[0] > _SEARCH_MAX_ROWS:
            w = w[:: math.ceil(w.shape[0] / _SEARCH_MAX_ROWS)]
        w = w.float().to(x.device)
        y = x @ w.t()
        refs.append((w, entry, observer, y, y.pow(2).sum().clamp_min(1e-30)))
    candidates: List[Optional[float]] = list(opts["alpha_grid"] if grid is None else grid)
    if opts["search_keeps_unsmoothed"]:
        candidates.insert(0, None)
    errors: Dict[str, float] = {}
    best, best_err = None, math.inf
    for alpha in candidates:
        if alpha is None:
            s = torch.ones_like(act_absmax, dtype=torch.float32)
        elif scales_for is not None:
            s = scales_for(alpha)
        else:
            s = smoothing_scales(act_absmax, weight_absmax, alpha, opts["min_scale"], opts["max_scale"])
        s = s.to(x.device)
        total = 0.0
        xs = x / s
        act_cache: Dict[str, torch.Tensor] = {}  # q/k/v share one input and usually one activation scheme
        for w, entry, observer, y, energy in refs:
            key = repr((sorted((entry.activations or {}).items()), sorted((observer or {}).items())))
            if key not in act_cache:
                act_cache[key] = _fake_act(xs, entry.activations, act_absmax.to(x.device) / s, observer)
            xq = act_cache[key]
            wq = _fake_weight(w * s.view(1, -1), entry.weights)
            total += float((xq @ wq.t() - y).pow(2).sum() / energy)
        if extra_error is not None:
            total += float(extra_error(s))
        errors["none" if alpha is None else f"{alpha:g}"] = total
        if total < best_err - 1e-12:
            best, best_err = alpha, total
    return best, errors


def smooth_layer(
    layer: nn.Module,
    layer_name: str,
    plan: Any,
    absmax: Mapping[str, torch.Tensor],
    options: Optional[Mapping[str, Any]],
    model_config: Any,
    *,
    inputs: Optional[Mapping[str, torch.Tensor]] = None,
    observers: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> Dict[str, Any]:
    """Smooth the W8A8 groups of one decoder layer in place.

    Args:
        layer: the decoder layer (float modules).
        layer_name: its full name in the model (``"model.layers.3"``); consumer names in ``plan``
            and ``absmax`` are ``f"{layer_name}.{path}"``.
        plan: the resolved :class:`~hfptq.plan.Plan`; only groups with a W8A8 consumer (and no
            weight-only integer consumer) are smoothed.
        absmax: per-input-channel ``max |x|`` of each planned linear's input over the calibration
            data, keyed by full module name.
        options: ``HfPtqConfig.smoothquant`` (validated by
            :func:`hfptq.algorithms.validate_options`).
        model_config: the model's config (its ``model_type`` selects the table).
        inputs: sample rows ``[n, in_features]`` of each consumer's input (only needed for
            ``alpha="search"``; groups without samples then use alpha 0.5 and say so).
        observers: observer settings (:func:`hfptq.calibration.observer_settings`) of the static
            consumers, keyed by full module name: the alpha search simulates their range with that
            observer instead of the raw maximum.

    Returns:
        ``{"layer", "groups": [...]}``, one record per group: ``status`` (``"smoothed"`` or
        ``"skipped"`` with a ``reason``), ``alpha``, ``act_range_before``/``act_range_after``
        (``max_j a_j / median_j a_j``, the outlier spread per-tensor/per-token INT8 must cover),
        and for searched groups the simulated output ``error`` per alpha candidate.

    Example:
        >>> info = smooth_layer(model.model.layers[0], "model.layers.0", plan, absmax,
        ...                     {"alpha": 0.5}, model.config)                # doctest: +SKIP
    """
    opts = validate_options("smoothquant", options)
    model_type = getattr(model_config, "model_type", "") or ""
    groups = groups_for(model_type, opts)
    info: Dict[str, Any] = {"layer": layer_name, "groups": []}
    if not groups:
        info["skipped"] = (
            f"no SmoothQuant table for model_type={model_type!r}; pass smoothquant.table=[{{'prev': ..., "
            "'consumers': [...]}}] to describe which norm feeds which linears"
        )
        return info
    for group in groups:
        info["groups"].append(_smooth_group(layer, layer_name, plan, absmax, opts, group, inputs,
                                            observers=observers))
    return info


def _skip(record: Dict[str, Any], reason: str) -> Dict[str, Any]:
    record["status"] = "skipped"
    record["reason"] = reason
    logger.debug("SmoothQuant %s: skipped (%s)", record["prev"], reason)
    return record


def _spread(a: torch.Tensor) -> float:
    a = a.float()
    med = a.median()
    return float(a.max() / med) if med > 0 else math.inf


def _smooth_group(layer, layer_name, plan, absmax, opts, group: SmoothGroup, inputs,
                  keep_scales: bool = False, extra_error: Optional[Any] = None,
                  observers: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, Any]:
    full = lambda path: f"{layer_name}.{path}" if layer_name else path  # noqa: E731
    record: Dict[str, Any] = {"group": group.name, "prev": full(group.prev),
                              "consumers": [full(c) for c in group.consumers]}
    prev = find_module(layer, group.prev)
    consumers = [find_module(layer, c) for c in group.consumers]
    if prev is None or any(c is None for c in consumers):
        missing = [p for p, m in zip((group.prev, *group.consumers), (prev, *consumers)) if m is None]
        return _skip(record, f"module(s) {missing} not found in the layer")
    if any(not isinstance(getattr(c, "weight", None), torch.Tensor) or not c.weight.is_floating_point()
           for c in consumers):
        return _skip(record, "a consumer is no longer a float linear (already converted?)")
    entries = [plan.get(name) if plan is not None else None for name in record["consumers"]]
    rotated = [n for n, e in zip(record["consumers"], entries)
               if e is not None and e.quantized and (e.activations or {}).get("rotation")]
    if rotated:
        return _skip(record, f"the input of {rotated} is rotated (activations.rotation): a per-channel factor "
                             "cannot be folded through the rotation")
    weight_only = [n for n, e in zip(record["consumers"], entries)
                   if e is not None and e.quantized and not _is_w8a8(e)]
    activation_aware = False
    if not any(_is_w8a8(e) for e in entries):
        if not weight_only:
            return _skip(record, "no consumer is quantized in the plan (float modules gain nothing)")
        if not (opts["weight_only"] and opts["alpha"] == "search"):
            return _skip(record, f"consumers {weight_only} are weight-only integer: activation-aware scaling runs "
                                 "only with alpha='search' and weight_only=True")
        activation_aware = True
    elif weight_only:
        return _skip(record, f"consumers {weight_only} are weight-only integer while others are W8A8: one "
                             "smoothing factor cannot serve both")
    stats = [absmax[n] for n in record["consumers"] if n in absmax]
    if not stats:
        return _skip(record, "no activation statistics for the consumers")
    act = torch.stack([t.detach().float().reshape(-1).cpu() for t in stats]).amax(dim=0)
    in_features = weight_out_in(consumers[0]).shape[1]
    if act.numel() != in_features:
        return _skip(record, f"activation statistics have {act.numel()} channels, consumers take {in_features}")
    if not torch.isfinite(act).all():
        raise CalibrationError(
            f"Non-finite activation maximum at the input of {record['consumers']}: the calibration forward produced "
            "inf/NaN. Check the model dtype (run calibration in float32) and the calibration data."
        )
    # max |w| per input channel as max(max w, -min w): exact, and no weight-sized |w| temporary
    w_abs = torch.stack([torch.maximum(w.amax(dim=0), w.amin(dim=0).neg()).float().cpu()
                         for w in (weight_out_in(c).detach() for c in consumers)]).amax(dim=0)

    # the factors of a given alpha: SmoothQuant's max-ratio formula, or activation-aware (set below)
    scales_for = lambda a: smoothing_scales(act, w_abs, a, opts["min_scale"], opts["max_scale"])  # noqa: E731
    alpha: Optional[float]
    if opts["alpha"] == "search":
        sample = None
        if inputs is not None:
            sample = next((inputs[n] for n in record["consumers"] if n in inputs), None)
        if sample is None and activation_aware:
            return _skip(record, "activation-aware scaling of weight-only consumers needs input samples (none given)")
        if sample is None:
            alpha = 0.5
            record["search"] = "no input samples given; used alpha=0.5"
            logger.warning("SmoothQuant alpha search for %s has no input samples; using alpha=0.5.", record["prev"])
        else:
            sample = sample.reshape(-1, in_features)
            if sample.shape[0] > opts["search_tokens"]:
                idx = torch.linspace(0, sample.shape[0] - 1, opts["search_tokens"]).round().long()
                sample = sample[idx]
            grid = None
            if activation_aware:
                act_mean = sample.float().abs().mean(dim=0)
                scales_for = lambda a: activation_aware_scales(act_mean, a, opts["min_scale"], opts["max_scale"])  # noqa: E731
                grid = opts["weight_only_grid"]
                record["method"] = "activation-aware (weight-only)"
            alpha, errors = _search_alpha(group, sample, consumers, entries, act, w_abs, opts, extra_error,
                                          scales_for=scales_for, grid=grid,
                                          observers=[(observers or {}).get(n) for n in record["consumers"]])
            record["error"] = errors
            record["error_unsmoothed"] = errors.get("none")
            record["error_chosen"] = errors["none" if alpha is None else f"{alpha:g}"]
            if alpha is None:
                record["alpha"] = None
                return _skip(record, "the alpha search found smoothing does not lower this group's output error")
    else:
        alpha = float(opts["alpha"])
    s = scales_for(alpha)
    record["alpha"] = alpha

    # fold first (it may refuse, leaving everything untouched), then scale the consumers
    if is_quantizable_linear(prev):
        _fold_into_linear(prev, s, group.prev_rows)
        record["folded_into"] = "linear rows"
    else:
        try:
            offset, err = _fold_into_norm(prev, s, group.norm_offset)
        except CalibrationError as exc:
            return _skip(record, str(exc))
        record["folded_into"] = "norm (1 + w)" if offset == 1.0 else "norm (w)"
        record["fold_error"] = err
        if offset != group.norm_offset:
            logger.warning("SmoothQuant: %s scales by %s, not as the table says; folded accordingly.",
                           record["prev"], "(1 + w)" if offset else "w")
    _scale_consumers(consumers, s)
    if keep_scales:
        record["scales"] = s
    record["status"] = "smoothed"
    record["scale_min"] = float(s.min())
    record["scale_max"] = float(s.max())
    record["act_range_before"] = _spread(act)
    record["act_range_after"] = _spread(act / s)
    return record


def smooth_head(
    norm: nn.Module,
    head: nn.Module,
    entry: Any,
    act_absmax: torch.Tensor,
    options: Optional[Mapping[str, Any]] = None,
    *,
    inputs: Optional[torch.Tensor] = None,
    norm_offset: float = 0.0,
    names: Tuple[str, str] = ("model.norm", "lm_head"),
    tied: bool = False,
    gptq: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Dict[str, Any]]:
    """SmoothQuant for the LM head: final norm -> ``lm_head``.

    The LM head reads the final norm's output, which (like every norm output) has a few outlier
    channels; with per-token INT8 activations they set each token's step size and the many small
    channels lose their resolution (Gemma 3 270M: channel maxima up to 10x their median). The
    factor ``s`` is folded into ``norm`` **in place** (``w' = w / s`` or ``(1 + w) / s - 1``,
    verified numerically as for decoder layers), while the head's smoothed weight ``W * s`` is
    *returned* instead of written: the head's weight is usually tied to the input embedding, which
    must keep reading ``W`` (an embedding tied to the quantized head divides its lookups by ``s``,
    see :func:`hfptq.convert.embedding_scale`).

    Args:
        norm: the final norm (its output must be exactly the head's input; the caller checks).
        head: the LM head (float linear, left untouched).
        entry: the head's plan entry (only a W8A8 head is smoothed).
        act_absmax: per-channel ``max |x|`` of the head's input over the calibration data.
        options: ``HfPtqConfig.smoothquant``.
        inputs: sample rows of the head's input (for ``alpha="search"``).
        norm_offset: first guess of the norm convention (``1.0`` for Gemma's ``1 + w``).
        names: ``(norm name, head name)`` for the record.
        tied: the head's integers are shared with the input embedding, whose lookups then read
            ``Q(W * s) / s``. The alpha search adds that relative embedding error to the head's
            output error (so it only smooths when the sum drops). A tied head is smoothed
            automatically only by the search and only when ``gptq`` is False; otherwise only when
            ``options["groups"]`` names ``"head"``. Measured on Gemma 3 270M (tied): smoothing the
            round-to-nearest W8A8 head cuts its cost +0.61% -> +0.22% ppl, but once GPTQ
            compensates the head's weights the larger error of the shared embedding rows wins
            (default plan SQ+GPTQ: +0.71% with the head smoothed, +0.65% without).
        gptq: GPTQ will quantize the head (on the smoothed inputs).

    Returns:
        ``(weight, scales, record)``: the smoothed float32 ``[out, in]`` weight and the factors
        ``s`` ``[in]``, or ``(None, None, record)`` when the head was not smoothed
        (``record["status"] == "skipped"`` with the reason; ``norm`` unchanged).

    Example:
        >>> weight, s, record = smooth_head(model.model.norm, model.lm_head, plan["lm_head"], absmax,
        ...                              {"alpha": "search"}, inputs=rows, norm_offset=1.0)  # doctest: +SKIP
    """
    opts = validate_options("smoothquant", options)
    w = weight_out_in(head).detach()
    extra_error = None
    if tied:
        if (opts["alpha"] != "search" or gptq) and "head" not in (opts["groups"] or ()):
            return None, None, {"group": "head", "prev": names[0], "consumers": [names[1]], "status": "skipped",
                                "reason": "the LM head is tied to the input embedding, which would share the smoothed "
                                          "integers: smoothed automatically only by the alpha search without GPTQ on "
                                          "the head, otherwise when smoothquant.groups names 'head'"}
        rows = w[:: max(1, math.ceil(w.shape[0] / _SEARCH_MAX_ROWS))].float()
        energy = rows.pow(2).sum().clamp_min(1e-30)

        def extra_error(s: torch.Tensor) -> float:
            # the embedding looks up rows of Q(W * s) and divides them by s
            s = s.to(rows.device).view(1, -1)
            return float((_fake_weight(rows * s, entry.weights) / s - rows).pow(2).sum() / energy)
    holder = nn.Module()
    holder.norm = norm
    holder.lm_head = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    # the copy that gets scaled: one float32 copy (``float().clone()`` of a bf16 head made two, +1 copy at the peak)
    holder.lm_head.weight = nn.Parameter(w.to(torch.float32, copy=True), requires_grad=False)
    group = SmoothGroup("head", "norm", ("lm_head",), norm_offset=norm_offset)
    record = _smooth_group(holder, "", {"lm_head": entry}, {"lm_head": act_absmax}, opts, group,
                           None if inputs is None else {"lm_head": inputs}, keep_scales=True,
                           extra_error=extra_error)
    record["prev"], record["consumers"] = names[0], [names[1]]
    scales = record.pop("scales", None)
    weight = holder.lm_head.weight.detach() if record.get("status") == "smoothed" else None
    del holder
    return weight, scales, record



class InputSampler:
    """A uniform sample of at most ``max_rows`` input rows per module (for the alpha search).

    A calibration stats hook: ``sampler(name, x, batch_index)`` with ``x`` ``[tokens, in]``. Every row
    seen gets a random priority and the ``max_rows`` lowest are kept, which is a uniform sample
    without replacement of all rows, whatever the batch split; memory is ``max_rows`` rows per module.

    Example:
        >>> sampler = InputSampler(max_rows=4)
        >>> for b in range(3):
        ...     sampler("fc", torch.randn(10, 8), b)
        >>> sampler.samples()["fc"].shape
        torch.Size([4, 8])
    """

    def __init__(self, max_rows: int = 1024, seed: int = 0) -> None:
        self.max_rows = int(max_rows)
        self._gen = torch.Generator().manual_seed(seed)
        self._rows: Dict[str, torch.Tensor] = {}
        self._keys: Dict[str, torch.Tensor] = {}

    def __call__(self, name: str, x: torch.Tensor, batch_index: int = 0) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        keys = torch.rand(rows.shape[0], generator=self._gen)
        if name in self._rows:
            rows = torch.cat([self._rows[name], rows])
            keys = torch.cat([self._keys[name], keys])
        if rows.shape[0] > self.max_rows:
            keep = torch.topk(keys, self.max_rows, largest=False).indices
            rows, keys = rows[keep], keys[keep]
        self._rows[name] = rows.clone()
        self._keys[name] = keys

    def samples(self) -> Dict[str, torch.Tensor]:
        """``{module name: rows [n, in_features]}``."""
        return dict(self._rows)


def summarize(records: Sequence[Mapping[str, Any]], options: Mapping[str, Any]) -> Dict[str, Any]:
    """Aggregate per-layer :func:`smooth_layer` records into the report's ``algorithms`` entry."""
    groups = [g for r in records for g in r.get("groups", [])]
    smoothed = [g for g in groups if g.get("status") == "smoothed"]
    alphas = [g["alpha"] for g in smoothed if g.get("alpha") is not None]
    out: Dict[str, Any] = {
        "name": "smoothquant",
        "alpha": options.get("alpha"),
        "groups_smoothed": len(smoothed),
        "groups_skipped": len(groups) - len(smoothed),
        # of the smoothed groups, those scaled activation-aware for weight-only consumers (AWQ-style)
        "groups_activation_aware": sum(1 for g in smoothed if g.get("method", "").startswith("activation-aware")),
        "layers": list(records),
    }
    if alphas:
        out["alpha_mean"] = sum(alphas) / len(alphas)
    before = [g["act_range_before"] for g in smoothed if math.isfinite(g.get("act_range_before", math.inf))]
    after = [g["act_range_after"] for g in smoothed if math.isfinite(g.get("act_range_after", math.inf))]
    if before and after:
        out["act_range_before_mean"] = sum(before) / len(before)
        out["act_range_after_mean"] = sum(after) / len(after)
    unsm = [g["error_unsmoothed"] for g in groups if g.get("error_unsmoothed") is not None]
    chosen = [g["error_chosen"] for g in groups if g.get("error_chosen") is not None]
    if unsm and chosen:
        out["search_error_unsmoothed"] = sum(unsm)
        out["search_error_chosen"] = sum(chosen)
    return out


# --------------------------------------------------------------------------------------------
# The calibration step
# --------------------------------------------------------------------------------------------


class SmoothQuantStep(CalibrationStep):
    """SmoothQuant inside the sequential calibration: each layer's groups, then final norm -> LM head.

    Per decoder layer, before the observing pass: one pass collects the per-channel ``max |x|`` (and,
    for ``alpha="search"``, sample rows) of every linear input, then ``layer_fn`` (default
    :func:`smooth_layer`) folds the factors into the layer's working copy, so the observers see the
    smoothed activations. In the tail, when the LM head is W8A8, ``head_fn`` (default
    :func:`smooth_head`; ``None`` disables the head group) smooths the final norm -> LM head.

    Args:
        options: ``HfPtqConfig.smoothquant``.
        layer_fn: ``layer_fn(layer, layer_name, plan, absmax, options, model_config, inputs=, observers=)``.
        head_fn: see :func:`smooth_head`, or ``None``.

    Example:
        >>> step = SmoothQuantStep({"alpha": 0.5})
        >>> step.name
        'smoothquant'
    """

    name = "smoothquant"
    needs_every_layer = True

    def __init__(self, options: Optional[Mapping[str, Any]], *, layer_fn: Optional[Callable[..., Any]] = None,
                 head_fn: Optional[Callable[..., Any]] = smooth_head) -> None:
        super().__init__()
        self.options = dict(options or {})
        self.layer_fn = smooth_layer if layer_fn is None else layer_fn
        self.head_fn = head_fn

    def passes_per_layer(self, run: Any) -> int:
        return 1

    def before_observe(self, run: Any, layer: LayerWork) -> None:
        absmax = ChannelAbsMax()
        hooks: List[Any] = [absmax]
        sampler = None
        if self.options.get("alpha") == "search":
            # the alpha search scores each candidate on a sample of the layer's real input rows
            sampler = InputSampler(validate_options("smoothquant", self.options)["search_tokens"])
            hooks.append(sampler)
        run.layer_pass(layer, write=False, modules=layer.all_linears, consumers=hooks)
        with torch.no_grad():
            stats = {k: v.clone() for k, v in absmax.values.items()}
            observers = {n: dict(run.slots[n].settings) for n in layer.modules if n in run.slots}
            self.records[layer.name] = self.layer_fn(
                layer.work, layer.name, run.plan, stats, dict(self.options), getattr(run.model, "config", None),
                inputs=None if sampler is None else sampler.samples(), observers=observers)

    # ---------------------------------------------------------------- final norm -> LM head
    def _head_target(self, run: Any) -> Optional[Tuple[str, nn.Module, str, nn.Module]]:
        """``(head name, head, norm name, norm)`` when the final norm -> LM head group applies."""
        if self.head_fn is None:
            return None
        groups = validate_options("smoothquant", self.options)["groups"]
        if groups is not None and "head" not in groups:
            return None
        entry = next((e for e in run.plan if e.kind == "lm_head"), None)
        if entry is None or not entry.quantized or (entry.activations or {}).get("mode", "none") == "none":
            return None
        head = find_module(run.model, entry.name)
        if head is None or not is_quantizable_linear(head):
            return None
        norm = find_final_norm(run.model, run.layers[0])
        return None if norm is None else (entry.name, head, norm[0], norm[1])

    def tail_needed(self, run: Any) -> bool:
        return self._head_target(run) is not None

    def before_tail(self, run: Any) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        target = self._head_target(run)
        if target is None:
            return []
        head_name, head, norm_name, norm = target
        opts = validate_options("smoothquant", self.options)
        absmax = ChannelAbsMax()
        hooks: List[Any] = [absmax]
        sampler = InputSampler(opts["search_tokens"]) if opts["alpha"] == "search" else None
        if sampler is not None:
            hooks.append(sampler)
        seen: Dict[str, Any] = {"norm_out": None, "feeds_head": True}

        def norm_out(_module, _args, output):
            seen["norm_out"] = output if isinstance(output, torch.Tensor) else None

        def check(name, x, _batch):
            ref = seen["norm_out"]
            if ref is None or ref.shape[-1] != x.shape[-1] or not torch.equal(ref.reshape(-1, ref.shape[-1]), x):
                seen["feeds_head"] = False
            seen["norm_out"] = None

        run.tail_pass({head_name: head}, [check, *hooks], observe=False, extra_hooks=[(norm, norm_out)])
        record: Dict[str, Any] = {"group": "head", "prev": norm_name, "consumers": [head_name]}
        weight = None
        work = copy.deepcopy(norm)
        if not seen["feeds_head"]:
            record.update(status="skipped", reason=f"{norm_name}'s output is not exactly {head_name}'s input")
        elif head_name not in absmax.values:
            record.update(status="skipped", reason=f"{head_name} received no input")
        else:
            model_type = getattr(getattr(run.model, "config", None), "model_type", "") or ""
            offset = next((g.norm_offset for g in groups_for(model_type) if g.prev.endswith("norm")), 0.0)
            rounded = any(head_name in step.module_names(run) for step in run.steps if step is not self)
            with torch.no_grad():
                weight, scales, record = self.head_fn(
                    work, head, run.plan[head_name], absmax.values[head_name], opts, norm_offset=offset,
                    inputs=None if sampler is None else sampler.samples().get(head_name), names=(norm_name, head_name),
                    tied=any(e.tied_to == head_name for e in run.plan), gptq=rounded)
        self.records[f"{norm_name} -> {head_name}"] = {"layer": norm_name, "groups": [record]}
        if weight is None:
            return []
        run.weights[head_name] = weight
        run.smoothed_heads.append(head_name)
        inverse = (1.0 / scales.double()).tolist()
        for e in run.plan:  # the embedding shares the head's integers (W * s): its lookups are divided by s
            if e.tied_to == head_name:
                run.plan_updates.append((e, inverse))
        return [(p, w) for p, w in zip(list(norm.parameters()) + list(norm.buffers()),
                                       list(work.parameters()) + list(work.buffers()))
                if p.shape == w.shape and not torch.equal(p, w)]
