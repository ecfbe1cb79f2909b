"""Tiny hand-made models and tokenizers whose outputs are known exactly (for hand-computed tests)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn


class _ToyLM(nn.Module):
    """Base: a dummy parameter (so the device can be found) and HF-like ``.logits`` outputs."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, ...]] = []  # input shapes seen, to check batching

    def logits_for(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, V]
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask=None, **kwargs):
        self.calls.append(tuple(input_ids.shape))
        return SimpleNamespace(logits=self.logits_for(input_ids))


class UniformLM(_ToyLM):
    """Every next token has probability 1/V: perplexity is exactly V."""

    def logits_for(self, input_ids):
        b, l = input_ids.shape
        return torch.zeros(b, l, self.vocab_size)


class BigramLM(_ToyLM):
    """``p(next | current) = probs[current, next]``: the logits only depend on the current token."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__(probs.shape[0])
        self.register_buffer("log_probs", probs.log())

    def logits_for(self, input_ids):
        return self.log_probs[input_ids]


class PositionalLM(_ToyLM):
    """``p(next)`` depends only on the position ``t`` inside the model input (rows of ``probs``)."""

    def __init__(self, probs: torch.Tensor) -> None:  # [positions, V]
        super().__init__(probs.shape[1])
        self.register_buffer("log_probs", probs.log())

    def logits_for(self, input_ids):
        b, l = input_ids.shape
        return self.log_probs[:l].unsqueeze(0).expand(b, l, -1).clone()


class UnigramLM(_ToyLM):
    """``p(next) = probs[next]`` whatever the context."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__(probs.shape[0])
        self.register_buffer("log_probs", probs.log())

    def logits_for(self, input_ids):
        b, l = input_ids.shape
        return self.log_probs.expand(b, l, -1).clone()


def prefix_logits(prefix: list[int], vocab_size: int) -> torch.Tensor:
    """Logits of :class:`PrefixSumLM` after reading ``prefix`` (depends on the whole prefix)."""
    s = sum(prefix) % 17 + len(prefix) % 5
    return torch.tensor([math.cos(0.37 * v * (s + 1)) * 3.0 for v in range(vocab_size)])


class PrefixSumLM(_ToyLM):
    """Causal toy whose logits at position t depend on every token up to t (sum and count)."""

    def logits_for(self, input_ids):
        b, l = input_ids.shape
        out = torch.empty(b, l, self.vocab_size)
        for i in range(b):
            row = input_ids[i].tolist()
            for t in range(l):
                out[i, t] = prefix_logits(row[: t + 1], self.vocab_size)
        return out


class CharTokenizer:
    """One token per character (``id = ord(c)``, ASCII only); ids 0/1/2 are pad/bos/eos."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    vocab_size = 128

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def encode_one(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [ord(c) for c in text]
        assert all(3 <= i < 128 for i in ids), text
        return ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids

    def __call__(self, texts, add_special_tokens: bool = True, **kwargs):
        if isinstance(texts, str):
            return {"input_ids": self.encode_one(texts, add_special_tokens)}
        return {"input_ids": [self.encode_one(t, add_special_tokens) for t in texts]}


def tiny_llama(vocab_size: int = 64, seed: int = 0, num_labels: int | None = None):
    """A 2-layer random Llama (causal LM, or sequence classifier with ``num_labels``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if num_labels is not None:
        config.num_labels = num_labels
        return LlamaForSequenceClassification(config).eval()
    return LlamaForCausalLM(config).eval()


def word_tokenizer(words: list[str]):
    """A real ``PreTrainedTokenizerFast``: whitespace-split word level, pad/bos/eos/unk specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
