"""GPTQ: exact grid, equivalence with RTN where the math says so, error reduction on correlated
inputs, act-order bookkeeping, and robustness to bad Hessians."""
from __future__ import annotations

import pytest
import torch

from hfptq.algorithms import validate_options
from hfptq.algorithms.gptq import GPTQResult, HessianAccumulator, gptq_quantize, rtn_quantize, weight_qparams
from hfptq.errors import CalibrationError, ConfigError
from hfptq.quant.linear import QuantLinear
from hfptq.quant.qparams import qrange

INT8 = {"bits": 8, "symmetric": True, "granularity": "channel", "group_size": None}
INT4_G = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 16}
INT4_G_ASYM = {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 16}


def _correlated(n=2048, d=64, seed=0, rank=16):
    """Inputs living near a rank-16 subspace, channels of different magnitude (like real activations)."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, rank, generator=gen) @ torch.randn(rank, d, generator=gen)
    return latent * torch.logspace(-0.5, 0.5, d) + 0.1 * torch.randn(n, d, generator=gen)


def _weight(out=48, d=64, seed=1):
    return torch.randn(out, d, generator=torch.Generator().manual_seed(seed))


def _hessian(x):
    acc = HessianAccumulator()
    acc("x", x)
    return acc.hessian("x")


def _output_error(x, w, q):
    return float((x @ (q - w).t()).pow(2).sum())


# ------------------------------------------------------------------ accumulator


def test_hessian_accumulator_equals_batch_formula():
    x = _correlated(300, 16)
    acc = HessianAccumulator()
    for batch, chunk in enumerate((x[:7], x[7:100].reshape(3, 31, 16), x[100:])):
        acc("fc", chunk, batch)
    expected = 2.0 / 300 * x.double().t() @ x.double()
    assert acc.counts["fc"] == 300
    # float32 sums of 300 products: relative error ~ 300 * 2**-24 of the largest entries
    torch.testing.assert_close(acc.hessian("fc").double(), expected, rtol=3e-5, atol=3e-5 * float(expected.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the Gram product stays float32 under autocast
        acc("fc", x[:1], 3)
    assert acc.sums["fc"].dtype == torch.float32
    with pytest.raises(CalibrationError, match="width"):
        acc("fc", torch.zeros(2, 5), 4)


# ------------------------------------------------------------------ grid and layout


@pytest.mark.parametrize("args", [INT8, INT4_G, INT4_G_ASYM, {**INT8, "granularity": "tensor"}])
@pytest.mark.parametrize("act_order", [False, True])
def test_result_lies_exactly_on_the_returned_grid(args, act_order):
    x = _correlated()
    w = _weight()
    res = gptq_quantize(w, _hessian(x), args, act_order=act_order, block_size=24)
    assert isinstance(res, GPTQResult)
    rows = 1 if args["granularity"] == "tensor" else w.shape[0]
    groups = w.shape[1] // args["group_size"] if args["granularity"] == "group" else 1
    assert res.scale.shape == (rows, groups)
    assert (res.zero_point is None) == args["symmetric"]
    # what QuantLinear stores from (weight, qparams) dequantizes back to exactly the GPTQ weight
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    q = QuantLinear.from_float(lin, args, {"mode": "none"}, weight=res.weight,
                               weight_qparams=(res.scale, res.zero_point))
    assert torch.equal(q.dequantized_weight(), res.weight)
    qmin, qmax = qrange(args["bits"], args["symmetric"])
    ints = q.int_weight()
    assert int(ints.min()) >= qmin and int(ints.max()) <= qmax


def test_identity_hessian_reduces_to_round_to_nearest():
    """With H = c*I no error is propagated (the off-diagonal of U is zero): GPTQ == RTN exactly."""
    w = _weight()
    h = 3.0 * torch.eye(64)
    for args in (INT8, INT4_G, INT4_G_ASYM):
        res = gptq_quantize(w, h, args, damp=0.0)
        rtn = rtn_quantize(w, args)
        torch.testing.assert_close(res.weight, rtn.weight, rtol=0, atol=0)
        torch.testing.assert_close(res.scale, rtn.scale, rtol=0, atol=0)


@pytest.mark.parametrize("args", [INT8, INT4_G, INT4_G_ASYM])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(args):
    x = _correlated()
    w = _weight()
    res = gptq_quantize(w, _hessian(x), args)
    rtn = rtn_quantize(w, args)
    gptq_err, rtn_err = _output_error(x, w, res.weight), _output_error(x, w, rtn.weight)
    # near-low-rank inputs leave GPTQ many directions to hide the rounding error in (it roughly halves
    # the error here); round-to-nearest is what GPTQ degenerates to when it cannot compensate at all
    assert gptq_err < 0.7 * rtn_err, (gptq_err, rtn_err)
    # the reported errors are the same quantities, normalised by tr(W H W^T)
    ref = float((x @ w.t()).pow(2).sum())
    assert res.info["error"] == pytest.approx(gptq_err / ref, rel=1e-3)
    assert res.info["rtn_error"] == pytest.approx(rtn_err / ref, rel=1e-3)
    assert res.info["error_reduction"] == pytest.approx(1 - gptq_err / rtn_err, rel=1e-3)


def _reference_obq(w, h, args, damp):
    """Textbook sequential GPTQ/OBQ in float64: quantize column i, spread its error with the inverse
    Hessian of the remaining columns, eliminate i from that inverse. No Cholesky, no blocks."""
    w = w.double().clone()
    h = h.double() + damp * torch.diagonal(h.double()).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    out = torch.zeros_like(w)
    bits, sym, gs = args["bits"], args["symmetric"], args.get("group_size")
    qmin, qmax = qrange(bits, sym)
    scale = zp = None
    for i in range(w.shape[1]):
        if scale is None or (args["granularity"] == "group" and i % gs == 0):
            span = w if args["granularity"] != "group" else w[:, i:i + gs]
            s, z = weight_qparams(span.float(), {**args, "granularity": "channel"})
            scale, zp = s[:, 0].double(), z[:, 0].double()
        q = (torch.clamp(torch.round(w[:, i] / scale) + zp, qmin, qmax) - zp) * scale
        out[:, i] = q
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return out.float()


@pytest.mark.parametrize("args,block_size", [(INT8, 16), (INT8, 40), (INT4_G_ASYM, 16), (INT4_G_ASYM, 24),
                                              (INT4_G_ASYM, 128)])
def test_matches_the_textbook_algorithm(args, block_size):
    """Also with blocks that do not align with the groups (24: groups straddle blocks and sub-blocks)."""
    x, w = _correlated(), _weight()
    h = _hessian(x).double()
    ours = gptq_quantize(w, h, args, damp=0.01, hessian_dtype="float64", block_size=block_size)
    ref = _reference_obq(w, h, args, 0.01)
    # same algorithm in a different (Cholesky, lazy-batch, float32-weight) form: the same grid points up to
    # float32 round-off of the group scales (a few ulps), except for rare rounding-boundary flips
    step = ours.scale.repeat_interleave(w.shape[1] // ours.scale.shape[1], dim=1)
    flips = (ours.weight - ref).abs() > 1e-4 * step
    assert float(flips.float().mean()) < 0.01
    assert _output_error(x, w, ours.weight) == pytest.approx(_output_error(x, w, ref), rel=0.02)


def test_block_size_does_not_change_the_result_much():
    """Lazy batch updates are an exact reordering of the same updates (up to float round-off)."""
    x, w = _correlated(), _weight()
    h = _hessian(x)
    a = gptq_quantize(w, h, INT8, block_size=64)
    b = gptq_quantize(w, h, INT8, block_size=8)
    # identical up to rare rounding-boundary flips
    assert float((a.weight != b.weight).float().mean()) < 0.01


def test_mse_observer_is_used_for_the_scales():
    x, w = _correlated(), _weight()
    w[:, 0] *= 20  # one outlier column: min/max scales are too coarse at 4 bits
    args = {**INT4_G, "observer": "mse"}
    res = gptq_quantize(w, _hessian(x), args)
    minmax_scale, _ = weight_qparams(w, INT4_G)
    assert float(res.scale[:, 0].mean()) < float(minmax_scale[:, 0].mean())  # clipped
    assert res.info["error"] < res.info["rtn_error"]


# ------------------------------------------------------------------ act-order


def test_act_order_static_groups_use_original_group_layout():
    """Act-order with groups: the scales are those of the contiguous groups of the original weight."""
    x, w = _correlated(), _weight()
    res = gptq_quantize(w, _hessian(x), INT4_G, act_order=True)
    assert res.info["static_groups"] is True
    expected, _ = weight_qparams(w, INT4_G)
    torch.testing.assert_close(res.scale, expected, rtol=0, atol=0)


def test_act_order_is_equivariant_to_input_permutation():
    x, w = _correlated(), _weight()
    h = _hessian(x)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    a = gptq_quantize(w, h, INT8, act_order=True)
    b = gptq_quantize(w[:, perm], h[perm][:, perm], INT8, act_order=True)
    torch.testing.assert_close(b.weight, a.weight[:, perm], rtol=0, atol=1e-6)


def test_act_order_with_sorted_hessian_equals_static_groups_in_order():
    x = _correlated()
    order = torch.argsort(torch.diagonal(_hessian(x)), descending=True)
    x = x[:, order]  # diagonal now already descending: act-order permutes nothing
    w = _weight()
    h = _hessian(x)
    a = gptq_quantize(w, h, INT4_G, act_order=True)
    b = gptq_quantize(w, h, INT4_G, act_order=False, static_groups=True)
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


# ------------------------------------------------------------------ robustness


def test_non_positive_definite_hessian_is_retried_with_more_damping():
    x = _correlated(8, 64)  # 8 tokens for 64 inputs: rank 8, singular
    h = _hessian(x)
    h -= 0.05 * float(torch.diagonal(h).mean()) * torch.eye(64)  # and slightly indefinite
    res = gptq_quantize(_weight(), h, INT8, damp=0.01)
    assert res.info["fallback"] is None
    assert res.info["damp_retries"] >= 1
    assert res.info["damp"] > 0.01 * float(torch.diagonal(h).mean())
    assert torch.isfinite(res.weight).all()


def test_hopeless_hessian_falls_back_to_rtn_without_raising():
    w = _weight()
    h = -torch.eye(64)  # negative definite: no dampening of a positive fraction can fix it
    res = gptq_quantize(w, h, INT4_G, max_damp_retries=2)
    assert "rounded to nearest" in res.info["fallback"]
    torch.testing.assert_close(res.weight, rtn_quantize(w, INT4_G).weight, rtol=0, atol=0)
    nan = torch.full((64, 64), float("nan"))
    res = gptq_quantize(w, nan, INT8)
    assert res.info["fallback"] == "non-finite Hessian" and torch.isfinite(res.weight).all()


def test_dead_inputs_are_decoupled_and_not_zeroed():
    x = _correlated()
    x[:, [3, 40]] = 0.0  # never active during calibration
    w = _weight()
    res = gptq_quantize(w, _hessian(x), INT8)
    assert res.info["dead_inputs"] == 2 and res.info["fallback"] is None
    rtn = rtn_quantize(w, INT8)
    # dead columns receive no error from the others and keep their (rounded) weights
    torch.testing.assert_close(res.weight[:, [3, 40]], rtn.weight[:, [3, 40]], rtol=0, atol=0)
    assert float(res.weight[:, [3, 40]].abs().sum()) > 0
    zero = gptq_quantize(w, torch.zeros(64, 64), INT8)  # everything dead: plain RTN, no crash
    torch.testing.assert_close(zero.weight, rtn.weight, rtol=0, atol=0)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="Did you mean 'damp'"):
        gptq_quantize(_weight(), torch.eye(64), INT8, dampening=0.1)
    with pytest.raises(ConfigError, match="damp"):
        validate_options("gptq", {"damp": -1})
    assert validate_options("gptq", None)["block_size"] == 128


# ------------------------------------------------------------------ float targets (GPTAQ-style)


def test_float_target_weight_is_the_weight_itself_without_drift():
    from hfptq.algorithms.gptq import float_target_weight

    x = _correlated()
    h = 2 / x.shape[0] * x.t() @ x
    w = _weight()
    w_star, info = float_target_weight(w, h, h.clone(), damp=0.01)
    torch.testing.assert_close(w_star, w, rtol=1e-4, atol=1e-4)
    assert info["shift"] < 1e-4 and info["fallback"] is None


def test_float_target_weight_is_the_least_squares_fit_of_the_float_output():
    from hfptq.algorithms.gptq import float_target_weight

    xf = _correlated(n=4096)
    gen = torch.Generator().manual_seed(5)
    xq = xf + 0.05 * torch.randn(xf.shape, generator=gen) * xf.std(0)  # the drifted input
    w = _weight()
    n = xf.shape[0]
    xq64, xf64 = xq.double(), xf.double()
    h, c = 2 / n * xq64.t() @ xq64, 2 / n * xq64.t() @ xf64  # float64: the check is of the algebra
    w_star, info = float_target_weight(w, h, c, damp=1e-9)
    exact = torch.linalg.lstsq(xq64, xf64 @ w.double().t()).solution.t().float()
    torch.testing.assert_close(w_star, exact, rtol=1e-3, atol=1e-4)
    h, c = h.float(), c.float()
    target = xf @ w.t()
    assert float((target - xq @ w_star.t()).norm()) < float((target - xq @ w.t()).norm())
    # rounding the corrected weight (what GPTQ is then handed) lands closer to the float output too
    res_plain = gptq_quantize(w, h, INT4_G)
    res_fit = gptq_quantize(w_star, h, INT4_G)
    assert float((target - xq @ res_fit.weight.t()).norm()) < float((target - xq @ res_plain.weight.t()).norm())
    # heavy regularisation pulls the fit back to the float weight
    far, _ = float_target_weight(w, h, c, damp=1e6)
    torch.testing.assert_close(far, w, rtol=1e-3, atol=1e-3)


def test_cross_accumulator_equals_batch_formula():
    from hfptq.calibration import CrossAccumulator

    xf = _correlated(n=300)
    xq = xf + 0.1 * torch.randn(xf.shape, generator=torch.Generator().manual_seed(2))
    acc = CrossAccumulator(["fc"], [{"fc": xf[:100]}, {"fc": xf[100:]}])
    acc("fc", xq[:100], 0)
    acc("fc", xq[100:], 1)
    acc("other", xq[:100], 0)  # not tracked
    torch.testing.assert_close(acc.cross("fc"), 2 / 300 * xq.t() @ xf, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="other"):
        acc.cross("other")
    # a module the float pass never saw (data-dependent routing) gets an error naming it and the fix
    from hfptq.errors import CalibrationError

    with pytest.raises(CalibrationError, match="'fc' ran in the quantized model but not in the float one.*"
                                               "float_targets=False"):
        CrossAccumulator(["fc"], [{}])("fc", xq[:10], 0)


def test_new_gptq_options_are_validated():
    assert validate_options("gptq", {"true_sequential": True})["float_targets"] is False
    # float targets are only consistent when each group's drift is measured after the earlier groups' correction
    assert validate_options("gptq", {"float_targets": True})["true_sequential"] is True
    from hfptq.errors import ConfigTypeError

    with pytest.raises(ConfigTypeError, match="gptq.float_targets must be a bool"):
        validate_options("gptq", {"float_targets": "yes"})
