"""Bit-identity check for refactors of calibration/conversion: fingerprints of tiny calibrated models.

Quantizes tiny random Llama / Gemma 3 / GPT-2 models with 14 configurations (static observers,
SmoothQuant fixed and searched alpha incl. the LM-head group, GPTQ INT8/INT4, true-sequential,
float targets, SmoothQuant + GPTQ) and stores their logits, state dicts and plans; ``check``
recomputes them and compares with ``torch.equal`` (exit 1 on any difference).

    python scripts/calibration_fingerprint.py record /tmp/before.pt    # on the old code
    python scripts/calibration_fingerprint.py check /tmp/before.pt     # on the new code
    python scripts/calibration_fingerprint.py check /tmp/before.pt gptq_ts sq_gemma   # some configs

About 10 s on two cores. Results depend on the CPU (bfloat16 autocast where the CPU has native
bf16): record and check on the same machine.
"""
import copy
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
import torch
import transformers

torch.set_num_threads(1)
import hfptq

def llama(tie=False):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()

def gemma():
    cfg = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                                        layer_types=["sliding_attention", "full_attention"] * 2,
                                        max_position_embeddings=64, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()

def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()

cal = lambda **kw: dict(dataset="x", batch_size=4, **kw)
HEADW8 = {"lm_head": "int8"}
CONFIGS = {
    "static": (llama, dict(activations="static", calibration=cal(observer="entropy", bins=256))),
    "static_gpt2": (gpt2, dict(activations="static", calibration=cal())),
    "static_gemma": (gemma, dict(activations="static", calibration=cal())),
    "sq": (llama, dict(activations="static", calibration=cal(), smoothquant={"alpha": 0.5})),
    "sq_search": (llama, dict(activations="static", calibration=cal(), smoothquant={"alpha": "search"})),
    "sq_search_tied": (lambda: llama(True), dict(activations="static", calibration=cal(), smoothquant={"alpha": "search"})),
    "sq_gemma": (gemma, dict(activations="static", calibration=cal(), smoothquant={"alpha": "search"})),
    "gptq": (llama, dict(activations="static", calibration=cal(), gptq={"damp": 0.01})),
    "gptq_int4": (llama, dict(activations="none", weights={"bits": 4, "group_size": 16}, calibration=cal(), gptq={})),
    "gptq_ts": (llama, dict(activations="none", calibration=cal(dtype="model"), gptq={"true_sequential": True})),
    "gptq_ft": (llama, dict(activations="none", calibration=cal(dtype="model"), gptq={"float_targets": True, "true_sequential": True})),
    "sq_gptq": (llama, dict(activations="static", calibration=cal(), smoothquant={"alpha": "search"}, gptq={"true_sequential": True})),
    "sq_gptq_gemma": (gemma, dict(activations="static", calibration=cal(), smoothquant={"alpha": 0.5}, gptq={"float_targets": True})),
    "dynamic_gptq_gpt2": (gpt2, dict(calibration=cal(), gptq={})),
}

def run(name):
    make, kw = CONFIGS[name]
    torch.manual_seed(1)
    ids = torch.randint(4, 60, (6, 16))
    model = make()
    config = hfptq.HfPtqConfig(**copy.deepcopy(kw))
    hfptq.quantize_model(model, config, calibration_data=ids, progress=False)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return {"logits": logits, "state": sd, "plan": str(getattr(model, "hfptq_plan", ""))}

if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(CONFIGS)
    if mode == "record":
        res = {}
        for n in names:
            try:
                res[n] = run(n)
                print("recorded", n, flush=True)
            except Exception as e:
                print("FAILED", n, type(e).__name__, e, flush=True)
        torch.save(res, out)
    else:
        ref = torch.load(out, weights_only=False)
        bad = 0
        for n in names:
            if n not in ref: continue
            got = run(n)
            ok = torch.equal(got["logits"], ref[n]["logits"]) and got["state"].keys() == ref[n]["state"].keys() and \
                all(torch.equal(got["state"][k], ref[n]["state"][k]) for k in got["state"]) and got["plan"] == ref[n]["plan"]
            bad += not ok
            print("OK " if ok else "DIFF", n, flush=True)
        sys.exit(1 if bad else 0)
