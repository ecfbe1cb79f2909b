import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfptq.errors import ConfigError, DataError
from hfptq.evaluation.perplexity import (
    PerplexityResult,
    _plan_windows,
    _scored_mask,
    compare_perplexity,
    perplexity,
)

from .toys import BigramLM, PositionalLM, UniformLM, tiny_llama

CORPUS = torch.tensor([3, 1, 2, 0, 3, 3, 1, 0, 2, 1])  # N = 10, vocab 4


def _bigram_table() -> torch.Tensor:
    probs = torch.tensor(
        [
            [0.10, 0.20, 0.30, 0.40],
            [0.25, 0.25, 0.40, 0.10],
            [0.70, 0.10, 0.10, 0.10],
            [0.05, 0.50, 0.15, 0.30],
            [0.40, 0.30, 0.20, 0.10],  # row 4 is the BOS token
        ]
    )
    return torch.cat([probs, torch.full((5, 1), 1e-30)], dim=1)  # vocab 5: BOS is never predicted


def _positional_table() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(6, 4, generator=gen) + 0.1
    return raw / raw.sum(1, keepdim=True)


def test_uniform_model_has_perplexity_vocab_size():
    ids = torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(1))
    res = perplexity(UniformLM(7), ids, seq_len=16, progress=False)
    assert res.perplexity == pytest.approx(7.0, rel=1e-6)
    assert res.nll == pytest.approx(math.log(7.0), rel=1e-6)
    # windows [0,16) ... [80,96) and the tail [84,100): 6 full windows x 15 scored + 4 tail tokens
    assert res.num_windows == 7
    assert res.num_tokens == 6 * 15 + 4
    assert (res.seq_len, res.stride) == (16, 16)


def test_bigram_non_overlapping_scores_all_but_window_starts():
    probs = _bigram_table()
    res = perplexity(BigramLM(probs), CORPUS, seq_len=4, progress=False)
    # windows [0,4), [4,8), tail moved back to [6,10) scoring only 8 and 9
    scored = [1, 2, 3, 5, 6, 7, 8, 9]
    expected = -sum(math.log(probs[CORPUS[i - 1], CORPUS[i]]) for i in scored) / len(scored)
    assert res.nll == pytest.approx(expected, rel=1e-6)
    assert res.num_tokens == 8 and res.num_windows == 3


def test_bigram_with_bos_scores_every_token_and_conditions_window_starts_on_bos():
    probs = _bigram_table()
    bos = 4
    res = perplexity(BigramLM(probs), CORPUS, seq_len=5, bos_token_id=bos, progress=False)
    # content 4 per window: [0,4), [4,8), tail [6,10); tokens 0 and 4 follow BOS
    prev = {0: bos, 4: bos}
    pairs = [(prev.get(i, int(CORPUS[i - 1])), int(CORPUS[i])) for i in range(10)]
    expected = -sum(math.log(probs[a, b]) for a, b in pairs) / 10
    assert res.nll == pytest.approx(expected, rel=1e-6)
    assert res.num_tokens == 10
    assert res.stride == 4  # clamped to the corpus part of a window


def test_positional_model_checks_where_tokens_sit_in_windows():
    probs = _positional_table()
    model = PositionalLM(probs)

    def expected(pairs):  # (logits position, corpus index)
        return -sum(math.log(probs[p, CORPUS[i]]) for p, i in pairs) / len(pairs)

    no_bos = perplexity(model, CORPUS, seq_len=4, progress=False)
    pairs = [(0, 1), (1, 2), (2, 3), (0, 5), (1, 6), (2, 7), (1, 8), (2, 9)]
    assert no_bos.nll == pytest.approx(expected(pairs), rel=1e-6)

    with_bos = perplexity(model, CORPUS, seq_len=5, bos_token_id=3, progress=False)
    pairs = [(0, 0), (1, 1), (2, 2), (3, 3), (0, 4), (1, 5), (2, 6), (3, 7), (2, 8), (3, 9)]
    assert with_bos.nll == pytest.approx(expected(pairs), rel=1e-6)

    sliding = perplexity(model, CORPUS, seq_len=4, stride=2, progress=False)
    # windows [0,4) [2,6) [4,8) [6,10): each scores only its 2 new tokens (positions 1, 2)
    pairs = [(0, 1), (1, 2), (2, 3), (1, 4), (2, 5), (1, 6), (2, 7), (1, 8), (2, 9)]
    assert sliding.nll == pytest.approx(expected(pairs), rel=1e-6)
    assert (sliding.num_windows, sliding.num_tokens, sliding.stride) == (4, 9, 2)


def test_max_windows_limits_the_evaluation():
    probs = _positional_table()
    res = perplexity(PositionalLM(probs), CORPUS, seq_len=4, max_windows=2, progress=False)
    pairs = [(0, 1), (1, 2), (2, 3), (0, 5), (1, 6), (2, 7)]
    expected = -sum(math.log(probs[p, CORPUS[i]]) for p, i in pairs) / 6
    assert res.nll == pytest.approx(expected, rel=1e-6)
    assert (res.num_windows, res.num_tokens) == (2, 6)


