"""Tiny random decoder models of the architectures the algorithms know, with planted outliers."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import transformers

torch.set_num_threads(1)

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(**_COMMON, tie_word_embeddings=False)
    if arch == "mistral":
        return transformers.MistralConfig(**_COMMON, sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**_COMMON)
    if arch == "qwen3":
        return transformers.Qwen3Config(**_COMMON, head_dim=16)
    if arch == "gemma":
        return transformers.GemmaConfig(**_COMMON, head_dim=16)
    if arch == "gemma2":
        return transformers.Gemma2Config(**_COMMON, head_dim=16, sliding_window=16)
    if arch == "gemma3_text":
        return transformers.Gemma3TextConfig(**_COMMON, head_dim=16, sliding_window=16)
    if arch == "phi3":
        return transformers.Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    raise KeyError(arch)


def tiny_model(arch: str, seed: int = 0, outlier: float = 30.0) -> torch.nn.Module:
    """A random ``arch`` causal LM in float32 whose norms have non-trivial weights and a few
    outlier channels (so smoothing changes the weights a lot and folding mistakes show)."""
    torch.manual_seed(seed)
    config = _config(arch)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    gemma_like = arch.startswith("gemma")
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                w = module.weight
                if w.dim() != 1:
                    continue
                base = 1.0 + 0.3 * torch.randn(w.shape, generator=gen)
                if name.endswith("layernorm"):  # the norms feeding linears
                    base[:3] *= outlier
                w.copy_(base - 1.0 if gemma_like else base)
        for name, module in model.named_modules():
            # outliers at down_proj's input too: a few large rows of up_proj (Phi-3: of gate_up_proj's up half)
            if name.endswith("mlp.up_proj"):
                module.weight[:3] *= outlier / 3
            elif name.endswith("mlp.gate_up_proj"):
                half = module.weight.shape[0] // 2
                module.weight[half:half + 3] *= outlier / 3
    return model


@pytest.fixture(scope="module")
def token_batches():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 96, (2, 24), generator=gen) for _ in range(2)]


@torch.no_grad()
def sampled_windows(model: torch.nn.Module, n: int, length: int, seed: int) -> torch.Tensor:
    """Token windows sampled from ``model`` itself. On its own samples the float model is the best
    possible predictor in expectation (the NLL increase of any other model is a KL divergence, >= 0),
    so quantization damage shows up as an NLL increase even for a random tiny model."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, 1), generator=gen)
    for _ in range(length - 1):
        logits = model(input_ids=ids).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        ids = torch.cat([ids, nxt], dim=1)
    return ids
