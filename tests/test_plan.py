"""Rules, presets and the resolved plan (hfptq.plan): mixed precision, precedence, and refusals."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import hfptq
from hfptq import HfPtqConfig, Plan, resolve_plan
from hfptq.errors import CheckpointError, HfPtqError, PlanError
from hfptq.plan import PRESETS, ModuleSpec, select_preset

LAYERS = (0, 1)


@pytest.fixture
def llama(load_tiny):
    return load_tiny("llama")


def _by_name(plan: Plan):
    return {e.name: e for e in plan}


def _precisions(plan: Plan):
    return {e.name: e.precision for e in plan}


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------


def test_every_required_family_has_a_preset():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "phi3", "gpt2",
                "opt", "gpt_neox", "bert", "roberta", "distilbert"}
    assert required <= set(PRESETS)
    for name, patterns in PRESETS.items():
        assert set(patterns) == {"attention", "ffn", "lm_head"}, name


def test_auto_preset_follows_model_type(tiny_family, load_tiny):
    model = load_tiny(tiny_family.name)
    name, patterns = select_preset(model, "auto")
    assert name == tiny_family.model_type and patterns is PRESETS[name]


def test_default_plan_of_llama(llama):
    plan = resolve_plan(llama, HfPtqConfig())
    entries = _by_name(plan)
    for i in LAYERS:
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert entries[f"model.layers.{i}.self_attn.{p}"].precision == "fp16"
        for p in ("gate_proj", "up_proj", "down_proj"):
            e = entries[f"model.layers.{i}.mlp.{p}"]
            assert (e.kind, e.precision, e.activations["mode"]) == ("ffn", "int8", "dynamic")
    assert entries["lm_head"].precision == "int8"
    # llama is not tied: the embedding stays as it is, and says so
    assert entries["model.embed_tokens"].precision == "skip"
    assert entries["model.embed_tokens"].source == "scheme.embedding (llama)"
    assert list(entries) == [n for n, m in llama.named_modules() if n in entries]  # model order


def test_structural_fallback_classifies_a_renamed_architecture(load_tiny, monkeypatch, caplog):
    reference = resolve_plan(load_tiny("llama"), HfPtqConfig())
    model = load_tiny("llama")
    monkeypatch.setattr(model.config, "model_type", "my_new_llama")
    with caplog.at_level(logging.WARNING, logger="hfptq.plan"):
        plan = resolve_plan(model, HfPtqConfig())
    assert plan.preset == "structural" and plan.model_type == "my_new_llama"
    assert [(e.name, e.kind, e.precision) for e in plan] == [(e.name, e.kind, e.precision) for e in reference]
    assert not caplog.records  # everything was classified
    # explicit preset='structural' gives the same on the real model type
    assert _precisions(resolve_plan(load_tiny("llama"), HfPtqConfig(preset="structural"))) == _precisions(reference)


def test_structural_fallback_warns_about_what_it_leaves_unchanged(load_tiny, monkeypatch, caplog):
    model = load_tiny("bert")
    monkeypatch.setattr(model.config, "model_type", "my_bert")
    with caplog.at_level(logging.WARNING, logger="hfptq.plan"):
        plan = resolve_plan(model, HfPtqConfig())
    left = [e.name for e in plan if e.kind == "other"]
    assert "bert.encoder.layer.0.attention.output.dense" in left
    assert any("could not be classified" in r.getMessage() and "my_bert" in r.getMessage() for r in caplog.records)
    # the query/key/value projections and the intermediate dense are still recognised
    assert plan["bert.encoder.layer.0.attention.self.query"].kind == "attention"
    assert plan["bert.encoder.layer.0.intermediate.dense"].kind == "ffn"


def test_gpt2_uses_conv1d_class_target(load_tiny):
    plan = resolve_plan(load_tiny("gpt2"), HfPtqConfig(rules=[{"targets": "Conv1D", "precision": "bf16"}]))
    for e in plan:
        if e.module_class == "Conv1D":
            assert e.precision == "bf16" and e.source == "rules[0]"
            assert e.extra == {"conv1d": True}
            assert (e.in_features, e.out_features) in {(32, 96), (32, 32), (32, 128), (128, 32)}
    assert plan["lm_head"].precision == "int8"


def test_gemma3_multimodal_preset_leaves_the_vision_tower_alone():
    import transformers

    text = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    plan = resolve_plan(model, HfPtqConfig())
    assert plan.preset == "gemma3"
    vision_entries = [e for e in plan if "vision_tower" in e.name]
    assert vision_entries and all((e.kind, e.precision) == ("other", "skip") for e in vision_entries)
    lang = [e for e in plan if "language_model.layers" in e.name]
    assert {e.kind for e in lang} == {"attention", "ffn"}
    assert all(e.precision == ("fp16" if e.kind == "attention" else "int8") for e in lang)
    assert plan["lm_head"].precision == "int8"


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------


def test_rule_keeps_down_proj_in_fp16_and_the_rest_default(llama):
    plan = resolve_plan(llama, HfPtqConfig(rules=[{"targets": "down_proj", "precision": "fp16"}]))
    default = _precisions(resolve_plan(llama, HfPtqConfig()))
    for name, precision in _precisions(plan).items():
        if name.endswith("mlp.down_proj"):
            assert precision == "fp16" and plan[name].source == "rules[0]" and plan[name].weights is None
        else:
            assert precision == default[name], name


def test_kind_target_with_activation_override(llama):
    cfg = HfPtqConfig(rules=[{"targets": "kind:ffn", "precision": "int8", "activations": "none"}])
    plan = resolve_plan(llama, cfg)
    for e in plan:
        if e.kind == "ffn":
            assert e.activations == {"mode": "none"} and e.describe() == "int8 weight-only (channel)"
    assert plan["lm_head"].activations["mode"] == "dynamic"  # not targeted: default W8A8


def test_regex_target_is_searched_in_the_full_name(llama):
    plan = resolve_plan(llama, HfPtqConfig(rules=[{"targets": r"re:layers\.1\..*mlp", "precision": "bf16"}]))
    for p in ("gate_proj", "up_proj", "down_proj"):
        assert plan[f"model.layers.1.mlp.{p}"].precision == "bf16"
        assert plan[f"model.layers.0.mlp.{p}"].precision == "int8"


def test_class_target_matches_every_linear(llama):
    plan = resolve_plan(llama, HfPtqConfig(rules=[{"targets": "Linear", "precision": "fp32", "name": "all fp32"}]))
    linears = [e for e in plan if e.kind != "embedding"]
    assert len(linears) == 15 and all(e.precision == "fp32" and e.source == "all fp32" for e in linears)


def test_first_matching_rule_wins_when_rules_overlap_partially(llama):
    cfg = HfPtqConfig(rules=[{"targets": "model.layers.0.mlp.down_proj", "precision": "fp16"},
                             {"targets": "down_proj", "precision": "bf16"}])
    plan = resolve_plan(llama, cfg)
    assert (plan["model.layers.0.mlp.down_proj"].precision, plan["model.layers.0.mlp.down_proj"].source) == ("fp16", "rules[0]")
    assert (plan["model.layers.1.mlp.down_proj"].precision, plan["model.layers.1.mlp.down_proj"].source) == ("bf16", "rules[1]")


def test_modules_to_not_convert_is_skip_and_wins_over_rules(llama):
    cfg = HfPtqConfig(rules=[{"targets": "kind:ffn", "precision": "int8"}], modules_to_not_convert=["down_proj", "lm_head"])
    plan = resolve_plan(llama, cfg)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        assert (plan[name].precision, plan[name].source) == ("skip", "modules_to_not_convert")
    assert plan["model.layers.0.mlp.up_proj"].source == "rules[0]"


def test_int4_rule_with_group_size(llama):
    plan = resolve_plan(llama, HfPtqConfig(rules=[{"targets": "kind:ffn", "precision": "int4",
                                                   "weights": {"group_size": 16}}]))
    e = plan["model.layers.0.mlp.down_proj"]
    assert e.weights == {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 16, "observer": "minmax"}
    assert e.activations == {"mode": "none"} and e.describe() == "int4 weight-only (g16)"


def test_top_level_int4_weights_apply_to_the_default_scheme(llama):
    cfg = HfPtqConfig(weights={"bits": 4, "group_size": 16})
    assert cfg.scheme["ffn"] == "int4" and cfg.scheme["lm_head"] == "int4" and cfg.scheme["attention"] == "fp16"
    plan = resolve_plan(llama, cfg)
    for e in plan:
        if e.kind in ("ffn", "lm_head"):
            assert e.precision == "int4" and e.weights["group_size"] == 16 and e.activations == {"mode": "none"}
    # a rule asking for int8 gets int8 defaults, not the 4-bit top-level weights
    plan = resolve_plan(llama, HfPtqConfig(weights={"bits": 4, "group_size": 16},
                                           rules=[{"targets": "down_proj", "precision": "int8"}]))
    assert plan["model.layers.0.mlp.down_proj"].weights["bits"] == 8
    assert plan["model.layers.0.mlp.down_proj"].weights["granularity"] == "channel"


def test_asymmetric_dynamic_activations_are_planned(llama):
    plan = resolve_plan(llama, HfPtqConfig(activations={"mode": "dynamic", "symmetric": False}))
    assert plan["lm_head"].activations == {"mode": "dynamic", "bits": 8, "symmetric": False, "granularity": "token"}


def test_tied_embedding_follows_an_int4_lm_head(load_tiny):
    plan = resolve_plan(load_tiny("gemma3_text"), HfPtqConfig(rules=[{"targets": "lm_head", "precision": "int4",
                                                                       "weights": {"group_size": 16}}]))
    emb = plan["model.embed_tokens"]
    assert emb.precision == "int4" and emb.tied_to == "lm_head" and emb.weights == plan["lm_head"].weights
    assert emb.extra["embed_scale"] == pytest.approx(32 ** 0.5)


# ------------------------------------------------------------------------------------------------
# Refusals: PlanError naming the rule/module and the fix
# ------------------------------------------------------------------------------------------------


def test_rule_matching_nothing(llama):
    with pytest.raises(PlanError, match=r"rules\[0\] \(targets=\['mlp\.fc9'\]\) matches no module") as info:
        resolve_plan(llama, HfPtqConfig(rules=[{"targets": "mlp.fc9", "precision": "fp16"}]))
    assert "re:<regex>" in str(info.value) and "table()" in str(info.value)
    with pytest.raises(PlanError, match="modules_to_not_convert"):
        resolve_plan(llama, HfPtqConfig(modules_to_not_convert=["no_such_module"]))


@pytest.mark.parametrize("first, second", [
    ({"targets": "down_proj", "precision": "fp16"}, {"targets": "down_proj", "precision": "int8"}),
    ({"targets": "kind:ffn", "precision": "fp16"}, {"targets": "re:mlp\\.down", "precision": "int8"}),
])
def test_rule_fully_shadowed_by_an_earlier_rule(llama, first, second):
    with pytest.raises(PlanError) as info:
        resolve_plan(llama, HfPtqConfig(rules=[first, second]))
    msg = str(info.value)
    assert msg.startswith("rules[1]") and "rules[0]" in msg and "never applies" in msg and "Reorder" in msg
    assert isinstance(info.value, HfPtqError) and isinstance(info.value, ValueError)


def test_group_size_not_dividing_in_features_names_the_module_and_a_divisor(llama):
    with pytest.raises(PlanError) as info:
        resolve_plan(llama, HfPtqConfig(rules=[{"targets": "down_proj", "precision": "int4",
                                                "weights": {"group_size": 48}}]))
    msg = str(info.value)
    # down_proj has in_features = intermediate = 64; 32 is the largest divisor of 64 below 48
    assert "group_size=48" in msg and "in_features=64" in msg and "'model.layers.0.mlp.down_proj'" in msg
    assert "e.g. 32" in msg and "granularity='channel'" in msg
    # the int4 default group of 128 on 32 input features: the message says how to change it
    with pytest.raises(PlanError, match=r"weights=\{'bits': 4, 'group_size': 32\}"):
        resolve_plan(llama, HfPtqConfig(scheme={"ffn": "int4"}))


def test_w8a8_refuses_group_and_asymmetric_weights(llama):
    with pytest.raises(PlanError, match="per-group weights and dynamic activations.*activations='none'"):
        resolve_plan(llama, HfPtqConfig(rules=[{"targets": "kind:ffn", "precision": "int8",
                                                "weights": {"granularity": "group", "group_size": 16}}]))
    with pytest.raises(PlanError, match="needs symmetric weights.*weights.symmetric=True"):
        resolve_plan(llama, HfPtqConfig(weights={"symmetric": False}))
    # weight-only asymmetric is fine
    plan = resolve_plan(llama, HfPtqConfig(weights={"symmetric": False}, activations="none"))
    assert plan["lm_head"].describe() == "int8 weight-only (channel asym)"


def test_unknown_preset_suggests_the_closest(llama):
    # refused when the config is built, and by select_preset for callers that bypass the config
    with pytest.raises(HfPtqError, match=r"preset='lama' is unknown\. Did you mean 'llama'\?.*'structural'"):
        HfPtqConfig(preset="lama")
    with pytest.raises(PlanError, match=r"preset='lama' is unknown\. Did you mean 'llama'\?.*'structural'"):
        select_preset(llama, "lama")


def test_explicit_preset_that_classifies_nothing(llama):
    with pytest.raises(PlanError) as info:
        resolve_plan(llama, HfPtqConfig(preset="gpt2"))
    msg = str(info.value)
    assert "preset='gpt2' classifies none" in msg and "q_proj" in msg and "rules=" in msg


def _toy_model():
    """A PreTrainedModel with no preset and linear names no heuristic understands."""
    from transformers import PretrainedConfig, PreTrainedModel

    class ToyConfig(PretrainedConfig):
        model_type = "hfptq_toy"

        def __init__(self, hidden: int = 16, **kwargs):
            self.hidden = hidden
            super().__init__(**kwargs)

    class ToyModel(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            h = config.hidden
            self.embed = nn.Embedding(32, h)
            self.blocks = nn.ModuleList(nn.ModuleDict({"wa": nn.Linear(h, h), "wb": nn.Linear(h, h)})
                                        for _ in range(2))
            self.mixer = nn.MultiheadAttention(h, 2, batch_first=True)
            self.head = nn.Linear(h, 32)
            self.post_init()

        def forward(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = x + block["wb"](torch.relu(block["wa"](x)))
            x = x + self.mixer(x, x, x, need_weights=False)[0]
            return self.head(x)

    torch.manual_seed(0)
    return ToyModel(ToyConfig())


def test_no_preset_and_unclassifiable_names_says_which_rules_to_write():
    model = _toy_model()
    with pytest.raises(PlanError) as info:
        resolve_plan(model, HfPtqConfig())
    msg = str(info.value)
    assert "model_type='hfptq_toy'" in msg and "rules=[" in msg
    assert "wa" in msg and "wb" in msg and "head" in msg and "'blocks.0.wa'" in msg
    assert "out_proj" not in msg  # the MultiheadAttention projection cannot be converted anyway

    # with the rules the message asks for, the model plans and runs
    cfg = HfPtqConfig(rules=[{"targets": "wa", "precision": "fp16"}, {"targets": "wb", "precision": "int8"}])
    plan = resolve_plan(model, cfg)
    assert [e.precision for e in plan if ".w" in e.name] == ["fp16", "int8", "fp16", "int8"]
    mha = plan["mixer.out_proj"]
    assert mha.precision == "skip" and "MultiheadAttention" in mha.source
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = model(ids)
        after = hfptq.quantize_model(model, cfg, progress=False)(ids)
    assert after.shape == before.shape and torch.isfinite(after).all()


def test_multihead_attention_projection_is_never_converted():
    model = _toy_model()
    plan = resolve_plan(model, HfPtqConfig(rules=[{"targets": "re:.", "precision": "int8", "activations": "none"}]))
    assert plan["mixer.out_proj"].precision == "skip"
    assert all(e.precision == "int8" for e in plan if e.kind != "embedding" and e.name != "mixer.out_proj")


def test_embedding_cannot_be_float_converted(llama):
    with pytest.raises(PlanError, match=r"embedding 'model.embed_tokens' cannot be stored as 'fp16'.*'skip'"):
        resolve_plan(llama, HfPtqConfig(scheme={"embedding": "fp16"}))
    plan = resolve_plan(llama, HfPtqConfig(scheme={"embedding": "int8"}))  # untied: its own int8 table
    emb = plan["model.embed_tokens"]
    assert emb.precision == "int8" and emb.tied_to is None and emb.activations == {"mode": "none"}


def test_tied_lm_head_in_float_is_refused(load_tiny):
    with pytest.raises(PlanError, match="share one weight.*tie_word_embeddings"):
        resolve_plan(load_tiny("gemma3_text"), HfPtqConfig(scheme={"lm_head": "fp16"}))
    # both skipped is consistent
    plan = resolve_plan(load_tiny("gemma3_text"), HfPtqConfig(scheme={"lm_head": "skip"}))
    assert plan["lm_head"].precision == plan["model.embed_tokens"].precision == "skip"


def test_int4_needs_an_even_in_features():
    model = nn.Sequential(nn.Linear(7, 8))
    model.config = type("C", (), {"model_type": "seq"})()
    with pytest.raises(PlanError, match="odd in_features=7.*'precision': 'int8'"):
        resolve_plan(model, HfPtqConfig(rules=[{"targets": "Linear", "precision": "int4",
                                                "weights": {"granularity": "channel"}}]))


# ------------------------------------------------------------------------------------------------
# The Plan object
# ------------------------------------------------------------------------------------------------


def test_plan_round_trips_through_a_dict(load_tiny):
    plan = resolve_plan(load_tiny("gpt2"), HfPtqConfig())
    data = plan.to_dict()
    import json

    again = Plan.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data and again.preset == "gpt2"
    with pytest.raises(CheckpointError, match="malformed"):
        Plan.from_dict({"modules": [{"name": "x"}]})
    with pytest.raises(CheckpointError):
        Plan.from_dict({})


def test_plan_accessors_table_and_summary(llama):
    plan = resolve_plan(llama, HfPtqConfig())
    assert plan.get("nope") is None
    with pytest.raises(KeyError):
        plan["nope"]
    assert plan.by_precision() == {"skip": 1, "fp16": 8, "int8": 7}
    assert plan.quantized_names() == [e.name for e in plan if e.precision == "int8"]
    assert plan.summary() == "hfptq plan (llama): 16 modules: 8 fp16, 7 int8, 1 skip"
    lines = plan.table().splitlines()
    assert lines[0].split() == ["module", "kind", "class", "precision", "scheme", "out", "x", "in", "decided", "by"]
    row = next(line for line in lines if line.startswith("model.layers.0.mlp.down_proj"))
    assert row.split() == ["model.layers.0.mlp.down_proj", "ffn", "Linear", "int8", "W8A8", "dynamic/token",
                           "(channel)", "32x64", "scheme.ffn", "(llama)"]


def test_tied_row_says_tied_once(load_tiny):
    table = resolve_plan(load_tiny("gpt2"), HfPtqConfig()).table()
    row = next(line for line in table.splitlines() if line.startswith("transformer.wte"))
    assert row.count("tied to lm_head") == 1


def test_module_spec_describe():
    base = dict(name="m", kind="ffn", module_class="Linear", in_features=8, out_features=4)
    assert ModuleSpec(precision="fp16", **base).describe() == "fp16 storage"
    assert ModuleSpec(precision="skip", **base).describe() == "unchanged"
    w = {"bits": 8, "symmetric": True, "granularity": "tensor", "group_size": None}
    assert ModuleSpec(precision="int8", weights=w, activations={"mode": "static", "granularity": "tensor"},
                      **base).describe() == "W8A8 static/tensor (tensor)"