def test_nll_is_token_weighted_not_mean_of_window_means():
    # sliding windows score 3, 2, 2, 2 tokens: a mean of window means would differ
    probs = _positional_table()
    res = perplexity(PositionalLM(probs), CORPUS, seq_len=4, stride=2, progress=False)
    window_pairs = [[(0, 1), (1, 2), (2, 3)], [(1, 4), (2, 5)], [(1, 6), (2, 7)], [(1, 8), (2, 9)]]
    means = [-sum(math.log(probs[p, CORPUS[i]]) for p, i in w) / len(w) for w in window_pairs]
    assert abs(res.nll - sum(means) / len(means)) > 1e-4


@pytest.mark.parametrize("batch_size", [2, 3, 8])
def test_batching_does_not_change_the_result(batch_size):
    model = PositionalLM(_positional_table())
    one = perplexity(model, CORPUS, seq_len=4, stride=2, batch_size=1, progress=False)
    model.calls.clear()
    many = perplexity(model, CORPUS, seq_len=4, stride=2, batch_size=batch_size, progress=False)
    assert many.nll == pytest.approx(one.nll, rel=1e-6)
    assert len(model.calls) == math.ceil(4 / batch_size)
    assert all(shape[1] == 4 for shape in model.calls)  # never more than seq_len positions


def test_bos_windows_never_exceed_seq_len():
    model = UniformLM(5)
    perplexity(model, torch.randint(0, 5, (50,)), seq_len=8, bos_token_id=4, progress=False)
    assert model.calls and all(shape[1] == 8 for shape in model.calls)


def test_corpus_shorter_than_one_window():
    res = perplexity(UniformLM(3), torch.tensor([0, 1, 2]), seq_len=16, progress=False)
    assert (res.num_windows, res.num_tokens) == (1, 2)
    assert res.perplexity == pytest.approx(3.0)


def test_matches_transformers_loss_on_a_real_tiny_model():
    model = tiny_llama(vocab_size=64)
    ids = torch.randint(3, 64, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_loss = model(ids[None, :20], labels=ids[None, :20]).loss.item()  # mean over 19 tokens
    res = perplexity(model, ids[:20], seq_len=20, progress=False)
    assert res.nll == pytest.approx(hf_loss, rel=1e-5)
    # sliding windows ask the model for fewer logits (logits_to_keep); compare with full logits
    with torch.no_grad():
        full = torch.log_softmax(model(ids[None, 8:24]).logits[0].float(), -1)  # window [8,24)
    sliding = perplexity(model, ids[:24], seq_len=16, stride=8, progress=False)
    with torch.no_grad():
        first = torch.log_softmax(model(ids[None, :16]).logits[0].float(), -1)
    nll = -sum(first[t - 1, ids[t]] for t in range(1, 16)) - sum(full[t - 9, ids[t]] for t in range(16, 24))
    assert sliding.num_tokens == 23
    assert sliding.nll == pytest.approx(float(nll) / 23, rel=1e-5)


def test_invalid_arguments_raise_clear_errors():
    model = UniformLM(4)
    with pytest.raises(DataError, match="1-D"):
        perplexity(model, torch.zeros(2, 5, dtype=torch.long), progress=False)
    with pytest.raises(DataError, match="at least 2"):
        perplexity(model, torch.tensor([1]), progress=False)
    with pytest.raises(ConfigError, match="stride"):
        perplexity(model, CORPUS, seq_len=4, stride=0, progress=False)
    with pytest.raises(ConfigError, match="seq_len"):
        perplexity(model, CORPUS, seq_len=1, progress=False)
    with pytest.raises(DataError, match="integer"):
        perplexity(model, CORPUS.float(), progress=False)


def test_compare_perplexity_drops():
    ref = PerplexityResult(perplexity=20.0, nll=math.log(20.0), num_tokens=100, num_windows=2, seq_len=64, stride=64)
    q = PerplexityResult(perplexity=21.0, nll=math.log(21.0), num_tokens=100, num_windows=2, seq_len=64, stride=64)
    cmp = compare_perplexity(ref, q)
    assert cmp["abs_drop"] == pytest.approx(1.0)
    assert cmp["rel_drop"] == pytest.approx(0.05)
    assert cmp["nll_delta"] == pytest.approx(math.log(21.0 / 20.0))
    other = PerplexityResult(21.0, math.log(21.0), 90, 2, 64, 64)
    with pytest.raises(ConfigError, match="num_tokens"):
        compare_perplexity(ref, other)


@settings(max_examples=200, deadline=None)
@given(num_ids=st.integers(2, 300), seq_len=st.integers(2, 40), stride_frac=st.floats(0.01, 1.0), bos=st.booleans())
def test_every_token_is_scored_at_most_once_and_windows_have_equal_length(num_ids, seq_len, stride_frac, bos):
    content = seq_len - 1 if bos else seq_len
    if content < 1:
        return
    stride = max(1, int(content * stride_frac))
    windows = _plan_windows(num_ids, content, stride)
    counts = [0] * num_ids
    for w in windows:
        assert w.end - w.begin == min(content, num_ids)  # full-length windows (batching needs it)
        for i, scored in zip(range(w.begin, w.end), _scored_mask(w, bos).tolist()):
            counts[i] += scored
    assert max(counts) == 1
    assert windows[-1].end == num_ids
    if bos or stride < content:
        # with BOS every token has context; sliding windows give every token after the first one
        assert counts == [1] * num_ids if bos else counts == [0] + [1] * (num_ids - 1)
    else:
        # non-overlapping without BOS: only the first token of each non-tail window lacks context
        starts = {w.begin for w in windows if w.begin == w.score_from}
        assert [i for i, c in enumerate(counts) if c == 0] == sorted(starts)
