"""Property-based tests of the quantization math in ``hfptq.quant.qparams``.

Float tolerance used throughout: quantization computes ``x / scale`` and ``scale * (q - z)`` in
float32, so a value within ``|x| * 2**-24`` of a rounding tie may round the other way and the
dequantized value carries a relative error of ``2**-24``. The bound ``|x - dq(q(x))| <= scale / 2``
therefore gets a slack of ``2**-20 * (|x| + scale * 2**bits)`` (a few ulps of the largest values
involved), which is orders of magnitude below ``scale / 2``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hfptq.quant.qparams import (
    SCALE_EPS,
    compute_qparams,
    dequantize,
    dequantize_weight,
    fake_quantize,
    pack_int4,
    qrange,
    quantize,
    quantize_per_token,
    quantize_weight,
    unpack_int4,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BITS = st.sampled_from([4, 8])
SYMMETRIC = st.booleans()
FINITE = st.floats(
    min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32
)


def vectors(min_size: int = 1, max_size: int = 64):
    return hnp.arrays(
        np.float32, st.integers(min_size, max_size), elements=FINITE
    ).map(torch.from_numpy)


@st.composite
def weights(draw, granularity: str):
    """A ``[out, in]`` weight plus the ``group_size`` for the granularity."""
    out_features = draw(st.integers(1, 6))
    if granularity == "group":
        group_size = draw(st.sampled_from([2, 4, 8, 16]))
        in_features = group_size * draw(st.integers(1, 4))
    else:
        group_size = None
        in_features = draw(st.integers(1, 24))
    w = draw(hnp.arrays(np.float32, (out_features, in_features), elements=FINITE))
    return torch.from_numpy(w), group_size


def slack(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return 2.0**-20 * (x.abs() + scale * 2**bits)


def expand_weight_scale(param: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[rows, n_groups]`` -> ``[out, in]`` (each granule's value on its elements)."""
    out_features, in_features = shape
    _, n_groups = param.shape
    full = param.repeat_interleave(in_features // n_groups, dim=1)
    return full.expand(out_features, in_features)


# ------------------------------------------------------------------------------ qrange / qparams


@pytest.mark.parametrize(
    "bits, symmetric, expected",
    [(8, True, (-127, 127)), (8, False, (-128, 127)), (4, True, (-7, 7)), (4, False, (-8, 7)),
     (7, True, (-63, 63)), (7, False, (-64, 63))],  # 7: activations of the fbgemm-a7 CPU route
)
def test_qrange_is_the_documented_grid(bits, symmetric, expected):
    assert qrange(bits, symmetric) == expected


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 16, -8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_unsupported_bits_raise(bits, symmetric):
    with pytest.raises(ValueError, match="bits"):
        qrange(bits, symmetric)
    with pytest.raises(ValueError, match="bits"):
        compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), bits, symmetric)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.ones(2, 4), bits=bits, symmetric=symmetric)


def test_compute_qparams_hand_computed_asymmetric():
    # [-1, 3] on 256 levels: scale = 4 / 255; zero point = round(-128 + 1 / scale) = round(-64.25).
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=False)
    assert float(scale) == pytest.approx(4.0 / 255.0, rel=1e-7)
    assert int(zp) == -64
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32


def test_compute_qparams_hand_computed_symmetric():
    scale, zp = compute_qparams(torch.tensor(-2.0), torch.tensor(0.5), 4, symmetric=True)
    assert float(scale) == pytest.approx(2.0 / 7.0, rel=1e-7)
    assert int(zp) == 0


@SETTINGS
@given(x=vectors(), bits=BITS, symmetric=SYMMETRIC)
def test_per_tensor_round_trip_within_half_step(x, bits, symmetric):
    scale, zp = compute_qparams(x.min(), x.max(), bits, symmetric)
    assert float(scale) > 0
    dq = dequantize(quantize(x, scale, zp, bits, symmetric), scale, zp)
    err = (x - dq).abs()
    assert torch.all(err <= scale / 2 + slack(x, scale, bits)), (err.max(), scale)


@SETTINGS
@given(x=vectors(min_size=2), bits=BITS, symmetric=SYMMETRIC)
def test_quantize_is_monotonic(x, bits, symmetric):
    scale, zp = compute_qparams(x.min(), x.max(), bits, symmetric)
    # Stretch beyond the range as well: clamping must keep the order.
    xs = torch.cat([x, 3 * x]).sort().values
    q = quantize(xs, scale, zp, bits, symmetric).to(torch.int32)
    assert torch.all(q[1:] >= q[:-1])


