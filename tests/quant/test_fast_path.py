"""The fast path of the quantized modules computes the reference numbers (``hfptq.quant.kernels``).

Every fast helper is compared with the reference formula of :mod:`hfptq.quant.qparams` (written
out again here where the module's reference is a method), **bit for bit** (``torch.equal``):
the fast path promises the same float32 operations in the same order, only in fewer passes and
with fewer temporaries. The one exception is weight-only tiling, where the BLAS is called per tile
of output rows; there the test uses the float32 dot-product error bound (two summation orders of
``K`` products differ by at most ``2 * gamma_K * sum |x_k w_k|``, ``gamma_K = K u / (1 - K u)``)
so that it does not depend on the BLAS library. No test here measures time.
"""
from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch
from torch import nn

from hfptq.quant import backends, kernels
from hfptq.quant.kernels import (
    cached_cast,
    dequant_linear_tiled,
    fast_cast,
    fast_path_enabled,
    int8_matmul,
    int8_matmul_reference,
    quantize_fast,
    quantize_per_token_fast,
    reference_math,
    rescale_int32,
    set_fast_path,
)
from hfptq.quant.linear import FloatLinear, QuantLinear
from hfptq.quant.qparams import SCALE_EPS, quantize, quantize_per_token

U_FP32 = 2.0**-24
ROWS = [1, 7, 64, 513]
DTYPES = [torch.float32, torch.bfloat16]
W8 = {"bits": 8, "symmetric": True, "granularity": "channel"}
W8_TENSOR = {"bits": 8, "symmetric": True, "granularity": "tensor"}
W8_ASYM = {"bits": 8, "symmetric": False, "granularity": "channel"}
W4_GROUP = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 32}
ACTS = {
    "dynamic-sym": {"mode": "dynamic"},
    "dynamic-asym": {"mode": "dynamic", "symmetric": False},
    "static-sym": {"mode": "static"},
    "static-asym": {"mode": "static", "symmetric": False},
}
STATIC_QPARAMS = {"static-sym": (0.04, None), "static-asym": (0.05, 7)}


def _x(*shape, seed=0, dtype=torch.float32, scale=3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _linear(in_f=96, out_f=80, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, out_f).unsqueeze(1))
    return lin


def _quant(lin: nn.Linear, weights: dict, acts: str) -> QuantLinear:
    qp = None
    if acts in STATIC_QPARAMS:
        s, z = STATIC_QPARAMS[acts]
        qp = (torch.tensor(s), None if z is None else torch.tensor(z))
    return QuantLinear.from_float(lin, weights, ACTS[acts], input_qparams=qp)


# ------------------------------------------------------------------------------------------------
# Activation quantization
# ------------------------------------------------------------------------------------------------


def _edge_rows(k: int) -> torch.Tensor:
    """Rows that stress the scale: zeros, values whose scale hits SCALE_EPS, huge values, ties."""
    rows = torch.stack([
        torch.zeros(k),
        torch.full((k,), 1e-35),                     # amax / 127 < SCALE_EPS: the clamp decides
        torch.linspace(-3e37, 3e37, k),              # near the float32 top
        torch.linspace(-127.0, 127.0, k),            # scale exactly 1: many exact .5 ties after division
        torch.cat([torch.tensor([-5.0]), torch.zeros(k - 1)]),  # amax from a negative value
    ])
    rows[3, 1::2] += 0.5
    return rows


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_per_token_fast_is_bit_identical(rows, dtype, symmetric):
    x = _x(rows, 200, seed=rows, dtype=dtype)
    ref = quantize_per_token(x, 8, symmetric)
    fast = quantize_per_token_fast(x, 8, symmetric)
    assert torch.equal(fast[0], ref[0]) and fast[0].dtype == torch.int8
    assert torch.equal(fast[1], ref[1]) and fast[1].dtype == torch.float32
    assert (fast[2] is None) == (ref[2] is None)
    if ref[2] is not None:
        assert torch.equal(fast[2], ref[2])
    assert torch.equal(x, _x(rows, 200, seed=rows, dtype=dtype))  # the input is not modified


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_per_token_fast_edge_rows(symmetric):
    x = _edge_rows(64)
    ref = quantize_per_token(x, 8, symmetric)
    fast = quantize_per_token_fast(x, 8, symmetric)
    for a, b in zip(fast, ref):
        assert (a is None and b is None) or torch.equal(a, b)
    if symmetric:
        assert fast[1][1].item() == SCALE_EPS
        # the skipped clamp is a no-op: every value already lies in the restricted range
        assert fast[0].abs().max().item() <= 127


