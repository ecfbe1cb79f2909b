"""End to end: every preset family through ``AutoModel*.from_pretrained(dir, quantization_config=HfPtqConfig())``.

How closeness is judged (no magic tolerances):

* Per layer, with the input each layer really receives inside the quantized model, the output
  must lie within the worst-case bound implied by the quantization steps (``|ΔW| <= s_w/2``
  per weight, ``|Δx| <= s_x/2`` per activation, FP16 storage / BF16 compute rounding for the
  attention projections), see ``tests/conftest.py::linear_error_bound``.
* The real int8 path must equal, to float32 rounding, the float64 evaluation of the integers it
  stores (``exact_quant_linear``), and the ``mode="fake"`` simulation fed the same input.
* End to end, the logits' relative error must stay below the sum over layers of the per-layer
  relative bounds (errors add up layer by layer through residual streams and normalisations
  of unit gain). Observed errors are 5-10x below that budget; a transposed or mis-scaled weight
  gives O(1) errors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn

import hfptq
from hfptq.api import model_bytes
from hfptq.plan import is_quantizable_linear
from hfptq.quant.linear import FloatLinear, QuantEmbedding, QuantLinear

TIED_FAMILIES = ["gemma", "gemma2", "gemma3_text", "gpt2", "opt", "bert_mlm", "roberta_mlm", "distilbert_mlm"]


@dataclass
class Trace:
    """A float model, its default-quantized twin, and what each hfptq module saw in one forward."""

    float_model: nn.Module
    quantized: nn.Module
    ids: torch.Tensor
    float_logits: torch.Tensor
    quant_logits: torch.Tensor
    io: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rel_bounds: Dict[str, float] = field(default_factory=dict)

    @property
    def budget(self) -> float:
        """End-to-end relative logit budget: the sum of the per-layer relative bounds."""
        return sum(self.rel_bounds.values())


@pytest.fixture(scope="module")
def traces(load_tiny, tiny_input_ids, qbounds):
    """Per family (cached for the module): float + quantized models, per-module inputs/outputs."""
    cache: Dict[str, Trace] = {}

    def get(family: str) -> Trace:
        if family in cache:
            return cache[family]
        ref = load_tiny(family)
        q = load_tiny(family, hfptq.HfPtqConfig())
        ids = tiny_input_ids(family)
        io: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []

        def record(name):
            def hook(module, inputs, output) -> None:  # returns None: the output is left alone
                io.setdefault(name, (inputs[0].detach(), output.detach()))
            return hook

        for name, module in q.named_modules():
            if isinstance(module, (QuantLinear, FloatLinear, QuantEmbedding)):
                handles.append(module.register_forward_hook(record(name)))
        with torch.no_grad():
            quant_logits = q(ids).logits
            float_logits = ref(ids).logits
        for h in handles:
            h.remove()
        trace = Trace(ref, q, ids, float_logits, quant_logits, io)
        for name, (x, y) in io.items():
            bound, y_ref = _layer_bound(trace, name, x, qbounds)
            trace.rel_bounds[name] = float(bound.max() / y_ref.abs().max())
        cache[family] = trace
        return trace

    return get


def _float_reference(trace: Trace, name: str, x: torch.Tensor, qbounds):
    ref_module = trace.float_model.get_submodule(name)
    if isinstance(ref_module, nn.Embedding):
        with torch.no_grad():
            return None, None, ref_module(x).double()
    w = qbounds.float_reference_weight(ref_module).double()
    b = None if ref_module.bias is None else ref_module.bias.detach().double()
    y = x.double().reshape(-1, x.shape[-1]) @ w.t() + (0 if b is None else b)
    return w, b, y


def _layer_bound(trace: Trace, name: str, x: torch.Tensor, qbounds):
    """(elementwise bound [T, N], float64 reference output [T, N]) of module ``name`` on input ``x``."""
    module = trace.quantized.get_submodule(name)
    w, b, y_ref = _float_reference(trace, name, x, qbounds)
    if isinstance(module, QuantEmbedding):
        src = module.source
        steps = qbounds.expand_weight_steps(src.weight_scale, src.out_features, src.in_features)
        scale = 1.0 if module.embed_scale is None else float(module.embed_scale)
        bound = steps[x.reshape(-1)] * (0.5 + 2.0 ** -22) * abs(scale)
        bound = bound + 4 * qbounds.U_FP32 * y_ref.reshape(bound.shape).abs()
        return bound, y_ref.reshape(bound.shape)
    if isinstance(module, QuantLinear):
        return qbounds.quant_linear_bound(module, x, w, b), y_ref
    assert isinstance(module, FloatLinear)
    setting = module.compute_dtype_setting
    if setting == "auto":
        compute = torch.bfloat16 if module.storage_dtype == torch.float16 and x.device.type == "cpu" else module.storage_dtype
    else:
        compute = getattr(torch, setting)
    return qbounds.float_linear_bound(x, w, b, module.storage_dtype, compute), y_ref


# ------------------------------------------------------------------------------------------------
# Plan contents
# ------------------------------------------------------------------------------------------------


def test_plan_has_the_expected_modules_kinds_and_precisions(tiny_family, traces):
    trace = traces(tiny_family.name)
    plan = trace.quantized.hfptq_plan
    assert isinstance(plan, hfptq.Plan)
    assert plan.preset == tiny_family.model_type and plan.model_type == tiny_family.model_type

    # nothing left unplanned: every float Linear/Conv1D of the float model appears in the plan
    float_linears = {n for n, m in trace.float_model.named_modules() if is_quantizable_linear(m)}
    planned = {e.name for e in plan if e.kind != "embedding"}
    assert planned == float_linears
    expected = {k: set(tiny_family.names(k)) for k in ("attention", "ffn", "lm_head", "other", "embedding")}
    assert set().union(*(expected[k] for k in ("attention", "ffn", "lm_head", "other"))) == float_linears
    for kind, names in expected.items():
        assert {e.name for e in plan if e.kind == kind} == names, kind

    for e in plan:
        if e.kind == "attention":
            assert (e.precision, e.weights, e.activations) == ("fp16", None, None)
            assert e.source == f"scheme.attention ({tiny_family.model_type})"
        elif e.kind in ("ffn", "lm_head"):
            assert e.precision == "int8", e.name
            assert e.weights == {"bits": 8, "symmetric": True, "granularity": "channel", "group_size": None,
                                 "observer": "minmax"}
            assert e.activations == {"mode": "dynamic", "bits": 8, "symmetric": False, "granularity": "token"}
            assert e.describe() == "W8A8 dynamic/token (channel)"
        elif e.kind == "other":
            assert e.precision == "skip" and e.source == "no preset/rule matched", e.name
        elif e.kind == "embedding":
            if tiny_family.tied:
                assert e.precision == "int8" and e.tied_to == tiny_family.lm_head
                assert e.activations == {"mode": "none"}
            else:
                assert e.precision == "skip" and e.tied_to is None
        if e.kind != "embedding":
            conv = tiny_family.conv1d and e.kind in ("attention", "ffn")
            assert e.module_class == ("Conv1D" if conv else "Linear")
            assert e.extra.get("conv1d", False) == conv

    # printable: one row per entry plus header and rule, every name present
    table = plan.table()
    assert len(table.splitlines()) == len(plan) + 2
    assert all(e.name in table for e in plan)
    counts = plan.by_precision()
    assert counts.get("fp16") == len(expected["attention"])
    assert counts.get("int8") == len(expected["ffn"]) + len(expected["lm_head"]) + (1 if tiny_family.tied else 0)
    # the same plan is written into the config (and so into config.json on save)
    assert trace.quantized.config.quantization_config.plan == plan.to_dict()


def test_modules_are_swapped_and_integer_buffers_are_really_int8(tiny_family, traces):
    trace = traces(tiny_family.name)
    q = trace.quantized
    for e in q.hfptq_plan:
        module = q.get_submodule(e.name)
        if e.kind == "embedding":
            assert isinstance(module, QuantEmbedding) if e.precision == "int8" else type(module).__name__ != "QuantEmbedding"
            continue
        if e.precision == "int8":
            assert isinstance(module, QuantLinear) and not hasattr(module, "weight")
            assert module.qweight.dtype == torch.int8
            assert tuple(module.qweight.shape) == (e.out_features, e.in_features)
            # 1 byte per weight: 4x smaller than the float32 weight it replaces
            float_w = trace.float_model.get_submodule(e.name).weight
            assert float_w.dtype == torch.float32
            assert module.qweight.nbytes * 4 == float_w.nbytes
            assert module.weight_scale.dtype == torch.float32
            assert tuple(module.weight_scale.shape) == (e.out_features, 1)
            assert module.weight_zero_point is None and module.act_mode == "dynamic" and not module.fake
        elif e.precision == "fp16":
            assert isinstance(module, FloatLinear)
            assert module.weight.dtype == torch.float16
            assert tuple(module.weight.shape) == (e.out_features, e.in_features)
            assert module.weight.nbytes * 2 == trace.float_model.get_submodule(e.name).weight.nbytes
        else:
            assert type(module) is type(trace.float_model.get_submodule(e.name))
    # the integer tensors are what save_pretrained writes
    state = q.state_dict()
    for name in q.hfptq_plan.quantized_names():
        assert state[f"{name}.qweight"].dtype == torch.int8
        assert f"{name}.weight" not in state


def test_summary_reports_bytes_before_and_after(tiny_family, traces):
    trace = traces(tiny_family.name)
    q, ref, plan = trace.quantized, trace.float_model, trace.quantized.hfptq_plan

    # Expected size, from first principles: drop the float tensors owned only by converted modules,
    # add int8 weight (1 B) + float32 per-row scale (+ float32 bias), or fp16 weight (+ fp16 bias).
    converted = {e.name for e in plan if e.precision != "skip"}
    owners: Dict[int, List[str]] = {}
    sizes: Dict[int, int] = {}
    for pname, t in list(ref.named_parameters(remove_duplicate=False)) + list(ref.named_buffers(remove_duplicate=False)):
        owners.setdefault(t.data_ptr(), []).append(pname.rsplit(".", 1)[0])
        sizes[t.data_ptr()] = t.numel() * t.element_size()
    kept = sum(sizes[p] for p, mods in owners.items() if not all(m in converted for m in mods))
    added = 0
    for e in plan:
        if e.precision == "skip" or e.tied_to:
            continue
        n = e.in_features * e.out_features
        if e.precision == "int8":
            added += n + 4 * e.out_features + (4 * e.out_features if e.has_bias else 0)
        elif e.precision == "fp16":
            added += 2 * n + (2 * e.out_features if e.has_bias else 0)
    assert model_bytes(q) == kept + added
    assert model_bytes(q) < model_bytes(ref)

    text = hfptq.summary(q)
    assert text.startswith(plan.summary())
    from hfptq.utils import format_bytes

    assert f"{format_bytes(model_bytes(ref), digits=1)} -> {format_bytes(model_bytes(q), digits=1)}" in text
    for precision, count in plan.by_precision().items():
        assert f"{count} {precision}" in text


# ------------------------------------------------------------------------------------------------
# Numerics
# ------------------------------------------------------------------------------------------------


def test_every_layer_is_within_its_step_size_bound(tiny_family, traces, qbounds):
    trace = traces(tiny_family.name)
    assert set(trace.io) == {e.name for e in trace.quantized.hfptq_plan if e.precision != "skip"}
    for name, (x, y) in trace.io.items():
        bound, y_ref = _layer_bound(trace, name, x, qbounds)
        err = (y.double().reshape(y_ref.shape) - y_ref).abs()
        worst = (err - bound).max().item()
        assert worst <= 0, f"{name}: error exceeds the bound by {worst:.3g} (max err {err.max().item():.3g})"
        # and the bound is not vacuous: the worst case stays a small fraction of the layer's output
        assert trace.rel_bounds[name] < 0.25, (name, trace.rel_bounds[name])


def test_real_int8_path_equals_the_exact_integer_math(tiny_family, traces, qbounds):
    trace = traces(tiny_family.name)
    checked = 0
    for name, (x, y) in trace.io.items():
        module = trace.quantized.get_submodule(name)
        if not isinstance(module, QuantLinear):
            continue
        exact, mag = qbounds.exact_quant_linear(module, x)
        # exact int32 accumulation, then two float32 multiplications and the bias add
        tol = 4 * qbounds.U_FP32 * mag + 1e-30
        assert ((y.double() - exact).abs() <= tol).all(), name
        checked += 1
    assert checked == len(trace.quantized.hfptq_plan.quantized_names())


def test_fake_mode_simulates_the_real_path(tiny_family, traces, load_tiny, qbounds):
    trace = traces(tiny_family.name)
    fake = load_tiny(tiny_family.name, hfptq.HfPtqConfig(mode="fake"))
    assert fake.hfptq_plan.to_dict() == trace.quantized.hfptq_plan.to_dict()
    for name, (x, y) in trace.io.items():
        module = fake.get_submodule(name)
        if isinstance(module, QuantLinear):
            assert module.fake
            real = trace.quantized.get_submodule(name)
            assert torch.equal(module.qweight, real.qweight) and torch.equal(module.weight_scale, real.weight_scale)
            _, mag = qbounds.exact_quant_linear(real, x)
            with torch.no_grad():
                y_fake = module(x)
            # fake: float32 matmul of the dequantized operands (K roundings); real: exact then rescaled
            tol = (x.shape[-1] + 8) * qbounds.U_FP32 * mag
            assert ((y_fake.double() - y.double()).abs() <= tol).all(), name


def test_logits_close_to_the_float_model(tiny_family, traces):
    trace = traces(tiny_family.name)
    a, b = trace.float_logits.double(), trace.quant_logits.double()
    assert a.shape == b.shape and torch.isfinite(b).all()
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel <= trace.budget, f"relative logit error {rel:.3g} > budget {trace.budget:.3g}"
    # the quantization does change the result (the int8 path is really taken)
    assert rel > 0


def test_generate_greedy(tiny_causal_family, traces):
    trace = traces(tiny_causal_family.name)
    q = trace.quantized
    prompt = trace.ids[:1, :6]
    with torch.no_grad():
        out = q.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True, output_logits=True)
        full = q(out.sequences).logits[0]
    seq = out.sequences[0]
    assert seq.shape == (10,) and torch.equal(seq[:6], prompt[0])
    assert ((seq >= 0) & (seq < 128)).all()
    scale = full.abs().max().item()
    for t, (scores, logits) in enumerate(zip(out.scores, out.logits)):
        # greedy: each new token is the argmax of the processed scores
        assert seq[6 + t].item() == scores[0].argmax().item()
        # the KV-cache step (one token through the int8 path) agrees with a full forward pass
        err = (logits[0].double() - full[5 + t].double()).abs().max().item()
        assert err <= trace.budget * scale, (t, err)


# ------------------------------------------------------------------------------------------------
# Family specifics
# ------------------------------------------------------------------------------------------------


def test_gpt2_conv1d_weights_are_transposed(traces):
    trace = traces("gpt2")
    convs = {n: m for n, m in trace.float_model.named_modules() if type(m).__name__ == "Conv1D"}
    assert len(convs) == 8
    for name, conv in convs.items():
        module = trace.quantized.get_submodule(name)
        w_ref = conv.weight.detach().t()  # Conv1D stores [in, out]
        assert (module.in_features, module.out_features) == (conv.weight.shape[0], conv.weight.shape[1])
        if isinstance(module, QuantLinear):
            step = module.weight_scale  # [out, 1]
            assert ((module.dequantized_weight() - w_ref).abs() <= step * (0.5 + 2 ** -22)).all(), name
            # per-row scale is amax/127 of the *output* channel (a transposition would mix rows/columns)
            torch.testing.assert_close(step.reshape(-1), w_ref.abs().amax(dim=1) / 127, rtol=2 ** -22, atol=0)
        else:
            assert isinstance(module, FloatLinear)
            assert torch.equal(module.weight, w_ref.to(torch.float16))
        assert torch.equal(module.bias.to(torch.float32), conv.bias.detach().to(module.bias.dtype).float())


@pytest.mark.parametrize("family", TIED_FAMILIES)
def test_tied_embedding_shares_the_lm_head_storage(family, traces):
    trace = traces(family)
    plan = trace.quantized.hfptq_plan
    emb_entry = next(e for e in plan if e.kind == "embedding")
    lm_head = trace.quantized.get_submodule(emb_entry.tied_to)
    emb = trace.quantized.get_submodule(emb_entry.name)
    assert isinstance(emb, QuantEmbedding) and isinstance(lm_head, QuantLinear)
    assert emb.source is lm_head and not hasattr(emb, "table")
    assert emb.source.qweight.data_ptr() == lm_head.qweight.data_ptr()
    assert trace.quantized.get_input_embeddings() is emb
    # the saved state holds the int8 matrix once
    assert not any(k.startswith(emb_entry.name + ".") for k in trace.quantized.state_dict())


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_embed_scale_reproduces_the_float_embedding(family, traces, qbounds):
    trace = traces(family)
    emb = trace.quantized.get_input_embeddings()
    ref = trace.float_model.get_input_embeddings()
    assert emb.embed_scale == pytest.approx(32 ** 0.5, rel=1e-6)  # sqrt(hidden_size)
    ids = torch.arange(128).reshape(4, 32)
    with torch.no_grad():
        out, want = emb(ids).double(), ref(ids).double()
    steps = emb.source.weight_scale.double()[ids]  # per-row step of each looked-up token, [4, 32, 1]
    bound = steps * (0.5 + 2 ** -22) * emb.embed_scale + 4 * qbounds.U_FP32 * want.abs()
    assert ((out - want).abs() <= bound).all()
    # without the scale the lookup would be off by sqrt(32): the bound is tight enough to notice
    assert ((out / emb.embed_scale - want).abs() > bound).any()


def test_gpt_neox_lm_head_is_classified_by_its_preset(traces):
    entry = traces("gpt_neox").quantized.hfptq_plan["lm_head"]
    assert entry.kind == "lm_head" and entry.source == "scheme.lm_head (gpt_neox)"


@pytest.mark.parametrize("plan", ["default", "lm_head skip"])
def test_quantizing_releases_the_memory_mapped_float_checkpoint(tmp_path, plan):
    """No tensor is left pointing into the float checkpoint that Transformers memory-maps: one tiny norm
    weight would keep the whole file's read pages resident (Gemma 3 270M: 1 GB for a 285 MiB model)."""
    import gc
    import itertools
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from tests.tiny import tiny_llama_dir

    folder = tiny_llama_dir(tmp_path / "m", tie=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    def mapped(m):
        return [n for n, t in itertools.chain(m.named_parameters(remove_duplicate=False), m.named_buffers())
                if t.device.type == "cpu" and not t.untyped_storage().resizable()]

    if not mapped(model):
        pytest.skip("this Transformers copies the weights out of the checkpoint file at load")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    norm = model.model.norm.weight.detach().clone()
    ids = torch.tensor([[1, 5, 9, 13]])
    cfg = hfptq.HfPtqConfig(scheme={"lm_head": "skip"} if plan == "lm_head skip" else None)
    hfptq.quantize_model(model, cfg, progress=False)
    assert mapped(model) == []
    assert torch.equal(model.model.norm.weight, norm) and isinstance(model.model.norm.weight, nn.Parameter)
    if plan == "lm_head skip" and tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    gc.collect()
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(folder / "model.safetensors") not in maps.read_text()