@SETTINGS
@given(x=vectors(), bits=BITS, symmetric=SYMMETRIC, stretch=st.floats(1.5, 1e3))
def test_no_overflow_and_clamping_outside_the_range(x, bits, symmetric, stretch):
    qmin, qmax = qrange(bits, symmetric)
    scale, zp = compute_qparams(x.min(), x.max(), bits, symmetric)
    wide = torch.cat([x, x * stretch, torch.tensor([1e30, -1e30])])
    q = quantize(wide, scale, zp, bits, symmetric)
    assert q.dtype == torch.int8
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    top = scale * (qmax - zp.float())  # largest representable value
    bottom = scale * (qmin - zp.float())
    assert torch.all(q[wide >= top] == qmax)
    assert torch.all(q[wide <= bottom] == qmin)


@SETTINGS
@given(
    lo=st.floats(-1e4, 0.0, allow_subnormal=False, width=32),
    hi=st.floats(0.0, 1e4, allow_subnormal=False, width=32),
    shift=st.floats(-1e4, 1e4, allow_subnormal=False, width=32),
    bits=BITS,
    symmetric=SYMMETRIC,
)
def test_zero_is_exactly_representable(lo, hi, shift, bits, symmetric):
    qmin, qmax = qrange(bits, symmetric)
    # Also ranges that exclude zero (all-positive / all-negative data): zero must still be exact.
    for a, b in ((lo, hi), (min(lo + shift, hi + shift), max(lo + shift, hi + shift))):
        scale, zp = compute_qparams(torch.tensor(a), torch.tensor(b), bits, symmetric)
        if symmetric:
            assert int(zp) == 0
        assert qmin <= int(zp) <= qmax
        zero = torch.zeros(3)
        back = dequantize(quantize(zero, scale, zp, bits, symmetric), scale, zp)
        assert torch.equal(back, zero)


def test_all_zero_input_gets_a_positive_scale():
    for symmetric in (True, False):
        scale, zp = compute_qparams(torch.tensor(0.0), torch.tensor(0.0), 8, symmetric)
        assert float(scale) >= SCALE_EPS > 0
        x = torch.zeros(4)
        assert torch.equal(fake_quantize(x, scale, zp, 8, symmetric), x)


@SETTINGS
@given(x=vectors(), bits=BITS, symmetric=SYMMETRIC)
def test_fake_quantize_matches_quantize_dequantize_and_keeps_dtype(x, bits, symmetric):
    scale, zp = compute_qparams(x.min(), x.max(), bits, symmetric)
    fq = fake_quantize(x, scale, zp, bits, symmetric)
    assert fq.dtype == x.dtype
    assert torch.equal(fq, dequantize(quantize(x, scale, zp, bits, symmetric), scale, zp))
    xb = x.to(torch.bfloat16)
    assert fake_quantize(xb, scale, zp, bits, symmetric).dtype == torch.bfloat16


# ------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@SETTINGS
@given(data=st.data(), bits=BITS, symmetric=SYMMETRIC)
def test_weight_round_trip_and_layout(granularity, data, bits, symmetric):
    w, group_size = data.draw(weights(granularity))
    qmin, qmax = qrange(bits, symmetric)
    q, scale, zp = quantize_weight(w, bits, symmetric, granularity, group_size)
    out_features, in_features = w.shape
    expected_layout = {
        "tensor": (1, 1),
        "channel": (out_features, 1),
        "group": (out_features, in_features // (group_size or 1)),
    }[granularity]
    assert q.shape == w.shape and q.dtype == torch.int8
    assert tuple(scale.shape) == expected_layout and scale.dtype == torch.float32
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    if symmetric:
        assert zp is None
    else:
        assert zp.dtype == torch.int8 and tuple(zp.shape) == expected_layout
        assert int(zp.min()) >= qmin and int(zp.max()) <= qmax
    dq = dequantize_weight(q, scale, zp)
    step = expand_weight_scale(scale, w.shape)
    assert torch.all((w - dq).abs() <= step / 2 + slack(w, step, bits))
    # A zero weight comes back as exactly zero whatever its granule's range.
    w0 = w.clone()
    w0[:, 0] = 0.0
    q0, s0, z0 = quantize_weight(w0, bits, symmetric, granularity, group_size)
    assert torch.all(dequantize_weight(q0, s0, z0)[:, 0] == 0.0)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@SETTINGS
@given(data=st.data(), bits=BITS, symmetric=SYMMETRIC)
def test_weight_quantization_equals_independent_per_granule_quantization(granularity, data, bits, symmetric):
    """Each granule (whole tensor / row / row-group) is quantized with its own min/max."""
    w, group_size = data.draw(weights(granularity))
    q, _, _ = quantize_weight(w, bits, symmetric, granularity, group_size)
    out_features, in_features = w.shape
    size = {"tensor": in_features * out_features, "channel": in_features, "group": group_size}[granularity]
    flat_w, flat_q = w.reshape(-1, size), q.reshape(-1, size)
    for granule, granule_q in zip(flat_w, flat_q):
        s, z = compute_qparams(granule.min(), granule.max(), bits, symmetric)
        assert torch.equal(quantize(granule, s, z, bits, symmetric), granule_q)


@pytest.mark.parametrize("granularity", ["channel", "group"])
@SETTINGS
@given(data=st.data(), bits=BITS, symmetric=SYMMETRIC)
def test_weight_quantization_is_monotonic_within_a_granule(granularity, data, bits, symmetric):
    w, group_size = data.draw(weights(granularity))
    size = w.shape[1] if granularity == "channel" else group_size
    sorted_w = w.reshape(-1, size).sort(dim=1).values.reshape(w.shape)
    q, _, _ = quantize_weight(sorted_w, bits, symmetric, granularity, group_size)
    qg = q.reshape(-1, size).to(torch.int32)
    assert torch.all(qg[:, 1:] >= qg[:, :-1])


def test_weight_with_explicit_qparams_is_used_as_given():
    w = torch.tensor([[0.5, -1.0, 2.0, 10.0]])
    scale = torch.tensor([[0.5]])
    q, s, z = quantize_weight(w, 8, True, "channel", scale=scale)
    assert torch.equal(s, scale) and z is None
    assert q.tolist() == [[1, -2, 4, 20]]


@pytest.mark.parametrize("in_features, group_size", [(10, 4), (6, 4), (8, 3), (8, None), (8, 0)])
def test_group_size_not_dividing_in_features_raises(in_features, group_size):
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(torch.randn(3, in_features), 4, True, "group", group_size)


def test_unknown_granularity_and_non_2d_weights_raise():
    with pytest.raises(ValueError, match="granularity"):
        quantize_weight(torch.randn(3, 4), 8, True, "row")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(3, 4, 2), 8, True, "channel")


