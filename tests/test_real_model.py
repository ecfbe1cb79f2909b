"""Real-model tier (issue 2): Gemma 3 270M with the default config through from_pretrained.

Dynamic per-token W8A8 on the FFN must keep WikiText-2 test perplexity within +2% of the float
model on a fixed slice, and greedy generation must stay coherent.
"""
import pytest
import torch

import hfptq
from hfptq.data import shared_data_dir

pytestmark = [pytest.mark.real_model,
              pytest.mark.skipif(shared_data_dir() is None, reason="../shared/data not found")]

WINDOWS, SEQ_LEN = 8, 512


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfptq.data import load_text_corpus, tokenize_corpus
    from hfptq.models import gemma3_270m_path

    path = str(gemma3_270m_path())
    tok = AutoTokenizer.from_pretrained(path)
    text = load_text_corpus({"dataset": "wikitext", "config": "wikitext-2-raw-v1", "split": "test"},
                            data_dir=shared_data_dir())
    ids = tokenize_corpus(text[:200_000], tok)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, tok, ids, ref


def _ppl(model, tok, ids):
    from hfptq.evaluation import perplexity

    return perplexity(model, ids, seq_len=SEQ_LEN, bos_token_id=tok.bos_token_id, max_windows=WINDOWS,
                      progress=False).perplexity


def test_default_config_ffn_dynamic_w8a8_within_2pct_and_generates(gemma):
    from transformers import AutoModelForCausalLM

    path, tok, ids, ref = gemma
    cfg = hfptq.HfPtqConfig(scheme={"lm_head": "skip"})  # the claim: FFN W8A8 dynamic, attention FP16
    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
    assert {e.precision for e in q.hfptq_plan if e.kind == "ffn"} == {"int8"}
    assert {e.precision for e in q.hfptq_plan if e.kind == "attention"} == {"fp16"}
    assert q.model.layers[0].mlp.down_proj.qweight.dtype == torch.int8
    p_ref, p_q = _ppl(ref, tok, ids), _ppl(q, tok, ids)
    assert p_q <= p_ref * 1.02, (p_ref, p_q)

    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out_ref = ref.generate(**prompt, max_new_tokens=12, do_sample=False)
        out_q = q.generate(**prompt, max_new_tokens=12, do_sample=False)
    n = prompt.input_ids.shape[1]
    text = tok.decode(out_q[0, n:], skip_special_tokens=True)
    assert len(text.split()) >= 5, text
    # Coherent: the float model finds the quantized continuation about as likely as its own greedy one
    # (mean NLL per generated token within 1 nat, i.e. each token at most e x less likely on average).
    def continuation_nll(seq):
        with torch.no_grad():
            logp = torch.log_softmax(ref(seq).logits[0, n - 1:-1].float(), -1)
        return float(-logp.gather(1, seq[0, n:, None]).mean())

    assert continuation_nll(out_q) <= continuation_nll(out_ref) + 1.0, (tok.decode(out_ref[0, n:]), text)


def test_default_plan_with_int8_lm_head(gemma):
    """The full default plan (LM head + tied embedding in INT8 too) stays close and 3x smaller."""
    from transformers import AutoModelForCausalLM

    path, tok, ids, ref = gemma
    q = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=hfptq.HfPtqConfig())
    assert q.model.embed_tokens.source is q.lm_head  # one int8 copy of the 262144 x 640 matrix
    p_ref, p_q = _ppl(ref, tok, ids), _ppl(q, tok, ids)
    from hfptq.quant.backends import w8a8_backend
    from hfptq.quant.kernels import reference_math

    if w8a8_backend().name == "fbgemm-w7":
        # CPUs whose FBGEMM saturates 8-bit x 8-bit sums compute with 7-bit re-gridded weights: the 8-bit
        # reference math must keep the bound below, the route adds its own drop (measured +1.1% to +2.0%)
        p_route = p_q
        with reference_math():
            p_q = _ppl(q, tok, ids)
        assert p_route <= p_q * 1.025, (p_q, p_route)
    assert p_q <= p_ref * 1.025, (p_ref, p_q)  # measured +1.5% on this slice
    assert hfptq.api.model_bytes(q) < 0.4 * hfptq.api.model_bytes(ref)

    # decode: one row per step, served by FBGEMM where it is exact here; every step's logits are the
    # reference int8 math's, bit for bit
    # (the reference of the route this CPU runs: 7-bit re-gridded weights on fbgemm-w7, see hfptq.quant.backends)
    from hfptq.quant.backends import route_reference_math
    from hfptq.quant.kernels import fbgemm_linear_available

    prompt = tok("The capital of France is", return_tensors="pt")
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        fast = q.generate(**prompt, **kw)
        with route_reference_math(q):
            slow = q.generate(**prompt, **kw)
    assert torch.equal(fast.sequences, slow.sequences)
    assert all(torch.equal(a, b) for a, b in zip(fast.logits, slow.logits)) and len(fast.logits) == 8
    route = w8a8_backend().name
    uses_fbgemm = fbgemm_linear_available() if route == "onednn-vnni" else route in ("fbgemm", "fbgemm-a7", "fbgemm-w7")
    slot = "_hfptq_w7" if route == "fbgemm-w7" else "_hfptq_fbgemm"  # fbgemm-w7 packs the 7-bit re-gridded weight
    assert (slot in q.lm_head.__dict__) == uses_fbgemm
