"""Automatic mixed precision: the search finds the planted sensitive module with a logarithmic number
of evaluations, reports what it measured truthfully, and emits rules that resolve."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import hfptq
from hfptq import HfPtqConfig, resolve_plan
from hfptq.algorithms import validate_options
from hfptq.algorithms.autoprecision import _compose_rules, _PrefixCache, mean_nll, search
from hfptq.errors import ConfigError, DataError

from .conftest import sampled_windows, tiny_model

PLANTED = "model.layers.1.mlp.down_proj"
ALL_W8A8 = HfPtqConfig(scheme={"attention": "int8"})


@pytest.fixture(scope="module")
def planted():
    """Tiny Llama whose layer-1 down_proj input has 1000x outlier channels (function unchanged in float:
    up_proj rows x1000, down_proj columns /1000), so per-token W8A8 ruins that one module."""
    model = tiny_model("llama", outlier=1.0)
    with torch.no_grad():
        mlp = model.get_submodule("model.layers.1.mlp")
        mlp.down_proj.weight.mul_(10)
        mlp.up_proj.weight[:4] *= 1000
        mlp.down_proj.weight[:, :4] /= 1000
        model.lm_head.weight.mul_(10)  # peaked predictions: quantization damage is visible
    return model, sampled_windows(model, 8, 32, 1), sampled_windows(model, 8, 32, 2), sampled_windows(model, 8, 32, 3)


def kl_metric(reference: torch.nn.Module):
    """-KL(reference || model) per position: 0 for the reference, deterministic, no sampling noise."""
    cache = {}

    @torch.no_grad()
    def metric(model, windows):
        if id(windows) not in cache:
            cache[id(windows)] = torch.log_softmax(reference(input_ids=windows).logits.float(), -1)
        ref = cache[id(windows)]
        logp = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
        return -float((ref.exp() * (ref - logp)).sum(-1).mean())

    return metric


# ------------------------------------------------------------------ loss plumbing


def test_mean_nll_is_the_shifted_cross_entropy(planted):
    model, _, windows, _ = planted
    with torch.no_grad():
        logits = model(input_ids=windows).logits.float()
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert mean_nll(model, windows, batch_size=3) == pytest.approx(float(full), rel=1e-5)
    last = F.cross_entropy(logits[:, -6:-1].reshape(-1, logits.shape[-1]), windows[:, -5:].reshape(-1))
    assert mean_nll(model, windows, last_tokens=5) == pytest.approx(float(last), rel=1e-5)


def test_prefix_replay_reproduces_the_full_forward(planted):
    model, _, windows, _ = planted
    cache = _PrefixCache(model, windows[:3], batch_size=2)
    reference = cache.reference(8)
    assert reference == pytest.approx(mean_nll(model, windows[:3], last_tokens=8), rel=1e-6)
    for start in range(len(cache.layers) + 1):
        assert cache.score(start, 8, "loss") == pytest.approx(reference, rel=1e-6)
        assert abs(cache.score(start, 8, "kl")) < 1e-6
    assert cache.layer_of("model.layers.1.mlp.up_proj") == 1 and cache.layer_of("lm_head") == len(cache.layers)


# ------------------------------------------------------------------ the search


@pytest.mark.parametrize("sensitivity", ["kl", "loss", "sqnr"])
def test_search_keeps_exactly_the_planted_module(planted, sensitivity):
    model, calib, search_windows, heldout = planted
    metric = kl_metric(copy.deepcopy(model))
    everything = hfptq.quantize_model(copy.deepcopy(model), copy.deepcopy(ALL_W8A8), progress=False)
    drop_all = -metric(everything, search_windows)
    budget = 0.3 * drop_all
    result = search(model, ALL_W8A8, {"max_metric_drop": budget}, calibration=calib, eval_windows=search_windows,
                    heldout_windows=heldout, metric_fn=metric, progress=False,
                    options={"margin": 1.0, "sensitivity": sensitivity, "sensitivity_windows": 2, "sensitivity_tokens": 16})
    report = result.report
    n = report["num_candidates"]
    assert report["sensitivity"][0]["module"] == PLANTED
    assert result.kept == [PLANTED]
    # binary search: k=0 plus at most ceil(log2 n) steps; k-1 was measured and failed the target
    assert report["evaluations"]["search"] <= 1 + math.ceil(math.log2(n))
    trials = {t["k"]: t["increase"] for t in report["trials"]}
    assert trials[0] == pytest.approx(drop_all, rel=1e-6) and trials[0] > budget and trials[1] <= budget
    # the held-out number is what a user gets by quantizing with the emitted config
    mine = hfptq.quantize_model(copy.deepcopy(model), copy.deepcopy(result.config), calibration_data=calib,
                                progress=False)
    assert report["heldout"]["increase"] == pytest.approx(-metric(mine, heldout), rel=1e-6, abs=1e-9)
    assert result.meets_budget and report["heldout"]["increase"] <= budget
    plan = resolve_plan(model, HfPtqConfig(scheme={"attention": "int8"}, rules=result.rules))
    assert plan[PLANTED].precision == "fp16"
    assert sum(e.precision == "fp16" for e in plan) == 1
    assert report["speed"]["final_int8_mac_share"] < report["speed"]["base_int8_mac_share"] == 1.0
    assert report["size"]["base_mib"] < report["size"]["final_mib"] < report["size"]["float_mib"]
    assert "auto_precision" in result.recipe_snippet()


def test_generous_budget_costs_one_search_evaluation(planted):
    model, calib, search_windows, heldout = planted
    result = search(model, ALL_W8A8, {"max_nll_increase": 10.0}, calibration=calib, eval_windows=search_windows,
                    heldout_windows=heldout, progress=False, options={"sensitivity_windows": 1, "sensitivity_tokens": 8})
    assert result.kept == [] and result.rules == []
    assert result.report["evaluations"]["search"] == 1 and result.report["evaluations"]["heldout"] == 1
    expected = mean_nll(model, heldout, batch_size=4)
    assert result.report["baseline"]["heldout"] == pytest.approx(expected, rel=1e-6)
    # given baselines are used as they are (no float evaluation)
    again = search(model, ALL_W8A8, {"max_nll_increase": 10.0}, calibration=calib, eval_windows=search_windows,
                   heldout_windows=heldout, progress=False, baselines={"eval": 1.0, "heldout": expected},
                   options={"sensitivity_windows": 1, "sensitivity_tokens": 8})
    assert again.report["evaluations"]["baselines"] == 0 and again.report["baseline"]["eval"] == 1.0


def test_missed_heldout_budget_is_reported_not_hidden(planted):
    model, calib, search_windows, heldout = planted
    metric = kl_metric(copy.deepcopy(model))
    result = search(model, ALL_W8A8, {"max_metric_drop": 0.0}, calibration=calib, eval_windows=search_windows,
                    heldout_windows=heldout, metric_fn=metric, progress=False,
                    options={"sensitivity_windows": 1, "sensitivity_tokens": 8, "max_rounds": 2})
    # FP16 storage itself perturbs the model a little, so a zero budget cannot be met: all modules
    # end up in the fallback and the report says the budget was missed
    assert len(result.kept) == result.report["num_candidates"]
    assert result.report["heldout"]["meets_budget"] is False and not result.meets_budget
    assert result.report["rounds"][-1]["k"] == result.report["num_candidates"]


# ------------------------------------------------------------------ rules


def test_tied_lm_head_falls_back_to_weight_only_and_resolves():
    """A tied LM head cannot be FP16 while the embedding shares it: W8A8 -> INT8 weight-only (shared
    storage kept), weight-only -> both left float."""
    model = tiny_model("gemma3_text")
    base = HfPtqConfig(scheme={"attention": "int8"})
    plan = resolve_plan(model, base)
    assert plan["model.embed_tokens"].tied_to == "lm_head"
    rules, dropped = _compose_rules(base, plan, ["lm_head", PLANTED], {"precision": "fp16"}, "lm_head")
    assert dropped == []
    new = resolve_plan(model, HfPtqConfig(scheme={"attention": "int8"}, rules=rules))
    assert new["lm_head"].precision == "int8" and new["lm_head"].activations == {"mode": "none"}
    assert new["model.embed_tokens"].tied_to == "lm_head"
    assert new[PLANTED].precision == "fp16"

    weight_only = HfPtqConfig(scheme={"attention": "int8"},
                              rules=[{"targets": ["kind:lm_head"], "precision": "int8", "activations": "none"}])
    plan = resolve_plan(model, weight_only)
    rules, dropped = _compose_rules(weight_only, plan, ["lm_head"], {"precision": "fp16"}, "lm_head")
    assert dropped == ["rules[0]"]
    new = resolve_plan(model, HfPtqConfig(scheme={"attention": "int8"}, rules=rules))
    assert new["lm_head"].precision == "skip" and new["model.embed_tokens"].precision == "skip"


def test_base_rules_fully_claimed_by_the_fallback_are_dropped():
    model = tiny_model("llama")
    base = HfPtqConfig(scheme={"attention": "int8"},
                       rules=[{"name": "dp", "targets": [PLANTED], "precision": "int8", "weights": {"observer": "mse"}},
                              {"targets": ["kind:lm_head"], "precision": "int8"}])
    plan = resolve_plan(model, base)
    rules, dropped = _compose_rules(base, plan, [PLANTED], {"precision": "fp16"}, None)
    assert dropped == ["dp"] and [r.get("name") for r in rules] == ["auto_precision", None]
    resolve_plan(model, HfPtqConfig(scheme={"attention": "int8"}, rules=rules))  # no "shadowed rule" error


# ------------------------------------------------------------------ validation


def test_inputs_and_options_are_validated(planted):
    model, calib, search_windows, _ = planted
    with pytest.raises(DataError, match="held-out"):
        search(model, ALL_W8A8, calibration=calib, eval_windows=search_windows, heldout_windows=search_windows[:2],
               progress=False)
    with pytest.raises(ConfigError, match="metric_fn"):
        search(model, ALL_W8A8, {"max_metric_drop": 1.0}, eval_windows=search_windows, heldout_windows=calib,
               progress=False)
    with pytest.raises(ConfigError, match="Did you mean 'max_ppl_increase_pct'"):
        validate_options("auto_precision", {"budget": {"max_ppl_increase": 0.3}})
    with pytest.raises(ConfigError, match="exactly one"):
        validate_options("auto_precision", {"budget": {"max_ppl_increase_pct": 0.3, "max_nll_increase": 0.1}})
    with pytest.raises(ConfigError, match="fallback"):
        validate_options("auto_precision", {"fallback": "int3"})
    assert validate_options("auto_precision", {"fallback": {"precision": "int8", "activations": "none"}})["fallback"] \
        == {"precision": "int8", "activations": "none"}


def test_search_trials_match_quantize_model_with_a_smoothed_tied_head():
    """SmoothQuant on a tied LM head records the embedding's 1/s on the base plan and keeps the head's W * s
    out of the float model. The search's k=0 trial must convert exactly what quantize_model builds (it once
    lost the 1/s and scored garbage), and ``kind:`` candidates use the rule syntax."""
    import copy

    import hfptq

    model = tiny_model("gemma3_text")
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    calib, ev, ho = (torch.randint(0, vocab, (4, 32), generator=gen) for _ in range(3))
    config = HfPtqConfig(smoothquant={"alpha": 0.5, "groups": ["gate_up", "head"]}, calibration={"dataset": "unused"})
    quantized = hfptq.quantize_model(copy.deepcopy(model), config, calibration_data=calib, progress=False)
    assert quantized.hfptq_plan["model.embed_tokens"].extra.get("embed_channel_scale") is not None  # head smoothed
    expected = mean_nll(quantized, ev)
    res = search(model, config, {"max_ppl_increase_pct": 1000.0}, calibration=calib, eval_windows=ev,
                 heldout_windows=ho, progress=False, options={"candidates": ["kind:lm_head", "kind:ffn"]})
    trial0 = next(t for t in res.report["trials"] if t["k"] == 0)
    assert trial0["value"] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    with pytest.raises(ConfigError, match="unknown kind"):
        search(model, config, calibration=calib, eval_windows=ev, heldout_windows=ho, progress=False,
               options={"candidates": ["kind:mlp"]})
