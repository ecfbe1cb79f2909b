"""Online Hadamard rotation of a W8A8 input (``activations.rotation``): exact in float, lower INT8 error on
outlier channels, observed rotated by calibration, kept by save/reload, undone by dequantize()."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hfptq
from hfptq import HfPtqConfig, resolve_plan
from hfptq.errors import ConfigError, PlanError
from hfptq.quant.linear import QuantLinear
from hfptq.quant.rotation import fold_input_rotations, hadamard, rotate, undo_input_rotations

from .conftest import tiny_model

DOWN_ROTATED = [{"targets": ["down_proj"], "precision": "int8", "activations": {"mode": "dynamic", "rotation": 32}}]


def _rotated_quant_linear(lin, block, weight_args, act_args):
    """``lin`` as a QuantLinear whose weight is stored as ``W H`` and whose input is rotated (``block`` 0: plain)."""
    src = copy.deepcopy(lin)
    if block:
        src.weight.data = rotate(src.weight.data, block)
    return QuantLinear.from_float(src, weight_args=weight_args, act_args={**act_args, "rotation": block})


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=b).logits for b in batches])


def test_hadamard_is_orthogonal_symmetric_and_rotation_is_an_involution():
    for n in (2, 16, 128):
        h = hadamard(n).double()
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-6)
        torch.testing.assert_close(h, h.T)
    x = torch.randn(4, 3, 256, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rotate(rotate(x, 64), 64), x, rtol=0, atol=1e-5)
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rotate(x, 64) @ rotate(w, 64).T, x @ w.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="blocks of 64"):
        rotate(torch.randn(2, 96), 64)


@pytest.mark.parametrize("block", [256, 2048])
def test_large_blocks_apply_the_full_hadamard_matrix(block):
    """Blocks above DENSE_BLOCK run as H_a (x) H_128 (two small matmuls); the result is x @ H_block itself."""
    from hfptq.quant.rotation import DENSE_BLOCK

    assert block > DENSE_BLOCK
    x = torch.randn(2, 5, 2 * block, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dense = hadamard(block, torch.float64)
    expected = (x.reshape(2, 5, 2, block) @ dense).reshape(x.shape)
    torch.testing.assert_close(rotate(x, block), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate(rotate(x, block), block), x, rtol=0, atol=1e-12)
    # float32 input keeps float32 and stays within float32 rounding of the exact product
    x32 = x.float()
    out = rotate(x32, block)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


def test_rotation_lowers_the_int8_error_of_outlier_channels():
    """Per-token INT8 of an input whose channel 3 is 50x the rest: the outlier sets every token's step. Rotated
    in blocks of 64, its energy is spread over 64 channels, so each token's max (hence step) drops from ~50 sigma
    to ~50/8 + 3 sigma: the activation rounding error (measured against the module's own int8 weight, so the
    weight rounding is left out) drops by the square of that, far more than 10x."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen)
    x[:, 3] *= 50.0
    lin = nn.Linear(256, 32, bias=False)
    nn.init.normal_(lin.weight, generator=gen)
    errors = {}
    with torch.no_grad():
        for block in (0, 64):
            q = _rotated_quant_linear(lin, block, {"bits": 8, "symmetric": True, "granularity": "channel"},
                                      {"mode": "dynamic", "symmetric": False})
            ref = (rotate(x, block) if block else x) @ q.dequantized_weight().T
            errors[block] = float((q(x) - ref).pow(2).mean() / ref.pow(2).mean())
    assert errors[64] < errors[0] / 10, errors


