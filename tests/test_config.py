"""HfPtqConfig: validation with actionable errors, defaults, and the Transformers round trip."""
from __future__ import annotations

import copy
import importlib
import json

import pytest

import hfptq
from hfptq import HfPtqConfig
from hfptq.config import DEFAULT_SCHEME, FORMAT_VERSION, check_target, normalize_rule
from hfptq.errors import ConfigError, ConfigTypeError, HfPtqError


def test_defaults_are_attention_fp16_ffn_int8_w8a8_dynamic():
    cfg = HfPtqConfig()
    assert cfg.quant_method == "hfptq"
    assert cfg.scheme == {"attention": "fp16", "ffn": "int8", "lm_head": "int8", "embedding": "skip", "other": "skip"}
    assert cfg.scheme == DEFAULT_SCHEME
    assert cfg.weights == {"bits": 8, "symmetric": True, "granularity": "channel", "group_size": None,
                           "observer": "minmax"}
    assert cfg.activations == {"mode": "dynamic", "bits": 8, "symmetric": False, "granularity": "token"}
    assert (cfg.mode, cfg.compute_dtype, cfg.preset, cfg.rules, cfg.plan) == ("real", "auto", "auto", [], None)
    assert not cfg.is_static


def test_static_activation_defaults_with_calibration():
    cfg = HfPtqConfig(activations="static", calibration={"dataset": "wikitext", "config": "wikitext-2-raw-v1"})
    assert cfg.activations == {"mode": "static", "bits": 8, "symmetric": True, "granularity": "tensor",
                               "observer": "minmax"}
    assert cfg.is_static
    assert cfg.calibration["split"] == "validation" and cfg.calibration["num_samples"] == 128


# ------------------------------------------------------------------------------------------------
# Errors: HfPtqError subclasses (also ValueError/TypeError), naming the field and the fix
# ------------------------------------------------------------------------------------------------


def _raises(exc_type, *fragments, **kwargs):
    with pytest.raises(exc_type) as info:
        HfPtqConfig(**kwargs)
    assert isinstance(info.value, HfPtqError)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return str(info.value)


def test_unknown_top_level_field_with_typo_suggestion():
    msg = _raises(ConfigError, "unknown field 'activation'", "Did you mean 'activations'?", "Valid fields:",
                  activation="dynamic")
    assert "weights" in msg
    _raises(ConfigError, "unknown field 'foo'", foo=1)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigTypeError, TypeError)


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(weights={"bitz": 8}), ["weights.bitz", "Did you mean 'bits'?"]),
    (dict(activations={"mode": "dynamic", "granulrity": "token"}), ["activations.granulrity", "'granularity'"]),
    (dict(calibration={"dataset": "wikitext", "num_sample": 4}), ["calibration.num_sample", "'num_samples'"]),
    (dict(rules=[{"target": "down_proj", "precision": "fp16"}]), ["rules[0].target", "'targets'"]),
    (dict(rules=[{"targets": "x", "precision": "int8", "weights": {"group": 8}}]), ["rules[0].weights.group"]),
    (dict(scheme={"mlp": "int8"}), ["scheme kind 'mlp'", "Valid kinds"]),
])
def test_unknown_nested_fields(kwargs, fragments):
    _raises(ConfigError, *fragments, **kwargs)


@pytest.mark.parametrize("bits", [2, 3, 16, 0])
def test_weight_bits_must_be_4_or_8(bits):
    _raises(ConfigError, f"weights.bits={bits}", "use 8 (int8) or 4 (int4)", weights={"bits": bits})


def test_activation_bits_must_be_8():
    _raises(ConfigError, "activations.bits=4", "8 bits", activations={"mode": "dynamic", "bits": 4})


def test_rule_bits_contradicting_precision():
    _raises(ConfigError, "rules[0].weights.bits=4 contradicts precision='int8'",
            rules=[{"targets": "x", "precision": "int8", "weights": {"bits": 4}}])


