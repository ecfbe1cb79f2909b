"""Integer matmul dispatch (CPU and CUDA) with an exact fallback.

``int8_matmul(a, b_t)`` returns ``a @ b_t.T`` accumulated exactly in int32, whatever path runs:
``torch._int_mm`` when the device and shapes allow it, otherwise a float matmul that is exact for
the given inner dimension (float32 while ``K * 127**2 < 2**24``, else float64). Every path gives the
same integers, so the fast path and the reference math produce identical outputs.
"""
from __future__ import annotations

import functools

import torch

_F32_EXACT_LIMIT = 2**24


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
        return False


def _int_mm_shape_ok(m: int, k: int, n: int, device_type: str) -> bool:
    if device_type == "cuda":
        # cuBLASLt int8 GEMM: m > 16, k and n multiples of 8
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return True


def int8_matmul_reference(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 result of ``a @ b_t.T`` through a float matmul (exact by the size bound)."""
    k = a.shape[-1]
    dtype = torch.float32 if k * 127 * 128 < _F32_EXACT_LIMIT else torch.float64
    return torch.matmul(a.to(dtype), b_t.to(dtype).t()).round_().to(torch.int32)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a [M, K] int8 @ b_t[N, K].T`` -> ``int32 [M, N]``, exact.

    CUDA's ``_int_mm`` requires ``M > 16``: small ``M`` (decode) is padded up to 32 rows.
    """
    m, k = a.shape
    n = b_t.shape[0]
    device_type = a.device.type
    if int_mm_available(device_type):
        if device_type == "cuda" and m <= 16 and k % 8 == 0 and n % 8 == 0:
            padded = torch.zeros(32, k, dtype=a.dtype, device=a.device)
            padded[:m] = a
            return torch._int_mm(padded, b_t.t())[:m]
        if _int_mm_shape_ok(m, k, n, device_type):
            return torch._int_mm(a, b_t.t())
    return int8_matmul_reference(a, b_t)