def test_quantize_model_rotates_down_proj_and_roundtrips(token_batches, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    ref = _logits(model, token_batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = hfptq.quantize_model(copy.deepcopy(model), HfPtqConfig(), progress=False)
    q = hfptq.quantize_model(copy.deepcopy(model), HfPtqConfig(rules=DOWN_ROTATED), progress=False)
    down = q.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.input_rotation == 32
    assert "rotated" in q.hfptq_plan["model.layers.0.mlp.down_proj"].describe()
    assert q.model.layers[0].mlp.up_proj.input_rotation == 0
    assert not down._forward_pre_hooks  # the float module's hook went with it
    got = _logits(q, token_batches)
    # the same W8A8 plan within the same order of error as without rotation (exact float equivalence is
    # checked above; the tiny random model has no outliers for rotation to remove)
    assert float((got - ref).abs().max()) < 4 * float((_logits(plain, token_batches) - ref).abs().max()) + 1e-3
    q.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert again.model.layers[0].mlp.down_proj.input_rotation == 32
    assert torch.equal(_logits(again, token_batches), got)
    # dequantize() undoes the fold: the float weight is W again (within the int8 step), not W H
    plain_model = again.dequantize()
    w = plain_model.model.layers[0].mlp.down_proj.weight.detach()
    w0 = before["model.layers.0.mlp.down_proj.weight"]
    step = w0.abs().amax(1, keepdim=True) / 127
    assert float(((w - w0).abs() / step).max()) < 8  # a rotated-back int8 error, not a scrambled weight
    # (each element of e H sums 32 rounding errors e_k / sqrt(32): at most sqrt(32) / 2 of the rotated step)
    assert float((_logits(plain_model, token_batches) - ref).abs().max()) < 2 * float((got - ref).abs().max()) + 1e-3


def test_static_calibration_observes_the_rotated_input(token_batches):
    """Static min/max down_proj with rotation: the frozen scale is max|x H| / 127 of the calibration data."""
    model = tiny_model("llama")
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))
    seen = []
    float_copy = copy.deepcopy(model)
    float_copy.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        float_copy(input_ids=calib)
    expected = float(rotate(torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]), 32).abs().max()) / 127
    rules = [{"targets": ["down_proj"], "precision": "int8",
              "activations": {"mode": "static", "observer": "minmax", "rotation": 32}}]
    config = HfPtqConfig(activations="dynamic", rules=rules, calibration={"dataset": "wikitext", "dtype": "model"})  # float32 forwards
    q = hfptq.quantize_model(copy.deepcopy(model), config, calibration_data=calib, progress=False)
    assert float(q.model.layers[0].mlp.down_proj.input_scale) == pytest.approx(expected, rel=1e-5)


def test_rotation_errors_name_the_field_and_fix():
    with pytest.raises(ConfigError, match="power of two"):
        HfPtqConfig(rules=[{"targets": ["down_proj"], "precision": "int8", "activations": {"mode": "dynamic",
                                                                                             "rotation": 48}}])
    with pytest.raises(ConfigError, match="power of two"):
        HfPtqConfig(activations={"mode": "none", "rotation": 24})  # weight-only is validated the same way
    model = tiny_model("llama")  # intermediate 128: a 256 block does not divide it
    with pytest.raises(PlanError, match="does not divide"):
        resolve_plan(model, HfPtqConfig(rules=[{"targets": ["down_proj"], "precision": "int8",
                                                "activations": {"mode": "dynamic", "rotation": 256}}]))
    tied = tiny_model("gemma3_text")  # tied LM head: its int8 rows are the embedding's
    before = {n: p.detach().clone() for n, p in tied.named_parameters()}
    config = HfPtqConfig(rules=[{"targets": ["kind:lm_head"], "precision": "int8",
                                 "activations": {"mode": "dynamic", "rotation": 32}}] + DOWN_ROTATED)
    with pytest.raises(ConfigError, match="tied input embedding"):
        hfptq.quantize_model(tied, config, progress=False)
    for n, p in tied.named_parameters():  # nothing half-applied
        assert torch.equal(p, before[n]), n


def test_fold_is_exact_in_float_and_undo_restores(token_batches):
    model = tiny_model("llama")
    ref = _logits(model, token_batches)
    w0 = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    done = fold_input_rotations(model, resolve_plan(model, HfPtqConfig(rules=DOWN_ROTATED)))
    assert len(done) == 2
    torch.testing.assert_close(_logits(model, token_batches), ref, rtol=1e-4, atol=1e-4)
    undo_input_rotations(done)
    assert not model.model.layers[1].mlp.down_proj._forward_pre_hooks
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, w0)


