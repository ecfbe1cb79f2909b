"""Integer matmul dispatch and the fast paths of the quantized modules (CPU and CUDA).

Two layers live here:

* :func:`int8_matmul` returns ``a @ b_t.T`` accumulated exactly in int32, whatever path runs:
  ``torch._int_mm`` when the device and shapes allow it, otherwise a float matmul that is exact
  for the given inner dimension (float32 while ``K * 128 * 128 < 2**24``, else float64: int8 operands
  reach -128 on both sides with asymmetric activations and weights). Every
  path gives the same integers.
* :func:`fbgemm_int8_linear` runs the same exact integer sums through FBGEMM for a few rows
  (decode), returned as float32; it is used only where :func:`fbgemm_linear_available` has checked
  it against exact integer arithmetic on this machine.
* The *fast path* helpers (:func:`quantize_per_token_fast`, :func:`quantize_fast`,
  :func:`rescale_int32`, :func:`dequant_linear_tiled`, :func:`cached_cast`) compute **the same
  numbers, bit for bit,** as the reference formulas of :mod:`hfptq.quant.qparams` used by
  :class:`~hfptq.quant.linear.QuantLinear`, in fewer passes over memory and with fewer temporary
  tensors. Each one documents why it is identical; ``tests/quant/test_fast_path.py`` checks it.

The reference math stays available: :func:`reference_math` (a context manager) or the
environment variable ``HFPTQ_REFERENCE_MATH=1`` make every module run its original,
unoptimised formulas — that is how ``benchmarks/speed.py`` proves that the fast path leaves
perplexity unchanged.

Example:
    >>> import torch
    >>> from hfptq.quant.kernels import int8_matmul, reference_math
    >>> a = torch.randint(-127, 128, (4, 64), dtype=torch.int8)
    >>> b = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    >>> torch.equal(int8_matmul(a, b), a.int() @ b.int().T)
    True
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .backends import cpu_int_mm_fast, native_bf16
from .qparams import SCALE_EPS, compute_qparams, dequantize_weight, qrange, unpack_int4

logger = logging.getLogger(__name__)

_F32_EXACT_LIMIT = 2**24

#: Bytes of dequantized weight produced per tile by :func:`dequant_linear_tiled` (about one L2 cache;
#: measured on Zen 4 for a 262,144 x 640 LM head at M=1: 64 KiB tiles 480 ms, 1 MiB 81 ms, 4 MiB 76 ms,
#: the whole matrix at once (the reference) 756 ms).
DEQUANT_TILE_BYTES = 1024 * 1024

_fast_path = os.environ.get("HFPTQ_REFERENCE_MATH", "0").lower() in ("", "0", "false", "no")


# ------------------------------------------------------------------------------------------------
# Switch
# ------------------------------------------------------------------------------------------------


def fast_path_enabled() -> bool:
    """Whether the quantized modules use the fast path (default) or the reference formulas.

    The fast path is also skipped while ``torch.compile`` traces a module: the reference
    formulas are pure tensor expressions that Inductor fuses by itself.

    Example:
        >>> fast_path_enabled()
        True
    """
    if not _fast_path:
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    return True


def set_fast_path(enabled: bool) -> None:
    """Turn the fast path on or off for the whole process (see :func:`reference_math`)."""
    global _fast_path
    _fast_path = bool(enabled)


@contextlib.contextmanager
def reference_math() -> Iterator[None]:
    """Run the quantized modules with their reference formulas inside the ``with`` block.

    Used to prove that the fast path gives the same outputs (and the same perplexity). The
    switch is process-wide, not per thread.

    Example:
        >>> with reference_math():
        ...     ref_logits = model(input_ids).logits          # doctest: +SKIP
        >>> torch.equal(ref_logits, model(input_ids).logits)  # doctest: +SKIP
        True
    """
    previous = _fast_path
    set_fast_path(False)
    try:
        yield
    finally:
        set_fast_path(previous)


# ------------------------------------------------------------------------------------------------
# Integer matmul
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def int_mm_available(device_type: str) -> bool:
    """Whether ``torch._int_mm`` runs on this device type (probed once)."""
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device_type)
        out = torch._int_mm(a, a)
        return bool(out[0, 0].item() == 32)
    except Exception:  # pragma: no cover - depends on the build
        logger.debug("torch._int_mm is not usable on %s; integer matmuls use the exact float fallback", device_type)
        return False


def _int_mm_shape_ok(m: int, k: int, n: int, device_type: str) -> bool:
    if device_type == "cuda":
        # cuBLASLt int8 GEMM: m > 16, k and n multiples of 8
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return True


def int8_matmul_reference(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 result of ``a @ b_t.T`` through a float matmul (exact by the size bound)."""
    k = a.shape[-1]
    # |a_k * b_k| <= 128 * 128 (both operands may be -128): every partial sum is an integer below
    # 2**24 in magnitude, hence exact in float32, while K * 128 * 128 < 2**24
    dtype = torch.float32 if k * 128 * 128 < _F32_EXACT_LIMIT else torch.float64
    return torch.matmul(a.to(dtype), b_t.to(dtype).t()).round_().to(torch.int32)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b_t[N, K].T`` -> ``int32 [M, N]``, exact.

    CUDA's ``_int_mm`` requires ``M > 16``: small ``M`` (decode) is padded up to 32 rows.

    Example:
        >>> a = torch.randint(-127, 128, (1, 64), dtype=torch.int8)
        >>> b = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
        >>> int8_matmul(a, b).shape
        torch.Size([1, 8])
    """
    m, k = a.shape
    n = b_t.shape[0]
    device_type = a.device.type
    # on CPU torch._int_mm runs oneDNN's int8 GEMM only with AVX512-VNNI, and a scalar loop otherwise
    # (64x slower than float32 on an AVX2-only CPU): see hfptq.quant.backends
    if int_mm_available(device_type) and (device_type != "cpu" or cpu_int_mm_fast()):
        if device_type == "cuda" and m <= 16 and k % 8 == 0 and n % 8 == 0:
            padded = torch.zeros(32, k, dtype=a.dtype, device=a.device)
            padded[:m] = a
            return torch._int_mm(padded, b_t.t())[:m]
        if _int_mm_shape_ok(m, k, n, device_type):
            return torch._int_mm(a, b_t.t())
    return int8_matmul_reference(a, b_t)


# ------------------------------------------------------------------------------------------------
# Few-row int8 linear through FBGEMM (decode): exact int32 accumulation, float32 out
# ------------------------------------------------------------------------------------------------

#: Largest number of rows sent to FBGEMM. Measured at one thread for a 640-wide input and 65,536
#: outputs: FBGEMM 2.4 ms vs ``torch._int_mm`` 4.5 ms at M=1, 2.8 vs 7.2 at M=8, 9.5 vs 11.6 at M=32,
#: even at M=64 and slower from M=128 on (64 vs 47 ms).
FBGEMM_MAX_ROWS = 32

_FBGEMM_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"


@functools.lru_cache(maxsize=None)
def _fbgemm_ops():
    """``(linear_prepack, linear_with_input_q_dq_qweight_dq_output_fp32)`` overloads, or ``(None, None)``;
    looked up once (:func:`fbgemm_int8_linear` runs once per quantized linear per decode step)."""
    quantized = getattr(torch.ops, "quantized", None)
    if quantized is None:
        return None, None
    try:
        # the ``.default`` overloads: calling the packet re-checks its arguments in Python on every call
        return quantized.linear_prepack.default, getattr(quantized, _FBGEMM_OP).default
    except (AttributeError, RuntimeError):
        return None, None


def fbgemm_pack(qweight: torch.Tensor):
    """FBGEMM's packed copy of an int8 ``[N, K]`` weight, for :func:`fbgemm_int8_linear`.

    The weight is packed as a per-tensor quantized tensor with scale 1 and zero point 0, so FBGEMM
    returns the raw integer sums (converted to float32); the real per-channel scales are applied
    afterwards by the caller, in the reference order. The packed copy is as large as the weight.
    """
    import warnings

    prepack, _ = _fbgemm_ops()
    engines = torch.backends.quantized.supported_engines
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice for quantized tensors
        try:
            if "fbgemm" in engines and previous != "fbgemm":
                torch.backends.quantized.engine = "fbgemm"
            wq = torch._make_per_tensor_quantized_tensor(qweight.contiguous(), 1.0, 0)
            return prepack(wq, None)
        finally:
            if torch.backends.quantized.engine != previous:
                torch.backends.quantized.engine = previous


def fbgemm_int8_linear(x_shifted: torch.Tensor, zero_point: int, packed) -> torch.Tensor:
    """``float32(sum_k (x_q - z) * W)`` for int8 weights, exact, from FBGEMM's int8 GEMM.

    ``x_shifted`` holds ``x_q - z`` as float32 (integers; ``z`` the activation zero point, 0 when
    symmetric) and ``zero_point`` is ``z + 2**(bits - 1)`` for ``bits``-bit activations (``z + 128``
    for 8 bits). FBGEMM quantizes its input with scale 1 and that zero point, which gives back
    ``x_q + 2**(bits - 1)`` as uint8 exactly (``x_q`` is in ``[-2**(bits-1), 2**(bits-1) - 1]``);
    it accumulates ``(x_q + 2**(bits-1) - zero_point) * w`` in int32 and converts the sum to float32
    with one correctly rounded conversion, multiplied by ``1 * 1``. That is ``acc.to(float32)`` of
    the reference, bit for bit, **where FBGEMM's integer sums are exact**: CPUs without VNNI add
    pairs of uint8 x int8 products in saturating 16-bit arithmetic, exact only for uint8 inputs
    below 128 (7-bit activations). :func:`fbgemm_linear_available` verifies it on this machine.
    """
    _, op = _fbgemm_ops()
    return op(x_shifted, 1.0, int(zero_point), packed)


def fbgemm_linear_available(bits: int = 8, weight_bits: int = 8) -> bool:
    """Whether the FBGEMM route runs here **and gives the reference integers** for ``bits``-bit activations
    and ``weight_bits``-bit weights (8: int8 in ``[-128, 127]``; 7: ``[-64, 63]``, see :func:`regrid_weight`).

    Probed once per ``(bits, weight_bits)`` with random and extreme operands (every ``x_q`` at the ends
    of the ``bits``-bit range, every weight at the ends of its range: CPUs without VNNI add pairs of
    products in saturating 16-bit arithmetic, which such inputs expose for 8-bit activations with
    8-bit weights, ``2 * 255 * 128 > 32767``; 7-bit activations, ``2 * 127 * 128``, or 7-bit weights,
    ``2 * 255 * 64 = 32640``, stay below it), several shapes, with and without an activation zero
    point. Any difference, missing op or error turns the route off. ``HFPTQ_FBGEMM=0`` turns it off too.

    Example:
        >>> fbgemm_linear_available(7) >= fbgemm_linear_available(8)  # doctest: +SKIP
        True
    """
    # one cache entry per operand pair however it is spelled: ``()``, ``(8)`` and ``(8, 8)`` share one probe
    return _fbgemm_linear_probe(int(bits), int(weight_bits))


@functools.lru_cache(maxsize=None)
def _fbgemm_linear_probe(bits: int, weight_bits: int) -> bool:
    """:func:`fbgemm_linear_available`'s probe, cached per ``(bits, weight_bits)``."""
    if os.environ.get("HFPTQ_FBGEMM", "1").lower() in ("0", "false", "no"):
        return False
    prepack, op = _fbgemm_ops()
    if prepack is None or op is None or "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    wlo, whi = -(1 << (weight_bits - 1)), (1 << (weight_bits - 1)) - 1
    offset = 1 << (bits - 1)
    try:
        gen = torch.Generator().manual_seed(0)
        for k, n in ((64, 40), (640, 96), (2048, 24)):
            weights = [
                torch.randint(wlo, whi + 1, (n, k), generator=gen, dtype=torch.int8),
                torch.where(torch.rand(n, k, generator=gen) < 0.5, wlo, whi).to(torch.int8),
            ]
            for w in weights:
                packed = fbgemm_pack(w)
                for m in (1, 3, 32, 67):
                    for xq in (torch.randint(lo, hi + 1, (m, k), generator=gen, dtype=torch.int8),
                               torch.full((m, k), hi, dtype=torch.int8), torch.full((m, k), lo, dtype=torch.int8),
                               torch.where(w[:1].expand(m, k) < 0, lo, hi).to(torch.int8)):
                        for z in (0, lo, hi, 5):
                            ref = (xq.to(torch.int64) - z) @ w.to(torch.int64).t()
                            out = fbgemm_int8_linear(xq.float().sub_(z), z + offset, packed)
                            if not torch.equal(out, ref.to(torch.int32).to(torch.float32)):
                                logger.debug("FBGEMM's int8 linear differs from the exact sums here for %d-bit "
                                             "activations and %d-bit weights; not used", bits, weight_bits)
                                return False
        return True
    except Exception:  # pragma: no cover - depends on the build
        logger.debug("FBGEMM's int8 linear is not usable here", exc_info=True)
        return False


