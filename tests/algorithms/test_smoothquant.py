"""SmoothQuant: the float model must be unchanged by smoothing (every architecture in the table),
only W8A8 groups are touched, and smoothing lowers the W8A8 error when activations have outliers."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hfptq import HfPtqConfig, resolve_plan
from hfptq.algorithms import validate_options
from hfptq.algorithms.base import ChannelAbsMax
from hfptq.algorithms.smoothquant import (
    SMOOTH_TABLE,
    InputSampler,
    groups_for,
    smooth_layer,
    smoothing_scales,
    summarize,
)
from hfptq.architectures import find_decoder_layers
from hfptq.quant.linear import QuantLinear
from hfptq.quant.qparams import dequantize_weight, quantize_weight
from hfptq.errors import ConfigError, ConfigTypeError

from .conftest import ARCHS, tiny_model

ALL_W8A8 = dict(scheme={"attention": "int8", "ffn": "int8", "lm_head": "skip"})


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(input_ids=b).logits for b in batches])


@torch.no_grad()
def collect_activation_stats(model, names, batches, sample_rows=0):
    """Per-channel max |x| (and up to ``sample_rows`` sample rows) of the inputs of ``names`` in the
    float model, from whole-model forwards (the calibration engine collects them layer by layer)."""
    absmax, sampler = ChannelAbsMax(names), InputSampler(sample_rows) if sample_rows else None
    hooks = [absmax] + ([sampler] if sampler else [])

    def feed(name, x):
        for hook in hooks:
            hook(name, x.reshape(-1, x.shape[-1]), 0)

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, args, _n=n: feed(_n, args[0]))
               for n in names]
    try:
        for batch in batches:
            model(input_ids=batch if batch.dim() == 2 else batch.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return absmax.values, (sampler.samples() if sampler else {})


def smooth_model(model, plan, absmax, options, inputs=None):
    """:func:`smooth_layer` on every decoder layer of ``model`` in place, statistics given."""
    name, layers = find_decoder_layers(model)
    records = [smooth_layer(layer, f"{name}.{i}", plan, absmax, options, model.config, inputs=inputs)
               for i, layer in enumerate(layers)]
    return summarize(records, validate_options("smoothquant", options))


def _stats(model, plan, batches, rows=0):
    return collect_activation_stats(model, [e.name for e in plan if e.kind != "embedding"], batches, sample_rows=rows)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ table


def test_table_names_the_norm_that_really_feeds_each_mlp():
    assert groups_for("gemma3_text")[1].prev == "pre_feedforward_layernorm"
    assert groups_for("gemma2")[1].prev == "pre_feedforward_layernorm"
    assert groups_for("gemma")[1].prev == "post_attention_layernorm"  # Gemma 1 has no pre_feedforward norm
    assert groups_for("llama")[1].prev == "post_attention_layernorm"
    assert all(g.norm_offset == 1.0 for g in groups_for("gemma3_text")[:2])
    assert all(g.norm_offset == 0.0 for g in groups_for("qwen3")[:2])
    assert groups_for("phi3")[2].prev_rows == "second_half"
    assert [g.name for g in groups_for("llama", {"groups": ["down"]})] == ["down"]
    with pytest.raises(ConfigError, match="groups"):
        groups_for("llama", {"groups": ["mlp"]})


def test_smoothing_scales_formula():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(32, generator=gen) * 10 + 0.1
    w = torch.rand(32, generator=gen) + 0.01
    for alpha in (0.0, 0.3, 0.5, 1.0):
        expected = a**alpha / w ** (1 - alpha)
        torch.testing.assert_close(smoothing_scales(a, w, alpha), expected.clamp(1e-5, 1e5))
    a[0] = 0.0
    w[1] = 0.0
    s = smoothing_scales(a, w, 0.5, min_scale=0.5, max_scale=2.0)
    assert s[0] == 1.0 and s[1] == 1.0  # dead channels are left alone
    assert float(s.min()) >= 0.5 and float(s.max()) <= 2.0


# ------------------------------------------------------------------ float equivalence


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothing_leaves_the_float_model_unchanged(arch, token_batches):
    model = tiny_model(arch)
    plan = resolve_plan(model, HfPtqConfig(**ALL_W8A8))
    before = _logits(model, token_batches)
    absmax, _ = _stats(model, plan, token_batches)
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = smooth_model(model, plan, absmax, {"alpha": 0.5})
    n_layers = len(find_decoder_layers(model)[1])
    assert info["groups_smoothed"] == len(SMOOTH_TABLE[arch]) * n_layers, info
    # the weights really moved (a no-op would pass the equivalence check trivially)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights_before[n])]
    assert any("norm" in n for n in changed) and any("down_proj" in n for n in changed)
    assert max(g["scale_max"] for layer in info["layers"] for g in layer["groups"]) > 2.0
    after = _logits(model, token_batches)
    # float32 round-off of the folded products only: a few ulps of the logit scale
    assert _rel(after, before) < 1e-4


def test_smoothing_the_wrong_gemma3_norm_breaks_the_model(token_batches):
    """The llm-compressor Gemma 3 recipe smooths post_attention_layernorm into the MLP; it is applied to
    the attention *output*, so the fold changes the function. The equivalence check above catches it."""
    model = tiny_model("gemma3_text")
    plan = resolve_plan(model, HfPtqConfig(**ALL_W8A8))
    before = _logits(model, token_batches)
    absmax, _ = _stats(model, plan, token_batches)
    wrong = [{"name": "gate_up", "prev": "post_attention_layernorm", "consumers": ["mlp.gate_proj", "mlp.up_proj"],
              "norm_offset": 1.0}]
    info = smooth_model(model, plan, absmax, {"alpha": 0.5, "table": wrong})
    assert info["groups_smoothed"] == 2
    assert _rel(_logits(model, token_batches), before) > 1e-2


def test_wrong_norm_convention_in_the_table_is_detected_and_corrected(token_batches):
    model = tiny_model("gemma3_text")
    plan = resolve_plan(model, HfPtqConfig(**ALL_W8A8))
    before = _logits(model, token_batches)
    absmax, _ = _stats(model, plan, token_batches)
    table = [{"name": "qkv", "prev": "input_layernorm",
              "consumers": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "norm_offset": 0.0}]
    info = smooth_model(model, plan, absmax, {"alpha": 0.5, "table": table})
    assert all(g["folded_into"] == "norm (1 + w)" for layer in info["layers"] for g in layer["groups"])
    assert _rel(_logits(model, token_batches), before) < 1e-4


def test_layernorm_with_bias_and_custom_table():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.a = nn.Linear(16, 8)
            self.b = nn.Linear(16, 4)

        def forward(self, x):
            h = self.norm(x)
            return torch.cat([self.a(h), self.b(h)], dim=-1)

    torch.manual_seed(0)
    block = Block()
    with torch.no_grad():
        block.norm.weight.copy_(torch.rand(16) + 0.5)
        block.norm.bias.copy_(torch.randn(16))
        block.norm.weight[2] *= 40
    x = torch.randn(32, 16)
    before = block(x)
    entry = SimpleNamespace(quantized=True, activations={"mode": "dynamic"}, weights={"bits": 8})
    plan = {"blk.a": entry, "blk.b": entry}
    h = block.norm(x)
    absmax = {"blk.a": h.abs().amax(0), "blk.b": h.abs().amax(0)}
    table = [{"name": "ln", "prev": "norm", "consumers": ["a", "b"]}]
    rec = smooth_layer(block, "blk", plan, absmax, {"alpha": 0.5, "table": table}, SimpleNamespace(model_type="x"))
    group = rec["groups"][0]
    assert group["status"] == "smoothed" and group["folded_into"] == "norm (w)"
    assert group["act_range_after"] < group["act_range_before"]
    torch.testing.assert_close(block(x), before, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ which groups


def test_only_groups_with_w8a8_consumers_are_smoothed(token_batches):
    model = tiny_model("llama")
    plan = resolve_plan(model, HfPtqConfig())  # attention FP16, FFN W8A8
    absmax, _ = _stats(model, plan, token_batches)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    info = smooth_model(model, plan, absmax, {"alpha": 0.5})
    by_group = {(layer["layer"], g["group"]): g for layer in info["layers"] for g in layer["groups"]}
    assert by_group[("model.layers.0", "qkv")]["status"] == "skipped"
    assert "no consumer is quantized" in by_group[("model.layers.0", "qkv")]["reason"]
    assert by_group[("model.layers.0", "gate_up")]["status"] == "smoothed"
    assert by_group[("model.layers.0", "down")]["status"] == "smoothed"
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)

    weight_only = tiny_model("llama")
    plan = resolve_plan(weight_only, HfPtqConfig(activations="none", **ALL_W8A8))
    info = smooth_model(weight_only, plan, absmax, {"alpha": 0.5})
    assert info["groups_smoothed"] == 0
    reasons = {g["reason"] for layer in info["layers"] for g in layer["groups"]}
    assert all("alpha='search'" in r for r in reasons)  # weight-only groups: activation-aware scaling needs the search


INT4_G = {"granularity": "group", "group_size": 16, "symmetric": False}


def test_activation_aware_scaling_of_weight_only_groups(token_batches):
    """INT4 weight-only groups: s = mean|x|**alpha searched against the simulated output error; the float
    model is unchanged by the fold and the chosen error is never above "no scaling"."""
    model = tiny_model("llama", outlier=30.0)
    config = HfPtqConfig(activations="none", scheme={"attention": "int4", "ffn": "int4", "lm_head": "skip"},
                         rules=[{"targets": ["kind:attention", "kind:ffn"], "precision": "int4", "weights": INT4_G}])
    plan = resolve_plan(model, config)
    before = _logits(model, token_batches)
    absmax, samples = _stats(model, plan, token_batches, rows=64)
    info = smooth_model(model, plan, absmax, {"alpha": "search", "weight_only_grid": [0.25, 0.5, 0.75]},
                        inputs=samples)
    groups = [g for layer in info["layers"] for g in layer["groups"]]
    assert groups and all(g.get("method") == "activation-aware (weight-only)" for g in groups)
    for g in groups:
        assert set(g["error"]) == {"none", "0.25", "0.5", "0.75"}
        assert g["error_chosen"] == min(g["error"].values())
    assert info["groups_smoothed"] >= 1  # 30x outlier channels: protecting them must pay somewhere
    assert info["search_error_chosen"] < info["search_error_unsmoothed"]
    assert _rel(_logits(model, token_batches), before) < 1e-4

    off = tiny_model("llama", outlier=30.0)
    info = smooth_model(off, plan, absmax, {"alpha": "search", "weight_only": False}, inputs=samples)
    assert info["groups_smoothed"] == 0


def test_activation_aware_scales_formula():
    from hfptq.algorithms.smoothquant import activation_aware_scales

    a = torch.tensor([9.0, 1.0, 4.0, 0.0])
    s = activation_aware_scales(a, 0.5)
    v = torch.tensor([3.0, 1.0, 2.0])
    torch.testing.assert_close(s[:3], v / (3.0 * 1.0) ** 0.5)
    assert s[3] == 1.0  # dead channel untouched
    assert torch.equal(activation_aware_scales(a, 0.0)[:3], torch.ones(3))  # alpha 0: no scaling


def test_unknown_architecture_is_reported_not_guessed():
    layer = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    info = smooth_layer(layer, "x", None, {}, {}, SimpleNamespace(model_type="mamba"))
    assert info["groups"] == [] and "no SmoothQuant table" in info["skipped"]


# ------------------------------------------------------------------ it helps W8A8


def _w8a8_errors(model, plan, batches, prefix="model.layers.0."):
    """Relative output error of each module of one layer under its planned W8A8 (fake) quantization,
    on its real inputs."""
    names = [e.name for e in plan if e.kind != "embedding" and e.name.startswith(prefix)]
    _, samples = collect_activation_stats(model, names, batches, sample_rows=100_000)
    errors = {}
    for name in names:
        module, x = model.get_submodule(name), samples[name]
        with torch.no_grad():
            y = x @ module.weight.t()
            q = QuantLinear.from_float(module, plan[name].weights, plan[name].activations, fake=True)
            errors[name.rsplit(".", 1)[1]] = float((q(x) - y).pow(2).sum() / y.pow(2).sum())
    return errors


def test_smoothing_lowers_per_token_w8a8_error_under_outliers(token_batches):
    model = tiny_model("llama", outlier=100.0)
    plan = resolve_plan(model, HfPtqConfig(**ALL_W8A8))
    before = _w8a8_errors(model, plan, token_batches)
    absmax, _ = _stats(model, plan, token_batches)
    smooth_model(model, plan, absmax, {"alpha": 0.5})
    after = _w8a8_errors(model, plan, token_batches)
    # ~100x outlier channels set every token's quantization step; alpha=0.5 shrinks them ~10x while the
    # weights' ranges grow only ~sqrt as much: every smoothed consumer's error drops severalfold (measured 4-10x)
    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"):
        assert after[name] < 0.5 * before[name], (name, before[name], after[name])
    assert after["o_proj"] == pytest.approx(before["o_proj"], rel=1e-5)  # no smoothing site: untouched


def test_alpha_search_picks_the_grid_minimum(token_batches):
    model = tiny_model("qwen3", outlier=50.0)
    plan = resolve_plan(model, HfPtqConfig(**ALL_W8A8))
    before = _logits(model, token_batches)
    absmax, samples = _stats(model, plan, token_batches, rows=48)
    info = smooth_model(model, plan, absmax, {"alpha": "search", "alpha_grid": [0.2, 0.5, 0.8]}, inputs=samples)
    groups = [g for layer in info["layers"] for g in layer["groups"]]
    assert groups and all("error" in g for g in groups)
    for g in groups:
        assert set(g["error"]) == {"none", "0.2", "0.5", "0.8"}
        assert g["error_chosen"] == min(g["error"].values())
        if g["status"] == "smoothed":
            assert g["alpha"] in (0.2, 0.5, 0.8)
        else:
            assert g["alpha"] is None and g["error_chosen"] == g["error"]["none"]
    assert info["groups_smoothed"] >= 1  # with 50x outliers smoothing must beat "none" somewhere
    assert info["search_error_chosen"] <= info["search_error_unsmoothed"]
    assert _rel(_logits(model, token_batches), before) < 1e-4


def test_static_search_simulates_the_modules_observer(token_batches):
    """Static consumers: the search scores the range their own observer (here percentile 99) picks on the
    sample rows, not the raw maximum of the statistics."""
    from hfptq.calibration import observer_settings
    from hfptq.quant.observers import make_observer
    from hfptq.quant.qparams import dequantize, quantize

    model = tiny_model("llama", outlier=30.0)
    config = HfPtqConfig(activations="static", **ALL_W8A8,
                         calibration={"dataset": "wikitext", "observer": "percentile", "percentile": 99.0})
    plan = resolve_plan(model, config)
    absmax, samples = _stats(model, plan, token_batches, rows=64)
    prefix = "model.layers.0."
    observers = {e.name: observer_settings(e, config) for e in plan if e.name.startswith(prefix)}
    assert {o["observer"] for o in observers.values()} == {"percentile"}
    layer = model.model.layers[0]
    opts = {"alpha": "search", "groups": ["gate_up"]}
    clipped = smooth_layer(copy.deepcopy(layer), "model.layers.0", plan, absmax, opts, model.config,
                           inputs=samples, observers=observers)["groups"][0]
    raw = smooth_layer(copy.deepcopy(layer), "model.layers.0", plan, absmax, opts, model.config,
                       inputs=samples)["groups"][0]

    # "no smoothing" scored by hand with the percentile observer on the same rows
    x = samples[prefix + "mlp.gate_proj"].float()
    settings = observers[prefix + "mlp.gate_proj"]
    obs = make_observer("percentile", **{k: v for k, v in settings.items() if k != "observer"})
    obs.observe(x)
    scale, zp = obs.compute_qparams()
    xq = dequantize(quantize(x, scale, zp, 8, True), scale, zp)
    expected = 0.0
    for name in ("gate_proj", "up_proj"):
        w = getattr(layer.mlp, name).weight.detach().float()
        q, ws, wz = quantize_weight(w, 8, True, "channel")
        y = x @ w.t()
        expected += float((xq @ dequantize_weight(q, ws, wz).t() - y).pow(2).sum() / y.pow(2).sum())
    assert clipped["error"]["none"] == pytest.approx(expected, rel=1e-4)
    assert clipped["error"]["none"] != pytest.approx(raw["error"]["none"], rel=1e-3)


def test_alpha_search_without_samples_falls_back_to_half(token_batches):
    model = tiny_model("llama")
    plan = resolve_plan(model, HfPtqConfig(**ALL_W8A8))
    absmax, _ = _stats(model, plan, token_batches)
    info = smooth_model(model, plan, absmax, {"alpha": "search"})
    groups = [g for layer in info["layers"] for g in layer["groups"]]
    assert all(g["alpha"] == 0.5 and "no input samples" in g["search"] for g in groups)
    # weight-only groups have no fixed-alpha fallback: skipped, saying why
    weight_only = tiny_model("llama")
    plan = resolve_plan(weight_only, HfPtqConfig(activations="none", **ALL_W8A8))
    info = smooth_model(weight_only, plan, absmax, {"alpha": "search"})
    groups = [g for layer in info["layers"] for g in layer["groups"]]
    assert groups and all(g["status"] == "skipped" and "needs input samples" in g["reason"] for g in groups)


# ------------------------------------------------------------------ options


def test_options_validation():
    opts = validate_options("smoothquant", {"alpha": "search"})
    assert opts["alpha"] == "search" and validate_options("smoothquant", opts) == opts
    with pytest.raises(ConfigError, match="Did you mean 'alpha'"):
        validate_options("smoothquant", {"alpah": 0.5})
    with pytest.raises(ConfigError, match=r"outside \[0, 1\]"):
        validate_options("smoothquant", {"alpha": 1.5})
    with pytest.raises(ConfigError, match="'search'"):
        validate_options("smoothquant", {"alpha": "auto"})
    with pytest.raises(ConfigError, match="Unknown algorithm"):
        validate_options("awq", {})
    with pytest.raises(ConfigTypeError, match="weight_only must be a bool"):
        validate_options("smoothquant", {"weight_only": "yes"})
    with pytest.raises(ConfigTypeError, match="weight_only_grid"):
        validate_options("smoothquant", {"weight_only_grid": []})


# ------------------------------------------------------------------ final norm -> LM head


HEAD_ONLY = dict(scheme={"attention": "skip", "ffn": "skip", "lm_head": "int8"})


def _head_model(arch, outlier=30.0):
    """A tiny model whose final norm (the LM head's input) has a few outlier channels, as real ones do."""
    model = tiny_model(arch)
    with torch.no_grad():
        w = model.model.norm.weight
        offset = 1.0 if arch.startswith("gemma") else 0.0
        w[:2] = (w[:2] + offset) * outlier - offset
    return model


def _calib_ids():
    return torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(3))


