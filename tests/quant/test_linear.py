"""QuantLinear / FloatLinear / QuantEmbedding: storage, execution modes, error bounds.

Every closeness check uses a bound derived from the quantization steps (``tests/conftest.py``):
weights within ``s_w/2`` of the float weight, activations within ``s_x/2``, plus the rounding of
the arithmetic; and the real integer path must equal the float64 evaluation of its own integers
(``exact_quant_linear``) to float32 rounding. No Transformers import: these are pure modules.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from hfptq.errors import CalibrationError, HfPtqError
from hfptq.quant import kernels
from hfptq.quant.linear import FloatLinear, QuantEmbedding, QuantLinear

W8_CHANNEL = {"bits": 8, "symmetric": True, "granularity": "channel"}
WEIGHT_CASES = {
    "int8-channel": W8_CHANNEL,
    "int8-tensor": {"bits": 8, "symmetric": True, "granularity": "tensor"},
    "int8-channel-asym": {"bits": 8, "symmetric": False, "granularity": "channel"},
    "int8-group16": {"bits": 8, "symmetric": True, "granularity": "group", "group_size": 16},
    "int4-group16": {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 16},
    "int4-channel-asym": {"bits": 4, "symmetric": False, "granularity": "channel"},
}
IN, OUT = 48, 24


def _math_modes():
    """Run each numeric test with the fast path and with the reference formulas (when both exist)."""
    modes = ["fast"]
    if hasattr(kernels, "reference_math"):
        modes.append("reference")
    return modes


@pytest.fixture(params=_math_modes())
def math_mode(request):
    ctx = kernels.reference_math() if request.param == "reference" else contextlib.nullcontext()
    with ctx:
        yield request.param


def _linear(in_f=IN, out_f=OUT, bias=True, seed=0, outlier=True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, out_f).unsqueeze(1))  # rows of different ranges
        if outlier:
            lin.weight[0, 3] = 2.5  # one large weight in row 0
    return lin


def _x(*shape, seed=1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    x[..., 5] *= 8  # an outlier feature, as in real activations
    return x.to(dtype)


def _check_bound(qbounds, module, lin, x, y):
    w = lin.weight.detach().double()
    b = None if lin.bias is None else lin.bias.detach().double()
    bound = qbounds.quant_linear_bound(module, x, w, b)
    y_ref = x.double().reshape(-1, x.shape[-1]) @ w.t() + (0 if b is None else b)
    err = (y.double().reshape(y_ref.shape) - y_ref).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    return err, bound


# ------------------------------------------------------------------------------------------------
# Weight storage
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
def test_weight_storage_and_round_trip(case, qbounds):
    args = WEIGHT_CASES[case]
    lin = _linear()
    q = QuantLinear.from_float(lin, args)
    bits, sym, gran = args["bits"], args["symmetric"], args["granularity"]
    if bits == 4:
        assert q.qweight.dtype == torch.uint8 and tuple(q.qweight.shape) == (OUT, IN // 2)
        assert q.qweight.nbytes * 8 == lin.weight.nbytes  # 8x smaller than float32
    else:
        assert q.qweight.dtype == torch.int8 and tuple(q.qweight.shape) == (OUT, IN)
        assert q.qweight.nbytes * 4 == lin.weight.nbytes  # 4x smaller than float32
    ints = q.int_weight()
    assert ints.dtype == torch.int8 and tuple(ints.shape) == (OUT, IN)
    qmax = 2 ** (bits - 1) - 1
    assert ints.max() <= qmax and ints.min() >= (-qmax if sym else -qmax - 1)
    rows = 1 if gran == "tensor" else OUT
    groups = IN // args["group_size"] if gran == "group" else 1
    assert q.weight_scale.dtype == torch.float32 and tuple(q.weight_scale.shape) == (rows, groups)
    if sym:
        assert q.weight_zero_point is None
    else:
        assert q.weight_zero_point.dtype == torch.int8 and tuple(q.weight_zero_point.shape) == (rows, groups)
    # every weight within half a step of the float one
    steps = qbounds.expand_weight_steps(q.weight_scale, OUT, IN)
    err = (q.dequantized_weight().double() - lin.weight.detach().double()).abs()
    assert (err <= steps * (0.5 + 2 ** -22)).all()
    # the step is the range of the granule over the grid: symmetric amax/qmax, asymmetric (max-min)/(2^b - 1)
    w = lin.weight.detach().double()
    if gran == "channel":
        expect = w.abs().amax(1) / qmax if sym else (w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)) / (2 ** bits - 1)
        torch.testing.assert_close(q.weight_scale.double().reshape(-1), expect, rtol=2 ** -22, atol=0)
    # state dict: integer tensors under their own names, no float weight
    keys = set(q.state_dict())
    assert "weight" not in keys and {"qweight", "weight_scale", "bias"} <= keys
    assert ("weight_zero_point" in keys) == (not sym)


def test_int4_packs_two_values_per_byte_low_nibble_first():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-7.0, 1.0, 7.0, -3.0]]))
    q = QuantLinear.from_float(lin, {"bits": 4, "symmetric": True, "granularity": "channel"})
    assert q.int_weight().tolist() == [[-7, 1, 7, -3]]  # step 1.0
    # (-7 & 0xF) | (1 << 4) = 0x19; (7 & 0xF) | ((-3 & 0xF) << 4) = 0xD7
    assert q.qweight.tolist() == [[0x19, 0xD7]]


# ------------------------------------------------------------------------------------------------
# Execution modes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(WEIGHT_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only(case, dtype, qbounds, math_mode):
    lin = _linear()
    q = QuantLinear.from_float(lin, WEIGHT_CASES[case], {"mode": "none"})
    x = _x(2, 5, IN, dtype=dtype)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == dtype and y.shape == (2, 5, OUT)
    _check_bound(qbounds, q, lin, x, y)
    # 3-D input = the same rows through the 2-D path
    with torch.no_grad():
        assert torch.equal(q(x.reshape(10, IN)), y.reshape(10, OUT))


@pytest.mark.parametrize("act_symmetric", [True, False], ids=["act-sym", "act-asym"])
@pytest.mark.parametrize("case", ["int8-channel", "int8-tensor"])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_w8a8_dynamic_equals_the_integer_math_and_is_within_the_bound(case, act_symmetric, rows, qbounds, math_mode):
    lin = _linear()
    q = QuantLinear.from_float(lin, WEIGHT_CASES[case], {"mode": "dynamic", "symmetric": act_symmetric})
    x = _x(rows, IN, seed=rows)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == torch.float32 and y.shape == (rows, OUT)
    exact, mag = qbounds.exact_quant_linear(q, x)
    assert ((y.double() - exact).abs() <= 4 * qbounds.U_FP32 * mag).all()
    err, bound = _check_bound(qbounds, q, lin, x, y)
    assert err.max() > 0  # really quantized


def test_w8a8_with_asymmetric_weights_is_exact_when_supported(qbounds, math_mode):
    """The integer path subtracts zero-point terms exactly (the plan still requires symmetric weights)."""
    lin = _linear()
    q = QuantLinear.from_float(lin, WEIGHT_CASES["int8-channel-asym"], {"mode": "dynamic", "symmetric": False})
    x = _x(9, IN)
    with torch.no_grad():
        y = q(x)
    exact, mag = qbounds.exact_quant_linear(q, x)
    assert ((y.double() - exact).abs() <= 4 * qbounds.U_FP32 * mag).all()
    _check_bound(qbounds, q, lin, x, y)


@pytest.mark.parametrize("act_symmetric", [True, False], ids=["act-sym", "act-asym"])
def test_w8a8_static(act_symmetric, qbounds, math_mode):
    lin = _linear()
    x = _x(6, IN)
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    if act_symmetric:
        scale, zp = torch.maximum(-lo, hi) / 127, None
    else:
        scale = (hi - lo) / 255
        zp = torch.round(-128 - lo / scale)
    q = QuantLinear.from_float(lin, W8_CHANNEL, {"mode": "static", "symmetric": act_symmetric},
                               input_qparams=(scale, zp))
    assert q.input_scale.dtype == torch.float32 and q.input_scale.shape == ()
    assert (q.input_zero_point is None) == act_symmetric
    with torch.no_grad():
        y = q(x)
    exact, mag = qbounds.exact_quant_linear(q, x)
    assert ((y.double() - exact).abs() <= 4 * qbounds.U_FP32 * mag).all()
    _check_bound(qbounds, q, lin, x, y)
    # outside the calibrated range the activations clamp to the grid, exactly as the math says
    big = x * 3
    with torch.no_grad():
        y_big = q(big)
    exact, mag = qbounds.exact_quant_linear(q, big)
    assert ((y_big.double() - exact).abs() <= 4 * qbounds.U_FP32 * mag).all()


@pytest.mark.parametrize("mode", ["dynamic", "static", "none"])
@pytest.mark.parametrize("act_symmetric", [True, False], ids=["act-sym", "act-asym"])
def test_fake_mode_matches_the_real_path(mode, act_symmetric, qbounds, math_mode):
    lin = _linear()
    x = _x(2, 4, IN)
    acts = {"mode": mode, "symmetric": act_symmetric}
    qparams = None
    if mode == "static":
        qparams = (x.abs().max() / 127, None) if act_symmetric else ((x.max() - x.min()) / 255,
                                                                     torch.round(-128 - x.min() * 255 / (x.max() - x.min())))
    real = QuantLinear.from_float(lin, W8_CHANNEL, acts, input_qparams=qparams)
    fake = QuantLinear.from_float(lin, W8_CHANNEL, acts, fake=True, input_qparams=qparams)
    assert fake.fake and torch.equal(fake.qweight, real.qweight)
    with torch.no_grad():
        y_real, y_fake = real(x), fake(x)
    _, mag = qbounds.exact_quant_linear(real, x)
    # fake: float32 matmul of the dequantized operands; real: exact integers rescaled
    assert ((y_real.double() - y_fake.double()).abs() <= (IN + 8) * qbounds.U_FP32 * mag).all()


def test_w8a8_bf16_and_3d_inputs(qbounds, math_mode):
    lin = _linear()
    q = QuantLinear.from_float(lin, W8_CHANNEL, {"mode": "dynamic"})
    x = _x(3, 4, IN, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        flat = q(x.reshape(12, IN))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 4, OUT)
    assert torch.equal(y.reshape(12, OUT), flat)
    _check_bound(qbounds, q, lin, x, y)


def test_bias_is_added_once(math_mode):
    lin = _linear(bias=True)
    no_bias = nn.Linear(IN, OUT, bias=False)
    with torch.no_grad():
        no_bias.weight.copy_(lin.weight)
    for acts in ({"mode": "dynamic"}, {"mode": "none"}):
        with_b = QuantLinear.from_float(lin, W8_CHANNEL, acts)
        without = QuantLinear.from_float(no_bias, W8_CHANNEL, acts)
        assert without.bias is None and "bias" not in without.state_dict()
        x = _x(4, IN)
        with torch.no_grad():
            torch.testing.assert_close(with_b(x) - without(x), lin.bias.detach().expand(4, OUT),
                                       rtol=0, atol=8 * 2 ** -24 * (with_b(x).abs().max().item() + 1))


def test_set_weight_refreshes_everything_derived_from_it(qbounds, math_mode):
    """Re-quantizing in place (GPTQ/SmoothQuant do this) must not reuse stale cached row sums."""
    q = QuantLinear.from_float(_linear(seed=0), W8_CHANNEL, {"mode": "dynamic", "symmetric": False})
    x = _x(5, IN)
    with torch.no_grad():
        q(x)  # builds whatever the module caches
        other = _linear(seed=7)
        q.set_weight(other.weight.detach())
        y = q(x)
    exact, mag = qbounds.exact_quant_linear(q, x)
    assert ((y.double() - exact).abs() <= 4 * qbounds.U_FP32 * mag).all()


def test_conv1d_weights_are_transposed():
    class Conv1D(nn.Module):  # the layout of transformers.pytorch_utils.Conv1D: weight [in, out]
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x):
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)

    torch.manual_seed(0)
    conv = Conv1D(OUT, IN)
    q = QuantLinear.from_float(conv, W8_CHANNEL, {"mode": "none"})
    assert (q.in_features, q.out_features) == (IN, OUT)
    steps = q.weight_scale.double()
    assert ((q.dequantized_weight().double() - conv.weight.detach().t().double()).abs() <= steps * (0.5 + 2 ** -22)).all()
    f = FloatLinear.from_float(conv, torch.float16)
    assert torch.equal(f.weight, conv.weight.detach().t().to(torch.float16))
    x = _x(3, IN)
    with torch.no_grad():
        want = conv(x).double()
        for module in (q, f):
            # both within a few percent: a transposition error would be O(1)
            assert ((module(x).double() - want).abs().max() / want.abs().max()) < 0.02


def test_static_without_qparams_is_refused():
    # an hfptq error (CalibrationError, also a ValueError) that names the missing qparams and the fix
    with pytest.raises(CalibrationError, match="input_qparams.*calibration") as info:
        QuantLinear.from_float(_linear(), W8_CHANNEL, {"mode": "static"})
    assert isinstance(info.value, HfPtqError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------
# FloatLinear
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_linear_fp16_storage_computes_in_bf16_on_cpu(dtype, qbounds, math_mode):
    lin = _linear()
    f = FloatLinear.from_float(lin, torch.float16)  # compute_dtype="auto"
    assert f.weight.dtype == torch.float16 and f.bias.dtype == torch.float16
    assert f.weight.nbytes * 2 == lin.weight.nbytes
    assert "weight" in dict(f.named_buffers()) and not list(f.parameters())  # storage is not a float parameter
    x = _x(3, IN, dtype=dtype)
    with torch.no_grad():
        y = f(x)
        y_again = f(x)
    assert y.dtype == dtype  # output in the input dtype
    want = torch.nn.functional.linear(x.to(torch.bfloat16), f.weight.to(torch.bfloat16),
                                      f.bias.to(torch.bfloat16)).to(dtype)
    assert torch.equal(y, want) and torch.equal(y_again, y)
    bound = qbounds.float_linear_bound(x, lin.weight.detach(), lin.bias.detach(), torch.float16, torch.bfloat16)
    y_ref = x.double() @ lin.weight.detach().double().t() + lin.bias.detach().double()
    assert ((y.double() - y_ref).abs() <= bound).all()


def test_float_linear_float32_compute(qbounds, math_mode):
    lin = _linear()
    f = FloatLinear.from_float(lin, torch.float16, compute_dtype="float32")
    x = _x(3, IN)
    with torch.no_grad():
        y = f(x)
    want = torch.nn.functional.linear(x, f.weight.float(), f.bias.float())
    assert y.dtype == torch.float32 and torch.equal(y, want)
    bound = qbounds.float_linear_bound(x, lin.weight.detach(), lin.bias.detach(), torch.float16, torch.float32)
    y_ref = x.double() @ lin.weight.detach().double().t() + lin.bias.detach().double()
    assert ((y.double() - y_ref).abs() <= bound).all()
    # fp32 compute is strictly more accurate than bf16 compute on the same storage
    with torch.no_grad():
        y_bf16 = FloatLinear.from_float(lin, torch.float16)(x)
    assert (y.double() - y_ref).abs().max() < (y_bf16.double() - y_ref).abs().max()


def test_float_linear_follows_weight_updates(math_mode):
    f = FloatLinear.from_float(_linear(), torch.float16)
    x = _x(2, IN)
    with torch.no_grad():
        before = f(x)
        f.weight.mul_(2)  # in place
        doubled = f(x)
        f.weight = torch.zeros_like(f.weight)  # reassigned
        zero = f(x)
    torch.testing.assert_close(doubled - f.bias.to(torch.bfloat16).float(),
                               2 * (before - f.bias.to(torch.bfloat16).float()), rtol=2 ** -7, atol=1e-2)
    assert torch.equal(zero, f.bias.to(torch.bfloat16).float().expand(2, OUT))
    clone = copy.deepcopy(f)
    with torch.no_grad():
        assert torch.equal(clone(x), zero)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_float_linear_other_storage(storage, qbounds):
    lin = _linear(bias=False)
    f = FloatLinear.from_float(lin, storage)
    assert f.weight.dtype == storage and f.bias is None
    x = _x(2, IN)
    with torch.no_grad():
        y = f(x)
    assert y.dtype == torch.float32
    bound = qbounds.float_linear_bound(x, lin.weight.detach(), None, storage, storage)
    assert ((y.double() - x.double() @ lin.weight.detach().double().t()).abs() <= bound).all()


# ------------------------------------------------------------------------------------------------
# QuantEmbedding
# ------------------------------------------------------------------------------------------------


def _embedding(num=40, dim=IN, padding_idx=None) -> nn.Embedding:
    torch.manual_seed(3)
    return nn.Embedding(num, dim, padding_idx=padding_idx)


@pytest.mark.parametrize("case", ["int8-channel", "int8-channel-asym", "int4-group16"])
def test_embedding_with_its_own_table(case, qbounds):
    emb = _embedding(padding_idx=0)
    q = QuantEmbedding.from_float(emb, WEIGHT_CASES[case])
    assert q.padding_idx == 0 and q.table is q.source
    ids = torch.tensor([[0, 1, 39], [5, 5, 17]])
    with torch.no_grad():
        out, want = q(ids), emb(ids)
    assert out.dtype == torch.float32 and out.shape == (2, 3, IN)
    steps = qbounds.expand_weight_steps(q.source.weight_scale, 40, IN)[ids]
    assert ((out.double() - want.double()).abs() <= steps * (0.5 + 2 ** -22)).all()
    assert set(q.state_dict()) >= {"table.qweight", "table.weight_scale"}


def test_embedding_tied_to_the_lm_head_shares_storage(qbounds):
    emb = _embedding()
    head = nn.Linear(IN, 40, bias=False)
    head.weight = emb.weight  # tied
    q_head = QuantLinear.from_float(head, W8_CHANNEL, {"mode": "dynamic"})
    scale = IN ** 0.5
    q_emb = QuantEmbedding.from_float(emb, W8_CHANNEL, tied_to=q_head, embed_scale=scale)
    assert q_emb.source is q_head and not hasattr(q_emb, "table")
    assert q_emb.source.qweight.data_ptr() == q_head.qweight.data_ptr()
    assert list(q_emb.state_dict()) == []  # nothing stored twice
    ids = torch.arange(40).reshape(5, 8)
    with torch.no_grad():
        out = q_emb(ids).double()
    # exactly the LM head's dequantized rows, times the scale (float32 rounding)
    rows = q_head.dequantized_weight().double()[ids] * scale
    assert ((out - rows).abs() <= 4 * qbounds.U_FP32 * rows.abs()).all()
    # and within the int8 row bound of the float (scaled) embedding
    want = emb(ids).double() * scale
    steps = q_head.weight_scale.double()[ids]
    assert ((out - want).abs() <= steps * (0.5 + 2 ** -22) * scale + 4 * qbounds.U_FP32 * want.abs()).all()
    # re-pointing the tie (what a reload does) follows the new storage
    other = QuantLinear.from_float(_linear(IN, 40, bias=False, seed=9), W8_CHANNEL)
    q_emb.tie_to(other)
    assert q_emb.source.qweight.data_ptr() == other.qweight.data_ptr()


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("rows", [1, 16, 17, 64])
@pytest.mark.parametrize("act_symmetric", [True, False], ids=["act-sym", "act-asym"])
def test_cuda_w8a8_equals_the_integer_math(rows, act_symmetric, qbounds, math_mode):
    lin = _linear()
    q = QuantLinear.from_float(lin, W8_CHANNEL, {"mode": "dynamic", "symmetric": act_symmetric}).cuda()
    x = _x(rows, IN, seed=rows)
    with torch.no_grad():
        y = q(x.cuda())
    assert y.device.type == "cuda" and y.dtype == torch.float32
    q_cpu = copy.deepcopy(q).cpu()
    exact, mag = qbounds.exact_quant_linear(q_cpu, x)
    assert ((y.cpu().double() - exact).abs() <= 4 * qbounds.U_FP32 * mag).all()


@cuda
def test_cuda_float_linear_computes_in_fp16(qbounds, math_mode):
    lin = _linear()
    f = FloatLinear.from_float(lin, torch.float16).cuda()
    x = _x(4, IN).cuda()
    with torch.no_grad():
        y = f(x)
    assert y.dtype == torch.float32
    want = torch.nn.functional.linear(x.half(), f.weight, f.bias).float()
    assert torch.equal(y, want)
    bound = qbounds.float_linear_bound(x.cpu(), lin.weight.detach(), lin.bias.detach(), torch.float16, torch.float16)
    y_ref = x.cpu().double() @ lin.weight.detach().double().t() + lin.bias.detach().double()
    assert ((y.cpu().double() - y_ref).abs() <= bound).all()