fbgemm_linear_available.cache_clear = _fbgemm_linear_probe.cache_clear  # (tests re-probe after changing the env)


#: Rows of the weight re-gridded at once by :func:`regrid_factors` / :func:`regrid_weight` (bounds their
#: float32 temporaries).
_REGRID_ROWS = 8192


def regrid_factors(qweight: torch.Tensor, bits: int = 7) -> torch.Tensor:
    """Per-output-channel factors ``f [N, 1]`` (float32) that re-grid symmetric int8 weights to ``bits`` bits
    (see :func:`regrid_weight`): ``f = fl(max(a, qmax) / qmax)`` with ``a = max_k |W[n, k]|`` and
    ``qmax = 2**(bits-1) - 1``, the row's full range on the ``bits``-bit grid; rows that fit ``bits``
    bits (``a <= qmax``) get ``f = 1``.

    A per-row clipping search (the ratio among 1.00, 0.98, ..., 0.80 of the full range that minimises
    the squared error against the 8-bit row) was measured on Gemma 3 270M ``HfPtqConfig()`` and not
    kept: WikiText-2 perplexity 29.87 with it against 29.58 without (16 windows; 8-bit 28.99).
    """
    qmax = (1 << (bits - 1)) - 1
    factor = torch.empty(qweight.shape[0], 1, dtype=torch.float32, device=qweight.device)
    for start in range(0, qweight.shape[0], _REGRID_ROWS):
        rows = qweight[start:start + _REGRID_ROWS]
        amax = rows.to(torch.int16).abs_().amax(dim=1, keepdim=True)  # (int16: |-128| overflows int8)
        factor[start:start + _REGRID_ROWS] = amax.to(torch.float32).clamp_(min=float(qmax)).div_(float(qmax))
    return factor


