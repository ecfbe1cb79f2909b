"""End-to-end recipe runs: every built-in recipe runs (tiny slices) and writes a report + checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hfptq
from hfptq.data import shared_data_dir
from hfptq.pipeline import run_recipe
from hfptq.recipes import find_recipe, load_recipe
from tests.tiny import tiny_bert_dir, tiny_llama_dir

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="../shared/data not found (set HFPTQ_DATA_DIR)")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))


@needs_data
def test_run_recipe_tiny_llama_writes_report_and_reloadable_checkpoint(tiny_llama, tmp_path):
    recipe = load_recipe(find_recipe("default"))
    result = run_recipe(recipe, model=str(tiny_llama), data_dir=str(DATA), output_dir=str(tmp_path), quick=True,
                        progress=False, print_summary=False)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["perplexity"]["float"] > 1 and report["perplexity"]["quantized"] > 1
    assert "piqa" in report["accuracy"]
    assert report["calibration"]["activations"].startswith("dynamic")  # the default recipe: W8A8 dynamic
    assert [a["name"] for a in report["algorithms"]] == ["smoothquant", "rotation"]
    assert report["algorithms"][1]["details"]["block_sizes"] == [128]
    assert "rotated in blocks of 128" in (tmp_path / "report" / "report.md").read_text()  # down_proj's input
    # the report says what the calibration forwards computed in (bf16 autocast on a CPU with native bf16)
    assert report["calibration"]["compute_dtype"] in ("bfloat16 (autocast)", "float32")
    assert report["calibration"]["compute_dtype"] == result.quantized_model.hfptq_calibration["compute_dtype"]
    assert report["size"]["quantized_bytes"] < report["size"]["float_bytes"]
    assert {r["module"] for r in report["layer_errors"]} == {
        e.name for e in result.quantized_model.hfptq_plan if e.precision != "skip" and e.kind != "embedding"}
    assert (tmp_path / "report" / "report.md").exists()
    # the saved checkpoint reloads to identical logits without recalibration
    from transformers import AutoModelForCausalLM

    ids = torch.randint(5, 200, (1, 12))
    with torch.no_grad():
        before = result.quantized_model(ids).logits
        after = AutoModelForCausalLM.from_pretrained(result.model_dir)(ids).logits
    assert torch.equal(before, after)


@needs_data
def test_bert_recipe_on_tiny_classifier(tmp_path):
    folder = tiny_bert_dir(tmp_path / "bert")
    recipe = load_recipe(find_recipe("bert-ag-news"))
    result = run_recipe(recipe, model=str(folder), data_dir=str(DATA), output_dir=str(tmp_path / "out"), quick=True,
                        progress=False, print_summary=False)
    acc = result.report.accuracy["ag_news"]["metrics"]["accuracy"]
    assert 0.0 <= acc["float"] <= 1.0 and 0.0 <= acc["quantized"] <= 1.0
    kinds = {(e.kind, e.precision) for e in result.quantized_model.hfptq_plan}
    assert ("attention", "fp16") in kinds and ("ffn", "int8") in kinds
    assert ("other", "skip") in kinds  # classifier head and pooler stay float, listed in the plan


@pytest.mark.real_model
@needs_data
@pytest.mark.parametrize("name", ["default", "static-ffn", "w8a8-all-linear", "int8-weight-only", "int4-g128",
                                  "smollm2-135m"])
def test_builtin_recipe_runs_on_real_model(name, tmp_path):
    recipe = load_recipe(find_recipe(name))
    result = run_recipe(recipe, data_dir=str(DATA), output_dir=str(tmp_path), quick=True, progress=False,
                        print_summary=False)
    ppl = result.report.perplexity
    assert ppl["float"] < 200 and ppl["quantized"] < 200, ppl  # the real models read WikiText fluently
    assert ppl["rel_drop"] is not None
    assert (tmp_path / "model" / "config.json").exists()