@pytest.mark.parametrize("value", ["8", 8.0, True])
def test_wrong_types_are_type_errors(value):
    _raises(ConfigTypeError, "weights.bits must be of type int", weights={"bits": value})


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(weights="int8"), ["weights must be a mapping", "'int8'"]),
    (dict(activations=8), ["activations must be 'dynamic', 'static', 'none' or a mapping"]),
    (dict(scheme="fp16"), ["scheme must be a mapping of kind -> precision"]),
    (dict(rules={"targets": "x", "precision": "fp16"}), ["rules must be a list"]),
    (dict(rules=["down_proj"]), ["rules[0] must be a mapping"]),
    (dict(rules=[{"targets": "x", "precision": "int8", "weights": "channel"}]), ["rules[0].weights must be a mapping"]),
    (dict(modules_to_not_convert="lm_head"), ["modules_to_not_convert must be a list", "['lm_head']"]),
    (dict(calibration="wikitext"), ["calibration must be a mapping"]),
    (dict(preset=3), ["preset must be a string"]),
    (dict(smoothquant="yes"), ["smoothquant must be a mapping"]),
])
def test_non_mapping_sections_are_type_errors(kwargs, fragments):
    _raises(ConfigTypeError, *fragments, **kwargs)


def test_group_size_required_and_positive():
    _raises(ConfigError, "weights.group_size must be a positive integer", "e.g. 128",
            weights={"granularity": "group"}, activations="none")
    _raises(ConfigError, "weights.group_size must be a positive integer",
            weights={"granularity": "group", "group_size": 0}, activations="none")


def test_w8a8_with_group_weights_is_refused():
    _raises(ConfigError, "weights.granularity='group' needs activations='none'", "granularity='channel'",
            weights={"granularity": "group", "group_size": 32})
    # weight-only and fake mode may use groups
    assert HfPtqConfig(weights={"granularity": "group", "group_size": 32}, activations="none").weights["group_size"] == 32
    assert HfPtqConfig(weights={"granularity": "group", "group_size": 32}, mode="fake").mode == "fake"


def test_static_without_calibration():
    _raises(ConfigError, "activations='static' needs calibration data", "calibration=dict(dataset=", "'dynamic'",
            activations="static")
    _raises(ConfigError, "calibration.dataset is required", activations="static", calibration={"split": "train"})
    _raises(ConfigError, "calibration.num_samples must be a positive integer",
            activations="static", calibration={"dataset": "x", "num_samples": 0})


def test_activation_granularity_must_fit_the_mode():
    _raises(ConfigError, "with mode='dynamic'", "granularity='token'", activations={"mode": "dynamic",
                                                                                    "granularity": "tensor"})
    _raises(ConfigError, "granularity='token' with mode='static'",
            activations={"mode": "static", "granularity": "token"}, calibration={"dataset": "x"})


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(preset="lama"), ["preset='lama' is unknown", "Did you mean 'llama'?"]),
    (dict(compute_dtype="bfloat"), ["compute_dtype='bfloat'", "Did you mean 'bfloat16'?"]),
    (dict(mode="simulate"), ["mode='simulate'", "'real'", "'fake'"]),
    (dict(activations="dinamic"), ["activations.mode='dinamic'", "Did you mean 'dynamic'?"]),
    (dict(scheme={"ffn": "int6"}), ["scheme.ffn='int6'", "Choose one of"]),
    (dict(rules=[{"targets": "x", "precision": "in8"}]), ["rules[0].precision='in8'", "Did you mean 'int8'?"]),
    (dict(rules=[{"targets": "x"}]), ["rules[0] needs both 'targets'", "'precision'"]),
    (dict(rules=[{"targets": [], "precision": "fp16"}]), ["rules[0].targets must be a non-empty"]),
    (dict(rules=[{"targets": "re:mlp.(up", "precision": "fp16"}]), ["rules[0].targets", "not a valid regular expression"]),
    (dict(rules=[{"targets": "kind:mlp", "precision": "fp16"}]), ["'kind:mlp' names an unknown kind", "ffn"]),
    (dict(rules=[{"targets": "x", "precision": "fp16", "weights": {"bits": 8}}]), ["rules[0].weights only applies"]),
    (dict(rules=[{"targets": "x", "precision": "bf16", "activations": "dynamic"}]), ["rules[0].activations only"]),
    (dict(rules=[{"targets": "x", "precision": "int8", "activations": "sometimes"}]), ["rules[0].activations.mode"]),
    (dict(format_version=FORMAT_VERSION + 1), ["newer hfptq", "pip install -U hfptq"]),
])
def test_invalid_values_name_the_field_and_the_fix(kwargs, fragments):
    _raises(ConfigError, *fragments, **kwargs)


