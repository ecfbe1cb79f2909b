import math
import socket
import sys

import pytest
import torch

from hfptq.errors import ConfigError, DataError
from hfptq.evaluation.accuracy import (
    accuracy_score,
    classify,
    multiple_choice,
    piqa_examples,
    zero_shot_classify,
)
from hfptq.evaluation.metrics import available_metrics, load_metric, metric_path

from .toys import CharTokenizer, PrefixSumLM, UnigramLM, prefix_logits, tiny_llama, word_tokenizer


def _unigram_probs() -> torch.Tensor:
    """p(' ') = 0.1, p('x') = 0.3, p('y') = 0.01, the rest spread uniformly."""
    probs = torch.zeros(128)
    probs[ord(" ")], probs[ord("x")], probs[ord("y")] = 0.1, 0.3, 0.01
    rest = [i for i in range(3, 128) if probs[i] == 0]
    probs[rest] = (1.0 - probs.sum()) / len(rest)
    return probs


# ------------------------------------------------------------------------------ evaluate metric
def test_accuracy_metric_is_loaded_from_the_package_through_evaluate(monkeypatch):
    import evaluate

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    load_metric.cache_clear()
    metric = load_metric("accuracy")
    assert isinstance(metric, evaluate.Metric)
    assert metric_path("accuracy").name == "accuracy"
    assert (metric_path("accuracy") / "accuracy.py").is_file()
    assert "accuracy" in available_metrics()
    assert load_metric("accuracy") is metric  # cached
    # 3 of 4 right; weighted: (1 + 1 + 0) / (1 + 1 + 2)
    assert metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])["accuracy"] == 0.75
    weighted = metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], sample_weight=[1, 1, 2])
    assert weighted["accuracy"] == pytest.approx(0.5)
    count = metric.compute(predictions=[2, 2, 1], references=[2, 2, 2], normalize=False)
    assert count["accuracy"] == 2.0


def test_missing_evaluate_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "evaluate", None)
    load_metric.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install evaluate"):
            load_metric("accuracy")
    finally:
        load_metric.cache_clear()


def test_unknown_metric_names_the_available_ones():
    with pytest.raises(ConfigError, match="accuracy"):
        load_metric("acuracy")


def test_accuracy_score_of_known_predictions():
    assert accuracy_score([1, 0, 2, 2, 1], [1, 1, 2, 0, 1]) == pytest.approx(3 / 5)
    assert accuracy_score([0] * 7, [0] * 7) == 1.0
    with pytest.raises(DataError, match="length"):
        accuracy_score([0, 1], [0])


# ------------------------------------------------------------------------------ multiple choice
def test_acc_and_acc_norm_differ_as_computed_by_hand():
    probs = _unigram_probs()
    lp = {c: math.log(float(probs[ord(c)])) for c in " xy"}
    # " xxxx": total log p = lp[' '] + 4 lp['x'] = -7.12 (5 bytes, -1.42/byte)
    # " y":    total log p = lp[' '] + lp['y']   = -6.91 (2 bytes, -3.45/byte)
    long_ll, short_ll = lp[" "] + 4 * lp["x"], lp[" "] + lp["y"]
    assert short_ll > long_ll and long_ll / 5 > short_ll / 2  # the premise of the test
    examples = [
        {"context": "Q: a?", "choices": [" xxxx", " y"], "label": 0},  # acc wrong, acc_norm right
        {"context": "Q: b?", "choices": [" y", " xxxx"], "label": 0},  # acc right, acc_norm wrong
        {"context": "Q: c?", "choices": [" xxxx", " y"], "label": 0},  # acc wrong, acc_norm right
        # " x": -3.51 total, -1.75/byte; " xx": -4.71 total, -1.57/byte -> acc picks 0, acc_norm 1
        {"context": "Q: d?", "choices": [" x", " xx", " y"], "label": 1},
    ]
    res = multiple_choice(UnigramLM(probs), CharTokenizer(), examples, batch_size=3, add_bos=True, progress=False)
    assert res["predictions"] == [1, 0, 1, 0]
    assert res["predictions_norm"] == [0, 1, 0, 1]
    assert res["acc"] == pytest.approx(1 / 4)
    assert res["acc_norm"] == pytest.approx(3 / 4)
    assert res["num_examples"] == 4
    assert res["loglikelihoods"][0] == pytest.approx([long_ll, short_ll], rel=1e-5)


