"""Task accuracy: multiple-choice log-likelihood scoring, classification, zero-shot topics.

:func:`multiple_choice` follows the lm-evaluation-harness recipe: for every choice, the
continuation tokens are scored given the context (``sum log p(continuation | context)``); the
prediction is the choice with the highest total log-likelihood (``acc``) or the highest
log-likelihood per byte of the continuation string (``acc_norm``). Ties go to the first choice.

Accuracies are computed with the ``evaluate`` library through the metric script shipped in
:mod:`hfptq.evaluation.metrics` (no Hub access needed).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch

from hfptq.errors import ConfigError, DataError
from hfptq.evaluation._utils import (
    extract_logits,
    forward_logits,
    model_device,
    progress_bar,
    tokenizer_adds_bos,
)
from hfptq.evaluation.metrics import load_metric

logger = logging.getLogger(__name__)


def accuracy_score(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Accuracy of ``predictions`` against ``references`` via the shipped ``evaluate`` metric.

    Example:
        >>> accuracy_score([1, 0, 1, 1], [1, 1, 1, 0])
        0.5
    """
    if len(predictions) != len(references):
        raise DataError(
            f"predictions and references differ in length ({len(predictions)} vs {len(references)})"
        )
    if not predictions:
        raise DataError("no examples to score: pass at least one example")
    result = load_metric("accuracy").compute(
        predictions=[int(p) for p in predictions], references=[int(r) for r in references]
    )
    return float(result["accuracy"])


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(map(int, ids)) for ids in out]


def _validate_examples(examples: list[dict]) -> None:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise DataError("examples must be a non-empty list of {'context', 'choices', 'label'} dicts")
    for i, ex in enumerate(examples):
        missing = [k for k in ("context", "choices", "label") if k not in ex]
        if missing:
            raise DataError(
                f"example {i} lacks the key(s) {missing}; each example needs 'context' (str), "
                "'choices' (list of str) and 'label' (int index into choices)"
            )
        choices = ex["choices"]
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise DataError(f"example {i}: 'choices' must be a list of at least 2 strings (got {choices!r})")
        label = ex["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise DataError(
                f"example {i}: 'label' must be an int in [0, {len(choices) - 1}] (got {label!r})"
            )


