"""GPTQ: quantize a weight column by column, compensating each rounding error on the columns left.

For a linear layer with inputs ``X`` (rows = tokens) the output error of a weight perturbation
``D`` is ``||X D^T||^2 = tr(D H D^T) / 2 * N`` with the Hessian ``H = 2/N X^T X``. GPTQ (Frantar
et al., 2022) quantizes the input columns in order; after rounding column ``i`` it spreads the
error over the not-yet-quantized columns with the inverse Hessian, which minimises that output
error given the columns already fixed. Implementation notes:

* **Cholesky form**: the successive inverse Hessians are rows of the upper Cholesky factor
  ``U`` of ``H^-1`` (``H^-1 = U^T U``), so no matrix is re-inverted inside the loop.
* **Lazy batch updates**: columns are processed in blocks of ``block_size``; inside a block the
  update is applied column by column, the rest of the matrix gets one matmul per block.
* **Dampening**: ``damp * mean(diag(H))`` is added to the diagonal. When the Cholesky
  factorisation fails (a non-positive-definite Hessian: too few calibration tokens, duplicated
  or degenerate inputs, numerical round-off) it is retried with 10x the dampening, up to
  ``max_damp_retries`` times; if it still fails the weight is rounded to nearest. Both are
  recorded in ``info``; GPTQ never raises on a bad Hessian.
* **Dead inputs** (``H_ii = 0``: the input channel was exactly zero on every calibration token)
  are decoupled (``H_ii = 1``, row/column zero) and rounded to nearest. Unlike the reference
  implementation their weights are *not* zeroed: calibration never seeing a channel does not
  mean inference never will.
* **Act-order** quantizes the columns by decreasing ``H_ii`` (the most sensitive first). With
  per-group weights the group parameters must still describe contiguous groups of the original
  column order (that is how :class:`~hfptq.quant.linear.QuantLinear` stores them, without a
  ``g_idx`` permutation), so act-order always uses **static groups**: each group's scale/zero
  point is computed once from the original weight, in the original order, before any update;
  column ``j`` (in processing order) is then quantized with the parameters of group
  ``perm[j] // group_size``. Without act-order, group parameters are computed when the first
  column of the group is reached, from the error-compensated weights (the usual GPTQ choice,
  slightly more accurate), unless ``static_groups=True``.

The result weight lies exactly on the quantization grid of the returned ``scale``/``zero_point``,
so ``QuantLinear.from_float(module, args, weight=result.weight,
weight_qparams=(result.scale, result.zero_point))`` stores exactly the integers GPTQ chose.

Example:
    >>> acc = HessianAccumulator()
    >>> acc("fc", torch.randn(256, 64))
    >>> res = gptq_quantize(torch.randn(32, 64), acc.hessian("fc"), {"bits": 4, "granularity": "group", "group_size": 32})
    >>> res.scale.shape
    torch.Size([32, 2])
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..architectures import find_module, is_quantizable_linear, weight_out_in
from ..errors import CalibrationError
from ..quant.qparams import compute_qparams, qrange, weight_minmax
from . import validate_options
from .base import CalibrationStep, CrossAccumulator, HessianAccumulator, InputCapture, LayerWork

logger = logging.getLogger(__name__)

__all__ = ["GPTQResult", "GPTQStep", "HessianAccumulator", "float_target_weight", "gptq_quantize", "rtn_quantize", "summarize", "weight_qparams"]

# Norm exponent and shrink grid of the MSE clipping search (as in the reference GPTQ quantizer).
_MSE_NORM = 2.4
_MSE_GRID = 100
_MSE_MAX_SHRINK = 0.8
# Rows updated eagerly inside a lazy block (see gptq_quantize); any value gives the same result.
_SUB = 16
# Rows used to estimate the reported output errors of very tall weights.
_ERROR_ROWS = 8192


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    Attributes:
        weight: float32 ``[out, in]``, exactly ``scale * (q - zero_point)`` for integers ``q``.
        scale: float32 ``[rows, n_groups]`` (the layout of :func:`hfptq.quant.qparams.quantize_weight`).
        zero_point: int8 ``[rows, n_groups]``, or ``None`` for symmetric weights.
        info: what happened: ``damp`` (absolute value used), ``damp_retries``, ``fallback``
            (``None`` or why round-to-nearest was used), ``dead_inputs``, ``act_order``,
            ``static_groups``, ``seconds``; with ``report_error``: ``error`` and ``rtn_error``
            (``tr(D H D^T) / tr(W H W^T)``, the relative output error of GPTQ and of
            round-to-nearest on the calibration inputs) and ``error_reduction``
            (``1 - error / rtn_error``).
    """

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    info: Dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Quantization parameters
# --------------------------------------------------------------------------------------------


