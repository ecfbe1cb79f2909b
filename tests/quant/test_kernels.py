"""int8_matmul: the exact int32 product on every path (``torch._int_mm``, float32 / float64 fallback, CUDA)."""
from __future__ import annotations

import pytest
import torch

from hfptq.quant import kernels
from hfptq.quant.kernels import int8_matmul, int8_matmul_reference, int_mm_available

SHAPES = [(1, 1, 1), (1, 64, 8), (1, 7, 5), (3, 1, 1), (5, 33, 7), (17, 129, 33), (32, 64, 48), (2, 1000, 3)]


def _int8(shape, gen, lo=-128, hi=127):
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int8)


def _exact(a, b_t):
    return a.long() @ b_t.long().t()


@pytest.fixture(params=["dispatch", "fallback"])
def matmul(request, monkeypatch):
    """``int8_matmul`` as dispatched here, and with ``torch._int_mm`` reported unavailable."""
    if request.param == "fallback":
        monkeypatch.setattr(kernels, "int_mm_available", lambda device_type: False)
    return int8_matmul


@pytest.mark.parametrize("m, k, n", SHAPES)
def test_matches_the_int64_product(m, k, n, matmul):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a, b = _int8((m, k), gen), _int8((n, k), gen, -127, 127)
    out = matmul(a, b)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.long(), _exact(a, b))


@pytest.mark.parametrize("a_val, b_val", [(-128, 127), (-128, -127), (127, 127), (-128, -128)])
def test_extreme_values(a_val, b_val, matmul):
    # asymmetric activations reach -128; K = 1000 keeps |sum| <= 1000 * 128 * 128 < 2^24
    a = torch.full((3, 1000), a_val, dtype=torch.int8)
    b = torch.full((2, 1000), b_val, dtype=torch.int8)
    assert torch.equal(matmul(a, b).long(), _exact(a, b))
    assert matmul(a, b)[0, 0].item() == 1000 * a_val * b_val


def test_large_k_where_float32_is_not_exact_uses_float64():
    # K * 128 * 128 >= 2^24: partial sums pass 2^24 and an odd total is not representable in float32
    k = 1100
    a = torch.full((1, k), 127, dtype=torch.int8)
    b = torch.full((1, k), 127, dtype=torch.int8)
    a[0, -1], b[0, -1] = 1, 2
    want = (k - 1) * 127 * 127 + 2  # 17,725,773: odd and > 2^24
    assert want > 2 ** 24 and want % 2 == 1
    assert (a.float() @ b.float().t()).item() != want  # float32 would be wrong here
    assert int8_matmul_reference(a, b).item() == want
    gen = torch.Generator().manual_seed(0)
    a, b = _int8((4, 4096), gen), _int8((6, 4096), gen, -127, 127)
    assert torch.equal(int8_matmul_reference(a, b).long(), _exact(a, b))


def test_fallback_branch_is_taken_and_exact_for_large_k(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "int_mm_available", lambda device_type: False)
    real = kernels.int8_matmul_reference
    monkeypatch.setattr(kernels, "int8_matmul_reference", lambda a, b: calls.append(a.shape) or real(a, b))
    gen = torch.Generator().manual_seed(1)
    a, b = _int8((2, 3000), gen), _int8((5, 3000), gen, -127, 127)
    assert torch.equal(kernels.int8_matmul(a, b).long(), _exact(a, b))
    assert calls == [torch.Size([2, 3000])]


def test_reference_exact_for_minus_128_on_both_sides():
    k = 1031  # 1031 * 127 * 128 = 16,759,936 < 2^24, but 1030 * 128 * 128 + 1 = 16,875,521 > 2^24
    a = torch.full((1, k), -128, dtype=torch.int8)
    b = torch.full((1, k), -128, dtype=torch.int8)
    a[0, -1] = b[0, -1] = 1
    assert int8_matmul_reference(a, b).item() == 1030 * 128 * 128 + 1


def test_int_mm_probe_is_a_bool():
    assert isinstance(int_mm_available("cpu"), bool)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m, k, n", [(1, 64, 32), (16, 64, 32), (17, 64, 32), (64, 128, 256), (5, 33, 7),
                                     (40, 36, 12)])
def test_cuda_paths(m, k, n):
    # m <= 16 with k, n multiples of 8: padded _int_mm; m > 16: _int_mm; otherwise the exact fallback
    gen = torch.Generator().manual_seed(m + k + n)
    a, b = _int8((m, k), gen), _int8((n, k), gen, -127, 127)
    out = int8_matmul(a.cuda(), b.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.cpu().long(), _exact(a, b))