def test_check_target_accepts_the_documented_forms():
    for target in ("down_proj", "mlp.down_proj", "Linear", "re:mlp\\.(up|down)_proj$", "kind:ffn", "kind:lm_head"):
        check_target(target)
    rule = normalize_rule({"targets": "down_proj", "precision": "int4", "weights": {"group_size": 64},
                           "activations": "none", "name": "ffn-int4"}, 3)
    assert rule == {"targets": ["down_proj"], "precision": "int4", "weights": {"group_size": 64},
                    "activations": {"mode": "none"}, "name": "ffn-int4"}


# ------------------------------------------------------------------------------------------------
# int4 via the top-level weights
# ------------------------------------------------------------------------------------------------


def test_top_level_int4_switches_the_default_scheme():
    cfg = HfPtqConfig(weights={"bits": 4})
    assert cfg.weights == {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 128,
                           "observer": "minmax"}
    assert cfg.scheme["ffn"] == cfg.scheme["lm_head"] == "int4"
    # an explicit scheme entry wins
    assert HfPtqConfig(weights={"bits": 4}, scheme={"lm_head": "int8"}).scheme["lm_head"] == "int8"


# ------------------------------------------------------------------------------------------------
# Serialisation: what Transformers does with the config
# ------------------------------------------------------------------------------------------------


def _rich_config(**extra) -> HfPtqConfig:
    return HfPtqConfig(
        weights={"symmetric": True}, activations={"mode": "dynamic", "symmetric": False},
        scheme={"attention": "bf16"}, preset="llama", mode="fake", compute_dtype="float32",
        rules=[{"targets": ["re:layers\\.0\\.mlp", "lm_head"], "precision": "int4", "weights": {"group_size": 32},
                "name": "first"}, {"targets": "kind:attention", "precision": "fp16"}],
        modules_to_not_convert=["model.layers.1.mlp.down_proj"], **extra,
    )


@pytest.mark.parametrize("make", [HfPtqConfig, _rich_config,
                                  lambda: HfPtqConfig(activations="static", calibration={"dataset": "wikitext",
                                                                                         "seq_len": 64}),
                                  lambda: HfPtqConfig(weights={"bits": 4, "group_size": 64})])
def test_to_dict_from_dict_round_trip(make):
    cfg = make()
    data = cfg.to_dict()
    assert data["quant_method"] == "hfptq" and data["format_version"] == FORMAT_VERSION
    text = json.dumps(data)  # what lands in config.json
    again = HfPtqConfig.from_dict(json.loads(text))  # what Transformers calls on reload
    assert isinstance(again, HfPtqConfig)
    assert again.to_dict() == data
    assert json.loads(again.to_json_string(use_diff=False)) == data
    assert "HfPtqConfig" in repr(again)


def test_auto_quantization_config_finds_hfptq():
    from transformers.quantizers import AutoQuantizationConfig

    data = _rich_config().to_dict()
    cfg = AutoQuantizationConfig.from_dict(data)
    assert type(cfg).__name__ == "HfPtqConfig" and cfg.to_dict() == data


def test_config_with_a_plan_round_trips(load_tiny):
    cfg = HfPtqConfig()
    hfptq.quantize_model(load_tiny("gpt2"), cfg, progress=False)
    assert cfg.plan is not None and cfg.plan["preset"] == "gpt2"
    again = HfPtqConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.plan == cfg.plan and hfptq.Plan.from_dict(again.plan).to_dict() == cfg.plan


def test_in_memory_calibration_objects_are_described_not_serialised():
    class FakeDataset:
        pass

    class FakeTokenizer:
        pass

    dataset, tokenizer = FakeDataset(), FakeTokenizer()
    cfg = HfPtqConfig(activations="static", calibration={"dataset": dataset, "tokenizer": tokenizer})
    data = cfg.to_dict()
    assert data["calibration"]["dataset"] == "<in-memory FakeDataset>"
    assert data["calibration"]["tokenizer"] == "<in-memory FakeTokenizer>"
    json.dumps(data)
    assert cfg.calibration["dataset"] is dataset  # the object itself stays usable
    clone = copy.deepcopy(cfg)
    assert clone.calibration["dataset"] is dataset and clone.calibration is not cfg.calibration
    assert clone.rules is not cfg.rules and clone.to_dict() == data