def _hidden(model, batches):
    """Final-norm outputs (the LM head's input): the base model's last hidden state is already normed."""
    with torch.no_grad():
        return torch.cat([model.model(input_ids=b).last_hidden_state for b in batches])


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])  # tied with a (1 + w) norm; untied with a w norm
def test_head_smoothing_keeps_the_float_function(arch, token_batches):
    from hfptq.calibration import calibrate

    model = _head_model(arch)
    head_weight = model.lm_head.weight.detach().clone()
    embed_weight = model.model.embed_tokens.weight.detach().clone()
    before = _logits(model, token_batches)
    config = HfPtqConfig(**HEAD_ONLY, smoothquant={"alpha": 0.5, "groups": ["head"]})
    plan = resolve_plan(model, config)
    result = calibrate(model, plan, config, _calib_ids(), progress=False)
    group = result.info["smoothquant"]["model.norm -> lm_head"]["groups"][0]
    assert group["status"] == "smoothed" and group["scale_max"] > 2.0, group
    assert group["folded_into"] == ("norm (1 + w)" if arch.startswith("gemma") else "norm (w)")
    # the model's head (and the embedding tied to it) still hold W; the smoothed W * s travels in the result
    assert torch.equal(model.lm_head.weight, head_weight) and torch.equal(model.model.embed_tokens.weight, embed_weight)
    smoothed = result.weights["lm_head"]
    after = _hidden(model, token_batches) @ smoothed.t()  # folded norm, then W * s
    assert _rel(after, before) < 1e-4  # float32 round-off of the folded products only, as for the layers
    emb = next(e for e in plan if e.kind == "embedding")
    if model.config.tie_word_embeddings:
        # the embedding shares the head's integers (of W * s): its lookups are multiplied by 1 / s
        inverse = torch.tensor(emb.extra["embed_channel_scale"], dtype=torch.float32)
        torch.testing.assert_close(smoothed * inverse, head_weight, rtol=1e-6, atol=1e-7)
    else:
        assert "embed_channel_scale" not in emb.extra


