"""Smoke tests of the evaluation pipeline on Gemma 3 270M and the shared data (slow tier)."""
import math

import pytest
import torch

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    try:
        from hfptq.models import gemma3_270m_path

        path = gemma3_270m_path()
    except Exception as exc:  # package missing, conversion impossible, ...
        pytest.skip(f"Gemma 3 270M is not available: {exc}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def test_perplexity_piqa_size_and_layer_error_on_gemma(gemma, tmp_path):
    data = pytest.importorskip("hfptq.data")
    from hfptq.evaluation import (
        QualityReport, layer_errors, model_size, multiple_choice, perplexity, piqa_examples,
    )

    model, tok = gemma
    root = data.shared_data_dir()
    if root is None or not root.is_dir():
        pytest.skip("the shared data folder (../shared/data or $HFPTQ_DATA_DIR) is not available")
    spec = {"dataset": "Salesforce/wikitext", "config": "wikitext-2-raw-v1", "split": "test"}
    text = data.load_text_corpus(spec, data_dir=root)
    rows = data.load_piqa("validation", limit=8, seed=0, data_dir=root)
    ids = data.tokenize_corpus(text[:20000], tok, add_bos=False)

    with_bos = perplexity(model, ids, seq_len=256, bos_token_id=tok.bos_token_id, max_windows=2, progress=False)
    without = perplexity(model, ids, seq_len=256, max_windows=2, progress=False)
    assert with_bos.num_tokens == 2 * 255 and without.num_tokens == 2 * 255
    # A pretrained LM: far better than uniform over 262k tokens, and Gemma needs its BOS.
    assert 2.0 < with_bos.perplexity < 200.0
    assert with_bos.perplexity < without.perplexity

    examples = piqa_examples(rows)
    batched = multiple_choice(model, tok, examples, batch_size=8, progress=False)
    single = multiple_choice(model, tok, examples[:3], batch_size=1, progress=False)
    for a, b in zip(batched["loglikelihoods"][:3], single["loglikelihoods"]):
        assert a == pytest.approx(b, abs=2e-3)  # right padding does not change the scores
    assert 0.0 <= batched["acc"] <= 1.0

    size = model_size(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert size["by_precision"]["float32"]["bytes"] >= 4 * n_params  # tied embedding counted once

    rows = layer_errors(model, model, ids[None, :64], ["model.layers.0.mlp.down_proj", "model.layers.17"],
                        progress=False)
    assert all(r["sqnr_db"] == math.inf for r in rows)

    report = QualityReport("gemma-3-270m")
    report.set_perplexity(with_bos, with_bos, dataset="wikitext-2 test (2 windows)")
    report.add_accuracy("piqa", batched, batched)
    report.set_size(size, size)
    paths = report.save(tmp_path)
    assert paths["markdown"].read_text().count(f"{with_bos.perplexity:.4f}") >= 2