def regrid_weight(qweight: torch.Tensor, bits: int = 7,
                  factor: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights ``[N, K]`` re-gridded to ``bits`` bits per output channel: ``(q, factor)``.

    With ``qmax = 2**(bits - 1) - 1`` (63 for 7 bits) and the row factors of :func:`regrid_factors`
    (or ``factor``)::

        q[n, k] = clamp(round(W[n, k] / factor[n]), -qmax - 1, qmax)

    so ``factor * q`` approximates the 8-bit integers ``W`` and the row's scale becomes
    ``weight_scale * factor`` (one float32 product). Rows whose 8-bit values already fit
    (``max |W[n]| <= qmax``) keep them exactly (``factor = 1``).

    This is what route ``fbgemm-w7`` computes with (:mod:`hfptq.quant.backends`): FBGEMM's
    saturating 16-bit pair sums on CPUs without VNNI are exact for full-range uint8 activations
    times weights in ``[-64, 63]`` (``2 * 255 * 64 = 32,640 < 32,767``). The result is a deterministic
    function of the stored 8-bit weights; nothing is saved.

    Example:
        >>> w = torch.tensor([[127, -64, 1, 0], [10, -63, 5, 2]], dtype=torch.int8)
        >>> q, f = regrid_weight(w)
        >>> q[1].tolist(), float(f[1])                  # fits 7 bits: unchanged
        ([10, -63, 5, 2], 1.0)
        >>> regrid_weight(w, factor=torch.tensor([[127 / 63], [1.0]]))[0][0].tolist()
        [63, -32, 0, 0]
    """
    qmax = (1 << (bits - 1)) - 1
    if factor is None:
        factor = regrid_factors(qweight, bits)
    out = torch.empty_like(qweight, dtype=torch.int8)
    for start in range(0, qweight.shape[0], _REGRID_ROWS):
        w = qweight[start:start + _REGRID_ROWS].to(torch.float32)
        out[start:start + _REGRID_ROWS] = w.div_(factor[start:start + _REGRID_ROWS]).round_().clamp_(
            -qmax - 1, qmax).to(torch.int8)
    return out, factor


# ------------------------------------------------------------------------------------------------
# Activation quantization (identical to qparams.quantize_per_token / qparams.quantize)
# ------------------------------------------------------------------------------------------------


def _as_float32(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """``x.float()`` and whether that made a private copy (which may then be overwritten)."""
    if x.dtype == torch.float32:
        return x, False
    return x.float(), True


def quantize_per_token_fast(
    x: torch.Tensor, bits: int = 8, symmetric: bool = True
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Bit-identical, faster :func:`~hfptq.quant.qparams.quantize_per_token`.

    Returns ``(q int8 [..., K], scale float32 [..., 1], zero_point int32 [..., 1] or None)``.

    Why the numbers are the same:

    * The reduction is the same (``abs().amax()``; the asymmetric path's ``amin``/``amax``); for
      low-precision inputs it runs on the input dtype, which is exact because ``abs``, ``min``
      and ``max`` return input values, which convert exactly to float32.
    * ``x / scale`` is the same IEEE division, rounded in the same direction; ``round`` then
      converts in place instead of into new tensors.
    * Symmetric: the reference's final ``clamp(-qmax, qmax)`` is provably a no-op and is
      skipped. ``scale`` is ``fl(amax / qmax)`` (relative error <= 2**-24, a normal number
      since it is at least ``SCALE_EPS``) or ``SCALE_EPS`` when that is larger, so for every
      ``|x| <= amax`` the rounded quotient ``fl(|x| / scale)`` is at most
      ``qmax * (1 + 2**-24) / (1 - 2**-24) < qmax + 0.5`` and rounds to at most ``qmax``.
      NaN stays NaN either way.

    Example:
        >>> x = torch.randn(3, 16)
        >>> from hfptq.quant.qparams import quantize_per_token
        >>> all(torch.equal(a, b) for a, b in zip(quantize_per_token_fast(x)[:2], quantize_per_token(x)[:2]))
        True
    """
    if symmetric:
        q, scale = _quantize_rows_sym(x, x.abs().amax(dim=-1, keepdim=True), bits)
        return q.to(torch.int8), scale, None
    return quantize_per_token_asym_fast(x, bits)


def _quantize_rows_sym(x: torch.Tensor, amax: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token quantization as float32 tensors ``(q, scale)`` from the rows' ``|x|`` maxima
    (see :func:`quantize_per_token_fast` for why it is the reference's numbers)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (amax if amax.dtype == torch.float32 else amax.float()).div_(qmax).clamp_(min=SCALE_EPS)
    xf, owned = _as_float32(x)
    t = xf.div_(scale) if owned else torch.div(xf, scale)
    return t.round_(), scale


def quantize_per_token_asym_fast(
    x: torch.Tensor, bits: int = 8
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bit-identical, faster asymmetric :func:`~hfptq.quant.qparams.quantize_per_token`.

    The reference is ``compute_qparams(amin, amax)`` followed by ``quantize``: about twenty small
    tensor operations, which dominate a decode step (one token, ``[1, K]``) where the integer
    matmul itself takes a few microseconds. Here the same IEEE operations run in the same order
    on freshly allocated ``[..., 1]`` tensors, in place, so there are about half as many:

    * ``amin``/``amax`` return input values (converting them to float32 is exact), computed into
      fresh tensors that the following steps may overwrite.
    * ``scale = clamp((max(hi, 0) - min(lo, 0)) / (qmax - qmin), min=SCALE_EPS)``, the
      reference expression, evaluated in place.
    * ``zero_point = clamp(round(qmin - lo / scale), qmin, qmax)``: ``torch.rsub`` computes
      ``qmin - t`` itself (the same single rounding). It is kept as an integer-valued float32 for
      the quantization, where the reference adds the int32 zero point to a float32 tensor —
      the int32 is first converted to that same float32 value, so the sums are equal; the
      returned zero point is its exact int32 conversion.

    Returns ``(q int8 [..., K], scale float32 [..., 1], zero_point int32 [..., 1])``.
    """
    q, scale, zp = _quantize_rows_asym(x, bits)
    return q.to(torch.int8), scale, zp.to(torch.int32)


def _quantize_rows_asym(x: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-token quantization as float32 tensors: ``(q, scale, zero_point)``, each integer-valued
    except ``scale`` (see :func:`quantize_per_token_asym_fast` for why it is the reference's numbers)."""
    qmin, qmax = qrange(bits, False)
    # two reductions, not torch.aminmax: on CPU aminmax along the last dim is about 15x slower than
    # amin + amax for [512, 640] inputs (measured with torch 2.13), and barely faster for one row
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    if lo.dtype != torch.float32:
        lo, hi = lo.float(), hi.float()
    lo.clamp_(max=0.0)
    scale = hi.clamp_(min=0.0).sub_(lo).div_(float(qmax - qmin)).clamp_(min=SCALE_EPS)
    zp = torch.rsub(lo.div_(scale), qmin).round_().clamp_(qmin, qmax)
    xf, owned = _as_float32(x)
    t = xf.div_(scale) if owned else torch.div(xf, scale)
    return t.round_().add_(zp).clamp_(qmin, qmax), scale, zp


#: FBGEMM takes one activation zero point per call. With several rows of asymmetric activations it gets
#: ``z = 0`` and the per-row ``z * rowsum(W)`` is subtracted from its float32 output; that is exact (the
#: reference's ``float(acc - z * rowsum)``) while every term is an integer of magnitude <= 2**24, which
#: ``K * 128 * 128 <= 2**24`` guarantees: inputs of at most 1,024 features (8-bit activations; see
#: :func:`fbgemm_row_zero_point_max_k`).
FBGEMM_ROW_ZERO_POINT_MAX_K = 2**24 // (128 * 128)


def fbgemm_row_zero_point_max_k(bits: int = 8, weight_bits: int = 8) -> int:
    """Widest input for which :func:`fbgemm_int8_linear`'s float32 sums of ``bits``-bit ``x_q`` (zero point
    not subtracted) times ``weight_bits``-bit weights, and ``z * rowsum(W)``, are exact integers:
    ``2**24 / (2**(bits-1) * 2**(weight_bits-1))`` (1,024 for 8 x 8 bits, 2,048 for 7 x 8 or 8 x 7).
    Wider inputs are summed in chunks of this width (see
    :meth:`~hfptq.quant.linear.QuantLinear._forward_int8_fbgemm`)."""
    return 2**24 // ((1 << (bits - 1)) * (1 << (weight_bits - 1)))


def quantize_rows_for_fbgemm(
    x: torch.Tensor, bits: int = 8, symmetric: bool = True
) -> Optional[Tuple[torch.Tensor, int, torch.Tensor, Optional[torch.Tensor]]]:
    """Per-token quantization of ``x [M, K]`` in the form :func:`fbgemm_int8_linear` takes.

    Returns ``(x_shifted, zero_point, scale [M, 1], row_zero_points)`` with the same ``x_q``, ``z``
    and ``scale`` as :func:`quantize_per_token_fast`, or ``None`` when a row holds NaN or infinity
    (the caller then takes the general route, whose numbers are the reference's whatever the input).
    With ``o = 2**(bits - 1)`` (128 for 8 bits):

    * symmetric, any ``M``: ``(x_q, o, scale, None)``;
    * asymmetric, one row (decode): ``(x_q - z, z + o, scale, None)``: FBGEMM's zero point stands
      for the row's;
    * asymmetric, several rows: ``(x_q, o, scale, z [M, 1])``: the caller subtracts ``z * rowsum(W)``
      (exact for ``K <= fbgemm_row_zero_point_max_k(bits)``).

    Why the numbers are the same:

    * Symmetric and several asymmetric rows: the same operations as :func:`quantize_per_token_fast`.
    * Asymmetric, one row: the row's scale and zero point are a handful of scalar operations; they
      run on NumPy ``float32`` scalars, which round every ``+ - /`` to float32 exactly as the tensor
      operations do (``np.rint`` and ``torch.round`` both round half to even), instead of a dozen
      one-element tensor operations. The division ``x / scale`` stays a tensor operation.
      ``clamp(round(x / s) + z, qmin, qmax) - z`` is computed as ``clamp(round(x / s), qmin - z,
      qmax - z)``: the same integers, exactly (small integers in float32).
    """
    offset = 1 << (bits - 1)
    if symmetric:
        amax = x.abs().amax(dim=-1, keepdim=True)
        if not math.isfinite(float(amax.max() if amax.numel() > 1 else amax)):
            return None
        q, scale = _quantize_rows_sym(x, amax, bits)
        return q, offset, scale, None
    if x.shape[0] != 1:
        q, scale, zp = _quantize_rows_asym(x, bits)
        if not math.isfinite(float(scale.sum())):  # NaN or infinity in x makes its row's scale so
            return None
        return q, offset, scale, zp
    lo_t, hi_t = torch.aminmax(x)
    lo, hi = float(lo_t), float(hi_t)  # exact: float32/bfloat16/float16 values
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    qmin, qmax = qrange(bits, False)
    f32 = np.float32
    lo32 = min(f32(lo), f32(0.0))
    hi32 = max(f32(hi), f32(0.0))
    s = max((hi32 - lo32) / f32(qmax - qmin), f32(SCALE_EPS))
    z = int(min(max(np.rint(f32(qmin) - lo32 / s), f32(qmin)), f32(qmax)))
    scale = torch.full((1, 1), float(s), dtype=torch.float32, device=x.device)
    xf, owned = _as_float32(x)
    t = xf.div_(scale) if owned else torch.div(xf, scale)
    return t.round_().clamp_(qmin - z, qmax - z), z + offset, scale, None


def quantize_fast(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bits: int = 8,
    symmetric: bool = True,
) -> torch.Tensor:
    """Bit-identical, faster :func:`~hfptq.quant.qparams.quantize`:
    ``clamp(round(x / scale) + zero_point, qmin, qmax)`` as int8, computed in place on one
    float32 buffer (same operations, same order, same float32 rounding).

    Example:
        >>> x = torch.randn(4, 8)
        >>> from hfptq.quant.qparams import quantize
        >>> s = torch.tensor(0.02)
        >>> torch.equal(quantize_fast(x, s, None), quantize(x, s, None))
        True
    """
    qmin, qmax = qrange(bits, symmetric)
    xf, owned = _as_float32(x)
    t = xf.div_(scale) if owned and scale.dtype == torch.float32 else torch.div(xf, scale)
    t.round_()
    if zero_point is not None:
        t.add_(zero_point)
    return t.clamp_(qmin, qmax).to(torch.int8)


# ------------------------------------------------------------------------------------------------
# Integer accumulator -> float output
# ------------------------------------------------------------------------------------------------


def rescale_int32(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``((float(acc) * x_scale) * w_scale + bias).to(out_dtype)``, the reference rescale.

    The products are evaluated in the reference order (activation scale first, then the weight
    scale, then the bias), each rounded to float32 as before, so the result is bit-identical.
    On CPU the int32 accumulator, which the caller owns and no longer needs, is converted to
    float32 *in its own memory* (an exact element-wise cast into a same-size dtype) and every
    later step runs in place: no new ``[M, N]`` float tensor is allocated.

    Args:
        acc: ``int32 [M, N]`` from :func:`int8_matmul`; overwritten on CPU.
        x_scale: ``[M, 1]`` (per token) or a 0-d tensor (per tensor).
        w_scale: ``[1, N]`` or ``[1, 1]``.
        bias: ``[N]`` in any float dtype, or ``None``.
        out_dtype: dtype of the result.
    """
    if acc.device.type == "cpu" and acc.is_contiguous():
        y = acc.view(torch.float32)
        y.copy_(acc)
    else:
        y = acc.to(torch.float32)
    y.mul_(x_scale).mul_(w_scale)
    if bias is not None:
        y.add_(bias if bias.dtype == torch.float32 else bias.to(torch.float32))
    return y if out_dtype == torch.float32 else y.to(out_dtype)


def subtract_zero_point_terms(
    acc: torch.Tensor,
    x_q: torch.Tensor,
    x_zero_point: Optional[torch.Tensor],
    w_q: torch.Tensor,
    w_zero_point: Optional[torch.Tensor],
    w_rowsum: Optional[torch.Tensor],
) -> torch.Tensor:
    """Integer zero-point corrections, exact in int32 (in place on ``acc``).

    ``sum_k (x_k - zx)(w_k - zw) = acc - zx * rowsum(w) - zw * rowsum(x) + K * zx * zw``.
    On CPU each outer-product term is applied with ``addr_`` (one pass, no ``[M, N]`` temporary;
    integer arithmetic, so the same integers as the reference's ``acc - zx * rowsum``).
    """
    in_place = acc.device.type == "cpu"
    m, n = acc.shape

    def sub_outer(col: torch.Tensor, row: torch.Tensor, alpha: int) -> None:
        # acc -= alpha * col (x) row, col: [M] or [1], row: [N] or [1]
        if in_place:
            acc.addr_(col.expand(m), row.expand(n), alpha=-alpha)
        else:
            acc.sub_(col.reshape(-1, 1) * row.reshape(1, -1) * alpha)

    if x_zero_point is not None:
        zx = x_zero_point.to(torch.int32).reshape(-1)
        sub_outer(zx, w_rowsum.reshape(-1), 1)
    if w_zero_point is not None:
        zw = w_zero_point.to(torch.int32).reshape(-1)
        sub_outer(x_q.to(torch.int32).sum(dim=1), zw, 1)
        if x_zero_point is not None:
            sub_outer(zx, zw, -x_q.shape[-1])
    return acc


def tune_cpu_allocator(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20,
                       top_pad: int = 64 << 20) -> bool:
    """Make glibc keep freed memory instead of returning it to the OS after every large free.

    PyTorch allocates a fresh tensor for every intermediate on CPU. With glibc's defaults, large
    blocks are unmapped or trimmed when freed and every new one is page-faulted in again: on
    Gemma 3 270M a ``[4, 512]`` prefill spent 2-4 s of its 6-8 s in the kernel handling about a
    million page faults, for every configuration (FP32 too, less so). This process-wide setting
    (``mallopt``) removes those faults, at the price of keeping the process's peak heap resident.
    The same effect without code: ``MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432``
    in the environment, or jemalloc/tcmalloc via ``LD_PRELOAD``.

    Returns ``False`` (and changes nothing) where glibc's ``mallopt`` is not available.

    Example:
        >>> tune_cpu_allocator()  # doctest: +SKIP
        True
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = bool(mallopt(m_mmap_threshold, int(mmap_threshold)))
    ok &= bool(mallopt(m_trim_threshold, int(trim_threshold)))
    ok &= bool(mallopt(m_top_pad, int(top_pad)))
    return ok


# ------------------------------------------------------------------------------------------------
# Weight-only: dequantize tile by tile (identical elements, cache-sized temporaries)
# ------------------------------------------------------------------------------------------------


def dequant_linear_tiled(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    dtype: torch.dtype,
    *,
    bits: int = 8,
    tile_bytes: int = DEQUANT_TILE_BYTES,
) -> torch.Tensor:
    """``F.linear(x, dequantize_weight(q, scale, zp, dtype), bias)`` without the full float weight.

    The weight is dequantized a few hundred output rows at a time (``tile_bytes`` of float
    weight, sized to stay in the L2 cache) and each tile goes through the same ``F.linear``.
    Every dequantized element is bit-identical to the reference (same element-wise formula).
    The reductions are done by the same BLAS routine over the same ``K`` for each output; only
    the number of output columns per call changes. The BLAS libraries PyTorch ships on x86
    (oneDNN / MKL) reduce each output over ``K`` in an order that does not depend on ``N`` and
    the outputs were bit-identical on the machines we measured, but no library promises it:
    ``tests/quant/test_fast_path.py`` therefore checks against the float32 dot-product error
    bound, and ``benchmarks/speed.py`` compares perplexities to the printed digits.

    Args:
        x: ``[M, K]`` activations already in ``dtype``.
        qweight: int8 ``[N, K]`` (int4: packed uint8 ``[N, K/2]`` with ``bits=4``).
        scale, zero_point: ``[rows, n_groups]`` as stored by :class:`QuantLinear`.
        bias: ``[N]`` already in ``dtype``, or ``None``.
        dtype: compute dtype.
    """
    n = qweight.shape[0]
    k = x.shape[-1]
    rows = max(16, tile_bytes // max(1, k * (torch.finfo(dtype).bits // 8)))
    rows -= rows % 16
    if rows >= n:
        w = dequantize_weight(unpack_int4(qweight) if bits == 4 else qweight, scale, zero_point, dtype)
        return F.linear(x, w, bias)
    per_channel = scale.shape[0] == n
    out = []
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        q = qweight[start:stop]
        if bits == 4:
            q = unpack_int4(q)
        s = scale[start:stop] if per_channel else scale
        z = None if zero_point is None else (zero_point[start:stop] if per_channel else zero_point)
        w = dequantize_weight(q, s, z, dtype)
        out.append(F.linear(x, w, None if bias is None else bias[start:stop]))
    return torch.cat(out, dim=-1)


# ------------------------------------------------------------------------------------------------
# Lazily derived copies (compute-dtype weights, row sums)
# ------------------------------------------------------------------------------------------------


def tensor_key(t: torch.Tensor) -> Optional[tuple]:
    """Identity of a tensor's current contents: storage, view, version counter.

    ``None`` when the version counter is not tracked (inference tensors), in which case a
    cached derivative cannot be validated and must not be used.
    """
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter
        return None
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride()), version)


def fast_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, bit for bit; float16 -> bfloat16 on CPU goes through float32.

    Both conversions of that route are correctly rounded and the first is exact, so the result
    is the direct cast's (checked over all 65,536 float16 values in the tests), about six times
    faster on x86 CPUs where the direct cast has no vectorised kernel.
    """
    if t.dtype == torch.float16 and dtype == torch.bfloat16 and t.device.type == "cpu":
        return t.float().to(dtype)
    return t.to(dtype)


def cached_cast(owner: torch.nn.Module, slot: str, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``source.to(dtype)``, computed once and reused while ``source`` is unchanged.

    The copy is kept in the plain attribute ``owner.<slot>`` (not a buffer: it is never saved,
    and Transformers' reload cannot reset it to garbage) together with a detached alias of
    ``source`` — the alias shares the version counter, so in-place writes (``copy_``,
    ``load_state_dict``) invalidate the copy, and it keeps the old storage alive, so a new
    tensor cannot reuse its address and be mistaken for it. Replacing the tensor (``.data =``,
    ``module.to(...)``) changes its address and also invalidates the copy.

    Bit-identical to ``source.to(dtype)`` (see :func:`fast_cast`).
    """
    return cached_derived(owner, slot, source, lambda t: fast_cast(t, dtype))


def cached_derived(owner: torch.nn.Module, slot: str, source: torch.Tensor, make) -> torch.Tensor:
    """``make(source)``, computed once and reused while ``source`` is unchanged (see :func:`cached_cast`)."""
    key = tensor_key(source)
    entry = owner.__dict__.get(slot)
    if key is not None and entry is not None and entry[0] == key:
        return entry[2]
    derived = make(source)
    if key is not None and source.device.type != "meta":
        owner.__dict__[slot] = (key, source.detach(), derived)
    return derived


# ------------------------------------------------------------------------------------------------
# Prepacked bfloat16 linear (oneDNN) for FP16-storage modules on CPU
# ------------------------------------------------------------------------------------------------


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16, see
    :func:`hfptq.quant.backends.native_bf16`) and oneDNN's bfloat16 kernels are there.

    oneDNN also runs bfloat16 on AVX-512 CPUs without those instructions, by emulation, slower
    than float32: that does not count."""
    if not native_bf16():
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _packed_ops():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    reorder = getattr(mkldnn, "_reorder_linear_weight", None) if mkldnn is not None else None
    linear = getattr(mkldnn, "_linear_pointwise", None) if mkldnn is not None else None
    return reorder, linear


@functools.lru_cache(maxsize=None)
def packed_bf16_linear_available() -> bool:
    """Whether oneDNN's prepacked bfloat16 linear runs here **and gives ``F.linear``'s numbers**.

    ``F.linear`` on bfloat16 CPU tensors already runs a oneDNN matmul; packing the weight once in
    oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what Inductor's weight
    freezing uses) skips the per-call reorder, about 1.7x faster for one token (decode) and the
    same for long prompts on x86 with AVX512-BF16. It is used only if a probe over several shapes
    (one row, a few rows, many rows; with and without bias) returns bit-identical outputs to
    ``F.linear``; otherwise (another CPU, another oneDNN, ops missing) the plain path runs.
    """
    reorder, linear = _packed_ops()
    if reorder is None or linear is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        for k, n, rows in ((96, 80, (1, 3, 64)), (640, 256, (1, 7, 130))):
            w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
            b = torch.randn(n, generator=gen).to(torch.bfloat16)
            packed = reorder(w, 1)
            for m in rows:
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                for bias in (None, b):
                    if not torch.equal(linear(x, packed, bias, "none", [], ""), F.linear(x, w, bias)):
                        logger.debug("prepacked bfloat16 linear differs from F.linear here; not used")
                        return False
        return True
    except Exception:  # pragma: no cover - depends on the build
        return False


def packed_bf16_weight(weight_bf16: torch.Tensor) -> torch.Tensor:
    """The bfloat16 ``[out, in]`` weight in oneDNN's blocked layout (for :func:`packed_bf16_linear`)."""
    reorder, _ = _packed_ops()
    return reorder(weight_bf16, 1)


def packed_bf16_linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for bfloat16 ``x`` with ``packed = packed_bf16_weight(W)``."""
    _, linear = _packed_ops()
    return linear(x, packed, bias, "none", [], "")


# ------------------------------------------------------------------------------------------------
# FBGEMM's FP16-weight linear for FP16-storage modules on CPUs without native bfloat16
# ------------------------------------------------------------------------------------------------


def _fp16_ops():
    quantized = getattr(torch.ops, "quantized", None)
    try:
        return quantized.linear_prepack_fp16.default, quantized.linear_dynamic_fp16.default
    except (AttributeError, RuntimeError):
        return None, None


def fp16_linear_error_bound(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bound on ``|fbgemm_fp16_linear(x, W) - F.linear(x, W.float(), b)|`` per output: both compute the same
    exact float32 products of float32 ``x`` and the float16 weight's values (float16 -> float32 is exact),
    summed in different orders, each sum within ``gamma_n * sum_k |x_k w_k|`` (``+ |b|``) of the exact one
    (``gamma_n = n u / (1 - n u)``, ``u = 2**-24``, ``n = K + 1`` terms with the bias), so they differ by at
    most twice that."""
    n = x.shape[-1] + 1
    u = 2.0 ** -24
    gamma = n * u / (1 - n * u)
    mag = torch.matmul(x.abs().double(), weight.abs().double().t())
    if bias is not None:
        mag = mag + bias.abs().double()
    return 2 * gamma * mag


@functools.lru_cache(maxsize=None)
def fbgemm_fp16_linear_available() -> bool:
    """Whether FBGEMM's FP16-weight linear (``torch.ops.quantized.linear_prepack_fp16`` /
    ``linear_dynamic_fp16``: the weight packed in float16, float32 activations, products and
    accumulation) runs here and stays within :func:`fp16_linear_error_bound` of ``F.linear`` on
    the float32 copy of the weight, for one row, a few and many, activations beyond float16's range
    included (they must not be rounded to float16). ``HFPTQ_FBGEMM=0`` turns it off.

    Example:
        >>> fbgemm_fp16_linear_available() in (True, False)
        True
    """
    if os.environ.get("HFPTQ_FBGEMM", "1").lower() in ("0", "false", "no"):
        return False
    prepack, op = _fp16_ops()
    if prepack is None or op is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        for k, n in ((64, 40), (640, 256), (1040, 96)):
            w = (torch.randn(n, k, generator=gen) * 0.05).half().float()
            packed = prepack(w, None)
            for m in (1, 5, 130):
                x = torch.randn(m, k, generator=gen)
                x[0, 0] = 1e6  # beyond float16's range: would be infinite if rounded to float16
                diff = (op(x, packed) - F.linear(x, w)).abs().double()
                if not bool((diff <= fp16_linear_error_bound(x, w)).all()):
                    logger.debug("FBGEMM's fp16 linear exceeds the float32 summation bound here; not used")
                    return False
        return True
    except Exception:  # pragma: no cover - depends on the build
        logger.debug("FBGEMM's fp16 linear is not usable here", exc_info=True)
        return False


def fbgemm_fp16_pack(weight: torch.Tensor):
    """FBGEMM's packed float16 copy of a float16 ``[N, K]`` weight (as many bytes as the weight)."""
    prepack, _ = _fp16_ops()
    return prepack(weight.float(), None)


def fbgemm_fp16_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """``x [M, K] float32 @ W.T`` with FBGEMM's float16-weight GEMM (float32 products and sums)."""
    _, op = _fp16_ops()
    return op(x, packed)


def clear_cached(owner: torch.nn.Module, slot: str) -> None:
    """Drop a copy kept by :func:`cached_cast`."""
    owner.__dict__.pop(slot, None)


# ------------------------------------------------------------------------------------------------
# Sibling modules reading the same input (q/k/v, gate/up): prepare the input once
# ------------------------------------------------------------------------------------------------


class _LastInput(threading.local):
    """One slot per thread: the last input prepared by :func:`prepared_input` and its result."""

    def __init__(self) -> None:
        self.source: Optional[torch.Tensor] = None
        self.key: Optional[tuple] = None
        self.value: object = None


_last_input = _LastInput()


def prepared_input(tag: tuple, x: torch.Tensor, prepare):
    """``prepare(x)``, reused when the previous call saw the very same, unchanged ``x``.

    Transformers feeds one tensor to several sibling projections (``q_proj``/``k_proj``/``v_proj``
    on the normed hidden states, ``gate_proj``/``up_proj`` on the MLP input). Quantizing it per
    token (or casting it to the compute dtype) once instead of two or three times is a large part
    of a decode step's cost. The result is reused only when ``x`` is the same Python object with
    the same storage, view and version counter as in the previous call (in-place writes bump the
    version) and ``tag`` (what was computed: e.g. ``("per_token", bits, symmetric)``) is equal, so
    the reused value is exactly what ``prepare(x)`` would return again. The slot keeps a reference
    to ``x`` (so its memory cannot be recycled for another tensor while the entry lives) and is
    per thread. Tensors without a version counter (created under ``torch.inference_mode``) are
    never reused. :func:`clear_prepared_input` empties the slot.
    """
    key = tensor_key(x)
    slot = _last_input
    if key is None:
        return prepare(x)
    if slot.source is x and slot.key == (tag, key):
        return slot.value
    value = prepare(x)
    slot.source, slot.key, slot.value = x, (tag, key), value
    return value


def clear_prepared_input() -> None:
    """Drop the input kept by :func:`prepared_input` (frees one activation tensor)."""
    slot = _last_input
    slot.source = slot.key = slot.value = None