def _one_row_cases(k: int = 200) -> list:
    """Single rows (decode): random at many magnitudes and offsets, skewed, the edge rows."""
    gen = torch.Generator().manual_seed(11)
    rows = [row.unsqueeze(0) for row in _edge_rows(k)]
    for i in range(300):
        mag = 10.0 ** torch.empty(1).uniform_(-30, 30, generator=gen).item()
        row = torch.randn(1, k, generator=gen) * mag
        if i % 3 == 1:
            row = row.abs() + mag * 0.1          # all positive: lo clamps to 0
        elif i % 3 == 2:
            row = row - row.max() - mag * 0.01   # all negative: hi clamps to 0
        rows.append(row)
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_rows_for_fbgemm_gives_the_reference_quantization(dtype, symmetric):
    """The FBGEMM form ``(x_q - z, z + 128, scale)`` carries the reference's ``x_q``, ``z`` and ``scale``:
    scalars on NumPy float32 for one asymmetric row, tensors otherwise."""
    for x in _one_row_cases():
        x = x.to(dtype)
        if not torch.isfinite(x).all():
            continue  # float16 overflow of the widest rows
        q, s, z = quantize_per_token(x, 8, symmetric)
        shifted, zero_point, scale, row_zero_points = kernels.quantize_rows_for_fbgemm(x, 8, symmetric)
        assert row_zero_points is None
        z0 = 0 if z is None else int(z)
        assert zero_point == z0 + 128
        assert torch.equal(scale, s)
        assert torch.equal(shifted + z0, q.float())


def test_quantize_rows_for_fbgemm_refuses_non_finite_rows_and_modules_fall_back(monkeypatch):
    """A row with NaN or infinity is not sent to FBGEMM (its int8 conversion of NaN is arbitrary):
    the module gives what it gives with the FBGEMM route switched off."""
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = _x(1, 96)
        x[0, 7] = bad
        for symmetric in (True, False):
            assert kernels.quantize_rows_for_fbgemm(x, 8, symmetric) is None
        for acts in ("dynamic-sym", "dynamic-asym"):
            q = _quant(_linear(), W8, acts)
            with torch.no_grad():
                y = q(x)
                with monkeypatch.context() as m:
                    m.setattr("hfptq.quant.linear.fbgemm_linear_available", lambda: False)
                    general = q(x)
            assert not torch.isfinite(y).all()
            torch.testing.assert_close(y, general, rtol=0, atol=0, equal_nan=True)
    x = _x(3, 96)
    q, _, z = quantize_per_token(x, 8, False)
    shifted, zero_point, scale, row_zero_points = kernels.quantize_rows_for_fbgemm(x, 8, False)
    assert zero_point == 128 and torch.equal(shifted, q.float()) and torch.equal(row_zero_points, z.float())
    x[1, 3] = float("nan")
    assert kernels.quantize_rows_for_fbgemm(x, 8, False) is None


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_fast_static_is_bit_identical(symmetric, dtype):
    x = _x(33, 50, dtype=dtype, scale=6.0)  # saturates: clamping matters here
    scale = torch.tensor(0.03)
    zp = None if symmetric else torch.tensor(-11, dtype=torch.int32)
    assert torch.equal(quantize_fast(x, scale, zp, 8, symmetric), quantize(x, scale, zp, 8, symmetric))
    assert torch.equal(x, _x(33, 50, dtype=dtype, scale=6.0))