# ------------------------------------------------------------------------------ per-token


@SETTINGS
@given(
    x=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 16)),
        elements=FINITE,
    ).map(torch.from_numpy),
    bits=BITS,
    symmetric=SYMMETRIC,
)
def test_per_token_round_trip(x, bits, symmetric):
    qmin, qmax = qrange(bits, symmetric)
    q, scale, zp = quantize_per_token(x, bits, symmetric)
    assert q.shape == x.shape and q.dtype == torch.int8
    assert scale.shape == (*x.shape[:-1], 1) and scale.dtype == torch.float32
    assert bool((scale > 0).all())
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    if symmetric:
        assert zp is None
    else:
        assert zp.shape == scale.shape
    dq = dequantize(q, scale, zp)
    assert torch.all((x - dq).abs() <= scale / 2 + slack(x, scale, bits))
    # Each token's scale depends on that token only.
    q_first, s_first, _ = quantize_per_token(x[..., :1, :], bits, symmetric)
    assert torch.equal(s_first, scale[..., :1, :]) and torch.equal(q_first, q[..., :1, :])


# ------------------------------------------------------------------------------ int4 packing


@SETTINGS
@given(
    q=hnp.arrays(
        np.int8,
        st.tuples(st.integers(1, 4), st.integers(1, 16)).map(lambda s: (s[0], 2 * s[1])),
        elements=st.integers(-8, 7),
    ).map(torch.from_numpy)
)
def test_pack_unpack_int4_is_an_exact_inverse(q):
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*q.shape[:-1], q.shape[-1] // 2)
    out = unpack_int4(packed)
    assert out.dtype == torch.int8 and torch.equal(out, q)


@SETTINGS
@given(
    p=hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 8)), elements=st.integers(0, 255)).map(
        torch.from_numpy
    )
)
def test_unpack_then_pack_is_identity_on_bytes(p):
    assert torch.equal(pack_int4(unpack_int4(p)), p)


def test_pack_int4_layout_low_nibble_first():
    q = torch.tensor([[1, 2, -1, 7, -8, -8]], dtype=torch.int8)
    # 1 | 2 << 4 = 0x21; 0xF | 7 << 4 = 0x7F; 0x8 | 0x8 << 4 = 0x88
    assert pack_int4(q).tolist() == [[0x21, 0x7F, 0x88]]


def test_pack_int4_rejects_odd_length():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@SETTINGS
@given(data=st.data(), symmetric=SYMMETRIC)
def test_int4_weight_survives_packing(data, symmetric):
    w, group_size = data.draw(weights("group"))
    assume(w.shape[1] % 2 == 0)
    q, scale, zp = quantize_weight(w, 4, symmetric, "group", group_size)
    restored = unpack_int4(pack_int4(q))
    assert torch.equal(dequantize_weight(restored, scale, zp), dequantize_weight(q, scale, zp))