def test_head_smoothing_lowers_lm_head_w8a8_error(token_batches):
    model = _head_model("llama")  # untied: the embedding keeps its own float table
    ref = _logits(model, token_batches)
    errors = {}
    for name, sq in (("rtn", None), ("smoothed", {"alpha": 0.5})):
        out = _logits(hfptq_quantize(model, HfPtqConfig(**HEAD_ONLY, smoothquant=sq), _calib_ids()), token_batches)
        errors[name] = float((out - ref).pow(2).sum() / ref.pow(2).sum())
    # 30x outliers in two of 64 channels set every token's INT8 step; alpha=0.5 divides them by ~5 while the
    # head's weight columns grow as much: the logit error must drop well below half (measured ~9x)
    assert errors["smoothed"] < 0.5 * errors["rtn"], errors


def test_tied_head_smoothing_accounts_for_the_embedding(token_batches):
    from hfptq.calibration import calibrate

    model = _head_model("gemma3_text")
    # fixed alpha: the embedding would read Q(W * s) / s unscored, so a tied head is left alone ...
    config = HfPtqConfig(**HEAD_ONLY, smoothquant={"alpha": 0.5})
    result = calibrate(model, resolve_plan(model, config), config, _calib_ids(), progress=False)
    group = result.info["smoothquant"]["model.norm -> lm_head"]["groups"][0]
    assert group["status"] == "skipped" and "tied" in group["reason"] and "lm_head" not in result.weights
    # ... the search scores head output error + embedding error and never picks worse than unsmoothed
    config = HfPtqConfig(**HEAD_ONLY, smoothquant={"alpha": "search"})
    result = calibrate(model, resolve_plan(model, config), config, _calib_ids(), progress=False)
    group = result.info["smoothquant"]["model.norm -> lm_head"]["groups"][0]
    assert group["error_chosen"] <= group["error"]["none"]
    untied = copy.deepcopy(model)
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    result = calibrate(untied, resolve_plan(untied, config), config, _calib_ids(), progress=False)
    plain = result.info["smoothquant"]["model.norm -> lm_head"]["groups"][0]
    # the same head scored without the embedding term: every candidate scores lower (the RTN embedding error > 0)
    assert all(plain["error"][k] < group["error"][k] for k in group["error"])
    # with GPTQ on the head the shared embedding's error outweighed the gain on Gemma: opt-in only
    config = HfPtqConfig(**HEAD_ONLY, smoothquant={"alpha": "search"}, gptq={})
    result = calibrate(model, resolve_plan(model, config), config, _calib_ids(), progress=False)
    group = result.info["smoothquant"]["model.norm -> lm_head"]["groups"][0]
    assert group["status"] == "skipped" and "GPTQ" in group["reason"]
    config = HfPtqConfig(**HEAD_ONLY, smoothquant={"alpha": "search", "groups": ["head"]}, gptq={})
    result = calibrate(model, resolve_plan(model, config), config, _calib_ids(), progress=False)
    assert "error" in result.info["smoothquant"]["model.norm -> lm_head"]["groups"][0]


