"""Evaluation: what quantization cost (perplexity, task accuracy, size, latency, layer error, report).

Every function takes a model (float or quantized, any ``transformers`` model run through its
normal forward) and token ids or examples; dataset loading lives in :mod:`hfptq.data`.

Example:
    >>> from hfptq.evaluation import perplexity, model_size, QualityReport
    >>> report = QualityReport("google/gemma-3-270m")
    >>> report.set_perplexity(perplexity(model, ids), perplexity(qmodel, ids), dataset="wikitext-2")
    >>> report.set_size(model_size(model), model_size(qmodel))
    >>> print(report.console_summary()); report.save("out/report")
"""
from hfptq.evaluation.accuracy import (
    accuracy_score,
    classify,
    multiple_choice,
    piqa_examples,
    zero_shot_classify,
)
from hfptq.evaluation.latency import measure_latency, peak_rss_bytes, reset_peak_rss
from hfptq.evaluation.layer_error import layer_errors, sensitivity_from_losses, sensitivity_scan, sqnr
from hfptq.evaluation.metrics import load_metric
from hfptq.evaluation.perplexity import PerplexityResult, compare_perplexity, perplexity
from hfptq.evaluation.report import SCHEMA_VERSION, QualityReport
from hfptq.evaluation.size import checkpoint_bytes, format_bytes, model_size

__all__ = [
    "PerplexityResult",
    "QualityReport",
    "SCHEMA_VERSION",
    "accuracy_score",
    "checkpoint_bytes",
    "classify",
    "compare_perplexity",
    "format_bytes",
    "layer_errors",
    "load_metric",
    "measure_latency",
    "model_size",
    "multiple_choice",
    "peak_rss_bytes",
    "perplexity",
    "piqa_examples",
    "reset_peak_rss",
    "sensitivity_from_losses",
    "sensitivity_scan",
    "sqnr",
    "zero_shot_classify",
]
