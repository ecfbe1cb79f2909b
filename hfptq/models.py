"""Compatibility alias: the offline model helpers live in :mod:`hfptq.offline.models`.

``hfptq.models`` *is* that module (same object), so ``monkeypatch.setattr(hfptq.models, ...)`` and
``from hfptq.models import gemma3_270m_path`` keep working.

Example:
    >>> import hfptq.models, hfptq.offline.models
    >>> hfptq.models is hfptq.offline.models
    True
"""
import sys

from .offline import models as _models

sys.modules[__name__] = _models
