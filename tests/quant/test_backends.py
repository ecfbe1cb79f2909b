"""Backend dispatch by CPU capability (hfptq.quant.backends): every route against the reference math on
any machine (capabilities emulated where the hardware lacks them), forcing, the warning, the summary text.

Nothing here times anything: the choice is made from capability facts, so the tests do not depend on
the speed of the machine.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hfptq.errors import ConfigError
from hfptq.quant import backends, kernels
from hfptq.quant.backends import HfPtqPerformanceWarning, force_backend
from hfptq.quant.kernels import reference_math
from hfptq.quant.linear import FloatLinear, QuantLinear

W8 = {"bits": 8, "symmetric": True, "granularity": "channel"}
W8_ASYM = {"bits": 8, "symmetric": False, "granularity": "channel"}
ACTS = {
    "dynamic-asym": {"mode": "dynamic", "symmetric": False},
    "dynamic-sym": {"mode": "dynamic", "symmetric": True},
    "static-sym": {"mode": "static", "symmetric": True},
    "static-asym": {"mode": "static", "symmetric": False},
}
STATIC_QPARAMS = {"static-sym": (0.04, None), "static-asym": (0.05, 7)}


_probes_touched = [False]


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch):
    """Every test starts and ends with a fresh choice (features, warnings re-read); the FBGEMM probes are
    re-run after a test that changed what they see (they are the slow part)."""
    for var in ("HFPTQ_CPU_FEATURES", "HFPTQ_W8A8_BACKEND", "HFPTQ_FBGEMM"):
        monkeypatch.delenv(var, raising=False)
    backends.reset()
    yield
    monkeypatch.undo()
    backends.reset()
    if _probes_touched[0]:
        kernels.fbgemm_linear_available.cache_clear()
        _probes_touched[0] = False


def _emulate(monkeypatch, features: str) -> None:
    monkeypatch.setenv("HFPTQ_CPU_FEATURES", features)
    backends.reset()


def _saturating_fbgemm(monkeypatch) -> None:
    """FBGEMM as a CPU without VNNI runs it: pairs of uint8 x int8 products added in saturating 16-bit
    arithmetic (``vpmaddubsw``), then summed in int32, minus the zero-point term, as float32."""
    prepack, op = kernels._fbgemm_ops()
    if prepack is None or op is None or "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no FBGEMM in this build")

    def saturating(x_shifted, scale, zero_point, packed):
        w = torch.ops.quantized.linear_unpack(packed)[0].int_repr().to(torch.int32)
        xu = (x_shifted + zero_point).to(torch.int32)                     # the uint8 values FBGEMM sees
        assert int(xu.min()) >= 0 and int(xu.max()) <= 255
        prod = xu.unsqueeze(1) * w.unsqueeze(0)                           # [M, N, K]
        if prod.shape[-1] % 2:
            prod = F.pad(prod, (0, 1))
        pairs = (prod[..., 0::2] + prod[..., 1::2]).clamp(-32768, 32767)
        return (pairs.sum(-1) - zero_point * w.sum(-1)).to(torch.float32)

    monkeypatch.setattr(kernels, "_fbgemm_ops", lambda: (prepack, saturating))
    _probes_touched[0] = True
    kernels.fbgemm_linear_available.cache_clear()
    backends.reset()


def _quant(acts: str, k: int = 96, n: int = 40, weights=W8, seed: int = 0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=gen) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=gen))
    return QuantLinear.from_float(lin, weights, ACTS[acts], input_qparams=STATIC_QPARAMS.get(acts))


def _x(rows: int, k: int, seed: int = 1) -> torch.Tensor:
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 3.0
    x[0, :4] = torch.tensor([40.0, -40.0, 0.0, 1e-3])      # outliers: extreme quantized values
    return x


def _reference_for(module: QuantLinear, route: str) -> QuantLinear:
    """The module whose reference math the route must reproduce bit for bit: itself, or, for
    ``fbgemm-a7`` with dynamic activations, the same weights with 7-bit activations, or, for
    ``fbgemm-w7``, a plain module holding the 7-bit re-gridded integers and scales."""
    ref = copy.deepcopy(module)
    if route == "fbgemm-a7" and module.act_mode == "dynamic":
        ref.act_bits = 7
    if route == "fbgemm-w7" and module.weight_bits == 8 and module.weight_zero_point is None:
        q7, factor = kernels.regrid_weight(module.qweight)
        ref.qweight.data = q7
        ref.weight_scale.data = module.weight_scale * factor
    return ref


def _runnable(route: str) -> bool:
    if route == "onednn-vnni":
        return kernels.int_mm_available("cpu")
    if route == "fbgemm":
        return kernels.fbgemm_linear_available(8)
    if route in ("fbgemm-a7", "fbgemm-split"):
        return kernels.fbgemm_linear_available(7)
    if route == "fbgemm-w7":
        return kernels.fbgemm_linear_available(8, 7)
    return True


# ------------------------------------------------------------------------------------------------
# Capability facts
# ------------------------------------------------------------------------------------------------


def test_cpu_features_override_by_class_and_flag(monkeypatch):
    _emulate(monkeypatch, "avx2")
    f = backends.cpu_features()
    assert (f.capability, f.avx512_vnni, f.native_bf16) == ("AVX2", False, False)
    assert "HFPTQ_CPU_FEATURES=avx2" in f.describe()
    _emulate(monkeypatch, "avx512-bf16")
    f = backends.cpu_features()
    assert (f.capability, f.avx512_vnni, f.native_bf16) == ("AVX512", True, True)
    _emulate(monkeypatch, "avx2, amx_bf16")
    assert backends.cpu_features().native_bf16 and not backends.cpu_features().avx512_vnni
    monkeypatch.delenv("HFPTQ_CPU_FEATURES")
    backends.reset()
    assert backends.cpu_features().source == "detected"
    assert backends.cpu_features().capability == torch.backends.cpu.get_cpu_capability()


def test_automatic_choice_per_cpu_class(monkeypatch):
    """VNNI -> oneDNN via torch._int_mm; no VNNI with an exact FBGEMM -> fbgemm; no VNNI with a saturating
    FBGEMM -> 7-bit re-gridded weights (7-bit activations where only those are exact); no usable FBGEMM ->
    the exact float route."""
    if not kernels.int_mm_available("cpu") or not kernels.fbgemm_linear_available(8):
        pytest.skip("needs torch._int_mm and an exact FBGEMM on this machine to emulate the classes")
    _emulate(monkeypatch, "avx512-vnni")
    assert backends.w8a8_backend().name == "onednn-vnni"
    _emulate(monkeypatch, "avx2")
    assert backends.w8a8_backend().name == "fbgemm"
    _saturating_fbgemm(monkeypatch)
    assert kernels.fbgemm_linear_available(8) is False      # the probe sees the saturation
    assert kernels.fbgemm_linear_available(7) is True       # 7-bit operands cannot saturate
    assert kernels.fbgemm_linear_available(8, 7) is True    # nor 8-bit activations x weights in [-64, 63]
    assert backends.w8a8_backend().name == "fbgemm-w7"
    assert "saturates" in backends.w8a8_backend().reason and "re-gridded to 7 bits" in backends.w8a8_backend().reason
    monkeypatch.setattr(kernels, "fbgemm_linear_available", lambda bits=8, weight_bits=8: bits == 7)
    backends.reset()
    assert backends.w8a8_backend().name == "fbgemm-a7"
    monkeypatch.undo()
    _emulate(monkeypatch, "avx2")
    _saturating_fbgemm(monkeypatch)
    monkeypatch.setenv("HFPTQ_FBGEMM", "0")
    kernels.fbgemm_linear_available.cache_clear()
    backends.reset()
    assert backends.w8a8_backend().name == "float-exact"


def test_int8_matmul_avoids_torch_int_mm_without_vnni(monkeypatch):
    """Without AVX512-VNNI torch's CPU _int_mm is a scalar loop (64x slower than float32 on an AVX2 EPYC):
    the exact float route runs instead, with the same integers."""
    def no_int_mm(*_):
        raise AssertionError("torch._int_mm called on a CPU without avx512_vnni")

    if not kernels.int_mm_available("cpu"):  # (probed here, before torch._int_mm is replaced below)
        pytest.skip("torch._int_mm does not run here")
    a = torch.randint(-128, 128, (5, 300), dtype=torch.int8)
    b = torch.randint(-128, 128, (7, 300), dtype=torch.int8)
    exact = (a.long() @ b.long().T).to(torch.int32)
    _emulate(monkeypatch, "avx2")
    monkeypatch.setattr(torch, "_int_mm", no_int_mm)
    assert torch.equal(kernels.int8_matmul(a, b), exact)
    monkeypatch.undo()
    _emulate(monkeypatch, "avx512-vnni")
    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *args: calls.append(1) or real(*args))
    assert torch.equal(kernels.int8_matmul(a, b), exact) and calls


# ------------------------------------------------------------------------------------------------
# Every route against the reference math
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", backends.W8A8_BACKENDS)
@pytest.mark.parametrize("acts", list(ACTS))
@pytest.mark.parametrize("rows", [1, 70])
@pytest.mark.parametrize("k", [96, 2100])
def test_every_route_equals_its_reference(route, acts, rows, k):
    """Forced route, any machine: outputs are the reference math's bit for bit (7-bit activations for
    ``fbgemm-a7``, the 7-bit re-gridded weights for ``fbgemm-w7``; 2,100 features exceed both chunk
    widths of the per-row zero-point correction)."""
    if not _runnable(route):
        pytest.skip(f"{route} does not run on this machine")
    q = _quant(acts, k=k)
    ref = _reference_for(q, route)
    x = _x(rows, k, seed=rows)
    with torch.no_grad(), force_backend(route):
        fast = q(x)
        expected = backends.module_backend(q).name
    with torch.no_grad(), reference_math():
        want = ref(x)
    assert torch.equal(fast, want)
    fbgemm_ran = any(s in q.__dict__ for s in ("_hfptq_fbgemm", "_hfptq_fbgemm_chunks", "_hfptq_w7", "_hfptq_w7_chunks"))
    if expected == "fbgemm-split":
        assert "_hfptq_fbgemm_split" in q.__dict__
    elif expected in ("fbgemm", "fbgemm-a7", "fbgemm-w7"):
        assert fbgemm_ran
        chunked = rows > 1 and acts == "dynamic-asym" and k > kernels.fbgemm_row_zero_point_max_k(
            7 if expected == "fbgemm-a7" else 8, 7 if expected == "fbgemm-w7" else 8)
        slot = "_hfptq_w7_chunks" if expected == "fbgemm-w7" else "_hfptq_fbgemm_chunks"
        assert (slot in q.__dict__) == chunked
    elif expected == "float-exact":
        assert not fbgemm_ran


def test_switching_routes_rebuilds_chunk_packs_for_the_new_width():
    """The per-row zero-point chunks are 1,024 inputs wide for 8-bit activations and 2,048 for 7: a module
    that ran one route and then another must not reuse the first route's packs."""
    if not (_runnable("fbgemm") and _runnable("fbgemm-a7")):
        pytest.skip("fbgemm and fbgemm-a7 do not both run on this machine")
    q = _quant("dynamic-asym", k=2100)
    x = _x(70, 2100)
    for route in ("fbgemm", "fbgemm-a7", "fbgemm-w7", "fbgemm"):
        with torch.no_grad(), force_backend(route):
            fast = q(x)
        with torch.no_grad(), reference_math():
            want = _reference_for(q, route)(x)
        assert torch.equal(fast, want), route


