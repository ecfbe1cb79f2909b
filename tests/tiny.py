"""Tiny offline models + tokenizers for fast end-to-end tests (no Hub access).

The tokenizer is a word-level tokenizer over the most frequent words of WikiText-2 validation
(from ../shared/data when present, else a built-in word list), with BOS/EOS/PAD/UNK specials.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

import torch

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
_FALLBACK = ("the of and in to a is was for on as with by he at from his it an were are which this be "
             "that or had first one their its new after who they have her she two been other when there all "
             "during into school time may years more most only over city some world would where later up "
             "such used many can state about national out known university united then made").split()


def _words(limit: int = 250) -> list[str]:
    from hfptq.data import shared_data_dir

    root = shared_data_dir()
    path = root / "wikitext-2-raw" / "wiki.valid.raw" if root else None
    if path is None or not path.exists():
        return _FALLBACK
    counts = collections.Counter(re.findall(r"[A-Za-z]+|[.,;:()'\"-]|\d", path.read_text()[:300_000]))
    return [w for w, _ in counts.most_common(limit)]


def tiny_tokenizer(folder: Path, vocab_limit: int = 250):
    """Build, save into ``folder`` and return a word-level ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + _words(vocab_limit))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def tiny_llama_dir(folder: Path, *, tie: bool = True, seed: int = 0, layers: int = 2) -> Path:
    """A tiny random Llama + word-level tokenizer saved in ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tiny_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def tiny_bert_dir(folder: Path, *, num_labels: int = 4, seed: int = 0) -> Path:
    """A tiny random BERT sequence classifier + WordPiece tokenizer saved in ``folder``."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = [w.lower() for w in _words(200)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(words) | set("abcdefghijklmnopqrstuvwxyz"))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_labels=num_labels, max_position_embeddings=256)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(folder)
    return folder
