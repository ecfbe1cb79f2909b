"""Quantization math as pure tensor functions (no Transformers imports).

Conventions
-----------
* Integers are stored signed (``torch.int8``) for both 8 and 4 bits; 4-bit values are packed
  two per byte only for storage (:func:`pack_int4`).
* Symmetric quantization uses the *restricted* range ``[-(2**(b-1) - 1), 2**(b-1) - 1]``
  (``[-127, 127]`` for int8) so that ``-x`` is exactly representable and the zero point is 0.
* Asymmetric quantization uses the full range ``[-2**(b-1), 2**(b-1) - 1]`` and an integer zero
  point, chosen so that the real value 0.0 is exactly representable (it maps to ``zero_point``).
* ``x ≈ scale * (q - zero_point)``; inside the representable range the round-trip error is at
  most ``scale / 2``.

Weight scale layout: always 2-D ``[rows, n_groups]`` where ``rows`` is ``out_features`` (or 1
for per-tensor) and ``n_groups`` is ``in_features // group_size`` (1 for per-channel/tensor).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Smallest scale we allow: keeps x / scale finite for all-zero channels.
SCALE_EPS = torch.finfo(torch.float32).tiny * 2**20  # ~1e-32, still a normal float32


def qrange(bits: int, symmetric: bool) -> Tuple[int, int]:
    """Return ``(qmin, qmax)`` of the integer grid for ``bits`` and the symmetry mode.

    7 bits is the activation grid of the ``fbgemm-a7`` CPU route (see :mod:`hfptq.quant.backends`)."""
    if bits not in (4, 7, 8):
        raise ValueError(f"bits must be one of 4 or 8 (7 for activations on the fbgemm-a7 route; got {bits})")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def compute_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[min_val, max_val]`` (elementwise; any shape).

    The range is first widened to include 0 so that zero is exactly representable.

    Returns:
        ``(scale, zero_point)``: ``scale`` float32 (> 0), ``zero_point`` int32 of the same shape
        (all zeros when symmetric).

    Example:
        >>> s, z = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=False)
        >>> float(s), int(z)
        (0.01568627543747425, -64)
    """
    qmin, qmax = qrange(bits, symmetric)
    min_val = torch.clamp(min_val.detach().float(), max=0.0)
    max_val = torch.clamp(max_val.detach().float(), min=0.0)
    if symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = torch.clamp(amax / qmax, min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_val - min_val) / float(qmax - qmin), min=SCALE_EPS)
        zero_point = torch.clamp(torch.round(qmin - min_val / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bits: int = 8,
    symmetric: bool = True,
) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, qmin, qmax)`` as ``torch.int8``.

    ``scale`` and ``zero_point`` broadcast against ``x``. NaN inputs are not allowed (the
    caller validates activations).
    """
    qmin, qmax = qrange(bits, symmetric)
    q = torch.round(x.float() / scale)
    if zero_point is not None:
        q = q + zero_point
    return torch.clamp(q, qmin, qmax).to(torch.int8)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``scale * (q - zero_point)`` in ``dtype``."""
    x = q.float()
    if zero_point is not None:
        x = x - zero_point.float()
    return (x * scale).to(dtype)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bits: int = 8,
    symmetric: bool = True,
) -> torch.Tensor:
    """Quantize then dequantize (simulation), returned in ``x.dtype``."""
    return dequantize(quantize(x, scale, zero_point, bits, symmetric), scale, zero_point, x.dtype)


# --------------------------------------------------------------------------------------------
# Weights: per-tensor / per-channel / per-group
# --------------------------------------------------------------------------------------------


def _grouped(weight: torch.Tensor, granularity: str, group_size: Optional[int]) -> torch.Tensor:
    """View ``[out, in]`` as ``[rows, n_groups, group]`` for the granularity."""
    out_features, in_features = weight.shape
    if granularity == "tensor":
        return weight.reshape(1, 1, out_features * in_features)
    if granularity == "channel":
        return weight.reshape(out_features, 1, in_features)
    if granularity == "group":
        if not group_size or in_features % group_size != 0:
            raise ValueError(
                f"group_size={group_size} must divide in_features={in_features}; "
                "choose a divisor or use granularity='channel'"
            )
        return weight.reshape(out_features, in_features // group_size, group_size)
    raise ValueError(f"granularity must be 'tensor', 'channel' or 'group' (got {granularity!r})")


def weight_minmax(
    weight: torch.Tensor, granularity: str = "channel", group_size: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-granule min and max of a 2-D weight, each shaped ``[rows, n_groups]``."""
    g = _grouped(weight.detach().float(), granularity, group_size)
    return g.amin(dim=-1), g.amax(dim=-1)


def quantize_weight(
    weight: torch.Tensor,
    bits: int = 8,
    symmetric: bool = True,
    granularity: str = "channel",
    group_size: Optional[int] = None,
    scale: Optional[torch.Tensor] = None,
    zero_point: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize a ``[out, in]`` weight.

    When ``scale``/``zero_point`` are omitted they come from the min/max of each granule.

    Returns:
        ``(q, scale, zero_point)``: ``q`` int8 ``[out, in]`` (values within the ``bits`` grid),
        ``scale`` float32 ``[rows, n_groups]``, ``zero_point`` int8 ``[rows, n_groups]`` or ``None``
        when symmetric.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_weight expects a 2-D weight, got shape {tuple(weight.shape)}")
    if scale is None:
        lo, hi = weight_minmax(weight, granularity, group_size)
        scale, zero_point = compute_qparams(lo, hi, bits, symmetric)
    g = _grouped(weight.detach().float(), granularity, group_size)
    zp = None if symmetric or zero_point is None else zero_point.to(torch.int32)
    q = quantize(g, scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), bits, symmetric)
    zp_out = None if zp is None else zp.to(torch.int8)
    return q.reshape(weight.shape), scale.float(), zp_out


def dequantize_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_weight`; the granularity is read off ``scale.shape``."""
    out_features, in_features = q.shape
    rows, n_groups = scale.shape
    g = q.reshape(rows, n_groups, -1)
    zp = None if zero_point is None else zero_point.unsqueeze(-1)
    return dequantize(g, scale.unsqueeze(-1), zp, dtype).reshape(out_features, in_features)


# --------------------------------------------------------------------------------------------
# Activations: per-token (dynamic) and per-tensor (static)
# --------------------------------------------------------------------------------------------


def quantize_per_token(
    x: torch.Tensor, bits: int = 8, symmetric: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Dynamic per-token (per-row of the last dim) quantization of an activation.

    Returns ``(q int8 [..., K], scale float32 [..., 1], zero_point int32 [..., 1] or None)``.
    """
    xf = x.float()
    if symmetric:
        _, qmax = qrange(bits, True)
        scale = torch.clamp(xf.abs().amax(dim=-1, keepdim=True) / qmax, min=SCALE_EPS)
        q = torch.clamp(torch.round(xf / scale), -qmax, qmax).to(torch.int8)
        return q, scale, None
    lo = xf.amin(dim=-1, keepdim=True)
    hi = xf.amax(dim=-1, keepdim=True)
    scale, zp = compute_qparams(lo, hi, bits, False)
    return quantize(xf, scale, zp, bits, False), scale, zp


# --------------------------------------------------------------------------------------------
# INT4 packing (two values per byte, low nibble first)
# --------------------------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in ``[-8, 7]`` along the last dim (even length) into ``uint8``."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {q.shape[-1]}")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [..., n]`` -> ``int8 [..., 2n]`` in ``[-8, 7]``."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    # sign-extend 4-bit two's complement
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