def test_tied_embedding_lookup_error_stays_within_half_a_step(token_batches):
    model = _head_model("gemma3_text")
    ids = torch.cat(token_batches)
    with torch.no_grad():
        ref_emb = model.model.embed_tokens(ids)
    q = hfptq_quantize(model, HfPtqConfig(**HEAD_ONLY, smoothquant={"alpha": 0.5, "groups": ["head"]}), _calib_ids())
    inverse = torch.tensor(q.hfptq_plan["model.embed_tokens"].extra["embed_channel_scale"])
    assert float(inverse.min()) < 0.5  # really smoothed
    with torch.no_grad():
        got = q.get_input_embeddings()(ids)
    # each row holds int8 of W * s (step = max_j |W_ij s_j| / 127 of its row); a lookup divides channel j by
    # s_j, so its error is at most half a step / s_j, times Gemma's sqrt(hidden) embedding scale
    step = q.lm_head.weight_scale.float()[ids].reshape(*ids.shape, 1)
    bound = 0.5 * step * inverse * float(model.model.embed_tokens.embed_scale) * (1 + 1e-5) + 1e-6
    assert bool(((got - ref_emb).abs() <= bound).all())


def hfptq_quantize(model, config, calib):
    import hfptq

    return hfptq.quantize_model(copy.deepcopy(model), config, calibration_data=calib, progress=False)


