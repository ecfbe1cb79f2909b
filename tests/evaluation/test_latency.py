import pytest
import torch

from hfptq.errors import ConfigError
from hfptq.evaluation.latency import fixed_length_generation_config, measure_latency, peak_rss_bytes, reset_peak_rss

from .toys import UniformLM, tiny_llama


def test_latency_on_a_tiny_random_model():
    model = tiny_llama()
    before = torch.get_num_threads()
    res = measure_latency(model, prompt_len=8, new_tokens=4, repeats=2, warmup=1, threads=1, batch_size=2)
    assert torch.get_num_threads() == before  # restored
    assert res["threads"] == 1
    for key in ("prefill_wall_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token",
                "generate_wall_s", "peak_rss_bytes"):
        assert res[key] > 0, key
    assert res["prefill_cpu_s"] >= 0 and res["generate_cpu_s"] >= 0
    assert len(res["prefill_wall_s_runs"]) == 2 and len(res["generate_wall_s_runs"]) == 2
    assert res["prefill_tokens_per_s"] == pytest.approx(2 * 8 / res["prefill_wall_s"])
    assert (res["batch_size"], res["prompt_len"], res["new_tokens"]) == (2, 8, 4)


def test_fixed_length_generation_never_stops_early():
    """A model whose greedy next token is its end-of-sequence id stops at once by default; the
    measurement's config still makes exactly the requested count, without ``min_new_tokens``."""
    model = tiny_llama()
    prompt = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        first = int(model(prompt).logits[0, -1].argmax())
        model.generation_config.eos_token_id = first
        stopped = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
        config = fixed_length_generation_config(model, 5)
        full = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    assert stopped.shape[1] == prompt.shape[1] + 1
    assert full.shape[1] == prompt.shape[1] + 5
    assert config.eos_token_id >= model.config.vocab_size and config.min_new_tokens in (None, 0)


def test_models_without_generate_skip_decoding():
    model = UniformLM(16)
    res = measure_latency(model, prompt_len=4, new_tokens=3, repeats=1, warmup=0,
                          input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert res["prefill_wall_s"] > 0
    assert res["decode_tokens_per_s"] is None and "decode_skipped" in res


def test_invalid_settings():
    with pytest.raises(ConfigError, match="repeats"):
        measure_latency(tiny_llama(), repeats=0)
    with pytest.raises(ConfigError, match="input_ids"):
        measure_latency(UniformLM(4), prompt_len=4)  # no config.vocab_size


def test_peak_rss_tracks_a_large_allocation():
    reset_ok = reset_peak_rss()
    assert isinstance(reset_ok, bool)
    before = peak_rss_bytes()
    assert before > 0
    block = bytearray(64 * 2**20)  # zero-filled: the pages are touched
    block[:: 4096] = b"\x01" * len(block[:: 4096])
    after = peak_rss_bytes()
    del block
    assert after >= before
    if reset_ok:  # the high-water mark was reset to the current RSS: it must see the new 64 MiB
        assert after - before >= 48 * 2**20
