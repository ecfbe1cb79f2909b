"""Property tests over configs and recipes (hypothesis).

Whatever a user writes, hfptq either does the job or raises an :class:`hfptq.HfPtqError`: never a
bare ``KeyError``/``TypeError``/``RuntimeError``, and a failed attempt leaves no file behind. The
strategies mix valid values with the typical mistakes (typos, wrong types, out-of-range numbers,
NaN, empty lists) for every field; examples are bounded to keep the file under ~30 s.
"""
from __future__ import annotations

import copy
import math
import os
import textwrap

import pytest
import torch
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hfptq  # noqa: E402
from hfptq.errors import HfPtqError  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


def _any_of(*values):
    return st.sampled_from(values)


NUMBERS = _any_of(0, 1, -1, 7, 8, 16, 0.5, 99.9, 150, 2.0, float("nan"), float("inf"), "8", None, True)

WEIGHTS = st.fixed_dictionaries({}, optional={
    "bits": _any_of(4, 8, 2, 16, "8", None),
    "symmetric": _any_of(True, False, 1, "yes"),
    "granularity": _any_of("tensor", "channel", "group", "grup", 3),
    "group_size": _any_of(None, 8, 16, 32, 7, 0, -4, "16"),
    "observer": _any_of("minmax", "mse", "entropy", "x"),
    "bitz": _any_of(8),
})
ACT_DICT = st.fixed_dictionaries({}, optional={
    "mode": _any_of("dynamic", "static", "none", "bogus"),
    "symmetric": _any_of(True, False, "no"),
    "granularity": _any_of("token", "tensor", "channel", "tokn"),
    "observer": _any_of("minmax", "percentile", "entropy", "mse", "max"),
    "percentile": NUMBERS,
    "bins": _any_of(16, 64, 0, 8, 2.5),
    "averaging_constant": _any_of(0.5, 1, 0, 2, None),
    "rotation": _any_of(None, 0, 8, 16, 12, 64, -2, "16"),
    "bits": _any_of(8, 4),
    "mod": _any_of("static"),
})
ACTIVATIONS = st.one_of(_any_of("dynamic", "static", "none", "bogus", None, 8), ACT_DICT)
PRECISION = _any_of("int8", "int4", "fp16", "bf16", "fp32", "skip", "int7", None)
TARGETS = _any_of("down_proj", "re:mlp\\.(up|gate)_proj$", "kind:ffn", "kind:attention", "kind:nope", "re:(",
                  "Linear", "", "lm_head")
RULE = st.fixed_dictionaries({"targets": st.one_of(TARGETS, st.lists(TARGETS, max_size=2)), "precision": PRECISION},
                             optional={"weights": WEIGHTS, "activations": ACTIVATIONS, "name": _any_of("r", 3),
                                       "target": _any_of("x")})
CALIBRATION = st.one_of(st.none(), st.fixed_dictionaries({"dataset": _any_of("hand-made", None, 3)}, optional={
    "num_samples": _any_of(2, 0, -1, "2"),
    "seq_len": _any_of(8, 0),
    "batch_size": _any_of(1, 2, 0),
    "observer": _any_of("minmax", "percentile", "mse", "entropy", "minmx"),
    "percentile": NUMBERS,
    "bins": _any_of(16, 0),
    "sequential": _any_of(True, False, "yes"),
    "dtype": _any_of("auto", "model", "float64"),
    "samples": _any_of(2),
}))
SMOOTHQUANT = st.one_of(st.none(), _any_of(True, False, "yes"), st.fixed_dictionaries({}, optional={
    "alpha": _any_of(0.5, "search", 5, "serch", -0.1, float("nan")),
    "alpha_grid": _any_of([0.3, 0.5], [], [2.0], "0.5"),
    "search_tokens": _any_of(16, 0),
    "min_scale": _any_of(1e-5, 0, 1e6),
    "groups": _any_of(None, "qkv", ["qkv", "down"], [3]),
    "alpah": _any_of(0.5),
}))
GPTQ = st.one_of(st.none(), _any_of(True, 1), st.fixed_dictionaries({}, optional={
    "damp": _any_of(0.01, 0.1, -1, "x", float("inf")),
    "block_size": _any_of(8, 128, 0, 3.5),
    "act_order": _any_of(True, False, "no"),
    "true_sequential": _any_of(True, False),
    "hessian_dtype": _any_of("float32", "float64", "float16"),
    "dampp": _any_of(0.01),
}))
CONFIG = st.fixed_dictionaries({}, optional={
    "weights": st.one_of(WEIGHTS, _any_of(None, 8, "int8")),
    "activations": ACTIVATIONS,
    "scheme": st.one_of(st.dictionaries(_any_of("attention", "ffn", "lm_head", "embedding", "other", "mlp"), PRECISION,
                                        max_size=3), _any_of(None, "int8")),
    "rules": st.one_of(st.lists(RULE, max_size=2), _any_of(None, "down_proj", {"targets": "x"})),
    "preset": _any_of("auto", "structural", "llama", "nope", 3),
    "calibration": CALIBRATION,
    "mode": _any_of("real", "fake", "bogus"),
    "compute_dtype": _any_of("auto", "float32", "bfloat16", "float16", "fp8"),
    "modules_to_not_convert": _any_of(None, ["lm_head"], "lm_head", [3], []),
    "smoothquant": SMOOTHQUANT,
    "gptq": GPTQ,
    "format_version": _any_of(1, 0, 2, "1"),
    "quantise": _any_of(True),
})