# ------------------------------------------------------------------------------------------------
# Rescale
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
@pytest.mark.parametrize("bias", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rescale_int32_is_bit_identical(per_token, bias, out_dtype):
    gen = torch.Generator().manual_seed(3)
    acc = torch.randint(-2**27, 2**27, (65, 40), generator=gen, dtype=torch.int32)
    xs = torch.rand(65, 1, generator=gen) * 1e-2 if per_token else torch.tensor(0.013)
    ws = torch.rand(1, 40, generator=gen) * 1e-3
    b = None if bias is None else torch.randn(40, generator=gen).to(bias)
    ref = acc.to(torch.float32) * xs * ws
    if b is not None:
        ref = ref + b.to(torch.float32)
    out = rescale_int32(acc.clone(), xs, ws, b, out_dtype)
    assert out.dtype == out_dtype
    assert torch.equal(out, ref.to(out_dtype))


def test_rescale_int32_non_contiguous_accumulator():
    acc = torch.randint(-1000, 1000, (8, 20), dtype=torch.int32)[:, ::2]
    xs, ws = torch.rand(8, 1), torch.rand(1, 10)
    assert torch.equal(rescale_int32(acc, xs, ws, None, torch.float32), acc.to(torch.float32) * xs * ws)


# ------------------------------------------------------------------------------------------------
# QuantLinear: fast == reference, module level
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("acts", list(ACTS))
@pytest.mark.parametrize("weights", [W8, W8_TENSOR, W8_ASYM], ids=["w-channel", "w-tensor", "w-asym"])
def test_quant_linear_w8a8_fast_equals_reference(rows, dtype, acts, weights):
    q = _quant(_linear(), weights, acts)
    x = _x(rows, 96, seed=rows, dtype=dtype)
    with torch.no_grad():
        fast = q(x)
        with reference_math():
            ref = q(x)
    assert fast.dtype == ref.dtype == dtype and fast.shape == (rows, 80)
    assert torch.equal(fast, ref)


def test_quant_linear_3d_input_and_no_bias():
    q = _quant(_linear(bias=False), W8, "dynamic-sym")
    x = _x(2, 5, 96)
    with torch.no_grad():
        fast = q(x)
        with reference_math():
            ref = q(x)
    assert fast.shape == (2, 5, 80) and torch.equal(fast, ref)


@pytest.mark.parametrize("weights", [W8_ASYM], ids=["w-asym"])
@pytest.mark.parametrize("acts", ["dynamic-sym", "dynamic-asym", "static-asym"])
def test_asymmetric_weights_match_the_dequantized_math(weights, acts):
    """``x_q @ (W_q - z_w)^T`` in integers equals the float math of the dequantized operands.

    Both sides are float32 evaluations of the same exact sum of ``K`` products; their distance is
    bounded by ``2 * (gamma_K + 3u) * sum_k |x_k| |w_k|`` over the dequantized operands.
    """
    q = _quant(_linear(), weights, acts)
    x = _x(9, 96)
    with torch.no_grad():
        y = q(x).double()
        x2 = x.reshape(-1, 96)
        if q.act_mode == "dynamic":
            xq, xs, xz = quantize_per_token(x2, 8, q.act_symmetric)
        else:
            xs, xz = q.input_scale, q.input_zero_point
            xq = quantize(x2, xs, xz, 8, q.act_symmetric)
        xd = (xq.double() - (0 if xz is None else xz.double())) * xs.double()
        wd = q.dequantized_weight(torch.float64)
        exact = xd @ wd.T + q.bias.double()
        mag = xd.abs() @ wd.abs().T + q.bias.double().abs()
    k = 96
    gamma = k * U_FP32 / (1 - k * U_FP32)
    assert ((y - exact).abs() <= 2 * (gamma + 3 * U_FP32) * mag).all()


@pytest.mark.parametrize("rows", ROWS)
def test_weight_rowsum_follows_in_place_weight_updates(rows):
    """The cached ``rowsum(W)`` of asymmetric activations is rebuilt after ``qweight.copy_``."""
    a, b = _linear(seed=0), _linear(seed=1)
    qa, qb = _quant(a, W8, "static-asym"), _quant(b, W8, "static-asym")
    x = _x(rows, 96)
    with torch.no_grad():
        qa(x)  # builds the cache for a's weight
        qa.qweight.copy_(qb.qweight)
        qa.weight_scale.copy_(qb.weight_scale)
        qa.bias.copy_(qb.bias)
        assert torch.equal(qa(x), qb(x))


# ------------------------------------------------------------------------------------------------
# Weight-only: tiles of rows
# ------------------------------------------------------------------------------------------------


def _bound(x: torch.Tensor, w: torch.Tensor, bias, out_dtype: torch.dtype, ref: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    gamma = k * U_FP32 / (1 - k * U_FP32)
    mag = x.double().abs() @ w.double().abs().T
    if bias is not None:
        mag = mag + bias.double().abs()
    bound = 2 * gamma * mag
    if out_dtype != torch.float32:
        # both float32 sums are then rounded to the output dtype: half an ulp each, eps * |ref| together
        eps = torch.finfo(out_dtype).eps
        bound = (bound + eps * ref.double().abs()) * (1 + eps) + torch.finfo(out_dtype).tiny
    return bound


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", [W8, W8_ASYM, W4_GROUP], ids=["int8-channel", "int8-asym", "int4-group"])
def test_dequant_linear_tiled_matches_reference(rows, dtype, weights):
    lin = _linear(in_f=128, out_f=200)
    q = QuantLinear.from_float(lin, weights, {"mode": "none"})
    x = _x(rows, 128, seed=rows).to(dtype)
    bias = q.bias.to(dtype)
    w = q.dequantized_weight(dtype)
    ref = torch.nn.functional.linear(x, w, bias)
    # one tile: the very same call as the reference
    whole = dequant_linear_tiled(x, q.qweight, q.weight_scale, q.weight_zero_point, bias, dtype,
                                 bits=q.weight_bits, tile_bytes=1 << 30)
    assert torch.equal(whole, ref)
    # 16-row tiles (13 of them, the last one partial): each element within the reduction-order bound
    tiled = dequant_linear_tiled(x, q.qweight, q.weight_scale, q.weight_zero_point, bias, dtype,
                                 bits=q.weight_bits, tile_bytes=16 * 128 * 4)
    assert tiled.shape == ref.shape and tiled.dtype == dtype
    assert ((tiled.double() - ref.double()).abs() <= _bound(x, w, bias, dtype, ref)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_only_module_fast_matches_reference(dtype):
    lin = _linear(in_f=64, out_f=5000)  # 5000 rows x 64: several tiles
    q = QuantLinear.from_float(lin, W8, {"mode": "none"})
    x = _x(3, 64).to(dtype)
    with torch.no_grad():
        fast = q(x)
        with reference_math():
            ref = q(x)
    assert fast.dtype == ref.dtype == dtype
    cd = torch.bfloat16 if dtype == torch.float16 else dtype  # "auto" on CPU: fp16 inputs compute in bf16
    w = q.dequantized_weight(cd)
    bound = _bound(x.to(cd), w, q.bias.to(cd), cd, ref)
    if dtype == torch.float16:
        bound = bound + 2.0 ** -10 * ref.double().abs()  # and rounded to float16 at the end
    assert ((fast.double() - ref.double()).abs() <= bound).all()


# ------------------------------------------------------------------------------------------------
# FloatLinear: cached compute-dtype weight
# ------------------------------------------------------------------------------------------------


def test_fast_cast_fp16_to_bf16_is_exact_for_every_fp16_value():
    h = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    direct, fast = h.to(torch.bfloat16), fast_cast(h, torch.bfloat16)
    nan = torch.isnan(h)
    assert torch.equal(direct[~nan].view(torch.int16), fast[~nan].view(torch.int16))
    assert torch.isnan(fast[nan]).all()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_float_linear_cached_equals_reference(rows, dtype, bias):
    f = FloatLinear.from_float(_linear(bias=bias), torch.float16)
    x = _x(rows, 96, dtype=dtype)
    with torch.no_grad():
        first, second = f(x), f(x)
        with reference_math():
            ref = f(x)
    assert torch.equal(first, ref) and torch.equal(second, ref)
    # cached on CPU (bfloat16 compute != float16 storage): oneDNN's packed layout where it gives F.linear's
    # numbers, else a plain bfloat16 copy
    slot = "_hfptq_packed_cache" if kernels.packed_bf16_linear_available() else "_hfptq_weight_cache"
    assert slot in f.__dict__


def test_float_linear_without_cache_equals_reference(monkeypatch):
    f = FloatLinear.from_float(_linear(), torch.float16)
    monkeypatch.setattr(f, "cache_compute_weight", False)
    x = _x(4, 96)
    with torch.no_grad():
        y = f(x)
        with reference_math():
            ref = f(x)
    assert torch.equal(y, ref) and "_hfptq_weight_cache" not in f.__dict__


def _fresh(lin: nn.Linear) -> FloatLinear:
    return FloatLinear.from_float(lin, torch.float16)


@pytest.mark.parametrize("how", ["copy_", "data", "load_state_dict"])
def test_float_linear_cache_follows_weight_changes(how):
    a, b = _linear(seed=0), _linear(seed=1)
    f, expected = _fresh(a), _fresh(b)
    x = _x(5, 96)
    with torch.no_grad():
        before = f(x)
        if how == "copy_":
            f.weight.copy_(expected.weight)
            f.bias.copy_(expected.bias)
        elif how == "data":
            f.weight.data = expected.weight.clone()
            f.bias.data = expected.bias.clone()
        else:
            f.load_state_dict(expected.state_dict())
        after = f(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, expected(x))


def test_float_linear_cache_is_not_state_and_is_dropped_on_copy():
    f = _fresh(_linear())
    x = _x(2, 96)
    with torch.no_grad():
        y = f(x)
    assert set(f.state_dict()) == {"weight", "bias"}
    assert all(t.dtype == torch.float16 for t in f.buffers())
    for clone in (copy.deepcopy(f), pickle.loads(pickle.dumps(f))):
        assert not set(FloatLinear._CACHE_SLOTS) & set(clone.__dict__)
        with torch.no_grad():
            assert torch.equal(clone(x), y)
    f.clear_cache()
    assert not set(FloatLinear._CACHE_SLOTS) & set(f.__dict__)


def test_cached_cast_skips_tensors_without_version_counter():
    owner = nn.Module()
    with torch.inference_mode():
        t = torch.randn(4, 4, dtype=torch.float16)
    out = cached_cast(owner, "_slot", t, torch.bfloat16)
    assert torch.equal(out, t.to(torch.bfloat16)) and "_slot" not in owner.__dict__


# ------------------------------------------------------------------------------------------------
# Switches and fallbacks
# ------------------------------------------------------------------------------------------------


def test_reference_math_switch_restores_state():
    assert fast_path_enabled()
    with reference_math():
        assert not fast_path_enabled()
        with reference_math():
            assert not fast_path_enabled()
        assert not fast_path_enabled()
    assert fast_path_enabled()
    set_fast_path(False)
    try:
        assert not fast_path_enabled()
    finally:
        set_fast_path(True)


def test_fast_path_is_off_while_torch_compile_traces(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fast_path_enabled()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("acts", ["dynamic-sym", "static-asym"])
def test_falls_back_cleanly_without_int_mm(monkeypatch, rows, acts):
    """Without ``torch._int_mm`` the exact float fallback gives the same integers, hence the same outputs."""
    q = _quant(_linear(), W8, acts)
    x = _x(rows, 96)
    with torch.no_grad():
        expected = q(x)

    def boom(*_args, **_kwargs):
        raise AssertionError("torch._int_mm must not be called")

    monkeypatch.setattr(kernels, "int_mm_available", lambda device_type: False)
    monkeypatch.setattr(torch, "_int_mm", boom)
    with torch.no_grad():
        assert torch.equal(q(x), expected)
        with reference_math():
            assert torch.equal(q(x), expected)


def test_int_mm_probe_without_the_op(monkeypatch):
    kernels.int_mm_available.cache_clear()
    try:
        monkeypatch.delattr(torch, "_int_mm")
        assert kernels.int_mm_available("cpu") is False
        a = torch.randint(-127, 128, (3, 40), dtype=torch.int8)
        b = torch.randint(-127, 128, (6, 40), dtype=torch.int8)
        assert torch.equal(int8_matmul(a, b), a.to(torch.int32) @ b.to(torch.int32).T)
    finally:
        monkeypatch.undo()
        kernels.int_mm_available.cache_clear()


# ------------------------------------------------------------------------------------------------
# CUDA (runs where a GPU is present)
# ------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("acts", list(ACTS))
def test_cuda_w8a8_fast_equals_reference_and_cpu_integers(rows, acts):
    q = _quant(_linear(in_f=96, out_f=80), W8, acts).cuda()
    x = _x(rows, 96).cuda()
    with torch.no_grad():
        fast = q(x)
        with reference_math():
            ref = q(x)
    assert torch.equal(fast, ref)
    a = torch.randint(-127, 128, (rows, 96), dtype=torch.int8)
    b = torch.randint(-127, 128, (80, 96), dtype=torch.int8)
    assert torch.equal(int8_matmul(a.cuda(), b.cuda()).cpu(), int8_matmul_reference(a, b))


@cuda
@pytest.mark.parametrize("rows", [1, 64])
def test_cuda_float_and_weight_only_modules(rows):
    lin = _linear()
    x = _x(rows, 96).cuda()
    for module in (FloatLinear.from_float(lin, torch.float16).cuda(),
                   QuantLinear.from_float(lin, W8, {"mode": "none"}).cuda()):
        with torch.no_grad():
            fast = module(x)
            with reference_math():
                ref = module(x)
        assert torch.equal(fast, ref)


# ------------------------------------------------------------------------------------------------
# Sibling projections reading one input (q/k/v, gate/up): the input is prepared once
# ------------------------------------------------------------------------------------------------


def _count_per_token_quantizations(monkeypatch) -> list:
    """A list that grows by one each time a W8A8 module quantizes its input per token."""
    calls: list = []
    for name in ("quantize_per_token_fast", "quantize_rows_for_fbgemm"):  # many rows / few rows (FBGEMM)
        real = getattr(kernels, name)
        monkeypatch.setattr(f"hfptq.quant.linear.{name}",
                            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def _siblings(acts: str = "dynamic-asym"):
    """Three W8A8 projections of one input, like q/k/v or gate/up."""
    return [_quant(_linear(96, out_f, seed=i), W8, acts) for i, out_f in enumerate((80, 32, 48))]


@pytest.mark.parametrize("acts", ["dynamic-sym", "dynamic-asym"])
def test_siblings_on_one_input_give_each_module_its_reference_output(acts, monkeypatch):
    """Sharing the quantized input changes no number, and the input is quantized once."""
    mods = _siblings(acts)
    x = _x(2, 5, 96, seed=3)
    calls = _count_per_token_quantizations(monkeypatch)
    kernels.clear_prepared_input()
    with torch.no_grad():
        fast = [m(x) for m in mods]
        with reference_math():
            ref = [m(x) for m in mods]
    assert len(calls) == 1
    for f, r in zip(fast, ref):
        assert torch.equal(f, r)


def test_prepared_input_is_recomputed_after_an_in_place_write_or_for_a_new_tensor(monkeypatch):
    mods = _siblings()
    x = _x(4, 96, seed=4)
    calls = _count_per_token_quantizations(monkeypatch)
    kernels.clear_prepared_input()
    with torch.no_grad():
        mods[0](x)
        x.mul_(-2.0)                       # same object, new contents: the version counter moved
        after_write = mods[1](x)
        same_values = x.clone()            # equal values, another tensor: recomputed, not trusted
        other = mods[2](same_values)
        with reference_math():
            assert torch.equal(after_write, mods[1](x))
            assert torch.equal(other, mods[2](same_values))
    assert len(calls) == 3


def test_prepared_input_distinguishes_settings_and_skips_inference_tensors(monkeypatch):
    sym, asym = _quant(_linear(seed=1), W8, "dynamic-sym"), _quant(_linear(seed=2), W8, "dynamic-asym")
    x = _x(3, 96, seed=5)
    kernels.clear_prepared_input()
    with torch.no_grad():
        out = (sym(x), asym(x))
        with reference_math():
            assert torch.equal(out[0], sym(x)) and torch.equal(out[1], asym(x))
    calls = _count_per_token_quantizations(monkeypatch)
    with torch.inference_mode():
        xi = _x(3, 96, seed=5)
        a, b = asym(xi), asym(xi)
    assert len(calls) == 2 and torch.equal(a, b) and torch.equal(a, out[1])


def test_float_linear_siblings_share_the_cast_and_match_reference():
    mods = [FloatLinear.from_float(_linear(96, n, seed=i), torch.float16) for i, n in enumerate((64, 16))]
    x = _x(6, 96, seed=6)
    kernels.clear_prepared_input()
    with torch.no_grad():
        fast = [m(x) for m in mods]
        with reference_math():
            ref = [m(x) for m in mods]
    assert all(torch.equal(f, r) for f, r in zip(fast, ref))
    assert all(f.dtype == x.dtype for f in fast)


def test_prepared_input_keeps_one_slot_per_thread():
    import threading

    x = _x(2, 96, seed=7)
    seen = {}

    def worker(name):
        seen[name] = kernels.prepared_input(("t",), x, lambda t: object())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen[0] is not seen[1]          # nothing leaks between threads
    kernels.clear_prepared_input()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("rows", [1, 3, 130])
def test_float_linear_packed_and_plain_paths_give_the_reference(packed, rows, monkeypatch):
    """Both CPU paths of FP16 storage / bfloat16 compute give F.linear's numbers; the probe decides."""
    if not backends.native_bf16():
        pytest.skip("FP16 storage computes in float32 on this CPU (no native bf16): see tests/quant/test_backends.py")
    if packed and not kernels.packed_bf16_linear_available():
        pytest.skip("oneDNN's prepacked bfloat16 linear is not exact (or missing) on this machine")
    monkeypatch.setattr("hfptq.quant.linear.packed_bf16_linear_available", lambda: packed)
    f = FloatLinear.from_float(_linear(), torch.float16)
    x = _x(rows, 96, seed=rows)
    with torch.no_grad():
        y = f(x)
        with reference_math():
            ref = f(x)
    assert torch.equal(y, ref)
    assert ("_hfptq_packed_cache" in f.__dict__) == packed
    assert ("_hfptq_weight_cache" in f.__dict__) == (not packed)


@contextlib.contextmanager
def _fresh_probe(probe, ops, what: str):
    """Run ``probe`` anew inside the block (its cached answer is dropped before and after); yields the
    ops it checks, or skips when the build lacks them."""
    probe.cache_clear()
    try:
        found = ops()
        if any(op is None for op in found):
            pytest.skip(f"no {what} ops in this build")
        yield found
    finally:
        probe.cache_clear()


def test_packed_probe_refuses_a_linear_that_differs(monkeypatch):
    with _fresh_probe(kernels.packed_bf16_linear_available, kernels._packed_ops, "oneDNN linear") as (reorder, linear):
        monkeypatch.setattr(kernels, "_packed_ops",
                            lambda: (reorder, lambda x, w, b, *a: linear(x, w, b, *a) + 1))
        assert kernels.packed_bf16_linear_available() is False


# ------------------------------------------------------------------------------------------------
# Few rows (decode) through FBGEMM: the same integers, hence the same outputs
# ------------------------------------------------------------------------------------------------

fbgemm = pytest.mark.skipif(not kernels.fbgemm_linear_available(),
                            reason="FBGEMM's int8 linear is missing or not exact on this machine")


def _extreme_x(rows: int, k: int = 96) -> torch.Tensor:
    """Rows whose quantized values sit at -128/127 (all positive, all negative, alternating, one spike)."""
    x = torch.ones(rows, k)
    x[1::4] = -1.0
    x[2::4, ::2] = -1.0
    x[3::4] = 0.0
    x[3::4, 5] = 1e4
    return x * 3.0


@fbgemm
@pytest.mark.parametrize("rows", [1, 2, 32, 33])
@pytest.mark.parametrize("acts", list(ACTS))
@pytest.mark.parametrize("inputs", ["random", "extreme"])
def test_fbgemm_route_equals_reference(rows, acts, inputs):
    """Up to FBGEMM_MAX_ROWS rows go through FBGEMM where its zero point can stand for the input's
    (one row, static, or symmetric activations); outputs are the reference's, bit for bit."""
    q = _quant(_linear(), W8, acts)
    x = _x(rows, 96, seed=rows) if inputs == "random" else _extreme_x(rows)
    with torch.no_grad():
        fast = q(x)
        with reference_math():
            ref = q(x)
    assert torch.equal(fast, ref)
    assert ("_hfptq_fbgemm" in q.__dict__) == (rows <= kernels.FBGEMM_MAX_ROWS)
    # several rows of asymmetric activations: per-row zero points subtracted from FBGEMM's float output
    assert ("_hfptq_rowsum_f32" in q.__dict__) == (1 < rows <= kernels.FBGEMM_MAX_ROWS and acts == "dynamic-asym")


@fbgemm
@pytest.mark.parametrize("k", [kernels.FBGEMM_ROW_ZERO_POINT_MAX_K, kernels.FBGEMM_ROW_ZERO_POINT_MAX_K + 16])
def test_fbgemm_row_zero_points_at_the_exactness_bound(k):
    """The largest sums the per-row correction can meet: every weight at 127, rows quantized to -128 with
    zero point 127 (|sum| and |z * rowsum| just under 2**24, their difference ~2**25 and rounded once,
    as the reference rounds it). Past K = 1,024 several asymmetric rows take torch._int_mm."""
    lin = nn.Linear(k, 24, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.5)
    q = _quant(lin, W8, "dynamic-asym")
    assert int(q.qweight.min()) == int(q.qweight.max()) == 127
    x = torch.cat([torch.full((3, k), -2.0), _x(2, k, seed=4)])
    with torch.no_grad():
        fast = q(x)
        with reference_math():
            ref = q(x)
        xq, _, zp = quantize_per_token(x, 8, False)
    assert int(xq[0].min()) == int(xq[0].max()) == -128 and int(zp[0]) == 127
    assert torch.equal(fast, ref)
    assert ("_hfptq_fbgemm" in q.__dict__) == (k <= kernels.FBGEMM_ROW_ZERO_POINT_MAX_K)


@fbgemm
def test_fbgemm_route_skips_asymmetric_weights_and_follows_weight_updates():
    qa, qb = _quant(_linear(seed=0), W8, "dynamic-asym"), _quant(_linear(seed=1), W8, "dynamic-asym")
    x = _x(1, 96, seed=9)
    with torch.no_grad():
        qa(x)  # packs a's weight
        packed = qa.__dict__["_hfptq_fbgemm"][2]
        qa.qweight.copy_(qb.qweight)
        qa.weight_scale.copy_(qb.weight_scale)
        qa.bias.copy_(qb.bias)
        assert torch.equal(qa(x), qb(x))        # repacked: the version counter moved
        assert qa.__dict__["_hfptq_fbgemm"][2] is not packed
        asym_w = _quant(_linear(), W8_ASYM, "dynamic-asym")
        y = asym_w(x)
        with reference_math():
            assert torch.equal(y, asym_w(x))
    assert "_hfptq_fbgemm" not in asym_w.__dict__
    clone = copy.deepcopy(qa)
    assert "_hfptq_fbgemm" not in clone.__dict__ and "_hfptq_fbgemm" not in pickle.loads(pickle.dumps(qa)).__dict__
    with torch.no_grad():
        assert torch.equal(clone(x), qb(x))


def test_fbgemm_probe_refuses_wrong_sums_and_can_be_turned_off(monkeypatch):
    """A kernel off by one integer (or HFPTQ_FBGEMM=0) turns the route off; modules then use _int_mm."""
    with _fresh_probe(kernels.fbgemm_linear_available, kernels._fbgemm_ops, "FBGEMM linear") as (prepack, op):
        monkeypatch.setattr(kernels, "_fbgemm_ops", lambda: (prepack, lambda *a: op(*a) + 1))
        assert kernels.fbgemm_linear_available() is False
        monkeypatch.undo()
        kernels.fbgemm_linear_available.cache_clear()
        monkeypatch.setenv("HFPTQ_FBGEMM", "0")
        assert kernels.fbgemm_linear_available() is False
        q = _quant(_linear(), W8, "dynamic-asym")
        x = _x(1, 96)
        with torch.no_grad():
            y = q(x)
            with reference_math():
                assert torch.equal(y, q(x))
        assert "_hfptq_fbgemm" not in q.__dict__
        monkeypatch.undo()


def test_fbgemm_probe_catches_saturating_pair_sums(monkeypatch):
    """What a CPU without VNNI would do (16-bit saturating sums of pairs of u8 x s8 products) fails the probe."""
    with _fresh_probe(kernels.fbgemm_linear_available, kernels._fbgemm_ops, "FBGEMM linear") as (prepack, op):
        def saturating(x_shifted, scale, zero_point, packed):
            w = torch.ops.quantized.linear_unpack(packed)[0].int_repr().to(torch.int32)
            xu = (x_shifted + zero_point).to(torch.int32)                     # x_q + 128, uint8 values
            prod = xu.unsqueeze(1) * w.unsqueeze(0)                           # [M, N, K]
            pairs = prod[..., 0::2] + prod[..., 1::2]
            acc = pairs.clamp(-32768, 32767).sum(-1) - zero_point * w.sum(-1)
            return acc.to(torch.float32)

        monkeypatch.setattr(kernels, "_fbgemm_ops", lambda: (prepack, saturating))
        assert kernels.fbgemm_linear_available() is False
        monkeypatch.undo()


def test_derived_copies_follow_module_moves():
    """``.to()`` that keeps the tensors keeps the derived copies; one that replaces them (another
    device, here ``meta`` and a cloning ``_apply``) drops them, instead of pinning the old weights."""
    q = _quant(_linear(), W8, "dynamic-asym")
    f = FloatLinear.from_float(_linear(), torch.float16)
    x = _x(1, 96)
    with torch.no_grad():
        q(x), f(x)
        slots_q = {s for s in q._CACHE_SLOTS if s in q.__dict__}
        slots_f = {s for s in f._CACHE_SLOTS if s in f.__dict__}
        assert slots_q and slots_f
        q.to("cpu"), f.to("cpu")
        assert {s for s in q._CACHE_SLOTS if s in q.__dict__} == slots_q
        assert {s for s in f._CACHE_SLOTS if s in f.__dict__} == slots_f
        q._apply(lambda t: t.clone()), f._apply(lambda t: t.clone())
        assert not any(s in q.__dict__ for s in q._CACHE_SLOTS)
        assert not any(s in f.__dict__ for s in f._CACHE_SLOTS)
        y_q, y_f = q(x), f(x)  # rebuilt from the new tensors
        with reference_math():
            assert torch.equal(y_q, q(x))
            ref_f = f(x)
        if f.uses_fbgemm_fp16(x.device, torch.float32):  # CPUs without native bf16: FBGEMM's fp16 GEMM
            bound = kernels.fp16_linear_error_bound(x, f.weight.float(), f.bias.float())
            assert ((y_f - ref_f).abs().double() <= bound).all()
        else:
            assert torch.equal(y_f, ref_f)
        q.set_weight(_linear(seed=5).weight)  # a new weight: every copy derived from the old one goes
        assert not any(s in q.__dict__ for s in q._CACHE_SLOTS)
        y_q = q(x)
        with reference_math():
            assert torch.equal(y_q, q(x))
        q.to("meta"), f.to("meta")
    assert not any(s in q.__dict__ for s in q._CACHE_SLOTS)
    assert not any(s in f.__dict__ for s in f._CACHE_SLOTS)
