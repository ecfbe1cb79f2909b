# Copyright hfptq contributors. Licensed under the Apache License, Version 2.0.
"""Accuracy metric shipped with hfptq so that ``evaluate.load`` never needs the Hub.

Written for hfptq following the structure of an ``evaluate`` metric script (module-level
description strings and one ``evaluate.Metric`` subclass). It has no scikit-learn dependency.
Loaded by :func:`hfptq.evaluation.metrics.load_metric` with
``evaluate.load("<this folder>")``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among the examples scored:
    accuracy = (number of predictions equal to their reference) / (number of examples)
With `sample_weight`, each example counts with its weight instead of 1. With
`normalize=False`, the (weighted) number of correct predictions is returned instead of the
proportion.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels, aligned with `predictions`.
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; if
        `False`, the (weighted) count of correct predictions.
    sample_weight (`list` of `float`, optional): one non-negative weight per example.

Returns:
    accuracy (`float`): in [0, 1] when `normalize=True`; a count otherwise.

Examples:
    >>> import evaluate
    >>> metric = evaluate.load("hfptq/evaluation/metrics/accuracy")  # the folder of this script
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and
          Grisel, O. and Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and
          Vanderplas, J. and Passos, A. and Cournapeau, D. and Brucher, M. and Perrot, M. and
          Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to their reference label."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://en.wikipedia.org/wiki/Accuracy_and_precision"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions and references must have the same length "
                f"(got {predictions.shape[0]} and {references.shape[0]})"
            )
        if predictions.size == 0:
            raise ValueError("accuracy of zero examples is undefined: pass at least one prediction")
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            weights = np.ones_like(correct)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != correct.shape:
                raise ValueError(
                    f"sample_weight must have one weight per example "
                    f"(got {weights.shape[0]} weights for {correct.shape[0]} examples)"
                )
            if np.any(weights < 0):
                raise ValueError("sample_weight must be non-negative")
        hits = float(np.sum(correct * weights))
        if not normalize:
            return {"accuracy": hits}
        total = float(np.sum(weights))
        if total == 0.0:
            raise ValueError("sample_weight sums to zero: accuracy is undefined")
        return {"accuracy": hits / total}