#: Plausible configs (valid values only, every combination): these exercise quantize and save, where the
#: cross-field cases hide (group sizes vs in_features, rotation blocks, static without calibration...).
PLAUSIBLE = st.fixed_dictionaries({}, optional={
    "weights": st.fixed_dictionaries({}, optional={
        "bits": _any_of(4, 8), "symmetric": st.booleans(), "granularity": _any_of("tensor", "channel", "group"),
        "group_size": _any_of(8, 16, 32, 24, 128), "observer": _any_of("minmax", "mse")}),
    "activations": st.one_of(_any_of("dynamic", "static", "none"), st.fixed_dictionaries({}, optional={
        "mode": _any_of("dynamic", "static", "none"), "symmetric": st.booleans(),
        "granularity": _any_of("token", "tensor", "channel"), "observer": _any_of("minmax", "percentile", "mse"),
        "percentile": _any_of(99.0, 100), "bins": _any_of(16, 64), "rotation": _any_of(None, 0, 8, 16, 64)})),
    "scheme": st.dictionaries(_any_of("attention", "ffn", "lm_head", "embedding"),
                              _any_of("int8", "int4", "fp16", "bf16", "fp32", "skip"), max_size=3),
    "rules": st.lists(st.fixed_dictionaries({"targets": _any_of("down_proj", "kind:ffn", "re:q_proj$", "lm_head"),
                                             "precision": _any_of("int8", "int4", "fp16", "skip")}), max_size=2),
    "calibration": st.one_of(st.none(), st.just({"dataset": "hand-made", "num_samples": 2, "seq_len": 8})),
    "mode": _any_of("real", "fake"),
    "compute_dtype": _any_of("auto", "float32", "bfloat16"),
    "modules_to_not_convert": _any_of(None, ["lm_head"]),
    "smoothquant": st.one_of(st.none(), st.just({}), st.just({"alpha": "search", "alpha_grid": [0.3, 0.6]})),
    "gptq": st.one_of(st.none(), st.just({"block_size": 16}), st.just({"act_order": True, "true_sequential": True})),
})


@pytest.fixture(scope="module")
def tiny_float():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _listing(folder):
    return sorted(os.listdir(folder))


@settings(max_examples=80, **SETTINGS)
@given(kwargs=st.one_of(CONFIG, PLAUSIBLE))
def test_any_config_quantizes_and_saves_or_raises_an_hfptq_error(kwargs, tiny_float, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    try:
        config = hfptq.HfPtqConfig(**copy.deepcopy(kwargs))
    except HfPtqError:
        hypothesis.event("config refused")
        return
    model = copy.deepcopy(tiny_float)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    try:
        hfptq.quantize_model(model, config, calibration_data=ids, progress=False)
    except HfPtqError:
        hypothesis.event("quantization refused")
        assert _listing(folder) == []
        return
    hypothesis.event("quantized")
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (2, 8, 64)
    model.save_pretrained(folder / "ckpt")
    assert _listing(folder) == ["ckpt"]  # no staging leftovers
    hfptq.verify_checkpoint(folder / "ckpt")


def _to_yaml(value) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True)


RECIPE = st.fixed_dictionaries({}, optional={
    "version": _any_of(1, 0, -7, 2, "1", None),
    "name": _any_of("r", 3, None),
    "description": _any_of("d", ["x"]),
    "model": st.one_of(_any_of(None, "gemma"), st.fixed_dictionaries({}, optional={
        "name_or_path": _any_of("gemma3-270m", None, 3), "dtype": _any_of("float32", "bfloat16", "fp8"),
        "task": _any_of("causal-lm", "sequence-classification", "clm"), "num_labels": _any_of(3, "3", None),
        "nmae": _any_of("x")})),
    "quantization": st.one_of(_any_of(None, "int8"), CONFIG),
    "evaluation": st.one_of(_any_of(None, []), st.fixed_dictionaries({}, optional={
        "perplexity": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"seq_len": _any_of(128, "128"),
                                                                                "max_windows": _any_of(2, None)})),
        "piqa": _any_of(None, {"limit": 8}, {"limt": 8}),
        "latency": _any_of(None, {"repeats": 1}, {"repeats": "1"}),
        "perplexty": _any_of({}),
    })),
    "output": st.one_of(_any_of(None, "out"), st.fixed_dictionaries({}, optional={
        "dir": _any_of("out", 3), "save": _any_of(True, "yes"), "plots": _any_of(False), "dri": _any_of("x")})),
    "quantisation": _any_of({}),
})


def _yaml_safe(value):
    """NaN/inf survive YAML; tuples do not matter here (strategies give lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    return value


@settings(max_examples=200, **SETTINGS)
@given(data=RECIPE, duplicate=st.booleans())
def test_any_recipe_loads_or_raises_an_hfptq_error(data, duplicate, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    text = _to_yaml(data) if data else "{}\n"
    if duplicate and data:
        key = next(iter(data))
        text += _to_yaml({key: data[key]})  # the same top-level key twice
    path = folder / "r.yaml"
    path.write_text(text)
    try:
        recipe = hfptq.recipes.load_recipe(path)
    except HfPtqError as exc:
        hypothesis.event("recipe refused")
        assert str(path) in str(exc)  # every recipe error names the file
    else:
        hypothesis.event("recipe loaded")
        assert not (duplicate and data)
        recipe.to_config()  # a loaded recipe always builds its config
    assert _listing(folder) == ["r.yaml"]


def test_fuzz_strategies_reach_both_outcomes():
    """The property tests above are only meaningful if their inputs both succeed and fail."""
    ok = hfptq.HfPtqConfig(weights={"bits": 4, "group_size": 16}, activations="none")
    assert ok.weights["bits"] == 4
    with pytest.raises(HfPtqError):
        hfptq.HfPtqConfig(gptq={"dampp": 0.01})
    text = textwrap.dedent("""
        version: 1
        quantization: {activations: dynamic}
    """)
    assert hfptq.recipes.load_recipe(text).to_config().activations["mode"] == "dynamic"