@pytest.mark.parametrize("route", ["fbgemm-w7", "fbgemm-a7", "fbgemm-split"])
@pytest.mark.parametrize("acts", ["dynamic-asym", "dynamic-sym", "static-asym"])
@pytest.mark.parametrize("rows", [1, 40])
def test_routes_without_vnni_are_exact_on_a_saturating_fbgemm(monkeypatch, route, acts, rows):
    """FBGEMM as a CPU without VNNI computes it (saturating 16-bit pair sums, emulated), every operand at its
    extreme: the 7-bit routes still give their 7-bit references bit for bit, the split route the 8-bit
    reference; one plain 8-bit pass would not. (The probes' verdict on this kernel is checked in
    test_automatic_choice_per_cpu_class.)"""
    _emulate(monkeypatch, "avx2")
    _saturating_fbgemm(monkeypatch)
    monkeypatch.setattr(kernels, "fbgemm_linear_available", lambda bits=8, weight_bits=8: min(bits, weight_bits) == 7)
    assert backends.w8a8_backend().name == "fbgemm-w7"
    k = 64
    lin = nn.Linear(k, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.where(torch.arange(k) % 3 == 0, -0.5, 0.5).expand(24, k))  # int8 weights at +-127
    q = QuantLinear.from_float(lin, W8, ACTS[acts], input_qparams=STATIC_QPARAMS.get(acts))
    x = torch.where(q.qweight[:1].expand(rows, k) < 0, -2.0, 6.0)                        # all products one sign
    if rows > 1:
        x[-1] = -x[-1]                                                                  # and the other sign
    with torch.no_grad(), force_backend(route):
        fast = q(x)
        expected = backends.module_backend(q).name
    if acts.startswith("static") and route == "fbgemm-a7":
        assert expected == "float-exact"
    else:
        assert expected == route
    ref = _reference_for(q, route)
    with torch.no_grad(), reference_math():
        want = ref(x)
    assert torch.equal(fast, want)
    if acts.startswith("static"):
        return
    # the same inputs with 8-bit activations through the saturating kernel lose the integers
    xs, z, _, row_z = kernels.quantize_rows_for_fbgemm(x, 8, acts == "dynamic-sym")
    if row_z is None:
        got = kernels.fbgemm_int8_linear(xs, z, kernels.fbgemm_pack(q.qweight))
        exact = (xs.double() @ q.qweight.double().T).float()
        assert not torch.equal(got, exact)