def _expected_ll(context: str, continuation: str, bos: bool) -> float:
    tokens = ([1] if bos else []) + [ord(c) for c in context + continuation]
    n_cont = len(continuation)
    total = 0.0
    for i in range(len(tokens) - n_cont, len(tokens)):
        total += float(torch.log_softmax(prefix_logits(tokens[:i], 128), -1)[tokens[i]])
    return total


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("bos", [True, False])
def test_only_continuation_tokens_are_scored_given_the_full_context(batch_size, bos):
    examples = [
        {"context": "Question: lift?\nAnswer:", "choices": [" up", " down low"], "label": 1},
        {"context": "Hi", "choices": [" a", " bb", " ccc"], "label": 2},
        {"context": "Longer context here", "choices": [" z", " zz"], "label": 0},
    ]
    model = PrefixSumLM(128)
    res = multiple_choice(model, CharTokenizer(), examples, batch_size=batch_size, add_bos=bos, progress=False)
    for ex, lls in zip(examples, res["loglikelihoods"]):
        assert lls == pytest.approx([_expected_ll(ex["context"], c, bos) for c in ex["choices"]], rel=1e-5)


def test_trailing_context_space_moves_to_the_continuation():
    model = PrefixSumLM(128)
    a = multiple_choice(model, CharTokenizer(), [{"context": "Answer: ", "choices": ["x", "y"], "label": 0}],
                        add_bos=True, progress=False)
    b = multiple_choice(model, CharTokenizer(), [{"context": "Answer:", "choices": [" x", " y"], "label": 0}],
                        add_bos=True, progress=False)
    assert a["loglikelihoods"] == b["loglikelihoods"]


def test_bos_default_follows_the_tokenizer(monkeypatch):
    # Without hfptq.data the fallback rule is used: BOS iff the tokenizer adds it itself.
    monkeypatch.setitem(sys.modules, "hfptq.data", None)
    model = PrefixSumLM(128)
    ex = [{"context": "Hi", "choices": [" a", " b"], "label": 0}]
    with_bos = multiple_choice(model, CharTokenizer(add_bos=True), ex, progress=False)
    without = multiple_choice(model, CharTokenizer(add_bos=False), ex, progress=False)
    assert with_bos["loglikelihoods"][0] == pytest.approx([_expected_ll("Hi", c, True) for c in (" a", " b")], rel=1e-5)
    assert without["loglikelihoods"][0] == pytest.approx([_expected_ll("Hi", c, False) for c in (" a", " b")], rel=1e-5)