def test_transformers_written_keys_are_accepted():
    data = HfPtqConfig().to_dict()
    data["hfptq_version"] = "0.0.1"
    assert HfPtqConfig.from_dict(data).to_dict() == HfPtqConfig().to_dict()


def test_registration_survives_reimport():
    import hfptq.quantizer as quantizer_module
    from transformers.quantizers import AutoQuantizationConfig
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    registered = (AUTO_QUANTIZATION_CONFIG_MAPPING["hfptq"], AUTO_QUANTIZER_MAPPING["hfptq"])
    saved = {m: dict(vars(m)) for m in (quantizer_module, hfptq)}
    try:
        importlib.reload(quantizer_module)  # a notebook re-run: must not raise "already registered"
        importlib.reload(hfptq)
        hfptq.quantizer.register()
        assert (AUTO_QUANTIZATION_CONFIG_MAPPING["hfptq"], AUTO_QUANTIZER_MAPPING["hfptq"]) == registered
        assert type(AutoQuantizationConfig.from_dict(HfPtqConfig().to_dict())).__name__ == "HfPtqConfig"
    finally:  # keep the classes the rest of the session imported
        for module, namespace in saved.items():
            vars(module).update(namespace)


# ------------------------------------------------------------------------------------------------
# the one options schema (hfptq.options)
# ------------------------------------------------------------------------------------------------


def test_readme_option_table_is_the_generated_one():
    from pathlib import Path

    from hfptq.options import options_markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- options-table:begin -->\n", "<!-- options-table:end -->"
    assert begin in readme and end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == options_markdown(), "README option table is stale: paste hfptq.options.options_markdown()"


def test_option_schema_defaults_match_the_code_that_uses_them():
    from hfptq.algorithms import OPTION_DEFAULTS
    from hfptq.data import DEFAULT_SPEC
    from hfptq.options import SCHEMA, defaults

    # OPTION_DEFAULTS is built from the schema (defaults()), so comparing their values cannot fail; what can
    # drift is which algorithm sections the code knows
    assert set(OPTION_DEFAULTS) <= set(SCHEMA)
    calib = defaults("calibration")
    for key, value in DEFAULT_SPEC.items():
        assert calib[key] == value, key
    filled = HfPtqConfig(calibration={"dataset": "x"}).calibration
    for key, value in filled.items():
        if key != "dataset":
            assert calib[key] == value, key


def test_options_module_imports_only_errors():
    import ast
    from pathlib import Path

    import hfptq.options as options

    tree = ast.parse(Path(options.__file__).read_text())
    local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert local == {"errors"}


@pytest.mark.parametrize("section,options,fragments", [
    ("gptq", {"dampp": 0.01}, ["Unknown option gptq.dampp", "Did you mean 'damp'?"]),
    ("smoothquant", {"alpah": 0.5}, ["smoothquant.alpah", "Did you mean 'alpha'?"]),
    ("gptq", {"damp": -1}, ["gptq.damp must be in"]),
    ("smoothquant", {"alpha": 5}, ["smoothquant.alpha must be in", "[0, 1]"]),
    ("smoothquant", {"alpha": "serch"}, ["Did you mean 'search'?"]),
    ("gptq", {"block_size": 0}, ["gptq.block_size must be a positive integer"]),
])
def test_algorithm_options_checked_when_the_config_is_built(section, options, fragments):
    with pytest.raises(HfPtqError) as info:
        HfPtqConfig(calibration={"dataset": "wikitext"}, **{section: options})
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("calibration,fragment", [
    ({"percentile": 150}, "calibration.percentile must be in (0, 100]"),
    ({"bins": 0}, "calibration.bins must be in"),
    ({"averaging_constant": 2.0}, "calibration.averaging_constant must be in (0, 1]"),
])
def test_calibration_ranges_checked_when_the_config_is_built(calibration, fragment):
    with pytest.raises(ConfigError) as info:
        HfPtqConfig(activations="static", calibration={"dataset": "wikitext", **calibration})
    assert fragment in str(info.value)


def test_activation_percentile_range_checked_in_rules():
    with pytest.raises(ConfigError, match=r"rules\[0\]\.activations\.percentile must be in"):
        HfPtqConfig(rules=[{"targets": "down_proj", "precision": "int8",
                            "activations": {"mode": "static", "observer": "percentile", "percentile": 150}}],
                    calibration={"dataset": "wikitext"})