def _args(weight_args: Mapping[str, Any]) -> Tuple[int, bool, str, Optional[int], str]:
    bits = int(weight_args.get("bits", 8))
    symmetric = bool(weight_args.get("symmetric", True))
    granularity = weight_args.get("granularity", "channel")
    group_size = weight_args.get("group_size") if granularity == "group" else None
    observer = weight_args.get("observer", "minmax") or "minmax"
    if granularity not in ("tensor", "channel", "group"):
        raise ValueError(f"granularity must be 'tensor', 'channel' or 'group' (got {granularity!r})")
    return bits, symmetric, granularity, group_size, observer


def _mse_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping search: shrink the min/max range while the ``|w - q(w)|^2.4`` error drops."""
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    qmin, qmax = qrange(bits, symmetric)
    best_err = torch.full_like(lo, math.inf)
    best_scale, best_zp = compute_qparams(lo, hi, bits, symmetric)
    for i in range(int(_MSE_MAX_SHRINK * _MSE_GRID)):
        p = 1.0 - i / _MSE_GRID
        scale, zp = compute_qparams(lo * p, hi * p, bits, symmetric)
        q = torch.clamp(torch.round(w / scale.unsqueeze(1)) + zp.unsqueeze(1), qmin, qmax)
        err = ((q - zp.unsqueeze(1)) * scale.unsqueeze(1) - w).abs().pow(_MSE_NORM).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def weight_qparams(weight: torch.Tensor, weight_args: Mapping[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point ``[rows, n_groups]`` of a ``[out, in]`` weight (min/max or MSE observer).

    Example:
        >>> s, z = weight_qparams(torch.tensor([[1.0, -2.0]]), {"bits": 8})
        >>> round(float(s) * 127, 4)
        2.0
    """
    bits, symmetric, granularity, group_size, observer = _args(weight_args)
    w = weight.detach().float()
    if observer != "mse":
        lo, hi = weight_minmax(w, granularity, group_size)
        return compute_qparams(lo, hi, bits, symmetric)
    out_f, in_f = w.shape
    if granularity == "tensor":
        rows = w.reshape(1, -1)
    elif granularity == "channel":
        rows = w
    else:
        rows = w.reshape(out_f * (in_f // group_size), group_size)
    scale, zp = _mse_qparams(rows, bits, symmetric)
    n_rows = 1 if granularity == "tensor" else out_f
    return scale.reshape(n_rows, -1), zp.reshape(n_rows, -1)


def _fake(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize with broadcastable ``scale``/``zp`` (float); exactly ``scale * (q - zp)``."""
    q = torch.clamp(torch.round(w / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def _expand(param: torch.Tensor, out_f: int, in_f: int, granularity: str, group_size: Optional[int]) -> torch.Tensor:
    """``[rows, n_groups]`` -> per-element ``[out, in]``."""
    if granularity == "group":
        return param.repeat_interleave(group_size, dim=1)
    return param.expand(out_f, in_f) if param.shape[0] == out_f else param.expand(out_f, in_f)


def rtn_quantize(weight: torch.Tensor, weight_args: Mapping[str, Any]) -> GPTQResult:
    """Round-to-nearest with the same observer and layout (the GPTQ fallback and baseline).

    Example:
        >>> rtn_quantize(torch.randn(4, 8), {"bits": 8}).scale.shape
        torch.Size([4, 1])
    """
    bits, symmetric, granularity, group_size, _ = _args(weight_args)
    w = weight.detach().float()
    scale, zp = weight_qparams(w, weight_args)
    qmin, qmax = qrange(bits, symmetric)
    out_f, in_f = w.shape
    q = _fake(w, _expand(scale, out_f, in_f, granularity, group_size),
              _expand(zp.float(), out_f, in_f, granularity, group_size), qmin, qmax)
    return GPTQResult(q, scale.float(), None if symmetric else zp.to(torch.int8), {})


def _rel_error(delta: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> float:
    num = float(((delta @ h) * delta).sum())
    den = float(((weight @ h) * weight).sum())
    return num / den if den > 0 else 0.0


# --------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------


def _inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> Tuple[Optional[torch.Tensor], float, int]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, retrying with 10x damp; ``(None, ...)`` if hopeless."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries + 1):
        hd = h + damp * eye
        chol, status = torch.linalg.cholesky_ex(hd)
        if int(status) == 0 and torch.isfinite(chol).all():
            hinv = torch.cholesky_inverse(chol)
            upper, status = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(status) == 0 and torch.isfinite(upper).all():
                return upper, damp, attempt
        if attempt < retries:
            damp *= 10.0
    return None, damp, retries


def _current_rows(block, err_block, u_block, wt, upper, i1, i2, i, j1, j2, count) -> torch.Tensor:
    """Rows ``i .. i + count`` (block-relative, transposed weight) with every update applied so far.

    Rows of the current sub-block are up to date; later rows of the block still owe the updates of
    the sub-block's processed rows ``j1 .. i``, rows after the block those of the block's rows
    ``0 .. i``. Used for dynamic group parameters, which must see the compensated weights.
    """
    n_block = i2 - i1
    parts = [block[i:min(i + count, j2)]]
    if i + count > j2:
        end = min(i + count, n_block)
        parts.append(block[j2:end] - u_block[j1:i, j2:end].t() @ err_block[j1:i])
        if i + count > n_block:
            end_abs = min(i1 + i + count, wt.shape[0])
            parts.append(wt[i2:end_abs] - upper[i1:i1 + i, i2:end_abs].t() @ err_block[:i])
    return torch.cat(parts)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, weight_args: Mapping[str, Any],
                  **options: Any) -> GPTQResult:
    """Quantize ``weight`` with GPTQ error compensation.

    Args:
        weight: float ``[out, in]`` weight (any float dtype/device; computation in float32 on its device).
        hessian: ``[in, in]`` Hessian of the layer input (:class:`HessianAccumulator`).
        weight_args: the plan's weight args: ``bits`` (8 or 4), ``symmetric``, ``granularity``
            (``"channel"``, ``"group"`` or ``"tensor"``), ``group_size``, ``observer``
            (``"minmax"``, or ``"mse"`` for a clipping search of each scale).
        **options: ``HfPtqConfig.gptq`` options: ``block_size`` (128), ``damp`` (0.01, fraction of
            the mean Hessian diagonal), ``act_order`` (False), ``static_groups`` (False; forced on
            with act-order + groups), ``max_damp_retries`` (6), ``hessian_dtype``
            (``"float32"``), ``report_error`` (True); ``true_sequential`` and ``float_targets``
            are read by the calibration engine (see :func:`float_target_weight`), not here.

    Returns:
        A :class:`GPTQResult`; its ``weight`` sits exactly on the grid of ``scale``/``zero_point``.

    Raises:
        ConfigError: unknown options (never for a bad Hessian: see ``info["fallback"]``).

    Example:
        >>> x = torch.randn(512, 16) @ torch.randn(16, 16)          # correlated inputs
        >>> acc = HessianAccumulator(); acc("fc", x)
        >>> res = gptq_quantize(torch.randn(8, 16), acc.hessian("fc"), {"bits": 4, "granularity": "channel"})
        >>> res.info["error"] <= res.info["rtn_error"]
        True
    """
    opts = validate_options("gptq", options)
    started = time.perf_counter()
    bits, symmetric, granularity, group_size, observer = _args(weight_args)
    if weight.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(f"hessian must be [{in_f}, {in_f}] for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if granularity == "group" and (not group_size or in_f % group_size):
        raise ValueError(f"group_size={group_size} must divide in_features={in_f}")
    device = weight.device
    hdtype = torch.float64 if opts["hessian_dtype"] == "float64" else torch.float32
    w_orig = weight.detach().to(torch.float32)
    h = hessian.detach().to(device=device, dtype=hdtype).clone()
    qmin, qmax = qrange(bits, symmetric)
    act_order = opts["act_order"]
    static_groups = opts["static_groups"] or (act_order and granularity == "group")
    info: Dict[str, Any] = {"act_order": act_order, "static_groups": bool(static_groups and granularity == "group"),
                            "block_size": opts["block_size"], "damp_fraction": opts["damp"], "damp_retries": 0,
                            "fallback": None, "dead_inputs": 0}

    def finish(result: GPTQResult) -> GPTQResult:
        if opts["report_error"] and info["fallback"] != "non-finite Hessian":
            h_ref = hessian.detach().to(device=device, dtype=torch.float32)
            rtn = rtn_quantize(w_orig, weight_args) if info["fallback"] is None else result
            # tall matrices (LM heads): the relative error is estimated on evenly spaced rows
            rows = slice(None) if out_f <= _ERROR_ROWS else slice(None, None, math.ceil(out_f / _ERROR_ROWS))
            ref = w_orig[rows]
            info["error"] = _rel_error(result.weight[rows] - ref, h_ref, ref)
            info["rtn_error"] = _rel_error(rtn.weight[rows] - ref, h_ref, ref)
            info["error_reduction"] = 1.0 - info["error"] / info["rtn_error"] if info["rtn_error"] > 0 else 0.0
        info["seconds"] = time.perf_counter() - started
        result.info = info
        return result

    if not torch.isfinite(h).all():
        info["fallback"] = "non-finite Hessian"
        logger.warning("GPTQ: the Hessian has inf/NaN entries (overflowing activations?); rounding to nearest.")
        return finish(rtn_quantize(w_orig, weight_args))

    diag = torch.diagonal(h)
    dead = diag == 0
    info["dead_inputs"] = int(dead.sum())
    if info["dead_inputs"]:
        h[dead, :] = 0
        h[:, dead] = 0
        h[dead, dead] = 1
    live_diag = diag[~dead]
    mean_diag = float(live_diag.mean()) if live_diag.numel() else 1.0
    damp = opts["damp"] * mean_diag if mean_diag > 0 else max(opts["damp"], 1e-8)

    # group/channel parameters that are fixed before the loop
    if granularity == "group" and static_groups:
        scale_all, zp_all = weight_qparams(w_orig, weight_args)  # [out, n_groups], original order
    elif granularity != "group":
        scale_all, zp_all = weight_qparams(w_orig, weight_args)  # [out or 1, 1]
    else:
        n_groups = in_f // group_size
        scale_all = torch.zeros(out_f, n_groups, dtype=torch.float32, device=device)
        zp_all = torch.zeros(out_f, n_groups, dtype=torch.int32, device=device)
    scale_all = scale_all.to(device)
    zp_all = zp_all.to(device)

    w = w_orig.clone()
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]

    upper, damp_used, retries = _inverse_cholesky(h, damp, opts["max_damp_retries"])
    info["damp"] = damp_used
    info["damp_retries"] = retries
    if upper is None:
        info["fallback"] = (f"Hessian not positive definite even with damp={damp_used:.3g} "
                            f"({retries} retries); rounded to nearest")
        logger.warning("GPTQ: %s.", info["fallback"])
        return finish(rtn_quantize(w_orig, weight_args))
    if retries:
        logger.info("GPTQ: Cholesky needed %d dampening retries (damp=%.3g).", retries, damp_used)
    upper = upper.to(torch.float32)

    # The loop works on the transposed weight [in, out] so that a column of W is a contiguous row
    # (on CPU, strided column access and whole-block rank-1 updates are memory bound). Two levels
    # of lazy updates: the rest of the matrix is updated once per block, the rest of the block once
    # per sub-block of _SUB rows, and only the current sub-block eagerly; mathematically identical
    # to updating everything after every column.
    wt = w.t().contiguous()
    del w  # LM heads are large: keep only the transposed working copy
    q_t = torch.zeros_like(wt)
    scale_t = scale_all.t().contiguous()  # [n_groups or 1, out or 1]
    zp_t = zp_all.t().contiguous().float()
    block_size = opts["block_size"]
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        n_block = i2 - i1
        block = wt[i1:i2].clone()
        err_block = torch.zeros_like(block)
        u_block = upper[i1:i2, i1:i2]
        for j1 in range(0, n_block, _SUB):
            j2 = min(j1 + _SUB, n_block)
            for i in range(j1, j2):
                col = i1 + i
                if granularity != "group":
                    s, z = scale_t[0], zp_t[0]
                elif static_groups:
                    g = int(perm[col]) // group_size if perm is not None else col // group_size
                    s, z = scale_t[g], zp_t[g]
                else:
                    g = col // group_size
                    if col % group_size == 0:
                        span = _current_rows(block, err_block, u_block, wt, upper, i1, i2, i, j1, j2, group_size)
                        gs_scale, gs_zp = weight_qparams(
                            span.t(), {**dict(weight_args), "granularity": "channel", "group_size": None})
                        scale_t[g] = gs_scale[:, 0]
                        zp_t[g] = gs_zp[:, 0].float()
                    s, z = scale_t[g], zp_t[g]
                row = block[i]
                q = _fake(row, s, z, qmin, qmax)
                q_t[col] = q
                err = (row - q) / u_block[i, i]
                err_block[i] = err
                if i + 1 < j2:
                    block[i + 1:j2] -= u_block[i, i + 1:j2].unsqueeze(1) * err.unsqueeze(0)
            if j2 < n_block:
                block[j2:] -= u_block[j1:j2, j2:].t() @ err_block[j1:j2]
        if i2 < in_f:
            wt[i2:] -= upper[i1:i2, i2:].t() @ err_block
    del wt
    q_all = q_t.t().contiguous()
    del q_t
    scale_all = scale_t.t().contiguous()
    zp_all = zp_t.t().round().to(torch.int32)

    if perm is not None:
        inv = torch.argsort(perm)
        q_all = q_all[:, inv]
    if not torch.isfinite(q_all).all():  # defensive: never hand back NaN weights
        info["fallback"] = "non-finite GPTQ update; rounded to nearest"
        logger.warning("GPTQ: %s.", info["fallback"])
        return finish(rtn_quantize(w_orig, weight_args))
    zp_out = None if symmetric else zp_all.to(torch.int8)
    return finish(GPTQResult(q_all, scale_all.float(), zp_out, {}))


def float_target_weight(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor,
                        damp: float = 0.01, retries: int = 6) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """The weight that best maps the quantized model's input onto the float model's output.

    With ``X_q`` the module's inputs in the model being quantized (earlier layers already rounded)
    and ``X_f`` the same positions' inputs in the float model, ``H = 2/N X_qᵀX_q`` and
    ``C = 2/N X_qᵀX_f``, the least-squares solution of ``min ||X_f Wᵀ - X_q W*ᵀ||`` is
    ``W* = W Cᵀ H⁻¹``. Since ``||X_f Wᵀ - X_q Qᵀ||² = ||X_q (W* - Q)ᵀ||² + const``, running GPTQ on
    ``W*`` with ``H`` minimises the error against the *float* output (GPTAQ's asymmetric
    calibration objective) rather than against the drifted layer's own float output.

    The fit is regularised towards ``W`` (``+ λ||W* - W||²``, ``λ`` = ``damp`` x the mean diagonal of
    ``H``, 10x more on a failed Cholesky): ``W* = W (C + λI)ᵀ (H + λI)⁻¹``, exactly ``W`` when
    ``X_q = X_f``, and directions the calibration inputs barely excite keep their float weight.

    Returns:
        ``(W*, info)`` with ``info["shift"] = ||W* - W|| / ||W||`` and the dampening used; ``W``
        itself (``info["fallback"]`` set) if no factorisation succeeds or the result is not finite.

    Example:
        >>> xf = torch.randn(4096, 16); xq = xf + 0.05 * torch.randn(4096, 16)
        >>> w = torch.randn(8, 16)
        >>> ws, info = float_target_weight(w, 2 / 4096 * xq.T @ xq, 2 / 4096 * xq.T @ xf, damp=1e-4)
        >>> bool(((xf @ w.T - xq @ ws.T).norm() < (xf @ w.T - xq @ w.T).norm()))
        True
    """
    # solved in float64 (an [in, in] factorisation: cheap next to GPTQ), returned in float32
    w = weight.detach().to(torch.float64)
    h = hessian.detach().to(device=w.device, dtype=torch.float64)
    c = cross.detach().to(device=w.device, dtype=torch.float64)
    info: Dict[str, Any] = {"shift": 0.0, "fallback": None}
    diag = torch.diagonal(h)
    live = diag[diag > 0]
    base = damp * float(live.mean()) if live.numel() else max(damp, 1e-8)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(retries + 1):
        chol, status = torch.linalg.cholesky_ex(h + base * eye)
        if int(status) == 0:
            w_star = torch.cholesky_solve((c + base * eye) @ w.t(), chol).t()
            if bool(torch.isfinite(w_star).all()):
                info["damp"] = base
                info["shift"] = float((w_star - w).norm() / w.norm().clamp_min(1e-12))
                return w_star.to(torch.float32).contiguous(), info
        base *= 10.0
    info["fallback"] = "no finite least-squares correction; the float weight is used"
    return weight.detach().to(torch.float32), info


def summarize(infos: Mapping[str, Optional[Mapping[str, Any]]], options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Aggregate the per-module ``GPTQResult.info`` dicts into the report's ``algorithms`` entry.

    ``error_reduction`` is ``1 - sum(error) / sum(rtn_error)`` over the modules (each error relative
    to its own output energy on the calibration inputs): the share of the round-to-nearest output
    error GPTQ removed.

    Example:
        >>> summarize({"fc": {"error": 1.0, "rtn_error": 4.0, "damp_retries": 0, "fallback": None}})["error_reduction"]
        0.75
    """
    infos = {k: v for k, v in infos.items() if v}
    out: Dict[str, Any] = {"name": "gptq", "modules": len(infos)}
    if options is not None:
        opts = validate_options("gptq", options)
        out.update({k: opts[k] for k in ("block_size", "damp", "act_order", "static_groups", "true_sequential",
                                         "float_targets")})
    errors = [(v["error"], v["rtn_error"]) for v in infos.values() if "error" in v and "rtn_error" in v]
    if errors:
        total, rtn = sum(e for e, _ in errors), sum(r for _, r in errors)
        out["error"] = total / len(errors)
        out["rtn_error"] = rtn / len(errors)
        out["error_reduction"] = 1.0 - total / rtn if rtn > 0 else 0.0
    out["damp_retries"] = sum(int(v.get("damp_retries", 0)) for v in infos.values())
    out["retried_modules"] = sorted(k for k, v in infos.items() if v.get("damp_retries"))
    out["fallbacks"] = {k: v["fallback"] for k, v in infos.items() if v.get("fallback")}
    out["dead_inputs"] = sum(int(v.get("dead_inputs", 0)) for v in infos.values())
    out["seconds"] = sum(float(v.get("seconds", 0.0)) for v in infos.values())
    shifts = [float(v["float_target_shift"]) for v in infos.values() if "float_target_shift" in v]
    if shifts:  # float_targets: how far the least-squares correction moved the weights before rounding
        out["float_target_modules"] = len(shifts)
        out["float_target_shift"] = sum(shifts) / len(shifts)
    return out


# --------------------------------------------------------------------------------------------
# The calibration step
# --------------------------------------------------------------------------------------------


class GPTQStep(CalibrationStep):
    """GPTQ inside the sequential calibration: Hessians from the observing pass, then rounding.

    Per decoder layer: the Hessians of the layer's quantized linears are collected in the engine's
    observing pass and ``quantize_fn`` (default :func:`gptq_quantize`) rounds each weight; the layer
    then runs once more with the new weights to produce the next layer's inputs. With
    ``true_sequential`` the modules are grouped by shared input in call order (q/k/v, o, gate/up,
    down) and each later group gets its own pass after the earlier groups were rounded. With
    ``float_targets`` a second hidden-state stream carries the float model: the unrounded layer runs
    on it first, recording its modules' inputs, and each weight is corrected towards the float
    output (``float_target_fn``, default :func:`float_target_weight`) before rounding. Planned
    modules after the layers (the LM head) are rounded from the tail pass's Hessians. The rounded
    weights go to ``run.weights`` (the model's own weights are never written).

    Example:
        >>> GPTQStep({"true_sequential": True}).name
        'gptq'
    """

    name = "gptq"

    def __init__(self, options: Optional[Mapping[str, Any]], *, quantize_fn: Optional[Callable[..., Any]] = None,
                 float_target_fn: Optional[Callable[..., Any]] = None) -> None:
        super().__init__()
        self.raw = dict(options or {})
        self.options: Dict[str, Any] = {}
        self.quantize_fn = gptq_quantize if quantize_fn is None else quantize_fn
        self.float_target_fn = float_target_weight if float_target_fn is None else float_target_fn
        self.names: List[str] = []
        self.float_cache: Optional[torch.Tensor] = None  # float_targets: the float model's hidden states
        self._groups: List[List[str]] = []
        self._targets: Optional[List[Dict[str, torch.Tensor]]] = None
        self._first: Optional[Tuple[HessianAccumulator, Optional[CrossAccumulator]]] = None
        self._tail: Optional[HessianAccumulator] = None

    def validate(self, run: Any) -> None:
        self.options = validate_options("gptq", self.raw)
        self.names = [e.name for e in run.plan if e.quantized and e.kind != "embedding"]
        for name in self.names:
            module = find_module(run.model, name)
            if module is None or not is_quantizable_linear(module):
                raise CalibrationError(f"GPTQ: the plan names {name!r} but the model has no float Linear there.")

    def module_names(self, run: Any) -> List[str]:
        return self.names

    def passes_per_layer(self, run: Any) -> int:
        # true sequential: ~4 groups a layer (q/k/v, o, gate/up, down), the first in the observing pass
        return 1 + 3 * self.options["true_sequential"] + self.options["float_targets"]

    def start_layers(self, run: Any) -> None:
        if self.options.get("float_targets"):
            self.float_cache = run.cache.clone()

    def end_layers(self, run: Any) -> None:
        self.float_cache = None

    def _here(self, layer: LayerWork) -> List[str]:
        return [n for n in self.names if n.startswith(layer.prefix)]

    def before_observe(self, run: Any, layer: LayerWork) -> None:
        here = self._here(layer)
        self._targets = None
        if self.options.get("float_targets"):
            # the float layer (smoothed, not yet rounded) on the float stream: its module inputs are the
            # GPTAQ targets, its outputs the next layer's float input
            capture = InputCapture(here)
            with torch.no_grad():
                reference = copy.deepcopy(layer.work)
            run.layer_pass(layer, write=True, module=reference, cache=self.float_cache, consumers=[capture],
                           modules={n: reference.get_submodule(n[len(layer.prefix):]) for n in here})
            del reference
            self._targets = capture.batches
        self._groups = self._call_groups(run, layer, here) if here and self.options.get("true_sequential") else [here]

    def _accumulators(self, group: List[str]) -> Tuple[Optional[HessianAccumulator], Optional[CrossAccumulator]]:
        hessians = HessianAccumulator(group) if group else None
        cross = CrossAccumulator(group, self._targets) if group and self._targets is not None else None
        return hessians, cross

    def observe_hooks(self, run: Any, layer: LayerWork) -> Tuple[List[Any], Optional[nn.Module]]:
        group = self._groups[0]
        self._first = self._accumulators(group)
        stop = layer.modules[group[-1]] if len(self._groups) > 1 else None  # only the group's inputs are needed
        return [c for c in self._first if c is not None], stop

    def rewrites_outputs(self, run: Any, layer: LayerWork) -> bool:
        return bool(self._here(layer))

    def after_observe(self, run: Any, layer: LayerWork) -> None:
        for g, group in enumerate(self._groups):
            if g == 0:
                hessians, cross = self._first
                self._first = None
            else:
                hessians, cross = self._accumulators(group)
                run.layer_pass(layer, write=False, modules={n: layer.modules[n] for n in group},
                               consumers=[c for c in (hessians, cross) if c is not None],
                               stop_after=layer.modules[group[-1]])
            for name in group:
                self._round(run, name, layer.modules[name], hessians, cross)
            del hessians, cross
        self._targets = None

    def _call_groups(self, run: Any, layer: LayerWork, names: Sequence[str]) -> List[List[str]]:
        """``names`` grouped by shared input, in call order (q/k/v, o, gate/up, down), from one batch.

        Modules called with the same input tensor (before any rotation hook) form one group; a
        module never called in the probe batch goes last, alone.
        """
        order: Dict[str, int] = {}  # module -> identity of its first input, in call order
        handles = []

        def hook(mod, args, kwargs, _name):
            x = args[0] if args else next(iter(kwargs.values()))
            order.setdefault(_name, x.data_ptr() if isinstance(x, torch.Tensor) else id(x))

        try:
            for n in names:
                handles.append(layer.modules[n].register_forward_pre_hook(
                    lambda mod, args, kwargs, _n=n: hook(mod, args, kwargs, _n), with_kwargs=True, prepend=True))
            run.forward_first_batch(layer)
        finally:
            for h in handles:
                h.remove()
        groups: List[List[str]] = []
        last = None
        for n, key in order.items():
            if groups and key == last:
                groups[-1].append(n)
            else:
                groups.append([n])
            last = key
        groups += [[n] for n in names if n not in order]
        return groups

    def _round(self, run: Any, name: str, module: nn.Module, hessians: HessianAccumulator,
               cross: Optional[CrossAccumulator] = None) -> None:
        """GPTQ on ``module`` of a layer's working copy; the rounded weight also replaces the copy's
        weight, so that the layer's later passes see it."""
        shift = None
        with torch.no_grad():
            hessian = hessians.hessian(name).clone()
            weight = weight_out_in(module).detach().float().clone()
            if cross is not None:
                opts = self.options
                weight, fit = self.float_target_fn(weight, hessian, cross.cross(name), opts["damp"],
                                                   opts["max_damp_retries"])
                shift = fit["shift"]
            out = self.quantize_fn(weight, hessian, dict(run.plan[name].weights), **self.raw)
            if shift is not None and getattr(out, "info", None) is not None:
                out.info["float_target_shift"] = shift
            new = out.weight.detach()
            if tuple(new.shape) != tuple(weight.shape):
                raise CalibrationError(f"GPTQ returned a weight of shape {tuple(new.shape)} for {name!r} "
                                       f"(expected {tuple(weight.shape)}).")
            module.weight.copy_(weight_out_in(module, new).to(module.weight.dtype))
        self._keep(run, name, out)

    def _keep(self, run: Any, name: str, out: Any) -> None:
        run.weights[name] = out.weight.detach()
        run.weight_qparams[name] = (out.scale, out.zero_point)
        self.records[name] = getattr(out, "info", None)

    # ---------------------------------------------------------------- modules after the layers
    def _tail_names(self, run: Any) -> List[str]:
        inside = f"{run.layers[0]}."
        return [n for n in self.names if not n.startswith(inside)]

    def tail_needed(self, run: Any) -> bool:
        return bool(self._tail_names(run))

    def tail_hooks(self, run: Any) -> Tuple[List[str], List[Any]]:
        names = self._tail_names(run)
        self._tail = HessianAccumulator(names) if names else None
        return names, [self._tail] if names else []

    def after_tail(self, run: Any, modules: Mapping[str, nn.Module]) -> None:
        for name in self._tail_names(run):
            with torch.no_grad():
                if name in run.weights:  # smoothed by SmoothQuant (final norm -> LM head)
                    weight = run.weights[name].float().clone()
                else:
                    weight = weight_out_in(modules[name]).detach().float().clone()
                out = self.quantize_fn(weight, self._tail.hessian(name).clone(), dict(run.plan[name].weights),
                                       **self.raw)
            self._keep(run, name, out)
        self._tail = None