def test_smoothed_tied_head_checkpoint_roundtrip_and_dequantize(token_batches, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _head_model("gemma3_text")
    q = hfptq_quantize(model, HfPtqConfig(**HEAD_ONLY, smoothquant={"alpha": 0.5, "groups": ["head"]}, gptq={}),
                       _calib_ids())
    assert "embed_channel_scale" in q.hfptq_plan["model.embed_tokens"].extra
    before = _logits(q, token_batches)
    q.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()  # as tiny_model
    assert torch.equal(_logits(again, token_batches), before)  # same integers, same per-channel lookup scale
    ids = torch.cat(token_batches)
    with torch.no_grad():
        looked_up = q.get_input_embeddings()(ids)
    plain = again.dequantize()
    with torch.no_grad():
        # the dequantized table is W (not W * s); Gemma's module scales it by sqrt(hidden) as before
        table = plain.get_input_embeddings().weight[ids] * float(model.model.embed_tokens.embed_scale)
    torch.testing.assert_close(table, looked_up, rtol=1e-5, atol=1e-6)


def test_head_group_is_selectable(token_batches):
    from hfptq.calibration import calibrate

    assert [g.name for g in groups_for("llama", {"groups": ["head", "down"]})] == ["down"]  # "head" is not a layer group
    for groups, smoothed in ((["qkv"], False), (["head"], True)):
        model = _head_model("llama")
        config = HfPtqConfig(**HEAD_ONLY, smoothquant={"alpha": 0.5, "groups": groups})
        result = calibrate(model, resolve_plan(model, config), config, _calib_ids(), progress=False)
        assert ("lm_head" in result.weights) is smoothed
        assert any("->" in k for k in result.info["smoothquant"]) is smoothed
    # a weight-only head gains nothing from a flatter activation range: not smoothed
    model = _head_model("llama")
    config = HfPtqConfig(**HEAD_ONLY, activations="none", smoothquant={"alpha": 0.5})
    result = calibrate(model, resolve_plan(model, config), config, _calib_ids(), progress=False)
    assert "lm_head" not in result.weights


def test_alpha_search_scores_tall_weights_on_evenly_spaced_rows(monkeypatch):
    """LM heads have one row per token: the search scores at most _SEARCH_MAX_ROWS of them. With each row
    repeated k times the subsample is exactly the distinct rows, and the relative error (error / energy, both
    k times larger on the full matrix) is the same: subsampled, full and distinct-rows scores agree."""
    from hfptq.algorithms import smoothquant as sq

    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 16, generator=gen)
    x = torch.randn(64, 16, generator=gen) * torch.logspace(0, 1.5, 16)
    entry = SimpleNamespace(quantized=True, activations={"mode": "dynamic", "symmetric": False},
                            weights={"bits": 8, "symmetric": True, "granularity": "channel"})
    opts = validate_options("smoothquant", {"alpha": "search"})
    group = sq.SmoothGroup("head", "norm", ("lm_head",))

    def scores(weight):
        lin = nn.Linear(16, weight.shape[0], bias=False)
        lin.weight.data = weight.clone()
        return sq._search_alpha(group, x, [lin], [entry], x.abs().amax(0), weight.abs().amax(0), opts)[1]

    full = scores(w0.repeat_interleave(4, 0))
    distinct = scores(w0)
    monkeypatch.setattr(sq, "_SEARCH_MAX_ROWS", 8)
    sub = scores(w0.repeat_interleave(4, 0))
    for key in full:
        assert sub[key] == pytest.approx(distinct[key], rel=1e-6)
        assert full[key] == pytest.approx(distinct[key], rel=1e-4)  # float32 sums over 4x the rows


