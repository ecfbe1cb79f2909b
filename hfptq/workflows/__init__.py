"""Workflows: whole jobs composed from the library (evaluate a checkpoint, search a mixed precision).

* :func:`evaluate_checkpoint` — a saved quantized checkpoint against its float model (``hfptq eval``);
* :mod:`hfptq.workflows.autoprecision` — :func:`~hfptq.workflows.autoprecision.search`, the fewest
  modules kept in higher precision that meet a quality budget.

Recipes end to end (``hfptq run``) are :mod:`hfptq.pipeline`.

Example:
    >>> from hfptq.workflows import evaluate_checkpoint
"""
from __future__ import annotations

from .evaluate import evaluate_checkpoint

__all__ = ["evaluate_checkpoint"]
