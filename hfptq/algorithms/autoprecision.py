"""Compatibility re-export: automatic mixed precision is a workflow, :mod:`hfptq.workflows.autoprecision`.

Example:
    >>> from hfptq.algorithms.autoprecision import search  # same object as hfptq.workflows.autoprecision.search
"""
from ..workflows.autoprecision import *  # noqa: F401,F403
from ..workflows.autoprecision import __all__, _compose_rules, _PrefixCache, mean_nll, search  # noqa: F401