def test_smoothquant_leaves_rotated_consumers_alone(token_batches):
    model = tiny_model("llama")
    config = HfPtqConfig(rules=DOWN_ROTATED, smoothquant={"alpha": 0.5})
    q = hfptq.quantize_model(copy.deepcopy(model), config, calibration_data=torch.cat(token_batches),
                             progress=False)
    records = [g for layer in q.hfptq_calibration["smoothquant"].values() for g in layer.get("groups", [])]
    down = [g for g in records if g["group"] == "down"]
    assert down and all(g["status"] == "skipped" and "rotated" in g["reason"] for g in down)
    assert any(g["status"] == "smoothed" for g in records if g["group"] == "gate_up")


def test_weight_only_rotation_lowers_the_int4_group_error_of_outlier_columns():
    """INT4 groups of 64 on a weight whose input channel 5 is 30x the rest: that column sets the step of every
    row's group, so the other 63 columns round to a few levels. Rotated in blocks of 64 (the weight is stored as
    W H, the input rotated at run time), the column's energy is spread over the group and the output error of the
    weight-only linear (activations not quantized) drops several-fold."""
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(128, 48, bias=False)
    nn.init.normal_(lin.weight, generator=gen)
    with torch.no_grad():
        lin.weight[:, 5] *= 30.0
    x = torch.randn(256, 128, generator=gen)
    ref = lin(x).detach()
    errors = {}
    with torch.no_grad():
        for block in (0, 64):
            q = _rotated_quant_linear(lin, block, {"bits": 4, "symmetric": False, "granularity": "group",
                                                   "group_size": 64}, {"mode": "none"})
            assert q.input_rotation == block
            errors[block] = float((q(x) - ref).pow(2).mean() / ref.pow(2).mean())
    assert errors[64] < errors[0] / 4, errors


def test_weight_only_int4_rotation_through_the_plan_saves_and_reloads(token_batches, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    ref = _logits(model, token_batches)
    rules = [{"targets": ["kind:attention", "kind:ffn"], "precision": "int4",
              "weights": {"granularity": "group", "group_size": 32, "symmetric": False},
              "activations": {"mode": "none", "rotation": 32}}]
    config = HfPtqConfig(activations="none", rules=rules, smoothquant={"alpha": "search"},
                         calibration={"dataset": "unused", "num_samples": 2})
    q = hfptq.quantize_model(copy.deepcopy(model), config, calibration_data=torch.cat(token_batches),
                             progress=False)
    down = q.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.act_mode == "none" and down.input_rotation == 32
    assert down.weight_bits == 4
    assert "weight-only" in q.hfptq_plan["model.layers.0.mlp.down_proj"].describe()
    assert "rotated in blocks of 32" in q.hfptq_plan["model.layers.0.mlp.down_proj"].describe()
    # activation-aware scaling would fold a per-channel factor through the rotation: it skips rotated consumers
    records = [g for layer in q.hfptq_calibration["smoothquant"].values() for g in layer.get("groups", [])]
    assert records and all(g["status"] == "skipped" and "rotated" in g["reason"] for g in records
                           if g["group"] in ("qkv", "gate_up", "down"))
    got = _logits(q, token_batches)
    assert torch.isfinite(got).all()
    # random weights have no outliers, so the rotated INT4 plan errs about as much as the unrotated one; dropping
    # the run-time rotation of one module's input (its stored weight is W H) breaks the function
    plain_rules = [{**rules[0], "activations": "none"}]
    unrot = hfptq.quantize_model(copy.deepcopy(model), HfPtqConfig(activations="none", rules=plain_rules),
                                 progress=False)
    err = float((got - ref).pow(2).mean() / ref.pow(2).mean())
    err_plain = float((_logits(unrot, token_batches) - ref).pow(2).mean() / ref.pow(2).mean())
    down.input_rotation = 0
    broken = float((_logits(q, token_batches) - ref).pow(2).mean() / ref.pow(2).mean())
    down.input_rotation = 32
    assert err < 2 * err_plain and broken > 4 * err, (err, err_plain, broken)
    q.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert back.model.layers[0].mlp.down_proj.input_rotation == 32
    assert torch.equal(_logits(back, token_batches), got)
    # dequantize() rotates the weight back (W H H = W): a float model with no hooks computing the same function
    plain = back.dequantize()
    assert not plain.model.layers[0].mlp.down_proj._forward_pre_hooks
    torch.testing.assert_close(_logits(plain, token_batches), got, rtol=1e-4, atol=1e-4)