def _max_model_length(model: torch.nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: list[tuple[str, str]],
    *,
    batch_size: int,
    add_bos: Optional[bool],
    max_length: Optional[int],
    progress: bool,
    desc: str,
) -> list[float]:
    """``log p(continuation | context)`` for each ``(context, continuation)`` request."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is None:
        raise ConfigError("add_bos=True but the tokenizer has no bos_token_id; pass add_bos=False")
    # A context that tokenizes to nothing still needs one position to predict from.
    fallback_prefix = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)  # right padding is masked out: any id works
    max_length = max_length or _max_model_length(model)

    # Like lm-eval: trailing spaces of the context belong to the continuation.
    pairs = []
    for context, continuation in requests:
        stripped = context.rstrip(" ")
        pairs.append((stripped, context[len(stripped) :] + continuation))
    context_ids = _encode(tokenizer, [c for c, _ in pairs])
    whole_ids = _encode(tokenizer, [c + k for c, k in pairs])

    sequences: list[tuple[list[int], int]] = []  # (model tokens incl. the last target, #continuation)
    for i, ((context, continuation), ctx, whole) in enumerate(zip(pairs, context_ids, whole_ids)):
        cont = whole[len(ctx) :]
        if not cont:
            raise DataError(
                f"request {i}: the continuation {continuation!r} produces no tokens after the context; "
                "choices must be non-empty strings"
            )
        prefix = [int(bos)] if add_bos else []
        if not ctx and not prefix:
            if fallback_prefix is None:
                raise DataError(
                    f"request {i}: empty context and the tokenizer has neither BOS nor EOS to condition on"
                )
            prefix = [int(fallback_prefix)]
        full = prefix + ctx + cont
        if max_length is not None and len(full) - 1 > max_length:
            if len(cont) > max_length:
                raise DataError(
                    f"request {i}: the continuation has {len(cont)} tokens, more than the model's "
                    f"max_length={max_length}"
                )
            full = full[-(max_length + 1) :]  # keep the most recent context (lm-eval does the same)
        sequences.append((full, len(cont)))

    # Longest first: padding stays small and an out-of-memory error shows up on the first batch.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    results = [0.0] * len(sequences)
    device = model_device(model)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in progress_bar(batches, enabled=progress, desc=desc, unit="batch"):
                # The last token is only a target: feed full[:-1].
                inputs = [sequences[i][0][:-1] for i in batch]
                width = max(len(x) for x in inputs)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, x in enumerate(inputs):
                    # Right padding: causal attention means real tokens never see the padding.
                    ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
                    mask[row, : len(x)] = 1
                first_needed = min(len(x) - sequences[i][1] for x, i in zip(inputs, batch))
                logits = forward_logits(
                    model, ids.to(device), attention_mask=mask.to(device), logits_to_keep=width - first_needed
                )
                start = width - logits.shape[1]
                for row, i in enumerate(batch):
                    full, n_cont = sequences[i]
                    n = len(full) - 1
                    # logits position j predicts token j + 1: the continuation is predicted by
                    # positions n - n_cont .. n - 1 (a slice: no copy of the vocab-wide logits).
                    targets = torch.tensor(full[-n_cont:], dtype=torch.long, device=logits.device)
                    logprobs = torch.log_softmax(logits[row, n - n_cont - start : n - start].float(), dim=-1)
                    results[i] = float(logprobs.gather(1, targets[:, None]).sum())
    finally:
        model.train(was_training)
    return results


def multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list[dict],
    *,
    batch_size: int = 8,
    progress: bool = True,
    add_bos: Optional[bool] = None,
    max_length: Optional[int] = None,
) -> dict:
    """Zero-shot multiple-choice accuracy by log-likelihood (lm-evaluation-harness style).

    Args:
        model: a causal LM (float or quantized).
        tokenizer: its tokenizer (``tokenizer(texts, add_special_tokens=False)["input_ids"]`` is
            used, plus ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``).
        examples: ``{"context": str, "choices": [str, ...], "label": int}`` dicts. Continuations
            are scored as given: include the leading space (``" " + answer``).
        batch_size: sequences (example x choice) per forward pass.
        progress: show a progress bar.
        add_bos: prepend BOS to every sequence; ``None`` asks ``hfptq.data.wants_bos``.
        max_length: truncate the context from the left beyond this many positions (default:
            the model's ``max_position_embeddings``).

    Returns:
        ``{"acc", "acc_norm", "num_examples", "predictions", "predictions_norm",
        "loglikelihoods"}``; ``acc_norm`` picks the choice with the highest log-likelihood per
        UTF-8 byte of the continuation; ``loglikelihoods`` is one list of per-choice sums per
        example.

    Example:
        >>> rows = load_piqa("validation", limit=200, seed=0)  # hfptq.data
        >>> res = multiple_choice(model, tokenizer, piqa_examples(rows))
        >>> res["acc"], res["acc_norm"]
    """
    _validate_examples(examples)
    requests = [(ex["context"], choice) for ex in examples for choice in ex["choices"]]
    lls = _loglikelihoods(
        model, tokenizer, requests, batch_size=batch_size, add_bos=add_bos, max_length=max_length,
        progress=progress, desc="multiple choice",
    )
    per_example: list[list[float]] = []
    predictions: list[int] = []
    predictions_norm: list[int] = []
    k = 0
    for ex in examples:
        n = len(ex["choices"])
        scores = lls[k : k + n]
        k += n
        per_example.append(scores)
        predictions.append(max(range(n), key=lambda j: (scores[j], -j)))
        normed = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, ex["choices"])]
        predictions_norm.append(max(range(n), key=lambda j: (normed[j], -j)))
    labels = [int(ex["label"]) for ex in examples]
    return {
        "acc": accuracy_score(predictions, labels),
        "acc_norm": accuracy_score(predictions_norm, labels),
        "num_examples": len(examples),
        "predictions": predictions,
        "predictions_norm": predictions_norm,
        "loglikelihoods": per_example,
    }


def piqa_examples(rows: list[dict]) -> list[dict]:
    """Turn PIQA rows ``{"goal", "sol1", "sol2", "label"}`` into :func:`multiple_choice` examples.

    Uses the lm-evaluation-harness prompt: context ``"Question: {goal}\\nAnswer:"``, choices
    ``[" " + sol1, " " + sol2]``.

    Example:
        >>> piqa_examples([{"goal": "Open a jar", "sol1": "twist", "sol2": "pull", "label": 0}])
        [{'context': 'Question: Open a jar\\nAnswer:', 'choices': [' twist', ' pull'], 'label': 0}]
    """
    examples = []
    for i, row in enumerate(rows):
        missing = [k for k in ("goal", "sol1", "sol2", "label") if k not in row]
        if missing:
            raise DataError(f"PIQA row {i} lacks {missing}; expected keys goal, sol1, sol2, label")
        examples.append(
            {
                "context": f"Question: {row['goal']}\nAnswer:",
                "choices": [" " + row["sol1"], " " + row["sol2"]],
                "label": int(row["label"]),
            }
        )
    return examples


def _check_labels(texts: list[str], labels: list[int]) -> None:
    if len(texts) != len(labels):
        raise DataError(f"texts and labels differ in length ({len(texts)} vs {len(labels)})")
    if not texts:
        raise DataError("no examples to score: texts is empty")


def classify(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    labels: list[int],
    *,
    batch_size: int = 16,
    max_length: int = 256,
    progress: bool = True,
) -> dict:
    """Accuracy of a ``*ForSequenceClassification`` model: prediction = argmax of the logits.

    Texts are truncated to ``max_length`` tokens and padded per batch (the tokenizer needs a
    pad token when ``batch_size > 1``).

    Returns:
        ``{"accuracy", "num_examples", "predictions"}``.

    Example:
        >>> rows, names = load_ag_news("test", limit=500, seed=0)  # hfptq.data
        >>> classify(model, tokenizer, [r["text"] for r in rows], [r["label"] for r in rows])["accuracy"]
    """
    _check_labels(texts, labels)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
    if batch_size > 1 and getattr(tokenizer, "pad_token_id", None) is None:
        raise ConfigError(
            "the tokenizer has no pad token, so batch_size > 1 cannot pad; set "
            "tokenizer.pad_token (and model.config.pad_token_id) or pass batch_size=1"
        )
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is not None:
        bad = [l for l in labels if not 0 <= int(l) < num_labels]
        if bad:
            raise DataError(f"labels must be in [0, {num_labels - 1}] (model.config.num_labels); got {bad[:5]}")
    device = model_device(model)
    predictions: list[int] = []
    batches = [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in progress_bar(batches, enabled=progress, desc="classify", unit="batch"):
                enc = tokenizer(
                    [texts[i] for i in batch],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                enc = {k: v.to(device) for k, v in enc.items()}
                logits = extract_logits(model(**enc))
                if logits.dim() != 2:
                    raise ConfigError(
                        f"classify needs a sequence-classification model returning [batch, num_labels] "
                        f"logits (got shape {tuple(logits.shape)}); for a causal LM use zero_shot_classify"
                    )
                predictions.extend(int(p) for p in logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    return {
        "accuracy": accuracy_score(predictions, [int(l) for l in labels]),
        "num_examples": len(texts),
        "predictions": predictions,
    }


def zero_shot_classify(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    labels: list[int],
    label_names: list[str],
    *,
    template: str = "{text}\nTopic:",
    batch_size: int = 8,
    progress: bool = True,
    add_bos: Optional[bool] = None,
) -> dict:
    """Zero-shot classification with a causal LM: the label whose name is most likely wins.

    Every text becomes the context ``template.format(text=text)``; each class is the
    continuation ``" " + label_name``; the class with the highest total log-likelihood is the
    prediction (``accuracy``), or with the highest log-likelihood per byte (``accuracy_norm``).

    Returns:
        ``{"accuracy", "accuracy_norm", "num_examples", "predictions", "predictions_norm"}``.

    Example:
        >>> rows, names = load_ag_news("test", limit=200, seed=0)  # hfptq.data
        >>> zero_shot_classify(model, tok, [r["text"] for r in rows], [r["label"] for r in rows], names)
    """
    _check_labels(texts, labels)
    if "{text}" not in template:
        raise ConfigError(f"template must contain the '{{text}}' placeholder (got {template!r})")
    if len(label_names) < 2:
        raise ConfigError(f"label_names needs at least 2 classes (got {label_names!r})")
    examples = [
        {"context": template.format(text=t), "choices": [" " + n for n in label_names], "label": int(l)}
        for t, l in zip(texts, labels)
    ]
    res = multiple_choice(model, tokenizer, examples, batch_size=batch_size, progress=progress, add_bos=add_bos)
    return {
        "accuracy": res["acc"],
        "accuracy_norm": res["acc_norm"],
        "num_examples": res["num_examples"],
        "predictions": res["predictions"],
        "predictions_norm": res["predictions_norm"],
    }
