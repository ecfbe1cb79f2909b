"""Ecosystem fit: ``tie_weights()`` on a tied hfptq model (what lm-eval's ``HFLM`` calls), lm-eval's local
PIQA / LAMBADA tasks, and ``torch.compile`` through ``generate`` (``is_compileable``)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfptq
from hfptq.quant.linear import QuantEmbedding, QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny import tiny_llama_dir  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("lmeval") / "tiny", tie=True)


def _quantized(path):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=hfptq.HfPtqConfig()).eval()


def test_tie_weights_on_tied_quantized_model_keeps_outputs(tied_dir):
    model = _quantized(tied_dir)
    ids = torch.randint(4, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.tie_weights()  # recompute_mapping=True: what HFLM(pretrained=model) calls
    model.tie_weights(recompute_mapping=False)
    emb, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and emb.source is head
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_tie_weights_still_ties_float_pairs(tied_dir):
    # LM head left float: hfptq owns nothing tied, Transformers ties as usual
    model = AutoModelForCausalLM.from_pretrained(
        tied_dir, quantization_config=hfptq.HfPtqConfig(scheme={"lm_head": "skip"})).eval()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_generate_compiles_with_static_cache(tied_dir):
    """``is_compileable``: generate() compiles the decode step (static cache) and matches eager decoding.

    A counting pass-through backend shows Dynamo traced the quantized model (Inductor's C++ build would take
    minutes on a 2-core machine); the traced graph runs the same ops, so tokens and logits agree with eager
    up to float reassociation."""
    from transformers import CompileConfig

    model = _quantized(tied_dir)
    assert model.hf_quantizer.is_compileable
    ids = torch.randint(4, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
              cache_implementation="static")
    eager = model.generate(ids, **kw)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    config = CompileConfig(backend=counting_backend, mode=None)
    config._compile_all_devices = True  # the CPU counterpart of generate's CUDA-only default
    torch._dynamo.reset()
    compiled = model.generate(ids, compile_config=config, **kw)
    assert graphs, "generate did not compile the quantized model"
    assert torch.equal(eager.sequences, compiled.sequences)
    scale = max(float(x.abs().max()) for x in eager.logits)
    assert max(float((x - y).abs().max()) for x, y in zip(eager.logits, compiled.logits)) <= 1e-5 * scale


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not found")
def test_local_task_yamls_join_piqa_labels(tmp_path):
    from hfptq.evaluation.lm_eval import write_local_tasks

    folder = write_local_tasks(tmp_path / "tasks", SHARED)
    rows = (folder / "piqa_validation.jsonl").read_text().splitlines()
    labels = (SHARED / "piqa" / "valid-labels.lst").read_text().split()
    assert len(rows) == len(labels) == 1838
    assert [int(__import__("json").loads(r)["label"]) for r in rows[:5]] == [int(x) for x in labels[:5]]
    assert "Question: {{goal}}\\nAnswer:" in (folder / "piqa_local.yaml").read_text()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not found")
def test_lm_eval_runs_local_tasks_on_quantized_model(tied_dir, tmp_path):
    pytest.importorskip("lm_eval")
    from hfptq.evaluation.lm_eval import lm_eval_evaluate

    model = _quantized(tied_dir)
    tokenizer = AutoTokenizer.from_pretrained(tied_dir)
    out = lm_eval_evaluate(model, tokenizer, data_dir=SHARED, limit=6, batch_size=4, tasks_dir=tmp_path / "t",
                           bootstrap_iters=0)
    piqa = out["results"]["piqa_local"]
    lam = out["results"]["lambada_openai_local"]
    assert 0.0 <= piqa["acc,none"] <= 1.0 and 0.0 <= lam["acc,none"] <= 1.0 and lam["perplexity,none"] > 1.0