def test_a7_route_leaves_static_and_asymmetric_weights_on_the_exact_float_route():
    if not kernels.fbgemm_linear_available(7):
        pytest.skip("FBGEMM not usable here")
    with force_backend("fbgemm-a7"):
        assert backends.module_backend(_quant("static-sym")).name == "float-exact"
        assert "static" in backends.module_backend(_quant("static-sym")).reason
        assert backends.module_backend(_quant("dynamic-asym", weights=W8_ASYM)).name == "float-exact"
        assert backends.module_backend(_quant("dynamic-asym")).name == "fbgemm-a7"


def test_w7_route_takes_static_activations_but_not_asymmetric_weights():
    if not kernels.fbgemm_linear_available(8, 7):
        pytest.skip("FBGEMM not usable here")
    with force_backend("fbgemm-w7"):
        for acts in ACTS:
            assert backends.module_backend(_quant(acts)).name == "fbgemm-w7", acts
        b = backends.module_backend(_quant("dynamic-asym", weights=W8_ASYM))
        assert b.name == "float-exact" and "asymmetric weights" in b.reason


# ------------------------------------------------------------------------------------------------
# fbgemm-w7: the 7-bit re-gridding of the int8 weights
# ------------------------------------------------------------------------------------------------


def test_regrid_weight_fits_7_bits_and_keeps_fitting_rows():
    """Every value in [-64, 63]; rows already within 7 bits unchanged (factor 1); elsewhere each re-gridded
    value is within half a 7-bit step (factor / 2) of the 8-bit one, and the row's extreme lands on +-63."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(-127, 128, (40, 300), generator=gen, dtype=torch.int8)
    w[:5] = torch.randint(-63, 64, (5, 300), generator=gen, dtype=torch.int8)         # fit 7 bits
    w[5, :] = 0                                                                       # all zero
    w[6, :] = 0
    w[6, 3] = -100                                                                    # one large negative value
    q, factor = kernels.regrid_weight(w)
    assert q.dtype == torch.int8 and int(q.min()) >= -64 and int(q.max()) <= 63
    assert torch.equal(q[:6], w[:6]) and torch.equal(factor[:6], torch.ones(6, 1))
    assert torch.equal(factor[6:], (w[6:].float().abs().amax(1, keepdim=True) / 63))
    assert ((q.double() * factor.double() - w.double()).abs() <= factor.double() / 2 * (1 + 1e-6)).all()
    assert int(q[6, 3]) == -63 and torch.equal(q[7:].abs().amax(1), torch.full((33,), 63, dtype=torch.int8))
    assert torch.equal(kernels.regrid_weight(w, factor=factor)[0], q)


def test_w7_route_keeps_the_8bit_weights_and_checkpoint(tmp_path):
    """The re-gridded weight is a runtime derivative: qweight, weight_scale and the state dict stay the 8-bit
    ones after the route ran, so a checkpoint saved on such a CPU reloads bit-identically elsewhere."""
    if not _runnable("fbgemm-w7"):
        pytest.skip("fbgemm-w7 does not run on this machine")
    q = _quant("dynamic-asym", k=200)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x = _x(5, 200)
    with torch.no_grad(), force_backend("fbgemm-w7"):
        y7 = q(x)
        q(x[:1])
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.save(after, tmp_path / "sd.pt")
    fresh = _quant("dynamic-asym", k=200, seed=9)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    with torch.no_grad():
        with reference_math():
            assert torch.equal(fresh(x), q(x))                 # the 8-bit reference, unchanged
        with force_backend("fbgemm-w7"):
            assert torch.equal(fresh(x), y7)


# ------------------------------------------------------------------------------------------------
# Forcing and the warning
# ------------------------------------------------------------------------------------------------


def test_forcing_by_env_and_bad_names(monkeypatch):
    monkeypatch.setenv("HFPTQ_W8A8_BACKEND", "float-exact")
    backends.reset()
    assert backends.w8a8_backend().name == "float-exact"
    assert "HFPTQ_W8A8_BACKEND" in backends.w8a8_backend().reason
    q = _quant("dynamic-asym")
    x = _x(3, 96)
    with torch.no_grad():
        y = q(x)
        with reference_math():
            assert torch.equal(y, q(x))
    assert "_hfptq_fbgemm" not in q.__dict__
    monkeypatch.setenv("HFPTQ_W8A8_BACKEND", "fbgemm8")
    backends.reset()
    with pytest.raises(ConfigError, match="HFPTQ_W8A8_BACKEND='fbgemm8'.*Did you mean 'fbgemm'"):
        backends.w8a8_backend()
    with pytest.raises(ConfigError, match="force_backend='vnni'"):
        with force_backend("vnni"):
            pass


def test_forcing_an_inexact_fbgemm_is_refused(monkeypatch):
    _saturating_fbgemm(monkeypatch)
    with pytest.raises(ConfigError, match="fbgemm.*not exact.*float-exact"):
        with force_backend("fbgemm"):
            pass


def test_no_fast_route_warns_once_naming_the_feature_and_fallback(monkeypatch):
    _emulate(monkeypatch, "avx2")
    monkeypatch.setenv("HFPTQ_FBGEMM", "0")
    _probes_touched[0] = True
    kernels.fbgemm_linear_available.cache_clear()
    qa, qb = _quant("dynamic-asym"), _quant("dynamic-sym", seed=1)
    x = _x(2, 96)
    with torch.no_grad(), pytest.warns(HfPtqPerformanceWarning) as record:
        ya = qa(x)
        qb(x), qa(x)
    messages = [str(r.message) for r in record if issubclass(r.category, HfPtqPerformanceWarning)]
    assert len(messages) == 1
    assert "avx512_vnni" in messages[0] and "float" in messages[0] and "HFPTQ_W8A8_BACKEND" in messages[0]
    with torch.no_grad(), reference_math():
        assert torch.equal(ya, qa(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", HfPtqPerformanceWarning)
        with torch.no_grad():
            qa(x)                                # no second warning


# ------------------------------------------------------------------------------------------------
# FP16-stored modules: bf16 only with native bf16
# ------------------------------------------------------------------------------------------------


def test_fp16_storage_computes_in_float32_without_native_bf16(monkeypatch):
    """No native bf16: FP16 storage computes in float32, through FBGEMM's float16-weight GEMM (a packed
    float16 copy, no float32 copy): F.linear's float32 results up to summation order, within the bound of
    two float32 sums of the same exact products; route_reference_math keeps that kernel. Without FBGEMM,
    a cached float32 copy, bit-identical to the reference."""
    _emulate(monkeypatch, "avx2")
    if not kernels.fbgemm_fp16_linear_available():
        pytest.skip("FBGEMM's fp16 linear is not usable here")
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(640, 48)
    f = FloatLinear.from_float(lin, torch.float16)
    for rows in (1, 7, 130):
        x = torch.randn(rows, 640, generator=gen) * 4
        with torch.no_grad():
            y = f(x)
            with reference_math():
                ref = f(x)
            with backends.route_reference_math(nn.Sequential(f)):
                assert torch.equal(f(x), y)
        assert torch.equal(ref, F.linear(x, f.weight.float(), f.bias.float()))
        bound = kernels.fp16_linear_error_bound(x, f.weight.float(), f.bias.float())
        assert ((y.double() - ref.double()).abs() <= bound).all()
    assert "_hfptq_fp16_packed" in f.__dict__ and "_hfptq_weight_cache" not in f.__dict__
    b = backends.module_backend(f)
    assert b.name == "fbgemm-fp16" and "no native bf16" in b.reason
    # without FBGEMM: the cached float32 copy
    monkeypatch.setenv("HFPTQ_FBGEMM", "0")
    kernels.fbgemm_fp16_linear_available.cache_clear()
    try:
        f = FloatLinear.from_float(lin, torch.float16)
        x = torch.randn(5, 640, generator=gen)
        with torch.no_grad():
            y = f(x)
            assert torch.equal(y, F.linear(x, f.weight.float(), f.bias.float()))
            with reference_math():
                assert torch.equal(y, f(x))
        cache = f.__dict__["_hfptq_weight_cache"][2]
        assert cache.dtype == torch.float32 and "_hfptq_packed_cache" not in f.__dict__
        b = backends.module_backend(f)
        assert b.name == "float32" and "no native bf16" in b.reason and "cached" in b.reason
    finally:
        monkeypatch.delenv("HFPTQ_FBGEMM")
        kernels.fbgemm_fp16_linear_available.cache_clear()
    # an explicit float32 request keeps F.linear on a float32 copy (bit-identical to the reference)
    f32 = FloatLinear.from_float(lin, torch.float16, compute_dtype="float32")
    with torch.no_grad():
        assert torch.equal(f32(x), F.linear(x, f32.weight.float(), f32.bias.float()))
    # an explicit bfloat16 request is honoured, with one warning
    fb = FloatLinear.from_float(lin, torch.float16, compute_dtype="bfloat16")
    with torch.no_grad(), pytest.warns(HfPtqPerformanceWarning, match="avx512_bf16"):
        fb(x)
    if torch.backends.mkldnn.is_available():
        _emulate(monkeypatch, "avx512-bf16")
        f2 = FloatLinear.from_float(lin, torch.float16)
        assert backends.module_backend(f2).name in ("bf16-prepacked", "bf16")


def test_fp16_probe_refuses_a_kernel_that_rounds_activations_to_float16(monkeypatch):
    """The FBGEMM fp16 probe checks float32 activations stay float32 (inputs beyond float16's range)."""
    prepack, op = kernels._fp16_ops()
    if prepack is None:
        pytest.skip("no FBGEMM fp16 ops in this build")
    monkeypatch.setattr(kernels, "_fp16_ops", lambda: (prepack, lambda x, packed: op(x.half().float(), packed)))
    kernels.fbgemm_fp16_linear_available.cache_clear()
    try:
        assert kernels.fbgemm_fp16_linear_available() is False
    finally:
        monkeypatch.undo()
        kernels.fbgemm_fp16_linear_available.cache_clear()


def test_weight_only_half_inputs_follow_native_bf16(monkeypatch):
    q = QuantLinear.from_float(nn.Linear(32, 16), W8, {"mode": "none"})
    x = torch.randn(3, 32).half()
    _emulate(monkeypatch, "avx2")
    assert q._compute_dtype(x) == torch.float32
    _emulate(monkeypatch, "avx512-bf16")
    assert q._compute_dtype(x) == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Visible choice: summary and describe_model
# ------------------------------------------------------------------------------------------------


def test_summary_says_which_backend_each_kind_uses_and_why(monkeypatch, load_tiny):
    import hfptq

    model = load_tiny("llama")
    hfptq.quantize_model(model, hfptq.HfPtqConfig(), progress=False)
    _emulate(monkeypatch, "avx2")
    with force_backend("float-exact"):
        text = hfptq.summary(model)
    assert text.startswith(hfptq.get_plan(model).summary())
    assert "backends on" in text and "HFPTQ_CPU_FEATURES=avx2" in text
    assert "W8A8 dynamic asym" in text and "float-exact - forced by force_backend" in text
    fp16_route = "fbgemm-fp16" if kernels.fbgemm_fp16_linear_available() else "float32"
    assert "float16 storage" in text and f"{fp16_route} - no native bf16" in text
    kinds = {e["kind"]: e for e in backends.describe_model(model)}
    plan = hfptq.get_plan(model)
    assert kinds["float16 storage"]["modules"] == plan.by_precision().get("fp16", 0)


def test_report_shows_the_backends_of_the_quantized_model(load_tiny):
    import hfptq
    from hfptq.evaluation.latency import measure_latency
    from hfptq.evaluation.report import QualityReport

    ref = load_tiny("llama")
    model = load_tiny("llama")
    hfptq.quantize_model(model, hfptq.HfPtqConfig(), progress=False)
    kw = dict(prompt_len=8, new_tokens=2, repeats=1, warmup=0)
    lf, lq = measure_latency(ref, **kw), measure_latency(model, **kw)
    assert "backends" not in lf
    assert lq["backends"] == backends.describe_model(model)
    assert lq["cpu_features"] == backends.cpu_features().describe()
    report = QualityReport(model_name="tiny-llama").set_latency(lf, lq)
    md = report.to_markdown()
    route = backends.w8a8_backend()
    assert f"| W8A8 dynamic asym | {len([e for e in hfptq.get_plan(model) if e.precision == 'int8'])} | {route.name} | {route.reason} |" in md
    assert f"W8A8 dynamic asym -> {route.name}" in report.console_summary()
    assert QualityReport.from_dict(report.to_dict()).to_markdown() == md


def test_route_reference_math_reproduces_every_route_on_a_model(load_tiny, tiny_input_ids):
    """``route_reference_math`` is the reference of what the fast path computes, on every runnable route
    (``reference_math`` alone is the 8-bit reference, which the 7-bit route differs from)."""
    import hfptq

    model = load_tiny("llama")
    hfptq.quantize_model(model, hfptq.HfPtqConfig(), progress=False)
    ids = tiny_input_ids("llama")
    for route in backends.W8A8_BACKENDS:
        if not _runnable(route):
            continue
        with torch.no_grad(), force_backend(route):
            fast = model(input_ids=ids).logits
            with backends.route_reference_math(model):
                ref = model(input_ids=ids).logits
            with reference_math():
                ref8 = model(input_ids=ids).logits
        assert torch.equal(fast, ref), route
        assert torch.equal(fast, ref8) == (route not in ("fbgemm-a7", "fbgemm-w7")), route
        # the 7-bit re-gridded weights made for the reference are dropped again
        assert not any("_hfptq_w7_weight" in m.__dict__ for m in model.modules()), route


@pytest.mark.parametrize("acts", ["dynamic-asym", "static-asym"])
def test_smoothed_dynamic_modules_take_7bit_activations_where_fbgemm_saturates(monkeypatch, acts):
    """SmoothQuant moves activation outliers into the weights, so on a saturating FBGEMM its modules take
    7-bit activations (``fbgemm-a7``) instead of 7-bit weights; static ones keep ``fbgemm-w7`` (their
    calibrated 8-bit grid cannot be halved), unsmoothed ones too, and forcing a route wins. Each is
    bit-identical to its route's reference."""
    _emulate(monkeypatch, "avx2")
    _saturating_fbgemm(monkeypatch)
    assert backends.w8a8_backend().name == "fbgemm-w7"
    plain, smoothed = _quant(acts), _quant(acts)
    smoothed.smoothed = True
    want = "fbgemm-a7" if acts.startswith("dynamic") else "fbgemm-w7"
    assert backends.module_backend(plain).name == "fbgemm-w7"
    assert backends.module_backend(smoothed).name == want
    if want == "fbgemm-a7":
        assert "SmoothQuant" in backends.module_backend(smoothed).reason
    x = _x(5, 96)
    for module in (plain, smoothed):
        route = backends.module_backend(module).name
        with torch.no_grad():
            fast = module(x)
        with torch.no_grad(), reference_math():
            assert torch.equal(fast, _reference_for(module, route)(x))
        model = nn.Sequential(module)
        with torch.no_grad(), backends.route_reference_math(model):
            assert torch.equal(model(x), fast)
    with force_backend("fbgemm-w7"):
        assert backends.module_backend(smoothed).name == "fbgemm-w7"