def test_activation_aware_int4_end_to_end_beats_round_to_nearest(token_batches):
    """quantize_model on an INT4 weight-only plan with smoothquant={"alpha": "search"}: the sequential
    calibration scales the weight-only groups activation-aware, reports it, and the logits move closer to the
    float model's than plain round-to-nearest INT4 on data the search never saw."""
    model = tiny_model("llama", outlier=30.0)
    int4 = dict(activations="none", scheme={"attention": "int4", "ffn": "int4", "lm_head": "skip"},
                rules=[{"targets": ["kind:attention", "kind:ffn"], "precision": "int4", "weights": INT4_G}])
    ref = _logits(model, token_batches)
    rtn = hfptq_quantize(model, HfPtqConfig(**int4), _calib_ids())
    aware = hfptq_quantize(model, HfPtqConfig(**int4, smoothquant={"alpha": "search"}), _calib_ids())
    entry = next(a for a in aware.hfptq_calibration["algorithms"] if a["name"] == "smoothquant")
    assert entry["groups_activation_aware"] == entry["groups_smoothed"] >= 1
    err_rtn = float((_logits(rtn, token_batches) - ref).pow(2).mean())
    err_aware = float((_logits(aware, token_batches) - ref).pow(2).mean())
    assert err_aware < err_rtn, (err_aware, err_rtn)