def test_batched_padding_matches_single_sequences_on_a_real_model():
    model = tiny_llama(vocab_size=64)
    tok = word_tokenizer([f"w{i}" for i in range(60)])
    examples = [
        {"context": "w1 w2 w3 w4 w5 w6", "choices": [" w7", " w8 w9 w10"], "label": 0},
        {"context": "w11", "choices": [" w12 w13", " w14"], "label": 1},
        {"context": "w20 w21 w22", "choices": [" w30", " w31", " w32 w33 w34 w35"], "label": 2},
    ]
    batched = multiple_choice(model, tok, examples, batch_size=7, add_bos=True, progress=False)
    single = multiple_choice(model, tok, examples, batch_size=1, add_bos=True, progress=False)
    for a, b in zip(batched["loglikelihoods"], single["loglikelihoods"]):
        assert a == pytest.approx(b, abs=1e-4)
    # independent reference: full forward of [bos] + context + choice, sum of continuation log-probs
    ids = [1] + tok("w11 w12 w13", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    ref = float(logp[-3, ids[-2]] + logp[-2, ids[-1]])
    assert single["loglikelihoods"][1][0] == pytest.approx(ref, abs=1e-4)


def test_invalid_examples_raise_data_errors():
    model, tok = UnigramLM(_unigram_probs()), CharTokenizer()
    with pytest.raises(DataError, match="label"):
        multiple_choice(model, tok, [{"context": "a", "choices": [" b", " c"], "label": 2}], progress=False)
    with pytest.raises(DataError, match="choices"):
        multiple_choice(model, tok, [{"context": "a", "choices": [" b"], "label": 0}], progress=False)
    with pytest.raises(DataError, match="lacks"):
        multiple_choice(model, tok, [{"context": "a", "label": 0}], progress=False)
    with pytest.raises(DataError, match="non-empty"):
        multiple_choice(model, tok, [{"context": "a", "choices": ["", " c"], "label": 0}], add_bos=True, progress=False)


def test_piqa_examples_use_the_lm_eval_prompt():
    rows = [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Pull the lid.", "label": 1}]
    assert piqa_examples(rows) == [
        {"context": "Question: Open a jar\nAnswer:", "choices": [" Twist the lid.", " Pull the lid."], "label": 1}
    ]
    with pytest.raises(DataError, match="sol2"):
        piqa_examples([{"goal": "g", "sol1": "a", "label": 0}])


# ------------------------------------------------------------------------------ classification
class _FirstTokenClassifier(torch.nn.Module):
    """Predicts ``input_ids[:, 0] % 3``; records the attention masks it saw."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"num_labels": 3})()
        self.masks = []

    def forward(self, input_ids, attention_mask=None):
        self.masks.append(attention_mask)
        return type("O", (), {"logits": torch.nn.functional.one_hot(input_ids[:, 0] % 3, 3).float()})()


def test_classify_argmax_and_accuracy_by_hand():
    words = [f"w{i}" for i in range(12)]
    tok = word_tokenizer(words)  # ids: w0 -> 4, w1 -> 5, ...
    texts = ["w0 w1", "w1", "w2 w2 w2", "w3", "w5 w0"]
    # first ids 4, 5, 6, 7, 9 -> predictions 1, 2, 0, 1, 0
    labels = [1, 2, 2, 1, 1]
    model = _FirstTokenClassifier()
    res = classify(model, tok, texts, labels, batch_size=2, progress=False)
    assert res["predictions"] == [1, 2, 0, 1, 0]
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert res["num_examples"] == 5
    assert model.masks[0].tolist() == [[1, 1], [1, 0]]  # padded batch


def test_classify_real_sequence_classifier_is_batch_invariant():
    tok = word_tokenizer([f"w{i}" for i in range(40)])
    model = tiny_llama(vocab_size=64, num_labels=4)
    texts = ["w1 w2 w3 w4 w5", "w6", "w7 w8", "w9 w10 w11", "w12 w13 w14 w15 w16 w17 w18"]
    labels = [0, 1, 2, 3, 0]
    a = classify(model, tok, texts, labels, batch_size=4, progress=False)
    b = classify(model, tok, texts, labels, batch_size=1, progress=False)
    assert a["predictions"] == b["predictions"]
    assert a["accuracy"] == pytest.approx(sum(p == l for p, l in zip(b["predictions"], labels)) / 5)
    with pytest.raises(DataError, match="num_labels"):
        classify(model, tok, texts, [0, 1, 2, 3, 4], progress=False)
    with pytest.raises(DataError, match="length"):
        classify(model, tok, texts, [0], progress=False)


def test_zero_shot_classify_picks_the_most_likely_label_name():
    probs = _unigram_probs()
    lp = {c: math.log(float(probs[ord(c)])) for c in " xyz"}
    # label names "xxxx" and "y": totals as in the multiple-choice test; "z" is uniform-ish mass
    names = ["xxxx", "y", "zz"]
    totals = [lp[" "] + 4 * lp["x"], lp[" "] + lp["y"], lp[" "] + 2 * lp["z"]]
    normed = [t / (len(n) + 1) for t, n in zip(totals, names)]
    pred = max(range(3), key=lambda i: totals[i])
    pred_norm = max(range(3), key=lambda i: normed[i])
    assert pred != pred_norm
    res = zero_shot_classify(UnigramLM(probs), CharTokenizer(), ["t one", "t two"], [pred, pred_norm], names,
                             add_bos=True, progress=False)
    assert res["predictions"] == [pred, pred]
    assert res["predictions_norm"] == [pred_norm, pred_norm]
    assert res["accuracy"] == pytest.approx(0.5) and res["accuracy_norm"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="text"):
        zero_shot_classify(UnigramLM(probs), CharTokenizer(), ["a"], [0], names, template="no placeholder")
